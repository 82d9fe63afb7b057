"""Running an experiment over seeds: raw rows, mean and 95% confidence intervals, a table and plots.

An experiment is a registered function `(seed, quick, workdir) -> list[dict]` returning one row per
measurement, with the registry entry naming its group keys, x axis and metrics. Confidence
intervals are Student-t intervals of the mean over seeds (seeds are the independent repeats).
"""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Callable
from pathlib import Path

from alignkit.plots import Series, line_chart, save_chart
from alignkit.registry import Registry
from alignkit.report import build_report, write_evaluation
from alignkit.train.rundir import RunDir

EXPERIMENTS = Registry("experiment")

# two-sided 95% quantiles of Student's t by degrees of freedom; 1.96 past the table
T_975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262,
         10: 2.228, 12: 2.179, 15: 2.131, 20: 2.086, 30: 2.042}


def t_quantile(df: int) -> float:
    known = [d for d in T_975 if d <= df]
    return T_975[max(known)] if df <= 30 else 1.96


def mean_ci(values: list[float]) -> tuple[float, float]:
    """Mean and half-width of its 95% confidence interval (0 for a single value); NaNs are left out."""
    values = [v for v in values if not math.isnan(v)]
    if not values:
        return math.nan, 0.0
    mean = statistics.fmean(values)
    if len(values) < 2:
        return mean, 0.0
    return mean, t_quantile(len(values) - 1) * statistics.stdev(values) / math.sqrt(len(values))


def summarize(rows: list[dict], group: tuple[str, ...], metrics: tuple[str, ...]) -> list[dict]:
    """One row per group: the group's keys, then mean and CI half-width of each metric, and n."""
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault(tuple(row[k] for k in group), []).append(row)
    out = []
    for key, members in groups.items():
        summary = dict(zip(group, key, strict=True))
        for metric in metrics:
            summary[metric], summary[f"{metric}_ci"] = mean_ci([m[metric] for m in members])
        summary["n"] = len(members)
        out.append(summary)
    return out


def chart(summary: list[dict], series_key: str, x: str, y: str, title: str, x_label: str, y_label: str) -> str:
    """Mean of `y` against (mean) `x`, one line per value of `series_key`, with the 95% CI of `y` as a band."""
    lines = []
    for name in dict.fromkeys(row[series_key] for row in summary):
        points = sorted((row[x], row[y], row[f"{y}_ci"]) for row in summary if row[series_key] == name)
        xs, ys, cis = zip(*points, strict=True)
        lines.append(Series(str(name), list(xs), list(ys), [m - c for m, c in zip(ys, cis, strict=True)],
                            [m + c for m, c in zip(ys, cis, strict=True)]))
    return line_chart(lines, title, x_label, y_label)


def table(summary: list[dict], group: tuple[str, ...], metrics: tuple[str, ...]) -> tuple[list[str], list[list]]:
    columns = [*group, *(f"{m} (95% CI)" for m in metrics), "seeds"]
    rows = [[*(row[k] for k in group), *(f"{row[m]:.3f} ± {row[m + '_ci']:.3f}" for m in metrics), row["n"]]
            for row in summary]
    return columns, rows


def markdown(columns: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    return "\n".join(lines + ["| " + " | ".join(map(str, row)) + " |" for row in rows])


def run_experiment(name: str, seeds: list[int], quick: bool = False, output_dir: str = "runs",
                   echo: Callable[[str], None] = print) -> tuple[Path, list[dict]]:
    """Run experiment `name` for each seed; write results.jsonl, evaluation.json, results.md, plots and
    report.html. Rows are appended to results.jsonl seed by seed, so a killed run keeps the seeds it finished."""
    entry = EXPERIMENTS.get(name)
    meta = entry.meta
    run = RunDir.create(output_dir, f"experiment-{name}")
    rows = []
    for seed in seeds:
        echo(f"[{name}] seed {seed}")
        for row in entry.fn(seed=seed, quick=quick, workdir=run.path / f"seed-{seed}"):
            rows.append({"seed": seed, **row})
            with open(run.path / "results.jsonl", "a") as f:
                f.write(json.dumps(rows[-1]) + "\n")
    summary = summarize(rows, meta["group"], meta["metrics"])
    columns, cells = table(summary, meta["group"], meta["metrics"])
    title = f"{name}: {entry.summary} ({entry.paper})"
    write_evaluation(run.path, title, columns, cells)
    images = []
    for plot in meta["plots"]:
        svg = chart(summary, meta["group"][0], **plot)
        path = save_chart(run.path / f"{plot['y']}.svg", svg)
        images.append(f"![{plot['title']}]({path.name})")
    (run.path / "results.md").write_text("\n\n".join([f"# {title}", markdown(columns, cells), *images]) + "\n")
    build_report([run.path], run.path / "report.html", title=f"alignkit experiment {name}")
    return run.path, summary
