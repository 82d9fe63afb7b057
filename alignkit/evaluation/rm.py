"""Evaluate any reward source or pairwise judge on comparisons (or best-of-n sets).

Reward sources (`score`) score chosen and rejected and P(chosen better) = sigma(r_c - r_r);
pairwise judges (`compare`) are asked directly, with chosen shown first in a seeded random half
of the pairs so a position-biased judge cannot score above chance by always answering A.
Failed items (a rule that raised, an unparsable verdict, an HTTP error) count as wrong and are
reported. Calibration uses both orientations of each pair (P for label 1 and 1 - P for label 0),
so it measures calibration rather than rewarding confidence when chosen is always label 1.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch
from torch import Tensor

from alignkit.data.records import BestOfN, Comparison
from alignkit.evaluation.metrics import (
    accuracy_by_subset,
    agreement,
    best_of_n_credit,
    calibration_bins,
    expected_calibration_error,
    length_bias,
    pair_correct,
    pair_probs_from_scores,
    rewardbench_v1,
    rewardbench_v2,
)


@dataclass
class PairScores:
    """P(chosen better) per pair, failures, and the scalar scores where the source has them."""

    probs: Tensor
    failed: Tensor
    chosen_scores: Tensor | None = None
    rejected_scores: Tensor | None = None


def _batches(n: int, size: int) -> list[range]:
    return [range(start, min(start + size, n)) for start in range(0, n, size)]


def _score_all(source, prompts: list, completions: list[str], batch_size: int) -> tuple[Tensor, Tensor]:
    values, failed = [], []
    for rows in _batches(len(prompts), batch_size):
        scores = source.score([prompts[i] for i in rows], [completions[i] for i in rows])
        values.append(scores.values.double().cpu())
        failed.append(scores.failure_mask())
    return torch.cat(values), torch.cat(failed)


def _compare_all(judge, prompts: list, a: list[str], b: list[str], batch_size: int) -> tuple[Tensor, Tensor]:
    probs, failed = [], []
    for rows in _batches(len(prompts), batch_size):
        preference = judge.compare([prompts[i] for i in rows], [a[i] for i in rows], [b[i] for i in rows])
        probs.append(preference.probs.double().cpu())
        failed.append(preference.failure_mask())
    return torch.cat(probs), torch.cat(failed)


def score_pairs(source, pairs: list[Comparison], batch_size: int = 32, seed: int = 0) -> PairScores:
    prompts = [p.prompt for p in pairs]
    if hasattr(source, "score"):
        values, failed = _score_all(source, prompts * 2, [p.chosen for p in pairs] + [p.rejected for p in pairs],
                                    batch_size)
        chosen, rejected = values[:len(pairs)], values[len(pairs):]
        failed = failed[:len(pairs)] | failed[len(pairs):]
        return PairScores(pair_probs_from_scores(chosen, rejected), failed, chosen, rejected)
    swapped = torch.tensor([random.Random(seed + i).random() < 0.5 for i in range(len(pairs))])
    a = [p.rejected if s else p.chosen for p, s in zip(pairs, swapped.tolist(), strict=True)]
    b = [p.chosen if s else p.rejected for p, s in zip(pairs, swapped.tolist(), strict=True)]
    probs, failed = _compare_all(source, prompts, a, b, batch_size)
    return PairScores(torch.where(swapped, 1 - probs, probs), failed)


def pair_report(result: PairScores, pairs: list[Comparison], bins: int = 10) -> dict:
    """Accuracy overall and per subset, RewardBench v1 sections, calibration and length bias."""
    correct = pair_correct(result.probs) & ~result.failed
    subsets = accuracy_by_subset(correct, [p.subset for p in pairs])
    both_ways = torch.cat([result.probs, 1 - result.probs])
    labels = torch.cat([torch.ones(len(pairs)), torch.zeros(len(pairs))])
    return {
        "pairs": len(pairs),
        "failed": int(result.failed.sum()),
        "accuracy": subsets["all"]["accuracy"],
        "subsets": {k: v for k, v in subsets.items() if k != "all"},
        "rewardbench_v1": rewardbench_v1(subsets),
        "calibration": {"ece": expected_calibration_error(both_ways, labels, bins),
                        "bins": calibration_bins(result.probs, torch.ones(len(pairs)), bins)},
        "length_bias": length_bias(result.chosen_scores, result.rejected_scores,
                                   [len(p.chosen) for p in pairs], [len(p.rejected) for p in pairs], correct),
    }


def best_of_n_scores(source, record: BestOfN) -> list[float]:
    """One score per completion (chosen first): the source's scores, or for a pairwise judge each
    completion's mean P(better) against every other (the row mean of the preference matrix)."""
    completions = list(record.chosen) + list(record.rejected)
    if hasattr(source, "score"):
        scores = source.score([record.prompt] * len(completions), completions)
        failed = scores.failure_mask().tolist()
        return [float("nan") if f else v for v, f in zip(scores.values.tolist(), failed, strict=True)]
    pairs = [(i, j) for i in range(len(completions)) for j in range(i + 1, len(completions))]
    preference = source.compare([record.prompt] * len(pairs), [completions[i] for i, _ in pairs],
                                [completions[j] for _, j in pairs])
    wins = torch.zeros(len(completions), dtype=torch.float64)
    for (i, j), p in zip(pairs, preference.probs.tolist(), strict=True):
        wins[i] += p
        wins[j] += 1 - p
    return (wins / (len(completions) - 1)).tolist()


def best_of_n_report(source, records: list[BestOfN]) -> dict:
    """RewardBench 2 scoring: per correct completion, 1/k credit when it ties k ways for the best score."""
    rows = []
    for record in records:
        scores = best_of_n_scores(source, record)
        wrong = scores[len(record.chosen):]
        credits = [best_of_n_credit([scores[c]] + wrong, 0) for c in range(len(record.chosen))]
        rows.append((record.subset or "all", sum(credits) / len(credits)))
    report = rewardbench_v2(rows)
    return {"sets": len(records), "accuracy": report["overall"], "rewardbench_v2": report}


def source_metrics(source, prefix: str = "source") -> dict:
    metrics = source.metrics(prefix) if hasattr(source, "metrics") else source.stats.metrics(prefix)
    return {k: v for k, v in metrics.items() if not (isinstance(v, float) and v != v)}


def evaluate(source, records: list, *, batch_size: int = 32, seed: int = 0,
             bins: int = 10) -> tuple[dict, Tensor | None]:
    """The report for `source` on `records`, and the pairs' P(chosen better) (None for best-of-n sets)."""
    if records and isinstance(records[0], BestOfN):
        report, probs = best_of_n_report(source, records), None
    else:
        result = score_pairs(source, records, batch_size, seed)
        report, probs = pair_report(result, records, bins), result.probs
    stats = source.stats
    if stats.items and stats.failures >= stats.items:   # nothing was measured: no accuracy to report
        return {"status": "failed", "records": len(records), "errors": stats.examples[:5],
                "source_metrics": source_metrics(source)}, None
    return report | {"status": "ok", "source_metrics": source_metrics(source)}, probs


def agreement_report(names: list[str], probs: list[Tensor]) -> list[dict]:
    """Agreement between every two sources evaluated on the same pairs."""
    return [{"a": names[i], "b": names[j], **agreement(probs[i], probs[j])}
            for i in range(len(names)) for j in range(i + 1, len(names))]
