"""Self-improvement losses, comparison rules and ranking consistency against their closed forms.

Expected values are recomputed here with plain `math` on Python floats from the papers' formulas
(DNO arXiv 2404.03715, CREAM arXiv 2410.12735, SPPO arXiv 2405.00675, INPO arXiv 2407.00617,
Nash-MD arXiv 2312.00886, RSO arXiv 2309.06657), never by calling the library.
"""

from __future__ import annotations

import itertools
import math
import random

import pytest
import torch

from alignkit.algorithms import preference_loss
from alignkit.algorithms.selfplay import COMPARISON_LOSSES, ComparisonInputs, comparison_loss
from alignkit.train.comparisons import kendall_consistency
from alignkit.train.pairs import PAIR_RULES, JudgedGroup, win_matrix

TIGHT = {"rel": 1e-9, "abs": 1e-12}


def logsig(t: float) -> float:
    return -math.log1p(math.exp(-t)) if t >= 0 else t - math.log1p(math.exp(t))


def sig(t: float) -> float:
    return 1.0 / (1.0 + math.exp(-t))


# --------------------------------------------------------------------------------------------
# Hand-made comparison batch
# --------------------------------------------------------------------------------------------

CHOSEN = [-3.0, -4.5, -7.25]
REJECTED = [-4.5, -3.0, -9.0]
REF_CHOSEN = [-3.5, -4.0, -8.0]          # h_w = [0.5, -0.5, 0.75]
REF_REJECTED = [-4.0, -3.25, -8.5]       # h_l = [-0.5, 0.25, -0.5]
ANCHOR_CHOSEN = [-3.25, -4.25, -7.5]
ANCHOR_REJECTED = [-4.25, -3.5, -8.75]
TARGET_CHOSEN = [0.75, 0.5, 0.25]
TARGET_REJECTED = [0.25, 0.625, 0.125]
LEN_CHOSEN = [3, 0, 8]                   # 0 is clamped to 1
LEN_REJECTED = [4, 2, 6]


def batch(**overrides) -> dict[str, torch.Tensor | None]:
    """The keyword arguments of `ComparisonInputs` for the hand-made batch, float64."""
    values = {"chosen_logps": CHOSEN, "rejected_logps": REJECTED, "ref_chosen_logps": REF_CHOSEN,
              "ref_rejected_logps": REF_REJECTED, "chosen_lengths": LEN_CHOSEN, "rejected_lengths": LEN_REJECTED,
              "anchor_chosen_logps": ANCHOR_CHOSEN, "anchor_rejected_logps": ANCHOR_REJECTED,
              "chosen_targets": TARGET_CHOSEN, "rejected_targets": TARGET_REJECTED}
    tensors = {k: torch.tensor(v, dtype=torch.long if "lengths" in k else torch.float64) for k, v in values.items()}
    return {**tensors, **overrides}


def inputs(**overrides) -> ComparisonInputs:
    kw = batch(**overrides)
    return ComparisonInputs(kw.pop("chosen_logps"), kw.pop("rejected_logps"), **kw)


def rows():
    return range(len(CHOSEN))


def h_w(i: int) -> float:
    return CHOSEN[i] - REF_CHOSEN[i]


def h_l(i: int) -> float:
    return REJECTED[i] - REF_REJECTED[i]


def values(name: str, **config) -> list[float]:
    return comparison_loss(name, inputs(), **config).tolist()


# --------------------------------------------------------------------------------------------
# Losses: closed forms
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["dno", "cream"])
@pytest.mark.parametrize("beta", [0.1, 2.0])
def test_soft_label_dpo_closed_form(name, beta):
    expected = []
    for i in rows():
        z, q = beta * (h_w(i) - h_l(i)), TARGET_CHOSEN[i]
        expected.append(-q * logsig(z) - (1 - q) * logsig(-z))
    assert values(name, beta=beta) == pytest.approx(expected, **TIGHT)


@pytest.mark.parametrize("name", ["dno", "cream"])
def test_soft_label_dpo_with_hard_label_is_dpo(name):
    kw = batch(chosen_targets=torch.ones(3, dtype=torch.float64))
    dpo = preference_loss("dpo", beta=0.5, **{k: v for k, v in kw.items() if "anchor" not in k and "targets" not in k})
    soft = comparison_loss(name, inputs(chosen_targets=kw["chosen_targets"]), beta=0.5)
    assert soft.tolist() == pytest.approx(dpo.tolist(), **TIGHT)


