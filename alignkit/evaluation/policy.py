"""A policy judged by a task's gold reward: its mean reward, its KL to a reference, its win rate.

All three are measured on the same completions, one sample per prompt at temperature 1 (the
distribution RL optimises), with a fixed seed so that policies are compared on equal footing:
- gold reward: the task's hidden reward of each sample, averaged; `greedy_gold` decodes greedily;
- KL to the reference: the Monte Carlo estimate E_y~pi[log pi(y|x) - log pi_ref(y|x)] (k1 on the
  policy's own samples, summed over the completion's tokens, EOS included), in nats per completion;
- win rate against a baseline's samples on the same prompts, by gold reward, ties counting half.
"""

from __future__ import annotations

import dataclasses
import statistics
from collections.abc import Callable, Sequence

import torch

from alignkit.data.tokenize import Encoded, Encoder
from alignkit.models.logprobs import completion_logprobs
from alignkit.rollout.base import Completion, SamplingConfig
from alignkit.rollout.hf import TransformersGenerator

GoldReward = Callable[[str, str], float]


@dataclasses.dataclass
class PolicySamples:
    prompts: list[str]
    completions: list[Completion]
    gold: list[float]


def sample_policy(model, tokenizer, prompts: Sequence[str], gold: GoldReward, sampling: SamplingConfig,
                  seed: int = 0) -> PolicySamples:
    encoder = Encoder(tokenizer)
    ids = [encoder.encode(p).prompt for p in prompts]
    completions = TransformersGenerator(model, tokenizer).generate(ids, sampling, seed)
    return PolicySamples(list(prompts), completions, [gold(p, c.text) for p, c in zip(prompts, completions,
                                                                                          strict=True)])


@torch.no_grad()
def kl_to_reference(samples: PolicySamples, reference, pad_id: int, batch_size: int = 64) -> float:
    """Mean over samples of sum_t log pi - log pi_ref, with log pi taken from sampling at temperature 1."""
    encoded = [Encoded(c.prompt_ids, c.token_ids) for c in samples.completions]
    policy = [sum(c.logprobs) for c in samples.completions]
    ref = []
    for start in range(0, len(encoded), batch_size):
        ref += completion_logprobs(reference, encoded[start:start + batch_size], pad_id)[0].tolist()
    return statistics.mean(p - r for p, r in zip(policy, ref, strict=True))


def win_rate(ours: Sequence[float], theirs: Sequence[float]) -> float:
    return statistics.mean(1.0 if a > b else 0.5 if a == b else 0.0 for a, b in zip(ours, theirs, strict=True))


def compare_policies(policies: dict, baseline: str, tokenizer, prompts: dict[str, Sequence[str]], gold: GoldReward,
                     *, max_new_tokens: int = 32, seed: int = 0) -> dict[str, dict[str, dict[str, float]]]:
    """`evaluate_policy` for every policy on every prompt set ({name: {prompt set: metrics}}), with
    `policies[baseline]` as both the KL reference and the win-rate baseline. The baseline is sampled
    once per prompt set; against itself its KL is 0 and its win rate 1/2 by definition."""
    reference = policies[baseline]
    results: dict = {name: {} for name in policies}
    for name_of_set, texts in prompts.items():
        metrics, samples = evaluate_policy(reference, tokenizer, texts, gold, reference=reference,
                                           max_new_tokens=max_new_tokens, seed=seed)
        results[baseline][name_of_set] = {**metrics, "kl_to_reference": 0.0, "win_rate": 0.5}
        for name, policy in policies.items():
            if name != baseline:
                results[name][name_of_set] = evaluate_policy(policy, tokenizer, texts, gold, reference=reference,
                                                             baseline=samples, max_new_tokens=max_new_tokens,
                                                             seed=seed)[0]
    return results


def evaluate_policy(model, tokenizer, prompts: Sequence[str], gold: GoldReward, *, reference,
                    baseline: PolicySamples | None = None, max_new_tokens: int = 32,
                    seed: int = 0) -> tuple[dict[str, float], PolicySamples]:
    """Gold reward (sampled and greedy), KL to `reference` and win rate against `baseline`'s samples;
    returns the metrics and the samples (the baseline for other policies)."""
    sampling = SamplingConfig(max_new_tokens=max_new_tokens, temperature=1.0)
    samples = sample_policy(model, tokenizer, prompts, gold, sampling, seed)
    greedy = sample_policy(model, tokenizer, prompts, gold, dataclasses.replace(sampling, temperature=0.0))
    out = {"gold_reward": statistics.mean(samples.gold), "greedy_gold_reward": statistics.mean(greedy.gold),
           "kl_to_reference": kl_to_reference(samples, reference, tokenizer.pad_token_id),
           "response_length": statistics.mean(len(c.token_ids) for c in samples.completions)}
    if baseline is not None:
        out["win_rate"] = win_rate(samples.gold, baseline.gold)
    return out, samples
