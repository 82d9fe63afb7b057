"""Offline preference losses on paired data (reference: shared algorithms.md, section 8).

Every loss takes summed response-token log-probs of shape [batch] and returns per-example losses.
`h_w`, `h_l` are the log-ratios against the reference; `lw`, `ll` the response token counts.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from alignkit.registry import Registry

PREFERENCE_LOSSES = Registry("preference loss")
register = PREFERENCE_LOSSES.register

# Aliases for config keys that are Python keywords or common spellings elsewhere.
_ALIASES = {"lambda": "lam", "tau": "beta"}


class PairedInputs:
    """The tensors a paired loss may read; reference-free losses simply ignore the ref fields."""

    def __init__(self, chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps,
                 chosen_lengths, rejected_lengths):
        self.lp_w, self.lp_l = chosen_logps, rejected_logps
        self.ref_w, self.ref_l = ref_chosen_logps, ref_rejected_logps
        self.len_w, self.len_l = chosen_lengths, rejected_lengths

    def _need(self, value: Tensor | None, what: str, loss: str) -> Tensor:
        if value is None:
            raise ValueError(f"loss {loss!r} needs {what}")
        return value

    def h_w(self, loss: str) -> Tensor:
        return self.lp_w - self._need(self.ref_w, "ref_chosen_logps", loss)

    def h_l(self, loss: str) -> Tensor:
        return self.lp_l - self._need(self.ref_l, "ref_rejected_logps", loss)

    def margin(self, loss: str) -> Tensor:
        """Delta = h_w - h_l, the DPO log-ratio margin."""
        return self.h_w(loss) - self.h_l(loss)

    def lengths(self, loss: str) -> tuple[Tensor, Tensor]:
        lw = self._need(self.len_w, "chosen_lengths", loss)
        ll = self._need(self.len_l, "rejected_lengths", loss)
        return lw.to(self.lp_w.dtype).clamp(min=1), ll.to(self.lp_l.dtype).clamp(min=1)


def preference_loss(
    name: str,
    *,
    chosen_logps: Tensor,
    rejected_logps: Tensor,
    ref_chosen_logps: Tensor | None = None,
    ref_rejected_logps: Tensor | None = None,
    chosen_lengths: Tensor | None = None,
    rejected_lengths: Tensor | None = None,
    **config,
) -> Tensor:
    """Per-example loss [batch] of the registered paired loss `name` with its config keywords."""
    inputs = PairedInputs(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps,
                          chosen_lengths, rejected_lengths)
    return PREFERENCE_LOSSES.call(name, inputs, **normalize_config(config))


def normalize_config(config: dict) -> dict:
    """Map aliases (`lambda`, `tau`) to the option names the loss functions take."""
    return {_ALIASES.get(k, k): v for k, v in config.items()}


def needs_reference(name: str, **config) -> bool:
    """Whether loss `name` (with this config, for mixtures) reads reference log-probs."""
    entry = PREFERENCE_LOSSES.get(name)
    if name == "mix":
        return any(needs_reference(part) for part in config.get("weights", {}))
    return entry.meta.get("reference", True)


@register("dpo", summary="sigmoid loss on the log-ratio margin",
          paper="Rafailov et al. 2023, arXiv 2305.18290")
def dpo(x: PairedInputs, *, beta: float = 0.1) -> Tensor:
    return -F.logsigmoid(beta * x.margin("dpo"))


@register("ipo", summary="squared loss to 1/(2 tau) on length-averaged log-ratios",
          paper="Azar et al. 2023, arXiv 2310.12036")
def ipo(x: PairedInputs, *, beta: float = 0.1) -> Tensor:
    lw, ll = x.lengths("ipo")
    margin = x.h_w("ipo") / lw - x.h_l("ipo") / ll
    return (margin - 1 / (2 * beta)) ** 2


@register("cdpo", summary="conservative DPO: label smoothing with flip rate epsilon",
          paper="Mitchell 2023, 'A note on DPO with noisy preferences'")
def cdpo(x: PairedInputs, *, beta: float = 0.1, label_smoothing: float = 0.1) -> Tensor:
    z = beta * x.margin("cdpo")
    return -(1 - label_smoothing) * F.logsigmoid(z) - label_smoothing * F.logsigmoid(-z)


@register("rdpo", summary="robust DPO, unbiased under label flip rate epsilon",
          paper="Chowdhury et al. 2024, arXiv 2403.00409")
def rdpo(x: PairedInputs, *, beta: float = 0.1, label_smoothing: float = 0.1) -> Tensor:
    if not 0 <= label_smoothing < 0.5:
        raise ValueError("rdpo needs 0 <= label_smoothing < 0.5")
    z = beta * x.margin("rdpo")
    eps = label_smoothing
    return (-(1 - eps) * F.logsigmoid(z) + eps * F.logsigmoid(-z)) / (1 - 2 * eps)


@register("hinge", summary="SLiC hinge loss max(0, 1 - beta * margin)",
          paper="Zhao et al. 2023, arXiv 2305.10425")
def hinge(x: PairedInputs, *, beta: float = 0.1) -> Tensor:
    return torch.relu(1 - beta * x.margin("hinge"))


@register("simpo", summary="reference-free, length-normalised margin with target gamma",
          paper="Meng et al. 2024, arXiv 2405.14734", reference=False)
def simpo(x: PairedInputs, *, beta: float = 2.0, gamma: float = 1.0) -> Tensor:
    lw, ll = x.lengths("simpo")
    return -F.logsigmoid(beta * x.lp_w / lw - beta * x.lp_l / ll - gamma)


def _log_odds(avg_logp: Tensor) -> Tensor:
    """log(P / (1 - P)) with P = exp(avg_logp), using log1mexp for stability."""
    avg_logp = avg_logp.clamp(max=-1e-6)
    return avg_logp - torch.log(-torch.expm1(avg_logp))


@register("orpo", summary="NLL on chosen plus lambda times an odds-ratio loss, no reference",
          paper="Hong et al. 2024, arXiv 2403.07691", reference=False)
def orpo(x: PairedInputs, *, lam: float = 0.1) -> Tensor:
    lw, ll = x.lengths("orpo")
    avg_w, avg_l = x.lp_w / lw, x.lp_l / ll
    return -avg_w - lam * F.logsigmoid(_log_odds(avg_w) - _log_odds(avg_l))


@register("nca", summary="noise-contrastive alignment, pairwise form",
          paper="Chen et al. 2024, arXiv 2402.05369")
def nca(x: PairedInputs, *, beta: float = 0.1) -> Tensor:
    r_w, r_l = beta * x.h_w("nca"), beta * x.h_l("nca")
    return -F.logsigmoid(r_w) - 0.5 * F.logsigmoid(-r_w) - 0.5 * F.logsigmoid(-r_l)


@register("bco", summary="binary classifier optimisation with a running reward shift delta",
          paper="Jung et al. 2024, arXiv 2404.04656")
def bco(x: PairedInputs, *, beta: float = 0.1, delta: float | Tensor = 0.0) -> Tensor:
    """`delta` is the running mean of all rewards beta*h seen so far; the trainer keeps it."""
    r_w, r_l = beta * x.h_w("bco"), beta * x.h_l("bco")
    return -F.logsigmoid(r_w - delta) - F.logsigmoid(-(r_l - delta))


@register("nll", summary="length-normalised negative log-likelihood of the chosen answer",
          paper="used inside RPO (Liu et al. 2024, arXiv 2405.16436) and MPO", reference=False)
def nll(x: PairedInputs) -> Tensor:
    lw, _ = x.lengths("nll")
    return -x.lp_w / lw


@register("rpo", summary="DPO plus eta times the length-normalised NLL of the chosen answer",
          paper="Liu et al. 2024, arXiv 2405.16436")
def rpo(x: PairedInputs, *, beta: float = 0.01, eta: float = 0.005) -> Tensor:
    lw, _ = x.lengths("rpo")
    return -F.logsigmoid(beta * x.margin("rpo")) - eta * x.lp_w / lw


def _check_lam(lam: float) -> None:
    if not 0 < lam < 1:
        raise ValueError("r3m needs 0 < lambda < 1")


def r3m_delta(margin: Tensor, *, beta: float = 0.1, lam: float = 0.75) -> Tensor:
    """Closed-form outlier update delta_i = max(log(1/lam - 1) - beta * margin_i, 0), stop-grad.

    R3M (Bukharin et al. 2024, arXiv 2406.15568, eq. 3.4 and the DPO extension): minimising
    -log sigma(beta*margin + delta) + lam*|delta| over delta >= 0 for a fixed model.
    """
    _check_lam(lam)
    return torch.clamp(math.log(1 / lam - 1) - beta * margin.detach(), min=0)


@register("r3m_dpo", summary="DPO robust to corrupted labels: per-pair outlier delta, l1 penalty",
          paper="Bukharin et al. 2024, arXiv 2406.15568")
def r3m_dpo(x: PairedInputs, *, beta: float = 0.1, lam: float = 0.75,
            delta: Tensor | None = None) -> Tensor:
    """Alternating R3M step: delta from the closed form (or given), then the loss with delta fixed."""
    _check_lam(lam)
    margin = x.margin("r3m_dpo")
    if delta is None:
        delta = r3m_delta(margin, beta=beta, lam=lam)
    return -F.logsigmoid(beta * margin + delta) + lam * delta.abs()


@register("mix", summary="weighted sum of registered losses, e.g. weights={dpo: 1, nll: 0.005}",
          paper="as MPO (Wang et al. 2024, arXiv 2411.10442) and RPO combine losses")
def mix(x: PairedInputs, *, weights: dict[str, float] | None = None, **shared) -> Tensor:
    """Each part gets the shared config keys its signature takes (beta, gamma, ...)."""
    if not weights:
        raise ValueError("loss 'mix' needs weights={loss_name: weight, ...}")
    accepted = {k for part in weights for k in PREFERENCE_LOSSES.get(part).defaults()}
    if set(shared) - accepted:
        raise TypeError(f"loss 'mix' parts {sorted(weights)} take no option(s) {sorted(set(shared) - accepted)}")
    total = 0.0
    for part, weight in weights.items():
        if part == "mix":
            raise ValueError("loss 'mix' cannot contain itself")
        options = PREFERENCE_LOSSES.get(part).defaults()
        total = total + weight * PREFERENCE_LOSSES.call(
            part, x, **{k: v for k, v in shared.items() if k in options})
    return total