@pytest.mark.parametrize("beta", [0.001, 0.1, 4.0])
def test_sppo_closed_form(beta):
    eta = 1 / beta
    expected = [0.5 * ((h_w(i) - eta * (TARGET_CHOSEN[i] - 0.5)) ** 2
                       + (h_l(i) - eta * (TARGET_REJECTED[i] - 0.5)) ** 2) for i in rows()]
    assert values("sppo", beta=beta) == pytest.approx(expected, **TIGHT)


def inpo_expected(eta: float, tau: float) -> list[float]:
    out = []
    for i in rows():
        h = ((CHOSEN[i] - REJECTED[i]) - tau / eta * (REF_CHOSEN[i] - REF_REJECTED[i])
             - (eta - tau) / eta * (ANCHOR_CHOSEN[i] - ANCHOR_REJECTED[i]))
        out.append((h - 1 / (2 * eta)) ** 2)
    return out


def test_inpo_closed_form_at_defaults():
    assert values("inpo") == pytest.approx(inpo_expected(7.5e-3, 2.5e-3), **TIGHT)


@pytest.mark.parametrize("eta,tau", [(0.5, 0.125), (2.0, 1.5)])
def test_inpo_closed_form_with_tau(eta, tau):
    assert values("inpo", eta=eta, tau=tau) == pytest.approx(inpo_expected(eta, tau), **TIGHT)


@pytest.mark.parametrize("tau", [0.5, 0.75, 0.0])
def test_inpo_rejects_tau_outside_zero_eta(tau):
    with pytest.raises(ValueError, match="tau"):
        comparison_loss("inpo", inputs(), eta=0.5, tau=tau)


@pytest.mark.parametrize("beta", [0.1, 3.0])
def test_nash_md_value_and_stop_gradient(beta):
    lp_w = torch.tensor(CHOSEN, dtype=torch.float64, requires_grad=True)
    loss = comparison_loss("nash-md", inputs(chosen_logps=lp_w), beta=beta)
    coefficient = [beta * h_w(i) - (TARGET_CHOSEN[i] - 0.5) for i in rows()]
    assert loss.tolist() == pytest.approx([c * CHOSEN[i] for i, c in enumerate(coefficient)], **TIGHT)
    loss.sum().backward()
    assert lp_w.grad.tolist() == pytest.approx(coefficient, **TIGHT)


def test_sft_is_length_normalised_nll():
    expected = [-CHOSEN[i] / max(LEN_CHOSEN[i], 1) for i in rows()]
    assert values("sft") == pytest.approx(expected, **TIGHT)


@pytest.mark.parametrize("name", [e.name for e in COMPARISON_LOSSES if e.meta["kind"] == "single"])
def test_single_answer_losses_read_no_rejected_input(name):
    full = comparison_loss(name, inputs())
    alone = comparison_loss(name, inputs(rejected_logps=None, ref_rejected_logps=None, rejected_lengths=None,
                                         anchor_rejected_logps=None, rejected_targets=None))
    assert alone.tolist() == pytest.approx(full.tolist(), **TIGHT)


def test_comparison_loss_falls_back_to_paired_losses():
    kw = {k: v for k, v in batch().items() if "anchor" not in k and "targets" not in k}
    assert comparison_loss("ipo", inputs(), beta=0.25).tolist() == pytest.approx(
        preference_loss("ipo", beta=0.25, **kw).tolist(), **TIGHT)


@pytest.mark.parametrize("name,missing", [
    ("sppo", "chosen_targets"), ("sppo", "rejected_targets"), ("dno", "chosen_targets"),
    ("cream", "ref_chosen_logps"), ("inpo", "anchor_chosen_logps"), ("inpo", "ref_rejected_logps"),
    ("nash-md", "chosen_targets"), ("nash-md", "ref_chosen_logps"), ("sft", "chosen_lengths"),
])
def test_missing_input_is_named(name, missing):
    with pytest.raises(ValueError, match=missing):
        comparison_loss(name, inputs(**{missing: None}))


# --------------------------------------------------------------------------------------------
# Losses: per-example, so splitting a batch changes neither the sum nor its gradient
# --------------------------------------------------------------------------------------------


