"""The policy as its own judge (Self-Rewarding LMs, Yuan et al. arXiv 2401.10020).

`PolicyBackend` answers judge conversations with the run's rollout engine on the policy's current
weights: the chat template the policy trains with, the engine's per-prompt seeds, and, under
torchrun with a sharded policy, the engine's lockstep. `self_judge` wraps it in a `GenerativeScorer`
with the additive 5-point rubric. An unparsable judgement is failed, not retried: retries would make
ranks call the sharded model a different number of times.
"""

from __future__ import annotations

from alignkit.judges.backends import Generation
from alignkit.judges.generative import GenerativeScorer
from alignkit.rewards.base import CallStats
from alignkit.rollout import SamplingConfig


class PolicyBackend:
    def __init__(self, generator, encoder, *, seed: int = 0):
        self.generator, self.encoder, self.seed = generator, encoder, seed
        self.stats = CallStats()
        self.calls = 0

    def generate(self, conversations, *, max_tokens=256, temperature=0.0, top_logprobs=0, seed=None):
        prompts = [self.encoder.encode(messages).prompt for messages in conversations]
        self.calls += 1
        base = self.seed * 1_000_003 + self.calls if seed is None else seed
        with self.stats.timed(len(prompts)):
            completions = self.generator.generate(prompts, SamplingConfig(max_tokens, temperature), seed=base)
        return [Generation(c.text, prompt_tokens=len(c.prompt_ids), completion_tokens=len(c.token_ids),
                           finish_reason="stop" if c.finish_reason != "length" else "length") for c in completions]


def self_judge(generator, encoder, *, max_tokens: int = 64, seed: int = 0, low: int = 0, high: int = 5):
    """A reward source: the policy rates each answer with the additive rubric, greedily, once."""
    return GenerativeScorer(PolicyBackend(generator, encoder, seed=seed), template="additive", low=low, high=high,
                            max_tokens=max_tokens, on_unparsable="abstain", use_logprobs=False)
