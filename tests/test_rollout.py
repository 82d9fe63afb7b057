"""TransformersGenerator: its own decoding loop against model.generate and a full forward pass."""

from __future__ import annotations

import pytest
import torch

from alignkit.models import tiny_model, tiny_tokenizer, token_logprobs
from alignkit.rollout import GENERATORS, SamplingConfig, TransformersGenerator
from alignkit.rollout.base import prompt_seeds
from alignkit.rollout.hf import draw
from alignkit.rollout.tokens import left_pad

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TEXTS = ["hello", "a much longer prompt than the others", "x", "what is up?", "0123456789"]


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def model():
    return tiny_model(seed=0)


@pytest.fixture(scope="module")
def prompts(tokenizer):
    return [tokenizer.encode(t) for t in TEXTS]


def greedy(max_new_tokens=16, **options) -> SamplingConfig:
    return SamplingConfig(max_new_tokens=max_new_tokens, temperature=0, **options)


def test_greedy_matches_model_generate_with_left_padding(model, tokenizer, prompts):
    completions = TransformersGenerator(model, tokenizer).generate(prompts, greedy(), seed=0)
    ids, attention = left_pad(prompts, tokenizer.pad_token_id, "cpu")
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=attention, do_sample=False, max_new_tokens=16,
                             eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    for completion, reference in zip(completions, out[:, ids.shape[1]:].tolist(), strict=True):
        if tokenizer.eos_token_id in reference:
            reference = reference[:reference.index(tokenizer.eos_token_id) + 1]
        assert completion.token_ids == reference
        assert len(completion.logprobs) == len(completion.token_ids)


def forward_logprobs(model, completion, temperature: float) -> torch.Tensor:
    ids = torch.tensor([completion.prompt_ids + completion.token_ids])
    if temperature == 1:
        score = torch.zeros_like(ids)
        score[0, len(completion.prompt_ids):] = 1
        return token_logprobs(model, ids, torch.ones_like(ids), score)[0, len(completion.prompt_ids):]
    logits = model(input_ids=ids).logits[0, len(completion.prompt_ids) - 1:-1].float() / temperature
    return logits.log_softmax(-1).gather(1, ids[0, len(completion.prompt_ids):, None]).squeeze(1)


@pytest.mark.parametrize("sampling", [SamplingConfig(max_new_tokens=12),
                                      SamplingConfig(max_new_tokens=12, temperature=0.7, top_k=20, top_p=0.9),
                                      SamplingConfig(max_new_tokens=12, stop=tuple("abcdefghijklm"))],
                         ids=["plain", "tempered-truncated", "rows-leaving-early"])
def test_sampling_logprobs_match_a_full_forward_pass(model, tokenizer, prompts, sampling):
    completions = TransformersGenerator(model, tokenizer, batch_size=3).generate(prompts, sampling, seed=1)
    if sampling.stop:
        assert len({len(c) for c in completions}) > 2
    with torch.no_grad():
        for completion in completions:
            expected = forward_logprobs(model, completion, sampling.temperature)
            assert torch.allclose(torch.tensor(completion.logprobs), expected, atol=1e-5)


def test_sampling_is_reproducible_for_a_seed_and_varies_across_seeds(model, tokenizer, prompts):
    generator = TransformersGenerator(model, tokenizer, batch_size=2)
    sampling = SamplingConfig(max_new_tokens=12, temperature=1.0)
    rng_state = torch.get_rng_state()
    first, again = (generator.generate(prompts, sampling, seed=5) for _ in range(2))
    other = generator.generate(prompts, sampling, seed=6)
    assert first == again
    assert [c.token_ids for c in first] != [c.token_ids for c in other]
    assert torch.equal(torch.get_rng_state(), rng_state)


SAMPLED = SamplingConfig(max_new_tokens=12, temperature=1.0, top_k=50, stop=tuple("abcd"))   # rows leave early
SEEDS = [11, 22, 33, 44, 55]


def token_ids(completions) -> list[list[int]]:
    return [c.token_ids for c in completions]


def test_a_prompt_seed_gives_the_same_completion_alone_in_any_batch_and_order(model, tokenizer, prompts):
    generator = TransformersGenerator(model, tokenizer, batch_size=64)
    together = token_ids(generator.generate(prompts, SAMPLED, seed=SEEDS))
    alone = [generator.generate([p], SAMPLED, seed=[s])[0].token_ids for p, s in zip(prompts, SEEDS, strict=True)]
    reversed_order = token_ids(generator.generate(prompts[::-1], SAMPLED, seed=SEEDS[::-1]))[::-1]
    small_batches = token_ids(TransformersGenerator(model, tokenizer, batch_size=2).generate(prompts, SAMPLED, SEEDS))
    assert together == alone == reversed_order == small_batches
    assert len({len(t) for t in together}) > 2


def test_a_repeated_prompt_follows_its_seed(model, tokenizer, prompts):
    completions = TransformersGenerator(model, tokenizer).generate([prompts[0]] * 3, SAMPLED, seed=[7, 7, 8])
    assert completions[0] == completions[1] and completions[0].token_ids != completions[2].token_ids


