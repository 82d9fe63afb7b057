import pytest
import torch

from alignkit.data import Encoder, TokenizeConfig, collate
from alignkit.models import tiny_tokenizer


def test_plain_template_masks_the_prompt_and_ends_with_eos():
    tok = tiny_tokenizer(200)
    enc = Encoder(tok)
    assert enc.template == "plain"
    e = enc.encode("abc=", "xyz")
    assert tok.decode(e.prompt) == "<s>abc="
    assert tok.decode(e.completion) == "xyz</s>"
    batch = collate([e, enc.encode("a=", "b")], tok.pad_token_id)
    assert batch.input_ids.shape == (2, 9)
    assert batch.score_mask[0].tolist() == [0] * 5 + [1] * 4
    assert batch.score_mask[1].tolist() == [0, 0, 0, 1, 1, 0, 0, 0, 0]
    assert batch.attention_mask[1].sum() == 5 and batch.input_ids[1, 5:].eq(tok.pad_token_id).all()
    assert batch.lengths.tolist() == [4, 2]


def test_plain_template_renders_chat_messages_as_role_lines():
    tok = tiny_tokenizer(200)
    e = Encoder(tok).encode([{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}], "ok")
    assert tok.decode(e.prompt) == "<s>system: be brief\nuser: hi\nassistant: "


def test_chat_template_is_used_when_the_tokenizer_has_one():
    tok = tiny_tokenizer(200, chat_template=True)
    enc = Encoder(tok)
    assert enc.template == "chat"
    e = enc.encode("hi", "yo")
    assert tok.decode(e.prompt) == "<|user|>hi<|assistant|>"
    assert tok.decode(e.completion) == "yo</s>"
    with pytest.raises(ValueError, match="no chat template"):
        Encoder(tiny_tokenizer(200), TokenizeConfig(template="chat"))


def test_truncation_keeps_the_end_of_the_prompt_cuts_the_completion_and_is_counted():
    tok = tiny_tokenizer(200)
    enc = Encoder(tok, TokenizeConfig(max_length=8, max_prompt_length=4))
    e = enc.encode("abcdefgh", "123456")
    assert tok.decode(e.prompt) == "efgh"
    assert tok.decode(e.completion) == "1234"
    assert enc.truncated == 1
    enc.encode("ab", "c")
    assert enc.truncated == 1
    with pytest.raises(ValueError, match="max_prompt_length"):
        Encoder(tok, TokenizeConfig(max_length=4, max_prompt_length=4))


def test_collate_pads_right_and_keeps_dtype_long():
    tok = tiny_tokenizer(200)
    b = collate([Encoder(tok).encode("a", "b")], tok.pad_token_id)
    assert b.input_ids.dtype == torch.long and b.score_mask.dtype == torch.long


def test_a_huge_record_is_cut_before_tokenising_and_keeps_the_same_tokens():
    """A 1 MB completion: the tokenizer sees a bounded text, and the kept tokens are those the token
    limits keep from the whole text (a 10 MB record cost 4 GB when the whole text was tokenised)."""
    from alignkit.data.tokenize import CHARS_PER_TOKEN, Encoder, TokenizeConfig
    from alignkit.models.tiny import tiny_tokenizer

    tokenizer, seen = tiny_tokenizer(), []

    class Spy:   # the tokenizer, recording the length of every text it is given
        def __call__(self, text, *args, **kwargs):
            seen.append(len(text))
            return tokenizer(text, *args, **kwargs)

        def __getattr__(self, name):
            return getattr(tokenizer, name)

    cfg = TokenizeConfig(max_length=64, max_prompt_length=16, template="plain")
    huge_prompt, huge_completion = "q" * 500_000 + "=", "ab " * 350_000
    encoder = Encoder(Spy(), cfg)
    encoded = encoder.encode(huge_prompt, huge_completion)
    assert max(seen) <= CHARS_PER_TOKEN * cfg.max_length + 8 and encoder.cut_before_tokenizing == 2
    whole_prompt = tokenizer("<s>" + huge_prompt, add_special_tokens=False)["input_ids"]
    whole_completion = tokenizer(huge_completion + "</s>", add_special_tokens=False)["input_ids"]
    assert encoded.prompt == whole_prompt[-cfg.max_prompt_length:]
    assert encoded.completion == whole_completion[:cfg.max_length - cfg.max_prompt_length]
