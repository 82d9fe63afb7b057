"""Implicit rewards: how much more a target model likes a completion than a baseline does.

`beta * (log pi_target(y|x) - log pi_baseline(y|x))`, summed over completion tokens or divided
by their number. With target = a DPO policy and baseline = its reference this is DPO's implicit
reward (Rafailov et al. 2023); with target = the SFT model and baseline = the pretrained base it
is Self-Rewarding PPO's coherent reward, placed at EOS (Zhang et al., arXiv 2510.21090).

In online RL the trainer passes the generated token ids (`tokens`), and exactly those are scored: a
completion cut at `max_new_tokens` is scored without an end-of-sequence token it never generated.
Text alone (`alignkit eval-rm`, offline use) is encoded as a finished answer, EOS included.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from alignkit.data.tokenize import Encoded, Encoder, TokenizeConfig
from alignkit.models.logprobs import completion_logprobs
from alignkit.rewards.base import CallStats, Prompt, Scores


class ImplicitReward:
    reads_tokens = True   # scores the generated token ids when the trainer passes them
    shardable = ("target", "baseline")

    def __init__(self, target, baseline, tokenizer, *, beta: float = 1.0, length_normalize: bool = False,
                 batch_size: int = 16, tokenize: TokenizeConfig | None = None):
        self.target, self.baseline, self.beta = target, baseline, beta
        self.length_normalize, self.batch_size = length_normalize, batch_size
        self.encoder = Encoder(tokenizer, tokenize)
        self.pad_id = tokenizer.pad_token_id
        self.stats = CallStats()

    @torch.no_grad()
    def score(self, prompts: Sequence[Prompt], completions: Sequence[str],
              references: Sequence[str | None] | None = None, *,
              tokens: Sequence[tuple[list[int], list[int]]] | None = None) -> Scores:
        """`tokens`: (prompt ids, completion ids) of each completion as generated, scored as they are."""
        encoded = ([Encoded(list(p), list(c)) for p, c in tokens] if tokens is not None
                   else [self.encoder.encode(p, c) for p, c in zip(prompts, completions, strict=True)])
        values = []
        with self.stats.timed(len(encoded)):
            for start in range(0, len(encoded), self.batch_size):
                chunk = encoded[start:start + self.batch_size]
                target, lengths = completion_logprobs(self.target, chunk, self.pad_id)
                baseline, _ = completion_logprobs(self.baseline, chunk, self.pad_id)
                ratio = (target - baseline.to(target.device)).cpu()
                values.append(ratio / lengths.cpu().clamp(min=1) if self.length_normalize else ratio)
        return Scores(self.beta * torch.cat(values))
