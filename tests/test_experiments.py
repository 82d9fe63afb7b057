"""`alignkit experiment`: confidence intervals, the per-seed runner, and the quick overoptimization and
Self-Rewarding PPO experiments end to end."""

import json
import math

import pytest

from alignkit.cli import main
from alignkit.experiments import EXPERIMENTS, run_experiment
from alignkit.experiments.base import chart, mean_ci, summarize, t_quantile

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_mean_ci_is_the_student_t_interval():
    mean, half = mean_ci([1.0, 2.0, 3.0])
    assert mean == 2.0 and half == pytest.approx(4.303 * 1.0 / math.sqrt(3))
    assert mean_ci([0.7]) == (0.7, 0.0) and mean_ci([1.0, math.nan, 3.0]) == mean_ci([1.0, 3.0])
    assert t_quantile(11) == 2.228 and t_quantile(100) == 1.96


def test_summarize_groups_rows_and_chart_draws_one_band_per_series():
    rows = [{"method": m, "x": x, "y": y} for m, x, y in
            [("a", 0, 1.0), ("a", 0, 3.0), ("a", 1, 2.0), ("a", 1, 2.0), ("b", 0, 0.0), ("b", 1, 1.0)]]
    summary = summarize(rows, ("method", "x"), ("y",))
    first = next(r for r in summary if r["method"] == "a" and r["x"] == 0)
    assert (first["y"], first["n"]) == (2.0, 2) and first["y_ci"] == pytest.approx(12.706 * math.sqrt(2) / math.sqrt(2))
    svg = chart(summary, "method", "x", "y", "t", "x", "y")
    assert svg.count('class="series"') == 2 and svg.count('class="band"') >= 1


@EXPERIMENTS.register("toy-coin", summary="a seeded toy", paper="none", group=("method", "level"),
                      metrics=("score",), plots=[{"x": "level", "y": "score", "title": "toy", "x_label": "level",
                                                  "y_label": "score"}])
def _toy(seed, quick, workdir):
    return [{"method": m, "level": level, "score": level * (1 + seed) + (m == "b")} for m in "ab" for level in (1, 2)]


def test_run_experiment_writes_raw_rows_table_and_plots(tmp_path):
    path, summary = run_experiment("toy-coin", [0, 1], output_dir=str(tmp_path), echo=lambda _: None)
    raw = [json.loads(line) for line in (path / "results.jsonl").read_text().splitlines()]
    assert len(raw) == 8 and {r["seed"] for r in raw} == {0, 1}
    row = next(r for r in summary if r["method"] == "b" and r["level"] == 2)
    assert row["score"] == pytest.approx(4.0) and row["score_ci"] == pytest.approx(12.706 * 1.0)  # values 3 and 5
    table = json.loads((path / "evaluation.json").read_text())
    assert table["columns"][:3] == ["method", "level", "score (95% CI)"] and len(table["rows"]) == 4
    assert (path / "score.svg").read_text().startswith("<svg") and "score.svg" in (path / "results.md").read_text()
    report = (path / "report.html").read_text()
    assert report.count('<svg class="chart"') == 1 and "score (95% CI)" in report and "http" not in report


def _results(tmp_path) -> list[dict]:
    (run,) = tmp_path.glob("experiment-*")
    return [json.loads(line) for line in (run / "results.jsonl").read_text().splitlines()]


def test_overoptimization_quick_traces_proxy_gold_and_kl_for_each_reward_model(tmp_path):
    assert main(["experiment", "overoptimization", "--quick", "--seeds", "0", "--output-dir", str(tmp_path)]) == 0
    rows = _results(tmp_path)
    assert {r["reward model"] for r in rows} == {"single", "ensemble mean", "ensemble min"}
    for name in ("single", "ensemble mean", "ensemble min"):
        curve = sorted((r for r in rows if r["reward model"] == name), key=lambda r: r["step"])
        assert [r["step"] for r in curve] == [0, 10, 20]
        assert curve[0]["sqrt_kl"] < 0.01 and curve[-1]["sqrt_kl"] > 0.5  # KL of SFT to itself: rounding only
        assert curve[-1]["proxy"] > curve[0]["proxy"]  # RL raises what it optimises
    starts = {r["gold"] for r in rows if r["step"] == 0}
    assert len(starts) == 1  # every curve starts from the same SFT samples
    (run,) = tmp_path.glob("experiment-*")
    assert (run / "gold.svg").exists() and (run / "proxy.svg").exists()


def test_self_rewarding_quick_scores_sft_and_srppo_on_ood_and_in_distribution_prompts(tmp_path):
    assert main(["experiment", "self-rewarding-ppo", "--quick", "--seeds", "0", "--output-dir", str(tmp_path)]) == 0
    rows = {r["method"]: r for r in _results(tmp_path)}
    assert set(rows) == {"SFT", "Self-Rewarding PPO"}
    assert rows["SFT"]["win_ood"] == 0.5 and rows["SFT"]["kl_to_sft"] == 0.0
    assert rows["Self-Rewarding PPO"]["kl_to_sft"] > 0.1
    assert all(0 <= r[k] <= 1 for r in rows.values() for k in ("gold_ood", "gold_in", "win_ood"))
