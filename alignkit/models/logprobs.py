"""Per-token log-probabilities of given tokens, without a float32 [batch, time, vocab] tensor.

The language-model head is applied only at the positions whose next token is scored (completion
tokens), in tiles of [rows, vocabulary slice]: the forward pass keeps a running log-sum-exp over the
vocabulary slices, the backward pass recomputes each tile's softmax instead of keeping the logits.
Each tile writes its slice of the head's gradient once per block of rows, so the gradient of a large
vocabulary is not re-read for every few rows. Peak extra memory is one tile of float32 logits.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from alignkit.data.tokenize import Encoded, collate
from alignkit.distributed import forward_call

CHUNK_BYTES = 4 * 2**20  # float32 logits held at once: one tile
ROW_BLOCK = 1024  # rows per tile at most; the vocabulary slice takes the rest of CHUNK_BYTES


def _tiles(rows: int, vocab: int) -> list[tuple[slice, slice]]:
    """(rows, vocabulary slice) of every tile, the vocabulary inner."""
    height = max(1, min(rows, ROW_BLOCK))
    width = max(1, min(vocab, CHUNK_BYTES // (4 * height)))
    return [(slice(r, r + height), slice(v, v + width))
            for r in range(0, rows, height) for v in range(0, vocab, width)]


def _chunk_logits(hidden: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    logits = hidden @ weight.to(hidden.dtype).T
    if bias is not None:
        logits = logits + bias.to(hidden.dtype)
    return logits.float()


def _tile_logits(hidden: Tensor, weight: Tensor, bias: Tensor | None, rows: slice, cols: slice) -> Tensor:
    return _chunk_logits(hidden[rows], weight[cols], None if bias is None else bias[cols])


def _in_tile(targets: Tensor, cols: slice) -> tuple[Tensor, Tensor]:
    """Rows whose target falls in the vocabulary slice, and the target's column within it."""
    local = targets - cols.start
    rows = ((local >= 0) & (local < cols.stop - cols.start)).nonzero().squeeze(1)
    return rows, local[rows]


class _TokenLogprob(torch.autograd.Function):
    """log softmax(hidden @ W.T + b)[target] row by row, tiled in forward and backward.

    With `want_entropy` it also returns each row's entropy (no gradient), nearly free from the same logits.
    The backward pass runs under the forward's autocast state.
    """

    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor,
                want_entropy: bool = False) -> tuple[Tensor, Tensor]:
        n = hidden.shape[0]
        top = torch.full((n,), -torch.inf, device=hidden.device)
        total, weighted, picked = (torch.zeros(n, device=hidden.device) for _ in range(3))
        for rows, cols in _tiles(n, weight.shape[0]):
            logits = _tile_logits(hidden, weight, bias, rows, cols)
            new_top = torch.maximum(top[rows], logits.max(1).values)
            shrink = torch.exp(top[rows] - new_top)
            exp = torch.exp(logits - new_top[:, None])
            total[rows] = total[rows] * shrink + exp.sum(1)
            if want_entropy:
                weighted[rows] = weighted[rows] * shrink + (exp * logits).sum(1)
            top[rows] = new_top
            hit, column = _in_tile(targets[rows], cols)
            picked[rows][hit] = logits[hit, column]
        normaliser = top + total.log()
        entropy = normaliser - weighted / total if want_entropy else torch.zeros_like(total)
        device = hidden.device.type
        ctx.autocast = (device, torch.get_autocast_dtype(device), torch.is_autocast_enabled(device))
        ctx.save_for_backward(hidden, weight, bias, targets, normaliser)
        ctx.mark_non_differentiable(entropy)
        return picked - normaliser, entropy

    @staticmethod
    def backward(ctx, grad_out: Tensor, _grad_entropy: Tensor):
        hidden, weight, bias, targets, normaliser = ctx.saved_tensors
        device, dtype, enabled = ctx.autocast
        grad_hidden = torch.zeros(hidden.shape, dtype=torch.float32, device=hidden.device)
        grad_weight = torch.zeros_like(weight, dtype=torch.float32)
        grad_bias = torch.zeros_like(bias, dtype=torch.float32) if bias is not None else None
        with torch.autocast(device, dtype=dtype) if enabled else nullcontext():
            for rows, cols in _tiles(hidden.shape[0], weight.shape[0]):
                logits = _tile_logits(hidden, weight, bias, rows, cols)
                # d/dlogits of log softmax[target] = onehot(target) - softmax
                grad_logits = torch.exp(logits - normaliser[rows, None]).mul_(-grad_out[rows, None])
                hit, column = _in_tile(targets[rows], cols)
                grad_logits[hit, column] += grad_out[rows][hit]
                grad_hidden[rows] += grad_logits @ weight[cols].float()
                grad_weight[cols] += grad_logits.T @ hidden[rows].float()
                if grad_bias is not None:
                    grad_bias[cols] += grad_logits.sum(0)
        grad_bias = grad_bias.to(bias.dtype) if grad_bias is not None else None
        return grad_hidden.to(hidden.dtype), grad_weight.to(weight.dtype), grad_bias, None, None


def _base_and_head(model: nn.Module) -> tuple[nn.Module, nn.Linear] | None:
    """The decoder trunk and linear LM head, or None when the head is not a plain Linear."""
    if hasattr(model, "get_base_model"):  # peft: adapters live inside the wrapped model's layers
        model = model.get_base_model()
    config = getattr(model, "config", None)
    if getattr(config, "final_logit_softcapping", None) or getattr(config, "logit_scale", None):
        return None
    base = getattr(model, getattr(model, "base_model_prefix", ""), None)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if base is None or not isinstance(head, nn.Linear):
        return None
    return base, head


