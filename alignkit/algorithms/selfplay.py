"""Losses of self-improvement loops: the policy learns from comparisons of its own samples.

They read what a comparison set carries beyond a preference pair (`ComparisonInputs`): a target
probability per answer (a win rate, a soft label) and the log-probs of the round's starting iterate
pi_t (the "anchor"), next to those of the configured reference. Every loss returns one value per
comparison. Any paired loss of `PREFERENCE_LOSSES` (dpo, ipo, ...) also trains on comparisons;
`comparison_loss` looks here first, then there.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from alignkit.algorithms.preference import PREFERENCE_LOSSES, PairedInputs, normalize_config
from alignkit.registry import Registry

COMPARISON_LOSSES = Registry("comparison loss")
register = COMPARISON_LOSSES.register


class ComparisonInputs(PairedInputs):
    """A paired loss's tensors plus the anchor pi_t's summed log-probs and per-answer target probabilities."""

    def __init__(self, chosen_logps, rejected_logps, ref_chosen_logps=None, ref_rejected_logps=None,
                 chosen_lengths=None, rejected_lengths=None, *, anchor_chosen_logps=None,
                 anchor_rejected_logps=None, chosen_targets=None, rejected_targets=None):
        super().__init__(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, chosen_lengths,
                         rejected_lengths)
        self.anchor_w, self.anchor_l = anchor_chosen_logps, anchor_rejected_logps
        self.target_w, self.target_l = chosen_targets, rejected_targets

    def targets(self, loss: str) -> tuple[Tensor, Tensor]:
        return self._need(self.target_w, "chosen_targets", loss), self._need(self.target_l, "rejected_targets", loss)

    def anchor_margin(self, loss: str) -> Tensor:
        return (self._need(self.anchor_w, "anchor_chosen_logps", loss)
                - self._need(self.anchor_l, "anchor_rejected_logps", loss))


def comparison_loss(name: str, inputs: ComparisonInputs, **config) -> Tensor:
    """Per-comparison loss of `name`, from this registry or `PREFERENCE_LOSSES`."""
    if name in COMPARISON_LOSSES:   # their option names are their own (inpo's tau is no alias of beta)
        return COMPARISON_LOSSES.call(name, inputs, **config)
    return PREFERENCE_LOSSES.call(name, inputs, **normalize_config(config))


def loss_entry(name: str):
    return COMPARISON_LOSSES.get(name) if name in COMPARISON_LOSSES else PREFERENCE_LOSSES.get(name)


def _soft_label_dpo(x: ComparisonInputs, beta: float, loss: str) -> Tensor:
    """-q log sigma(beta Delta) - (1 - q) log sigma(-beta Delta), q the chosen answer's target."""
    q, _ = x.targets(loss)
    z = beta * x.margin(loss)
    return -q * F.logsigmoid(z) - (1 - q) * F.logsigmoid(-z)


@register("dno", summary="DPO against the iterate with soft labels q = P(y_w beats y_l) (reference: pi_t)",
          paper="Rosset et al. 2024, arXiv 2404.03715", kind="pair")
def dno(x: ComparisonInputs, *, beta: float = 0.1) -> Tensor:
    """DNO's regression to preferences (eq. of Algorithm 1): both orders of a pair weighted by
    sigma(r_t(y) - r_t(y')), here the comparison's target probability."""
    return _soft_label_dpo(x, beta, "dno")


@register("cream", summary="DPO with the ranking consistency C as an adaptive label smoothing (reference: pi_t)",
          paper="Wang et al. 2024, arXiv 2410.12735", kind="pair")
def cream(x: ComparisonInputs, *, beta: float = 0.1) -> Tensor:
    """C (-log sigma(beta Delta)) + (1 - C)(-log sigma(-beta Delta)); C is the chosen answer's target."""
    return _soft_label_dpo(x, beta, "cream")


@register("sppo", summary="squared loss of log pi/pi_t towards eta (win rate - 1/2) for the best and worst answer",
          paper="Wu et al. 2024, arXiv 2405.00675", kind="pair")
def sppo(x: ComparisonInputs, *, beta: float = 0.001) -> Tensor:
    """1/2 [(h(y_w) - eta (P_w - 1/2))^2 + (h(y_l) - eta (P_l - 1/2))^2], eta = 1/beta, h against the reference."""
    eta = 1 / beta
    p_w, p_l = x.targets("sppo")
    return 0.5 * ((x.h_w("sppo") - eta * (p_w - 0.5)) ** 2 + (x.h_l("sppo") - eta * (p_l - 0.5)) ** 2)


@register("inpo", summary="squared loss of the pair's log-ratio against pi_ref and pi_t towards 1/(2 eta)",
          paper="Zhang et al. 2024, arXiv 2407.00617", kind="pair")
def inpo(x: ComparisonInputs, *, eta: float = 7.5e-3, tau: float = 2.5e-3) -> Tensor:
    """(log pi(y+)/pi(y-) - tau/eta log pi_ref(y+)/pi_ref(y-) - (eta-tau)/eta log pi_t(y+)/pi_t(y-) - 1/(2 eta))^2."""
    if not 0 < tau < eta:
        raise ValueError(f"inpo needs 0 < tau < eta, got tau={tau}, eta={eta}")
    reference = x._need(x.ref_w, "ref_chosen_logps", "inpo") - x._need(x.ref_l, "ref_rejected_logps", "inpo")
    h = x.lp_w - x.lp_l - tau / eta * reference - (eta - tau) / eta * x.anchor_margin("inpo")
    return (h - 1 / (2 * eta)) ** 2


@register("nash-md", summary="REINFORCE on P(y beats the mixture's y') - 1/2 with a KL penalty to the reference",
          paper="Munos et al. 2023, arXiv 2312.00886", kind="single")
def nash_md(x: ComparisonInputs, *, beta: float = 0.1) -> Tensor:
    """(beta sg(log pi(y)/pi_ref(y)) - (p - 1/2)) log pi(y), y sampled from pi, p its target.

    Its gradient is the policy gradient of E[p - 1/2] - beta KL(pi || pi_ref) with the sequence-level
    score-function estimator of the KL (the practical Nash-MD-PG form puts the same penalty per token;
    the two have the same expectation).
    """
    p = x._need(x.target_w, "chosen_targets", "nash-md")
    return (beta * x.h_w("nash-md").detach() - (p - 0.5)) * x.lp_w


@register("sft", summary="length-normalised negative log-likelihood of the kept answer (rejection sampling)",
          paper="RAFT (Dong et al. 2023, arXiv 2304.06767), ReST (Gulcehre et al. 2023, arXiv 2308.08998)",
          kind="single", reference=False)
def sft(x: ComparisonInputs) -> Tensor:
    return -x.lp_w / x._need(x.len_w, "chosen_lengths", "sft").to(x.lp_w.dtype).clamp(min=1)
