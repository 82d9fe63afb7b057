"""A rollout engine on a transformers causal LM in this process, with its own decoding loop.

Prompts are sorted by length and decoded in chunks of `batch_size`, left-padded, with a KV cache.
Positions come from the attention mask, so a padded row gets the same positions as alone. The LM
head runs on the last position only. A row leaves the batch (and the KV cache) as soon as it
finishes, so late steps only pay for the rows still going.

Sampling draws one uniform number per row and step and inverts the cumulative distribution (much
cheaper than `torch.multinomial` over a large vocabulary on CPU). Each prompt draws from its own
`random.Random`, seeded by its seed (`seed` is one per prompt, or an int from which `prompt_seeds`
derives them), so a prompt's completion does not depend on the other prompts, their order or the
batch size (up to float rounding of the batched forward pass), nor on the device; the global RNGs
are untouched. Top-p sorts the vocabulary every step, so it costs more than top-k. Stop strings are
looked for in the decoded text of the last few tokens (the longest stop string's length plus 4),
which assumes no run of that many tokens decodes to almost nothing.

Lockstep (on by default under torch.distributed with more than one rank): with a sharded model
(FSDP2's `fully_shard`) every forward pass is a collective, so all ranks must run the same number.
The ranks agree on the number of chunks, a rank out of prompts decodes dummy chunks, and after every
step they agree whether any row is still going; a rank whose rows have all finished runs the model
on one dummy token until every rank is done. Real rows get exactly what they get without lockstep.
Every rank must call `generate` with the same `sampling`.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import Tensor

from alignkit.rollout.base import Completion, SamplingConfig, prompt_seeds
from alignkit.rollout.tokens import eos_ids, left_pad

try:
    from torch.distributed.fsdp import FSDPModule
except ImportError:  # torch before 2.6: no FSDP2 models to recognise
    FSDPModule = ()


class TransformersGenerator:
    """Batched sampling from a transformers causal LM that shares its weights with the trainer.

    lockstep: keep the decoding loops of all ranks of the default process group in step (see the
    module docstring); None turns it on when torch.distributed is initialized with several ranks.
    """

    def __init__(self, model, tokenizer, *, batch_size: int = 64, lockstep: bool | None = None):
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        self.model, self.tokenizer, self.batch_size, self.lockstep = model, tokenizer, batch_size, lockstep
        self.eos_ids = eos_ids(model, tokenizer)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos_ids[0]

    def sync_weights(self, model) -> None:
        self.model = model

    def generate(self, prompts: Sequence[list[int]], sampling: SamplingConfig,
                 seed: int | Sequence[int]) -> list[Completion]:
        """One completion per prompt, in order; `seed` is an int or one per prompt."""
        if any(len(p) == 0 for p in prompts) or sampling.temperature < 0:
            raise ValueError("every prompt needs at least one token, and the temperature must be at least 0")
        seeds = prompt_seeds(seed, len(prompts))
        device = next(self.model.parameters()).device
        peers = self._peers(device)
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
        chunks = [order[start:start + self.batch_size] for start in range(0, len(order), self.batch_size)]
        if peers is not None:   # empty chunks are dummies, run only to keep pace with the other ranks
            chunks += [[] for _ in range(peers.max(len(chunks)) - len(chunks))]
        results: list[Completion | None] = [None] * len(prompts)
        training = self.model.training
        try:
            self.model.eval()
            with _without_grad(self.model):
                for chunk in chunks:
                    completions = self._chunk([prompts[i] for i in chunk], [seeds[i] for i in chunk],
                                              sampling, device, peers)
                    for i, completion in zip(chunk, completions, strict=True):
                        results[i] = completion
        finally:
            self.model.train(training)
        return results

    def _peers(self, device) -> _Peers | None:
        """The other ranks to keep in step with, or None when not in lockstep."""
        initialized = dist.is_available() and dist.is_initialized()
        if self.lockstep is None:
            return _Peers(device) if initialized and dist.get_world_size() > 1 else None
        if self.lockstep and not initialized:
            raise RuntimeError("lockstep=True needs torch.distributed to be initialized")
        return _Peers(device) if self.lockstep else None

    def _chunk(self, prompts: list[list[int]], seeds: list[int], sampling: SamplingConfig, device,
               peers: _Peers | None) -> list[Completion]:
        """Completions of one chunk; with no prompts, a dummy chunk that only keeps pace with the peers."""
        state = _Decoding(prompts, sampling, self.eos_ids, self.tokenizer)
        rngs = [random.Random(s % 2**64) for s in seeds]
        ids, attention = left_pad(prompts or [[self.pad_id]], self.pad_id, device)
        width = ids.shape[1]
        attention = torch.cat([attention, attention.new_ones(len(ids), sampling.max_new_tokens)], 1)
        positions = (attention[:, :width].cumsum(1) - 1).clamp(min=0)
        logits, cache = self._step(ids, attention[:, :width], positions, None)
        positions = positions[:, -1:]
        for step in range(sampling.max_new_tokens):
            keep = []
            if state.rows:
                uniforms = [rngs[row].random() for row in state.rows]
                tokens, logprobs = sample(logits, sampling, uniforms)
                keep = state.record(tokens.tolist(), logprobs.tolist(), last=step == sampling.max_new_tokens - 1)
            if not _any_going(len(keep), peers):
                break
            if not keep:   # this rank is done, another is not
                self._keep_pace(device)
                continue
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

    def _keep_pace(self, device) -> None:
        """A forward pass on one dummy token without a cache: the collectives of a step, nothing else."""
        self.model(input_ids=torch.full((1, 1), self.pad_id, device=device), use_cache=False, logits_to_keep=1)


def _without_grad(model):
    """torch.inference_mode, or torch.no_grad for an FSDP2 model: FSDP2 builds its unsharded parameters on
    its first forward pass, and built as inference tensors they make every training step after fail."""
    sharded = any(isinstance(module, FSDPModule) for module in model.modules())
    return torch.no_grad() if sharded else torch.inference_mode()


def _any_going(live_rows: int, peers: _Peers | None) -> bool:
    """Whether any row is still going, on this rank or, in lockstep, on any rank."""
    return (peers.max(live_rows) if peers is not None else live_rows) > 0


class _Peers:
    """All ranks of the default process group, agreeing on counts so their decoding loops stay in step."""

    def __init__(self, device):
        # NCCL (alone or in a mixed "cpu:gloo,cuda:nccl" backend) takes device tensors; gloo takes CPU ones
        self.device = device if "nccl" in str(dist.get_backend()) else torch.device("cpu")

    def max(self, value: int) -> int:
        """The largest `value` over all ranks."""
        total = torch.tensor([value], device=self.device)
        dist.all_reduce(total, op=dist.ReduceOp.MAX)
        return int(total.item())


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


def sample(logits: Tensor, sampling: SamplingConfig, uniforms: Sequence[float]) -> tuple[Tensor, Tensor]:
    """Next tokens [B] and their log softmax(logits / temperature) [B], before top-k / top-p truncation.

    `uniforms`: one number in [0, 1) per row, what the row's draw is made from (unused when greedy).
    Overwrites `logits`. Log-probs are read as log(softmax) at the chosen tokens: one pass over the
    vocabulary (torch's softmax is faster than its exp on CPU), exact to float32 rounding.
    """
    if sampling.temperature == 0:
        tokens = logits.argmax(-1)
        probs = logits.softmax(-1)
    else:
        probs = logits.div_(sampling.temperature).softmax(-1)
        uniforms = torch.tensor(uniforms, dtype=probs.dtype).to(probs.device)[:, None]
        tokens = draw(truncate(probs, sampling.top_k, sampling.top_p), uniforms)
    return tokens, probs.gather(1, tokens[:, None]).squeeze(1).log()


def draw(weights: Tensor, uniforms: Tensor, block: int = 256) -> Tensor:
    """One index per row with probability proportional to `weights` [B, V], from `uniforms` [B, 1] in [0, 1].

    The number is placed in the running sums of blocks of the vocabulary, then in the running sum inside its
    block: two short cumulative sums instead of one over the whole vocabulary. An index of zero weight is
    never drawn.
    """
    block = min(block, weights.shape[1])
    rows, padding = weights.shape[0], -weights.shape[1] % block
    blocks = (torch.nn.functional.pad(weights, (0, padding)) if padding else weights).view(rows, -1, block)
    sums = blocks.sum(-1)
    ends = sums.cumsum(-1)
    total = ends[:, -1:]
    target = torch.minimum(uniforms * total, total.nextafter(torch.zeros_like(total)))  # rounding can reach total
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
