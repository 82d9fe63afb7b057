"""A rollout engine on a transformers causal LM in this process, with its own decoding loop.

Prompts are sorted by length and decoded in chunks of `batch_size`, left-padded, with a KV cache.
Positions come from the attention mask, so a padded row gets the same positions as alone. The LM
head runs on the last position only. A row leaves the batch (and the KV cache) as soon as it
finishes, so late steps only pay for the rows still going.

Sampling draws one uniform number per row and inverts the cumulative distribution (much cheaper than
`torch.multinomial` over a large vocabulary on CPU), from a private `torch.Generator`: the same seed,
prompts and batch size give the same completions on one machine, and the global RNG is untouched.
Top-p sorts the vocabulary every step, so it costs more than top-k. Stop strings are looked for in
the decoded text of the last few tokens (the longest stop string's length plus 4), which assumes no
run of that many tokens decodes to almost nothing.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from alignkit.judges.backends import _eos_ids, left_pad
from alignkit.rollout.base import Completion, SamplingConfig


class TransformersGenerator:
    """Batched sampling from a transformers causal LM that shares its weights with the trainer."""

    def __init__(self, model, tokenizer, *, batch_size: int = 64):
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        self.model, self.tokenizer, self.batch_size = model, tokenizer, batch_size
        self.eos_ids = _eos_ids(model, tokenizer)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos_ids[0]

    def sync_weights(self, model) -> None:
        self.model = model

    def generate(self, prompts: Sequence[list[int]], sampling: SamplingConfig, seed: int) -> list[Completion]:
        if any(len(p) == 0 for p in prompts) or sampling.temperature < 0:
            raise ValueError("every prompt needs at least one token, and the temperature must be at least 0")
        device = next(self.model.parameters()).device
        rng = torch.Generator(device=device).manual_seed(seed)
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
        results: list[Completion | None] = [None] * len(prompts)
        training = self.model.training
        try:
            self.model.eval()
            with torch.inference_mode():
                for start in range(0, len(order), self.batch_size):
                    chunk = order[start:start + self.batch_size]
                    completions = self._chunk([prompts[i] for i in chunk], sampling, rng, device)
                    for i, completion in zip(chunk, completions, strict=True):
                        results[i] = completion
        finally:
            self.model.train(training)
        return results

    def _chunk(self, prompts: list[list[int]], sampling: SamplingConfig, rng, device) -> list[Completion]:
        state = _Decoding(prompts, sampling, self.eos_ids, self.tokenizer)
        ids, attention = left_pad(prompts, self.pad_id, device)
        width = ids.shape[1]
        attention = torch.cat([attention, attention.new_ones(len(prompts), sampling.max_new_tokens)], 1)
        positions = (attention[:, :width].cumsum(1) - 1).clamp(min=0)
        logits, cache = self._step(ids, attention[:, :width], positions, None)
        positions = positions[:, -1:]
        for step in range(sampling.max_new_tokens):
            tokens, logprobs = sample(logits, sampling, rng)
            keep = state.record(tokens.tolist(), logprobs.tolist(), last=step == sampling.max_new_tokens - 1)
            if not keep:
                break
            if len(keep) < len(tokens):
                index = torch.tensor(keep, device=device)
                cache.batch_select_indices(index)
                tokens, attention, positions = tokens[index], attention[index], positions[index]
            positions = positions + 1
            logits, cache = self._step(tokens[:, None], attention[:, :width + step + 1], positions, cache)
        return [state.completion(row) for row in range(len(prompts))]

    def _step(self, ids: Tensor, attention: Tensor, positions: Tensor, cache) -> tuple[Tensor, object]:
        mask = attention if not bool(attention[:, 0].all()) else None
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=cache,
                         use_cache=True, logits_to_keep=1)
        return out.logits[:, -1].float(), out.past_key_values


class _Decoding:
    """Per-prompt tokens, log-probs and finish reasons of one chunk; which batch rows are still going."""

    def __init__(self, prompts, sampling: SamplingConfig, eos_ids, tokenizer):
        self.prompts, self.sampling, self.eos_ids, self.tokenizer = prompts, sampling, set(eos_ids), tokenizer
        self.rows = list(range(len(prompts)))
        self.tokens: list[list[int]] = [[] for _ in prompts]
        self.logprobs: list[list[float]] = [[] for _ in prompts]
        self.reasons = ["length"] * len(prompts)
        self.window = max((len(s) for s in sampling.stop), default=0) + 4

    def record(self, tokens: list[int], logprobs: list[float], last: bool) -> list[int]:
        """Append one step; return the batch indices of the rows that go on."""
        keep = []
        for index, (row, token, logprob) in enumerate(zip(self.rows, tokens, logprobs, strict=True)):
            self.tokens[row].append(token)
            self.logprobs[row].append(logprob)
            if token in self.eos_ids:
                self.reasons[row] = "eos"
            elif self.sampling.stop and self._hits_stop(self.tokens[row]):
                self.reasons[row] = "stop"
            elif not last:
                keep.append(index)
        self.rows = [self.rows[i] for i in keep]
        return keep

    def _hits_stop(self, tokens: list[int]) -> bool:
        tail = self.tokenizer.decode(tokens[-self.window:], skip_special_tokens=True)
        return any(s in tail for s in self.sampling.stop)

    def completion(self, row: int) -> Completion:
        tokens, reason = self.tokens[row], self.reasons[row]
        text = self.tokenizer.decode(tokens[:-1] if reason == "eos" else tokens, skip_special_tokens=True)
        if reason == "stop":
            text = text[:min(text.find(s) + len(s) for s in self.sampling.stop if s in text)]
        return Completion(list(self.prompts[row]), tokens, text, self.logprobs[row], reason)


def sample(logits: Tensor, sampling: SamplingConfig, rng: torch.Generator) -> tuple[Tensor, Tensor]:
    """Next tokens [B] and their log softmax(logits / temperature) [B], before top-k / top-p truncation.

    Overwrites `logits`. Log-probs are read as log(softmax) at the chosen tokens: one pass over the
    vocabulary (torch's softmax is faster than its exp on CPU), exact to float32 rounding.
    """
    if sampling.temperature == 0:
        tokens = logits.argmax(-1)
        probs = logits.softmax(-1)
    else:
        probs = logits.div_(sampling.temperature).softmax(-1)
        tokens = draw(truncate(probs, sampling.top_k, sampling.top_p), rng)
    return tokens, probs.gather(1, tokens[:, None]).squeeze(1).log()


def draw(weights: Tensor, rng: torch.Generator, block: int = 256) -> Tensor:
    """One index per row with probability proportional to `weights` [B, V], by one uniform number per row.

    The number is placed in the running sums of blocks of the vocabulary, then in the running sum inside its
    block: two short cumulative sums instead of one over the whole vocabulary. An index of zero weight is
    never drawn.
    """
    block = min(block, weights.shape[1])
    rows, padding = weights.shape[0], -weights.shape[1] % block
    blocks = (torch.nn.functional.pad(weights, (0, padding)) if padding else weights).view(rows, -1, block)
    sums = blocks.sum(-1)
    ends = sums.cumsum(-1)
    target = torch.rand(rows, 1, generator=rng, device=weights.device) * ends[:, -1:]
    chosen = torch.searchsorted(ends, target, right=True).clamp_(max=ends.shape[1] - 1)
    inside = blocks[torch.arange(rows, device=weights.device), chosen[:, 0]].cumsum(-1)
    rest = (target - ends.gather(1, chosen) + sums.gather(1, chosen)).clamp_(min=0)
    rest = torch.minimum(rest, inside[:, -1:].nextafter(torch.zeros_like(rest)))
    return (chosen * block + torch.searchsorted(inside, rest, right=True)).squeeze(1)


def truncate(probs: Tensor, top_k: int, top_p: float) -> Tensor:
    """`probs` zeroed in place outside the top-k tokens, then outside the top-p nucleus of what is left."""
    if 0 < top_k < probs.shape[-1]:
        kth = probs.topk(top_k, -1).values[:, -1:]
        probs.masked_fill_(probs < kth, 0.0)
    if top_p < 1.0:
        ranked, order = probs.sort(-1, descending=True)
        mass_before = ranked.cumsum(-1).sub_(ranked).div_(ranked.sum(-1, keepdim=True))
        probs.scatter_(-1, order, ranked.masked_fill_(mass_before >= top_p, 0.0))
    return probs