def token_logprobs(model: nn.Module, input_ids: Tensor, attention_mask: Tensor,
                   score_mask: Tensor) -> Tensor:
    """log pi(input_ids[t] | input_ids[<t]) at positions where score_mask is 1, else 0: [B, T].

    `score_mask` marks the tokens to score (completion tokens); the first position is never scored.
    """
    parts = _base_and_head(model)
    if parts is None:
        return naive_token_logprobs(model, input_ids, attention_mask, score_mask)
    return forward_call(model, _head_logprobs, *parts, input_ids, attention_mask, score_mask)


def _head_logprobs(base: nn.Module, head: nn.Linear, input_ids: Tensor, attention_mask: Tensor,
                   score_mask: Tensor) -> Tensor:
    hidden = base(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    scored = score_mask[:, 1:].bool()
    rows, _ = _TokenLogprob.apply(hidden[:, :-1][scored], head.weight, head.bias, input_ids[:, 1:][scored])
    out = torch.zeros(input_ids.shape, dtype=torch.float32, device=input_ids.device)
    out[:, 1:][scored] = rows
    return out


def naive_token_logprobs(model: nn.Module, input_ids: Tensor, attention_mask: Tensor,
                         score_mask: Tensor) -> Tensor:
    """The plain way: full float32 logits for the whole batch, then log_softmax and gather."""
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1].float()
    picked = logits.log_softmax(-1).gather(2, input_ids[:, 1:, None]).squeeze(2)
    out = torch.zeros(input_ids.shape, dtype=torch.float32, device=input_ids.device)
    out[:, 1:] = picked * score_mask[:, 1:]
    return out


def sequence_logprobs(model: nn.Module, input_ids: Tensor, attention_mask: Tensor,
                      score_mask: Tensor) -> Tensor:
    """Summed log-probs of the scored tokens of each sequence: [B]."""
    return token_logprobs(model, input_ids, attention_mask, score_mask).sum(1)


def completion_logprobs(model: nn.Module, encoded: list[Encoded], pad_id: int) -> tuple[Tensor, Tensor]:
    """Summed completion log-probs [n] and completion lengths [n] of encoded (prompt, completion)s."""
    batch = collate(encoded, pad_id).to(next(model.parameters()).device)
    token_lp = token_logprobs(model, batch.input_ids, batch.attention_mask, batch.score_mask)
    return token_lp.sum(1), batch.lengths


def reward_head_scores(model: nn.Module, encoded: list[Encoded], pad_id: int) -> Tensor:
    """Scores [n, K] of a sequence classifier with K outputs (reward heads), read at each sequence's last token."""
    batch = collate(encoded, pad_id).to(next(model.parameters()).device)
    return model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits.float()


def reward_scores(model: nn.Module, encoded: list[Encoded], pad_id: int) -> Tensor:
    """Scalar scores [n] of a one-output sequence classifier, read at each sequence's last token."""
    scores = reward_head_scores(model, encoded, pad_id)
    if scores.shape[1] != 1:
        raise ValueError(f"the model has {scores.shape[1]} reward heads; use reward_head_scores")
    return scores[:, 0]


@dataclass
class PolicyOutputs:
    """Per-token quantities of completion tokens, [B, T], 0 elsewhere."""

    logprobs: Tensor
    entropy: Tensor          # carries a gradient only when asked for (an entropy bonus)
    values: Tensor | None    # from `value_head` on the same hidden states, when given


def _scatter(rows: Tensor, scored: Tensor, shape) -> Tensor:
    out = torch.zeros(shape, dtype=rows.dtype, device=rows.device)
    out[:, 1:][scored] = rows
    return out


def policy_outputs(model: nn.Module, input_ids: Tensor, attention_mask: Tensor, score_mask: Tensor, *,
                   temperature: float = 1.0, entropy_grad: bool = False,
                   value_head: nn.Module | None = None) -> PolicyOutputs:
    """Log-probs of softmax(logits / temperature), entropies and optional values of the scored tokens.

    One trunk pass. The head runs on scored positions only: chunked and fused (entropy without
    gradient) by default, or in one piece when the entropy needs a gradient. The value of token t is
    read from the hidden state that predicts it (the state before the token).
    """
    logprobs, entropy, values = forward_call(model, _policy_outputs, model, input_ids, attention_mask, score_mask,
                                             temperature, entropy_grad, value_head)
    return PolicyOutputs(logprobs, entropy, values)


def _policy_outputs(model, input_ids, attention_mask, score_mask, temperature, entropy_grad, value_head):
    parts = _base_and_head(model)
    scored = score_mask[:, 1:].bool()
    targets = input_ids[:, 1:][scored]
    if parts is None:
        out = model(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True)
        hidden, logits = out.hidden_states[-1][:, :-1][scored], out.logits[:, :-1][scored].float() / temperature
    else:
        base, head = parts
        hidden = base(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state[:, :-1][scored]
        bias = head.bias / temperature if head.bias is not None else None
        logits = _chunk_logits(hidden / temperature, head.weight, bias) if entropy_grad else None
    if logits is not None:
        log_softmax = logits.log_softmax(-1)
        logprobs = log_softmax.gather(1, targets[:, None]).squeeze(1)
        entropy = -(log_softmax.exp() * log_softmax).sum(-1)
        entropy = entropy if entropy_grad else entropy.detach()
    else:
        logprobs, entropy = _TokenLogprob.apply(hidden / temperature, head.weight, bias, targets, True)
    values = value_head(hidden).squeeze(-1).float() if value_head is not None else None
    shape = input_ids.shape
    return (_scatter(logprobs, scored, shape), _scatter(entropy, scored, shape),
            None if values is None else _scatter(values, scored, shape))
