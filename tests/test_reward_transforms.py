"""PAR and log-sigmoid centring as transform steps, on responses sampled from the reference policy."""

import copy
import json
import math

import pytest
import torch

from alignkit.cli import main
from alignkit.config import ConfigError
from alignkit.data.tokenize import Encoder
from alignkit.models.tiny import TinyConfig, tiny_model, tiny_tokenizer
from alignkit.rewards.transforms import ReferenceDraw, ReferenceSampler
from alignkit.rollout import SamplingConfig, TransformersGenerator
from alignkit.sources import build_source
from alignkit.train.rl import config_from, run_rl

pytestmark = pytest.mark.usefixtures("one_torch_thread")

RULES = '''
def checksum(prompt, completion, reference):
    return float(sum(map(ord, completion)) % 17)

def picky(prompt, completion, reference):
    if completion.startswith("ok"):
        return float(len(completion))
    if prompt == "never" or sum(map(ord, completion)) % 3 == 0:
        raise ValueError("refuses to score")
    return float(sum(map(ord, completion)) % 17)
'''
SAMPLING = SamplingConfig(max_new_tokens=6)


@pytest.fixture
def rules(tmp_path):
    path = tmp_path / "rules.py"
    path.write_text(RULES)
    return path


@pytest.fixture(scope="module")
def reference():
    """A tiny model (not the default seed's) and its tokenizer."""
    return tiny_model(TinyConfig(seed=1)), tiny_tokenizer()


def sampler_for(model, tokenizer, seed: int = 3) -> ReferenceSampler:
    return ReferenceSampler(copy.deepcopy(model), tokenizer, sampling=SAMPLING, seed=seed)


def checksum(text: str) -> float:
    return float(sum(map(ord, text)) % 17)


def sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def quantile(values: list[float], q: float) -> float:
    """Linear interpolation between order statistics, by hand."""
    ordered = sorted(values)
    position = q * (len(ordered) - 1)
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (position - low) * (ordered[high] - ordered[low])


def transformed(rules, rule: str, *steps) -> dict:
    return {"kind": "transformed", "source": f"rule:{rules}:{rule}", "steps": list(steps)}


# ----- the closed forms -----
def test_par_from_a_yaml_spec_averages_sigmoid_margins_over_reference_samples(tmp_path, rules, reference):
    spec = tmp_path / "par.yaml"
    spec.write_text(f"kind: transformed\nsource: rule:{rules}:checksum\nsteps: [{{par: {{m: 4}}}}]\n")
    source = build_source(str(spec))
    source.bind_reference(sampler_for(*reference))
    prompts, completions = ["1+2=", "3+4=", "1+2="], ["3", "x7", "hello"]
    values = source.score(prompts, completions).values
    samples = source.sampler.sample(prompts, ReferenceDraw(4))
    assert samples[0] == samples[2] and len({checksum(s) for row in samples for s in row}) > 2
    expected = [sum(sigmoid(checksum(c) - checksum(s)) for s in row) / 4
                for c, row in zip(completions, samples, strict=True)]
    assert values.tolist() == pytest.approx(expected, abs=1e-6)


def test_log_sigmoid_centres_on_a_quantile_of_reference_rewards_after_earlier_steps(rules, reference):
    steps = [{"clip": {"low": 3, "high": 12}}, {"log_sigmoid": {"m": 5, "quantile": 0.7}}]
    source = build_source(transformed(rules, "checksum", *steps))
    source.bind_reference(sampler_for(*reference))
    prompts, completions = ["1+2=", "9+9="], ["3", "18!"]
    values = source.score(prompts, completions).values
    samples = source.sampler.sample(prompts, ReferenceDraw(5))
    clip = lambda r: min(max(r, 3.0), 12.0)  # noqa: E731 - the earlier step, on both sides of the margin
    expected = [math.log(sigmoid(clip(checksum(c)) - quantile([clip(checksum(s)) for s in row], 0.7)))
                for c, row in zip(completions, samples, strict=True)]
    assert values.tolist() == pytest.approx(expected, abs=1e-5)


def test_reference_rewards_are_normalised_without_teaching_the_running_normaliser(rules, reference):
    source = build_source(transformed(rules, "checksum", "running_norm", {"par": {"m": 3}}))
    source.bind_reference(sampler_for(*reference))
    completions = ["a", "bcd", "ef"]
    values = source.score(["1+1="] * 3, completions).values
    norm = source.steps[0]
    assert norm.count == 3                                  # the policy's rewards only
    raw = [checksum(c) for c in completions]
    mean = sum(raw) / 3
    std = math.sqrt(sum((r - mean) ** 2 for r in raw) / 3)
    z = lambda r: (r - mean) / (std + 1e-8)  # noqa: E731
    samples = source.sampler.sample(["1+1="], ReferenceDraw(3))[0]
    expected = [sum(sigmoid(z(r) - z(checksum(s))) for s in samples) / 3 for r in raw]
    assert values.tolist() == pytest.approx(expected, abs=1e-5)