def test_an_int_seed_derives_one_seed_per_prompt_position(model, tokenizer, prompts):
    generator = TransformersGenerator(model, tokenizer, batch_size=2)
    by_int = generator.generate(prompts, SAMPLED, seed=5)
    assert by_int == generator.generate(prompts, SAMPLED, seed=prompt_seeds(5, len(prompts)))
    assert token_ids(by_int) == token_ids(TransformersGenerator(model, tokenizer).generate(prompts, SAMPLED, seed=5))
    with pytest.raises(ValueError, match="one seed per prompt"):
        generator.generate(prompts, SAMPLED, seed=SEEDS[:2])


def test_lockstep_needs_torch_distributed(model, tokenizer, prompts):
    with pytest.raises(RuntimeError, match="torch.distributed"):
        TransformersGenerator(model, tokenizer, lockstep=True).generate(prompts, SAMPLED, seed=0)
    assert TransformersGenerator(model, tokenizer, lockstep=False).generate(prompts[:1], SAMPLED, seed=0)


@pytest.mark.parametrize("truncation", [{"top_k": 1}, {"top_p": 1e-6}])
def test_keeping_one_token_is_greedy(model, tokenizer, prompts, truncation):
    generator = TransformersGenerator(model, tokenizer)
    expected = generator.generate(prompts, greedy(), seed=0)
    sampled = generator.generate(prompts, SamplingConfig(max_new_tokens=16, temperature=1.0, **truncation), seed=3)
    assert [c.token_ids for c in sampled] == [c.token_ids for c in expected]
    for got, want in zip(sampled, expected, strict=True):
        assert got.logprobs == pytest.approx(want.logprobs, abs=1e-6)


def test_stop_string_ends_the_completion_at_the_token_that_completes_it(model, tokenizer, prompts):
    generator = TransformersGenerator(model, tokenizer)
    full = generator.generate(prompts[:1], greedy(), seed=0)[0]
    stop = full.text[3:5]
    cut = generator.generate(prompts[:1], greedy(stop=("never there", stop)), seed=0)[0]
    length = next(n for n in range(1, len(full.token_ids) + 1) if stop in tokenizer.decode(full.token_ids[:n]))
    assert cut.finish_reason == "stop"
    assert cut.token_ids == full.token_ids[:length]
    assert cut.text == full.text[:full.text.find(stop) + len(stop)]
    assert cut.text.endswith(stop)


def test_max_new_tokens_ends_with_length(model, tokenizer, prompts):
    completions = TransformersGenerator(model, tokenizer).generate(prompts, greedy(max_new_tokens=5), seed=0)
    assert all(c.finish_reason == "length" and len(c.token_ids) == len(c.logprobs) == 5 for c in completions)


def test_eos_is_kept_in_tokens_but_not_in_text(tokenizer, prompts):
    model = tiny_model(seed=0)
    full = TransformersGenerator(model, tokenizer).generate(prompts[:1], greedy(), seed=0)[0]
    at = next(i for i in range(1, len(full.token_ids)) if full.token_ids[i] not in full.token_ids[:i])
    model.generation_config.eos_token_id = [tokenizer.eos_token_id, full.token_ids[at]]
    ended = TransformersGenerator(model, tokenizer).generate(prompts[:1], greedy(), seed=0)[0]
    assert ended.finish_reason == "eos"
    assert ended.token_ids == full.token_ids[:at + 1]
    assert ended.text == tokenizer.decode(full.token_ids[:at])


def test_small_batches_keep_input_order_and_greedy_output(model, tokenizer, prompts):
    whole = TransformersGenerator(model, tokenizer, batch_size=64).generate(prompts, greedy(), seed=0)
    chunked = TransformersGenerator(model, tokenizer, batch_size=2).generate(prompts, greedy(), seed=0)
    assert [c.prompt_ids for c in chunked] == prompts
    assert [c.token_ids for c in chunked] == [c.token_ids for c in whole]


def test_training_mode_is_restored_and_weights_can_be_swapped(tokenizer, prompts):
    model = tiny_model(seed=0).train()
    generator = TransformersGenerator(model, tokenizer)
    generator.generate(prompts[:1], greedy(max_new_tokens=2), seed=0)
    assert model.training
    other = tiny_model(seed=1)
    generator.sync_weights(other)
    assert generator.model is other


def test_draw_follows_the_weights_and_never_picks_a_zero_weight():
    weights = torch.zeros(600)
    weights[[0, 255, 256, 300, 599]] = torch.tensor([1.0, 2.0, 3.0, 0.5, 3.5])
    uniforms = torch.rand(40_000, 1, generator=torch.Generator().manual_seed(0))
    picks = draw(weights.expand(40_000, -1).contiguous(), uniforms, block=256)
    counts = torch.bincount(picks, minlength=600).float() / len(picks)
    assert set(picks.unique().tolist()) <= {0, 255, 256, 300, 599}
    assert torch.allclose(counts, weights / weights.sum(), atol=0.01)
    edges = draw(weights.expand(2, -1).contiguous(), torch.tensor([[0.0], [1.0]]), block=256)
    assert edges.tolist() == [0, 599]
    first_block = torch.zeros(1, 600)
    first_block[0, [3, 10]] = 1.0
    assert draw(first_block, torch.tensor([[1.0]]), block=256).tolist() == [10]


def test_registered_as_transformers():
    assert GENERATORS.get("transformers").fn is TransformersGenerator
