"""Tests for alignkit.evaluation.metrics.

Expected values are worked out by hand in each test from the formulas in the shared algorithm
reference (section 11: RewardBench v1 and v2 scoring) and the textbook definitions of ECE, Pearson
correlation and Cohen's kappa, never by calling the library a second time.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from alignkit.evaluation.metrics import (
    REWARDBENCH_V1_SECTIONS,
    accuracy_by_subset,
    agreement,
    best_of_n_credit,
    calibration_bins,
    cohen_kappa,
    expected_calibration_error,
    length_bias,
    pair_correct,
    pair_probs_from_scores,
    pearson,
    rewardbench_v1,
    rewardbench_v2,
)

FAST = settings(max_examples=50, deadline=None)


def sigmoid(t: float) -> float:
    return 1.0 / (1.0 + math.exp(-t))


# --------------------------------------------------------------------------------------------
# pair_correct, accuracy_by_subset
# --------------------------------------------------------------------------------------------


def test_pair_correct_is_strict_and_nan_is_wrong():
    probs = [0.9, 0.5, 0.4999, 0.51, float("nan"), 1.0, 0.0]
    assert pair_correct(probs).tolist() == [True, False, False, True, False, True, False]
    assert pair_correct(torch.tensor(probs, dtype=torch.float32)).dtype == torch.bool


def test_equal_scores_are_a_wrong_tie():
    probs = pair_probs_from_scores([2.0, 3.0, -1.0], [2.0, 1.0, 0.0])
    assert probs[0].item() == 0.5
    assert pair_correct(probs).tolist() == [False, True, False]


def test_tiny_score_differences_survive_in_float64():
    # float32 sigmoid rounds a 1e-9 margin to exactly 0.5; the helper works in float64.
    assert torch.sigmoid(torch.tensor(1e-9)).item() == 0.5
    assert pair_correct(pair_probs_from_scores(torch.tensor([1e-9]), torch.tensor([0.0]))).tolist() == [True]


def test_accuracy_by_subset_groups_and_overall():
    result = accuracy_by_subset(torch.tensor([True, False, True, True, False]), ["a", "a", "b", None, "b"])
    assert result == {
        "all": {"accuracy": 3 / 5, "count": 5},
        "a": {"accuracy": 1 / 2, "count": 2},
        "b": {"accuracy": 1 / 2, "count": 2},
    }


def test_accuracy_by_subset_edges():
    assert accuracy_by_subset([], []) == {"all": {"accuracy": None, "count": 0}}
    assert accuracy_by_subset([1, 1, 0, 1], [None] * 4) == {"all": {"accuracy": 0.75, "count": 4}}
    with pytest.raises(ValueError):
        accuracy_by_subset([1, 0], ["x"])
    with pytest.raises(ValueError):
        accuracy_by_subset([1], ["all"])


# --------------------------------------------------------------------------------------------
# RewardBench v1
# --------------------------------------------------------------------------------------------


def test_rewardbench_v1_names_match_reference():
    assert sum(len(s) for s in REWARDBENCH_V1_SECTIONS.values()) == 23
    assert "llmbar-adver-GPTInst" in REWARDBENCH_V1_SECTIONS["Chat Hard"]
    assert "llmbar-adver-GPTOut" in REWARDBENCH_V1_SECTIONS["Chat Hard"]
    assert "mt-bench-med" in REWARDBENCH_V1_SECTIONS["Chat"]
    assert "xstest-should-respond" in REWARDBENCH_V1_SECTIONS["Safety"]


def test_rewardbench_v1_partial_weights_math_as_present_code():
    per_subset = {
        "alpacaeval-easy": (1.0, 100),
        "mt-bench-easy": (0.5, 28),
        "math-prm": (0.8, 447),
        "hep-python": (0.6, 164),
        "hep-go": (0.4, 164),
        "some-other-set": (0.0, 1000),
    }
    result = rewardbench_v1(per_subset)
    chat = (1.0 * 100 + 0.5 * 28) / 128  # 0.890625
    reasoning = (0.8 * 328 + 0.6 * 164 + 0.4 * 164) / (328 + 328)  # math counts as the 328 code examples: 0.65
    assert result["sections"] == pytest.approx({"Chat": chat, "Reasoning": reasoning})
    assert reasoning == pytest.approx(0.65)
    assert result["overall"] == pytest.approx((chat + reasoning) / 2)
    assert "llmbar-natural" in result["missing"] and "hep-go" not in result["missing"]


def test_rewardbench_v1_full_reasoning_and_three_sections():
    hep_accuracy = {"cpp": 0.5, "go": 0.6, "java": 0.7, "js": 0.8, "python": 0.9, "rust": 1.0}
    hep = {f"hep-{lang}": (acc, 164) for lang, acc in hep_accuracy.items()}
    per_subset = {
        **hep,
        "math-prm": {"accuracy": 0.9, "count": 447},  # accuracy_by_subset's form is accepted too
        "refusals-dangerous": {"accuracy": 0.9, "count": 100},
        "donotanswer": {"accuracy": 0.5, "count": 136},
        "llmbar-adver-GPTInst": {"accuracy": 0.25, "count": 92},
        "all": {"accuracy": 0.1, "count": 10_000},
    }
    result = rewardbench_v1(per_subset)
    reasoning = 0.9 * 984 / 1968 + 164 * (0.5 + 0.6 + 0.7 + 0.8 + 0.9 + 1.0) / 1968  # = 0.45 + 0.375
    safety = (0.9 * 100 + 0.5 * 136) / 236  # 158 / 236
    assert reasoning == pytest.approx(0.825)
    assert result["sections"] == pytest.approx({"Chat Hard": 0.25, "Safety": safety, "Reasoning": reasoning})
    assert result["overall"] == pytest.approx((0.825 + 158 / 236 + 0.25) / 3)


def test_rewardbench_v1_edges():
    assert rewardbench_v1({}) is None
    assert rewardbench_v1({"all": (0.7, 10), "llmbar-adver-gptinst": (1.0, 5)}) is None  # names are case-sensitive
    assert rewardbench_v1({"donotanswer": (0.9, 0)}) is None  # empty subsets do not count
    only_math = rewardbench_v1({"math-prm": (0.7, 447)})
    assert only_math["sections"] == {"Reasoning": 0.7} and only_math["overall"] == 0.7
    only_code = rewardbench_v1({"hep-js": (0.5, 164), "hep-rust": (1.0, 82)})
    assert only_code["sections"]["Reasoning"] == pytest.approx((0.5 * 164 + 1.0 * 82) / 246)


# --------------------------------------------------------------------------------------------
# RewardBench 2
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("scores", "index", "credit"),
    [
        ([1.0, 3.0, 2.0, 0.0], 1, 1.0),
        ([1.0, 3.0, 2.0, 0.0], 0, 0.0),
        ([3.0, 3.0, 1.0, 0.0], 0, 0.5),
        ([3.0, 3.0, 3.0, 0.0], 2, 1 / 3),
        ([2.0, 2.0, 2.0, 2.0], 3, 0.25),
        ([float("nan"), 1.0, 1.0, 0.0], 1, 0.5),
        ([1.0, float("nan"), 0.5], 1, 0.0),
        ([float("nan"), float("nan")], 0, 0.0),
    ],
)
def test_best_of_n_credit(scores, index, credit):
    assert best_of_n_credit(scores, index) == pytest.approx(credit)


def test_best_of_n_credit_index_checked():
    with pytest.raises(IndexError):
        best_of_n_credit([1.0, 2.0], 2)
    with pytest.raises(IndexError):
        best_of_n_credit([1.0, 2.0], -1)


@FAST
@given(st.lists(st.integers(-3, 3).map(float), min_size=1, max_size=6))
def test_best_of_n_credit_over_all_indices_sums_to_one(scores):
    credits = [best_of_n_credit(scores, i) for i in range(len(scores))]
    assert all(0.0 <= c <= 1.0 for c in credits)
    assert sum(credits) == pytest.approx(1.0)


def test_rewardbench_v2_unweighted_over_subsets():
    rows = [("Math", 1.0), ("Math", 0.0), ("Math", 0.5), ("Focus", 0.25), ("Ties", 1 / 3)]
    result = rewardbench_v2(rows)
    assert result["subsets"]["Math"] == {"score": pytest.approx(0.5), "count": 3}
    assert result["subsets"]["Focus"] == {"score": 0.25, "count": 1}
    assert result["subsets"]["Ties"]["count"] == 1
    assert result["overall"] == pytest.approx((0.5 + 0.25 + 1 / 3) / 3)
    assert rewardbench_v2([]) == {"subsets": {}, "overall": None}


# --------------------------------------------------------------------------------------------
# Calibration
# --------------------------------------------------------------------------------------------


def test_calibration_bins_and_ece_by_hand():
    probs = [0.05, 0.15, 0.12, 1.0, 0.95, 0.0]
    labels = [0, 1, 0, 1, 1, 0]
    table = calibration_bins(probs, labels, bins=10)
    assert [row["count"] for row in table] == [2, 2, 0, 0, 0, 0, 0, 0, 0, 2]
    assert table[1]["mean_prob"] == pytest.approx(0.135) and table[1]["frequency"] == 0.5
    assert table[9]["mean_prob"] == pytest.approx(0.975) and table[9]["lower"] == pytest.approx(0.9)
    assert table[4] == {"lower": 0.4, "upper": 0.5, "count": 0, "mean_prob": None, "frequency": None}
    ece = (2 / 6) * 0.025 + (2 / 6) * abs(0.5 - 0.135) + (2 / 6) * abs(1.0 - 0.975)
    assert expected_calibration_error(probs, labels, bins=10) == pytest.approx(ece)


def test_ece_two_bins_by_hand():
    # bin [0, .5): mean p 0.3, frequency 0.5; bin [.5, 1]: mean p 0.75, frequency 1.0
    ece = 0.5 * abs(0.5 - 0.3) + 0.5 * abs(1.0 - 0.75)
    assert expected_calibration_error(torch.tensor([0.2, 0.4, 0.5, 1.0]), [0, 1, 1, 1], bins=2) == pytest.approx(ece)


def test_ece_edges():
    assert expected_calibration_error([], [], bins=5) is None
    assert all(row["count"] == 0 for row in calibration_bins([], [], bins=5))
    probs = [0.9, 0.7, 0.6, 0.2]
    assert expected_calibration_error(probs, [1, 1, 1, 1]) == pytest.approx(1 - sum(probs) / 4)
    with pytest.raises(ValueError):
        expected_calibration_error([0.5], [1, 0])
    with pytest.raises(ValueError):
        calibration_bins([0.5], [1], bins=0)


@FAST
@given(st.lists(st.tuples(st.integers(1, 8), st.integers(0, 8)), min_size=1, max_size=6), st.integers(1, 12))
def test_ece_zero_when_each_group_is_calibrated(groups, bins):
    probs, labels = [], []
    for n, k in groups:
        k = min(k, n)
        probs += [k / n] * n  # n predictions of k/n, exactly k of them right
        labels += [1] * k + [0] * (n - k)
    assert expected_calibration_error(probs, labels, bins) == pytest.approx(0.0, abs=1e-12)


@FAST
@given(st.lists(st.tuples(st.floats(0, 1), st.booleans()), min_size=1, max_size=30))
def test_ece_between_zero_and_one(rows):
    ece = expected_calibration_error([p for p, _ in rows], [y for _, y in rows])
    assert 0.0 <= ece <= 1.0


# --------------------------------------------------------------------------------------------
# Length bias
# --------------------------------------------------------------------------------------------


def test_length_correlation_by_hand():
    # pooled scores [1, 2, 3, 4] against lengths [1, 3, 2, 4]: both means 2.5,
    # sum dx*dy = 2.25 - .25 - .25 + 2.25 = 4, sum dx^2 = sum dy^2 = 5, r = 4 / 5
    result = length_bias([1.0, 2.0], [3.0, 4.0], [1, 3], [2, 4], [False, False])
    assert result["length_correlation"] == pytest.approx(0.8)


def test_length_bias_groups():
    chosen_len, rejected_len = [5, 10, 3, 8, 6], [9, 2, 3, 12, 1]
    correct = torch.tensor([False, True, True, True, True])
    result = length_bias(None, None, chosen_len, rejected_len, correct)
    assert result == {
        "length_correlation": None,  # a pairwise judge has no scalar scores
        "accuracy_longer_rejected": 0.5,  # pairs 0 and 3
        "count_longer_rejected": 2,
        "accuracy_longer_chosen": 1.0,  # pairs 1 and 4
        "count_longer_chosen": 2,
        "count_equal_length": 1,
    }


def test_length_bias_edges():
    constant_scores = length_bias([1.0, 1.0], [1.0, 1.0], [3, 4], [5, 6], [False, False])
    assert constant_scores["length_correlation"] is None
    assert constant_scores["accuracy_longer_chosen"] is None and constant_scores["count_longer_chosen"] == 0
    assert constant_scores["accuracy_longer_rejected"] == 0.0
    same_lengths = length_bias([1.0, 2.0], [0.0, 3.0], [4, 4], [4, 4], [True, False])
    assert same_lengths["length_correlation"] is None
    assert same_lengths["accuracy_longer_rejected"] is None and same_lengths["count_equal_length"] == 2
    empty = length_bias([], [], [], [], [])
    assert empty["length_correlation"] is None and empty["accuracy_longer_chosen"] is None


# --------------------------------------------------------------------------------------------
# Agreement, kappa, Pearson
# --------------------------------------------------------------------------------------------


def test_agreement_by_hand():
    a = [0.9, 0.2, 0.6, 0.4, 0.7]  # decisions 1 0 1 0 1
    b = [0.8, 0.6, 0.3, 0.1, 0.9]  # decisions 1 1 0 0 1
    result = agreement(a, b)
    assert result["agreement"] == pytest.approx(3 / 5)
    p_e = 0.6 * 0.6 + 0.4 * 0.4  # both say "chosen" 3 times out of 5
    assert result["kappa"] == pytest.approx((0.6 - p_e) / (1 - p_e))
    assert result["kappa"] == pytest.approx(1 / 6)
    assert result["count"] == 5


def test_agreement_logit_correlation_and_one_class():
    a = [sigmoid(t) for t in (1.0, 2.0, 3.0, 4.0)]
    b = [sigmoid(t) for t in (1.0, 3.0, 2.0, 4.0)]
    result = agreement(a, b)
    assert result["logit_correlation"] == pytest.approx(0.8)
    assert result["agreement"] == 1.0
    assert result["kappa"] is None  # every decision is "chosen" on both sides: p_e = 1


def test_agreement_edges():
    opposite = agreement([0.9, 0.8], [0.1, 0.5])  # 0.5 is a "not chosen" decision
    assert opposite["agreement"] == 0.0 and opposite["kappa"] == 0.0
    hard = agreement([1.0, 0.0, 1.0, 0.0], [1.0, 0.0, 0.0, 1.0])  # clamped logits stay finite
    assert hard["logit_correlation"] == pytest.approx(0.0, abs=1e-12)
    assert hard["kappa"] == pytest.approx(0.0) and hard["agreement"] == 0.5
    assert agreement([], []) == {"agreement": None, "kappa": None, "logit_correlation": None, "count": 0}
    assert agreement([0.7], [0.2])["logit_correlation"] is None


def test_kappa_and_pearson_direct():
    # p_o = 3/4, rates 1/2 and 1/4: p_e = 1/8 + 3/8 = 1/2, kappa = (3/4 - 1/2) / (1/2) = 1/2
    assert cohen_kappa([1, 1, 0, 0], [1, 0, 0, 0]) == pytest.approx(0.5)
    assert cohen_kappa([0, 0], [0, 0]) is None
    assert pearson([1, 2, 3], [6, 4, 2]) == pytest.approx(-1.0)
    assert pearson([1, 2, float("nan")], [1, 2, 3]) is None
    assert pearson([0.1, 0.1, 0.1], [1, 2, 3]) is None


@FAST
@given(st.lists(st.floats(0, 1), min_size=2, max_size=30))
def test_agreement_with_itself(probs):
    result = agreement(probs, probs)
    assert result["agreement"] == 1.0
    decisions = [p > 0.5 for p in probs]
    if any(decisions) and not all(decisions):
        assert result["kappa"] == pytest.approx(1.0)
    else:
        assert result["kappa"] is None
    if result["logit_correlation"] is not None:
        assert result["logit_correlation"] == pytest.approx(1.0)