# ----- where the reference responses come from -----
def test_reference_samples_come_from_the_reference_policy_and_are_drawn_once(reference):
    model, tokenizer = reference
    sampler = sampler_for(model, tokenizer)
    prompts = ["1+2=", "5+5="]
    first = sampler.sample(prompts, ReferenceDraw(3))
    generator = TransformersGenerator(model, tokenizer)
    for prompt, row in zip(prompts, first, strict=True):
        ids = Encoder(tokenizer).encode(prompt).prompt
        assert row == [c.text for c in generator.generate([ids] * 3, SAMPLING, sampler.seeds(prompt, 3))]
    assert sampler.generated == 6
    assert sampler.sample(prompts[::-1] + prompts, ReferenceDraw(3)) == first[::-1] + first
    assert sampler.generated == 6                           # cached per prompt
    more = sampler.sample(prompts, ReferenceDraw(5))
    assert [row[:3] for row in more] == first and sampler.generated == 10
    assert sampler_for(model, tokenizer).sample(prompts[1:], ReferenceDraw(3)) == first[1:]   # as after a resume
    assert sampler_for(tiny_model(TinyConfig(seed=2)), tokenizer).sample(prompts, ReferenceDraw(3)) != first
    greedy = sampler.sample(prompts, ReferenceDraw(2, max_new_tokens=3, temperature=0.0))
    assert all(row[0] == row[1] for row in greedy) and greedy != [row[:2] for row in first] and sampler.generated == 14


def test_reference_samples_are_scored_once_and_counted_apart(rules, reference):
    source = build_source(transformed(rules, "checksum", {"par": {"m": 4}}))
    source.bind_reference(sampler_for(*reference))
    source.score(["1+2="] * 4, ["a", "b", "c", "d"])
    source.score(["1+2=", "2+2="], ["a", "b"])
    assert (source.stats.calls, source.stats.items) == (2, 6)             # the policy's completions only
    assert (source.reference_stats.calls, source.reference_stats.items) == (2, 8)
    assert source.sampler.generated == 8


def test_failed_reference_samples_are_left_out_and_a_prompt_without_any_is_a_tie(rules, reference):
    source = build_source(transformed(rules, "picky", {"par": {"m": 8}}))
    source.bind_reference(sampler_for(*reference))
    scores = source.score(["1+2=", "never"], ["ok1", "ok22"])
    samples = source.sampler.sample(["1+2="], ReferenceDraw(8))[0]
    usable = [checksum(s) for s in samples if sum(map(ord, s)) % 3]
    assert 0 < len(usable) < 8
    assert scores.values.tolist() == pytest.approx([sum(sigmoid(3 - r) for r in usable) / len(usable), 0.5])
    assert scores.failed.tolist() == [False, True]
    assert source.stats.failures == 0 and source.reference_stats.failures == 8 + 8 - len(usable)


# ----- where no sampler can be bound -----
@pytest.mark.parametrize("step", ["par", "log_sigmoid"])
def test_a_reference_step_without_a_sampler_names_the_step(rules, step):
    source = build_source(transformed(rules, "checksum", "running_norm", step))
    assert source.needs_sampler
    with pytest.raises(ConfigError, match=f"'{step}' needs responses sampled from a reference policy"):
        source.score(["p"], ["a"])


def test_eval_rm_with_par_fails_with_the_clear_error(tmp_path, rules, capsys):
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(json.dumps({"prompt": "q", "chosen": "ab", "rejected": "a"}) + "\n")
    spec = tmp_path / "par.yaml"
    spec.write_text(json.dumps(transformed(rules, "checksum", "par")))
    assert main(["eval-rm", str(pairs), "--source", str(spec)]) == 2
    assert "'par' needs responses sampled from a reference policy" in capsys.readouterr().err


def test_one_reference_step_cannot_follow_another(rules):
    with pytest.raises(ConfigError, match="'log_sigmoid' follows another reference step"):
        build_source(transformed(rules, "checksum", "par", "log_sigmoid"))


# ----- end to end -----
def test_rl_with_par_samples_the_frozen_initial_policy(tmp_path, rules):
    model, tokenizer = tiny_model(), tiny_tokenizer()
    initial = copy.deepcopy(model.state_dict())
    cfg = config_from({
        "recipe": "grpo", "output_dir": str(tmp_path),
        "data": {"task": "arithmetic", "task_options": {"max_operand": 9}, "eval_size": 8},
        "rollout": {"max_new_tokens": 4}, "rl": {"prompts_per_step": 4, "group_size": 4},
        "train": {"steps": 2, "lr": 1e-2, "progress": False},
        "reward": transformed(rules, "checksum", {"par": {"m": 2}})})   # varies, unlike the gold reward here
    result = run_rl(cfg, model=model, tokenizer=tokenizer)
    reward = result.method.reward
    sampler = reward.sampler
    assert all(torch.equal(sampler.model.state_dict()[k], v) for k, v in initial.items())
    assert not all(torch.equal(model.state_dict()[k], v) for k, v in initial.items())   # the policy moved
    assert sampler.generated == 2 * len(sampler.cache) and 0 < len(sampler.cache) <= 8
    assert sampler.sampling.max_new_tokens == 4 and reward.stats.items == 2 * 4 * 4
    rows = [row for row in result.run.metrics() if "train/reward/mean" in row]
    assert len(rows) == 2 and all(0 < row["train/reward/mean"] < 1 for row in rows)     # PAR is in (0, 1)
    assert [row["train/reward/items"] for row in rows] == [16, 16]                     # reference samples apart
