"""Per-token log-probabilities of given tokens, without a float32 [batch, time, vocab] tensor.

The language-model head is applied only at the positions whose next token is scored (completion
tokens), in chunks of rows; the backward pass recomputes each chunk's softmax instead of keeping
the logits. Peak extra memory is one chunk of [rows, vocab] instead of the whole batch's logits.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from alignkit.data.tokenize import Encoded, collate
from alignkit.distributed import forward_call

CHUNK_BYTES = 4 * 2**20  # float32 logits held at once per chunk


def _chunk_rows(vocab: int) -> int:
    return max(1, CHUNK_BYTES // (4 * vocab))


def _chunk_logits(hidden: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    logits = hidden @ weight.to(hidden.dtype).T
    if bias is not None:
        logits = logits + bias.to(hidden.dtype)
    return logits.float()


class _TokenLogprob(torch.autograd.Function):
    """log softmax(hidden @ W.T + b)[target] row by row, chunked in forward and backward.

    With `want_entropy` it also returns each row's entropy (no gradient), nearly free from the same logits.
    """

    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor,
                want_entropy: bool = False) -> tuple[Tensor, Tensor]:
        out = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
        entropy = torch.zeros_like(out)
        step = _chunk_rows(weight.shape[0])
        for start in range(0, hidden.shape[0], step):
            logits = _chunk_logits(hidden[start:start + step], weight, bias)
            picked = logits.gather(1, targets[start:start + step, None]).squeeze(1)
            normaliser = logits.logsumexp(dim=1)
            out[start:start + step] = picked - normaliser
            if want_entropy:
                entropy[start:start + step] = normaliser - (torch.softmax(logits, dim=1) * logits).sum(1)
        ctx.save_for_backward(hidden, weight, bias, targets)
        ctx.mark_non_differentiable(entropy)
        return out, entropy

    @staticmethod
    def backward(ctx, grad_out: Tensor, _grad_entropy: Tensor):
        hidden, weight, bias, targets = ctx.saved_tensors
        grad_hidden = torch.empty_like(hidden)
        grad_weight = torch.zeros_like(weight, dtype=torch.float32)
        grad_bias = torch.zeros_like(bias, dtype=torch.float32) if bias is not None else None
        step = _chunk_rows(weight.shape[0])
        for start in range(0, hidden.shape[0], step):
            rows = slice(start, start + step)
            logits = _chunk_logits(hidden[rows], weight, bias)
            # d/dlogits of log softmax[target] = onehot(target) - softmax
            grad_logits = torch.softmax(logits, dim=1).mul_(-grad_out[rows, None])
            grad_logits.scatter_add_(1, targets[rows, None], grad_out[rows, None])
            grad_hidden[rows] = (grad_logits @ weight.float()).to(hidden.dtype)
            grad_weight.addmm_(grad_logits.T, hidden[rows].float())
            if grad_bias is not None:
                grad_bias += grad_logits.sum(0)
        grad_bias = grad_bias.to(bias.dtype) if grad_bias is not None else None
        return grad_hidden, grad_weight.to(weight.dtype), grad_bias, None, None


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