def random_batch(seed: int, n: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    logps = {k: -10 * torch.rand(n, generator=g, dtype=torch.float64)
             for k in ["chosen_logps", "rejected_logps", "ref_chosen_logps", "ref_rejected_logps",
                       "anchor_chosen_logps", "anchor_rejected_logps"]}
    for k in ["chosen_logps", "rejected_logps"]:
        logps[k].requires_grad_(True)
    targets = {k: torch.rand(n, generator=g, dtype=torch.float64) for k in ["chosen_targets", "rejected_targets"]}
    lengths = {k: torch.randint(0, 20, (n,), generator=g) for k in ["chosen_lengths", "rejected_lengths"]}
    return {**logps, **targets, **lengths}


def loss_of(name: str, kw: dict, rows_: slice) -> torch.Tensor:
    part = {k: v[rows_] for k, v in kw.items()}
    return comparison_loss(name, ComparisonInputs(part.pop("chosen_logps"), part.pop("rejected_logps"), **part))


@pytest.mark.parametrize("name", COMPARISON_LOSSES.names())
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_losses_accumulate_over_micro_batches(name, seed):
    kw, n, cut = random_batch(seed, 7), 7, 3
    full = loss_of(name, kw, slice(0, n))
    assert full.shape == (n,)
    full.sum().backward()
    full_grads = [kw[k].grad.clone() for k in ["chosen_logps", "rejected_logps"] if kw[k].grad is not None]
    for k in ["chosen_logps", "rejected_logps"]:
        kw[k].grad = None
    halves = [loss_of(name, kw, slice(0, cut)), loss_of(name, kw, slice(cut, n))]
    assert (halves[0].sum() + halves[1].sum()).item() == pytest.approx(full.sum().item(), **TIGHT)
    for half in halves:
        half.sum().backward()
    micro_grads = [kw[k].grad for k in ["chosen_logps", "rejected_logps"] if kw[k].grad is not None]
    assert full_grads, f"{name} gives the policy no gradient"
    assert len(micro_grads) == len(full_grads)
    for a, b in zip(full_grads, micro_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


# --------------------------------------------------------------------------------------------
# Comparison rules
# --------------------------------------------------------------------------------------------

ANSWERS = [[1], [2], [3], [4]]


def group(scores=None, **kw) -> JudgedGroup:
    scores = None if scores is None else torch.tensor(scores, dtype=torch.float64)
    return JudgedGroup([0], [list(a) for a in ANSWERS[:len(scores) if scores is not None else 4]], scores, **kw)


def rule(name: str, g: JudgedGroup, seed: int = 0, **options):
    return PAIR_RULES.call(name, g, random.Random(seed), **options)


def pairs_of(comparisons) -> list[tuple]:
    return [(c.chosen, c.rejected) for c in comparisons]


def test_best_worst_picks_highest_against_lowest():
    (c,) = rule("best-worst", group([0.25, 0.875, -0.5, 0.125]))
    assert (c.chosen, c.rejected, c.gap) == ([2], [3], 1.375)


@pytest.mark.parametrize("scores,min_margin", [([0.5, 0.5, 0.5], 0.0), ([0.0, 0.5], 0.5), ([0.0, 0.5], 1.0)])
def test_best_worst_drops_ties_and_small_gaps(scores, min_margin):
    assert rule("best-worst", group(scores), min_margin=min_margin) == []


def test_best_worst_keeps_gap_above_min_margin():
    assert pairs_of(rule("best-worst", group([0.0, 0.5]), min_margin=0.25)) == [([2], [1])]


def test_best_worst_lets_the_reference_compete():
    g = group([0.125, 0.5], reference=[9], reference_score=2.0)
    assert pairs_of(rule("best-worst", g)) == [([2], [1])]
    assert pairs_of(rule("best-worst", g, include_reference=True)) == [([9], [1])]


def test_all_pairs_orients_every_pair_by_score():
    scores = [0.25, -1.0, 2.0, 0.5]
    score_of = {a[0]: s for a, s in zip(ANSWERS, scores, strict=True)}
    comparisons = rule("all-pairs", group(scores))
    assert len(comparisons) == 4 * 3 // 2
    assert {frozenset((c.chosen[0], c.rejected[0])) for c in comparisons} == {
        frozenset(p) for p in itertools.combinations([1, 2, 3, 4], 2)}
    for c in comparisons:
        assert c.gap == score_of[c.chosen[0]] - score_of[c.rejected[0]] > 0


def test_all_pairs_skips_ties_and_small_gaps():
    assert len(rule("all-pairs", group([1.0, 1.0, 2.0]))) == 2
    assert pairs_of(rule("all-pairs", group([0.0, 0.25, 2.0]), min_margin=0.5)) == [([3], [1]), ([3], [2])]


def test_soft_pairs_target_is_the_win_probability_of_best_over_worst():
    wins = torch.tensor([[0.5, 0.25, 0.875], [0.75, 0.5, 0.625], [0.125, 0.375, 0.5]])
    (c,) = rule("soft-pairs", group([0.0, 1.0, -2.0], wins=wins))
    assert (c.chosen, c.rejected, c.chosen_target, c.rejected_target) == ([2], [3], 0.625, 0.375)


WINS = torch.tensor([[0.5, 0.25, 0.75], [0.75, 0.5, 1.0], [0.25, 0.0, 0.5]], dtype=torch.float64)


def test_win_rate_targets_are_row_means_of_wins():
    (c,) = rule("win-rate", group([0.5, 2.0, -1.0], wins=WINS))
    assert (c.chosen, c.rejected) == ([2], [3])
    assert (c.chosen_target, c.rejected_target) == pytest.approx(((0.75 + 0.5 + 1.0) / 3, (0.25 + 0.0 + 0.5) / 3))


def test_win_rate_hard_targets_and_ties():
    (c,) = rule("win-rate", group([0.5, 2.0, -1.0], wins=WINS), hard=True)
    assert (c.chosen_target, c.rejected_target) == (1.0, 0.0)
    assert rule("win-rate", group([1.0, 1.0, 1.0], wins=WINS)) == []


def test_reference_vs_sample_pairs_the_reference_with_each_sample():
    comparisons = rule("reference-vs-sample", JudgedGroup([0], [[1], [2], [3]], reference=[9]))
    assert pairs_of(comparisons) == [([9], [1]), ([9], [2]), ([9], [3])]
    with pytest.raises(ValueError, match="reference"):
        rule("reference-vs-sample", JudgedGroup([0], [[1], [2]]))


def test_best_keeps_the_top_answer_above_min_score():
    g = group([0.25, 0.75, 0.5])
    assert pairs_of(rule("best", g)) == [([2], None)]
    assert pairs_of(rule("best", g, min_score=0.75)) == [([2], None)]
    assert rule("best", g, min_score=0.8) == []


def test_threshold_keeps_every_answer_at_or_above_it():
    comparisons = rule("threshold", group([0.25, 0.75, 0.5, 1.0]), threshold=0.5)
    assert pairs_of(comparisons) == [([2], None), ([3], None), ([4], None)]


@pytest.mark.parametrize("name", ["best-worst", "all-pairs", "soft-pairs", "win-rate", "best", "threshold", "rso"])
def test_ranking_rules_need_scores(name):
    with pytest.raises(ValueError, match="reward source or a judge"):
        rule(name, group())


RSO_SCORES = [0.0, 1.0, 3.0, 2.0]


@pytest.mark.parametrize("seed", range(10))
def test_rso_with_tiny_beta_accepts_only_the_top_answer(seed):
    # exp((r - r_max) / beta) is 1 for the top answer and 0 for the others
    assert rule("rso", group(RSO_SCORES), seed, beta=1e-3, accept=4) == []


@pytest.mark.parametrize("seed", range(10))
def test_rso_with_huge_beta_accepts_every_answer(seed):
    (c,) = rule("rso", group(RSO_SCORES), seed, beta=1e12, accept=4)
    assert (c.chosen, c.rejected, c.gap) == ([3], [1], 3.0)


def test_against_alternative_targets_are_the_alternative_win_rates():
    g = JudgedGroup([0], [[1], [2]], alternative_wins=torch.tensor([0.25, 0.75]))
    comparisons = rule("against-alternative", g)
    assert [(c.chosen, c.rejected, c.chosen_target) for c in comparisons] == [([1], None, 0.25), ([2], None, 0.75)]
    with pytest.raises(ValueError, match="mixture"):
        rule("against-alternative", JudgedGroup([0], [[1], [2]]))


def test_win_matrix_is_bradley_terry():
    scores = [0.0, 1.5, -0.5]
    wins = win_matrix(torch.tensor(scores, dtype=torch.float64))
    for i, j in itertools.product(range(3), repeat=2):
        assert float(wins[i, j]) == pytest.approx(sig(scores[i] - scores[j]), **TIGHT)


# --------------------------------------------------------------------------------------------
# CREAM's ranking consistency
# --------------------------------------------------------------------------------------------


def test_kendall_consistency():
    ranks = torch.tensor([0.5, 2.0, -1.0, 3.0])
    assert kendall_consistency(ranks, 10 * ranks + 1) == 1.0
    assert kendall_consistency(ranks, -ranks) == 0.0
    # of the 6 pairs only (1, 3) is ordered the other way: tau = (5 - 1) / 6
    mixed = torch.tensor([0.5, 2.0, -1.0, 1.0])
    assert kendall_consistency(ranks, mixed) == pytest.approx((4 / 6 + 1) / 2)
