import pytest
import torch

import alignkit.models.logprobs as logprobs
from alignkit.models import (
    ModelConfig,
    ModelLoadError,
    load_model_and_tokenizer,
    naive_token_logprobs,
    sequence_logprobs,
    tiny_model,
    tiny_tokenizer,
    token_logprobs,
)


def _batch(vocab: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, vocab, (3, 12), generator=g)
    attention = torch.ones_like(ids)
    attention[2, 9:] = 0
    score = torch.zeros_like(ids)
    score[:, 5:] = 1
    score[2, 9:] = 0
    return ids, attention, score


@pytest.mark.parametrize("rows_per_chunk", [1, 4, 1000])
def test_chunked_logprobs_match_full_logits_in_value_and_gradient(monkeypatch, rows_per_chunk):
    vocab = 300
    monkeypatch.setattr(logprobs, "CHUNK_BYTES", rows_per_chunk * vocab * 4)
    model = tiny_model(vocab_size=vocab)
    ids, attention, score = _batch(vocab)
    fast = token_logprobs(model, ids, attention, score)
    slow = naive_token_logprobs(model, ids, attention, score)
    torch.testing.assert_close(fast, slow, atol=1e-5, rtol=1e-5)
    assert (fast[score == 0] == 0).all() and (fast[score == 1] < 0).all()
    weights = torch.linspace(0.5, 2.0, ids.shape[1])
    grads_fast = torch.autograd.grad((fast * weights).sum(), list(model.parameters()))
    grads_slow = torch.autograd.grad((slow * weights).sum(), list(model.parameters()))
    for a, b in zip(grads_fast, grads_slow, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_sequence_logprobs_sum_scored_tokens_only():
    model = tiny_model(vocab_size=200)
    ids, attention, score = _batch(200, seed=1)
    per_token = token_logprobs(model, ids, attention, score)
    torch.testing.assert_close(sequence_logprobs(model, ids, attention, score), per_token.sum(1))
    # Changing an unscored completion-side token after the mask changes nothing in the sum.
    ids2 = ids.clone()
    ids2[2, 10] = 7
    torch.testing.assert_close(sequence_logprobs(model, ids2, attention, score)[2],
                               sequence_logprobs(model, ids, attention, score)[2])


def test_tiny_tokenizer_round_trips_ascii_and_has_chat_template():
    tok = tiny_tokenizer(vocab_size=200, chat_template=True)
    text = "abc = 12+3\nXYZ!"
    assert tok.decode(tok(text, add_special_tokens=False)["input_ids"]) == text
    assert len(tok) == 200
    rendered = tok.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True,
                                       tokenize=False)
    assert rendered == "<|user|>hi<|assistant|>"
    with pytest.raises(ValueError, match="vocab_size"):
        tiny_tokenizer(vocab_size=10)


def test_tiny_model_is_seeded_and_sized():
    a, b = tiny_model(seed=3), tiny_model(seed=3)
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters(), strict=True))
    big = tiny_model(vocab_size=32000, hidden_size=64, intermediate_size=256)
    n = sum(p.numel() for p in big.parameters())
    assert 3.5e6 < n < 5e6


def test_load_from_local_directory_round_trip(tmp_path):
    model, tok = tiny_model(vocab_size=150, seed=5), tiny_tokenizer(150, chat_template=True)
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    loaded, loaded_tok = load_model_and_tokenizer(ModelConfig(name=str(tmp_path)))
    assert all(torch.equal(x, y) for x, y in zip(model.parameters(), loaded.parameters(), strict=True))
    assert loaded_tok.chat_template == tok.chat_template
    assert loaded_tok("ab")["input_ids"] == tok("ab")["input_ids"]


def test_load_errors_are_clear(tmp_path):
    with pytest.raises(ModelLoadError, match="local directory"):
        load_model_and_tokenizer(ModelConfig(name=str(tmp_path)))
    with pytest.raises(ModelLoadError, match="hub id"):
        load_model_and_tokenizer(ModelConfig(name="nobody/does-not-exist"))
    with pytest.raises(ValueError, match="dtype"):
        load_model_and_tokenizer(ModelConfig(name=str(tmp_path), dtype="float8"))


def test_remote_code_is_off_unless_asked(tmp_path, monkeypatch):
    import transformers

    model, tok = tiny_model(vocab_size=150), tiny_tokenizer(150)
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    seen = []
    real = transformers.AutoModelForCausalLM.from_pretrained.__func__

    def spy(cls, *args, **kwargs):
        seen.append(kwargs.get("trust_remote_code"))
        return real(cls, *args, **kwargs)

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", classmethod(spy))
    load_model_and_tokenizer(ModelConfig(name=str(tmp_path)))
    load_model_and_tokenizer(ModelConfig(name=str(tmp_path), trust_remote_code=True))
    assert seen == [False, True]
