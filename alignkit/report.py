"""`alignkit report RUN_DIR...`: one static HTML page that compares runs side by side and opens offline.

Charts of reward, KL, loss, response length and per-phase time overlay every run; tables give each
run's final evaluation, any `evaluation.json`, and where the runs' configs differ. The page holds
everything inline (CSS, SVG, one small script that counts the drawn lines) and links to nothing.
"""

from __future__ import annotations

import argparse
import html
import json
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import yaml

from alignkit.plots import PALETTE, SVG_NAMESPACE, Series, line_chart

METRICS, EVALUATION = "metrics.jsonl", "evaluation.json"
PHASES = ("generate", "score", "reference", "advantage", "update", "sync")   # online RL's, in order; then "step"


@dataclass(frozen=True)
class Chart:
    """A quantity drawn for every run: the first of `train` keys it logged (solid), the first of `eval` (dashed)."""

    title: str
    y_label: str
    train: tuple[str, ...]
    eval: tuple[str, ...] = ()


CHARTS = (
    Chart("Reward", "mean reward", ("train/reward/mean",), ("eval/reward",)),
    Chart("KL to the reference", "KL per token", ("train/kl",)),
    Chart("Loss (training loss; policy loss in RL)", "loss", ("train/loss", "train/loss/policy"), ("eval/loss",)),
    Chart("Value loss", "loss", ("train/loss/value",)),
    Chart("Response length", "tokens", ("train/response_length/mean",), ("eval/response_length",)),
    Chart("Preference accuracy", "accuracy", ("train/preference_accuracy",), ("eval/preference_accuracy",)),
)


# ----- reading run directories -----
@dataclass
class Run:
    path: Path
    name: str
    config: dict
    manifest: dict
    metrics: dict[str, dict[int, float]]   # key -> step -> value; of repeated steps the last line wins

    def curve(self, keys: tuple[str, ...]) -> tuple[list[int], list[float]] | None:
        key = next((k for k in keys if k in self.metrics), None)
        if key is None:
            return None
        steps = sorted(self.metrics[key])
        return steps, [self.metrics[key][s] for s in steps]

    def final(self, key: str) -> float | None:
        values = self.metrics.get(key)
        return values[max(values)] if values else None

    @property
    def steps(self) -> int:
        return max((max(v) for k, v in self.metrics.items() if k.startswith("train/")), default=0)


def read_metrics(path: Path) -> dict[str, dict[int, float]]:
    """Numeric values of every metric line by key and step; event lines are skipped. A bad line is an error."""
    metrics = defaultdict(dict)
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}, line {number}: not JSON ({err.msg})") from None
        if not isinstance(record, dict) or not isinstance(record.get("step"), int):
            raise ValueError(f"{path}, line {number}: expected a JSON object with an integer \"step\"")
        if "event" in record:
            continue
        for key, value in record.items():
            if key != "step" and isinstance(value, int | float) and not isinstance(value, bool):
                metrics[key][record["step"]] = float(value)
    return dict(metrics)


def find_runs(dirs: list[Path]) -> tuple[list[Path], list[Path]]:
    """Run directories (each dir itself, or its immediate subdirectories holding metrics) and evaluation files.

    A directory with an evaluation.json and no runs (an experiment's) is reported by its tables and figures."""
    runs, evaluations = [], []
    for directory in dirs:
        if not directory.is_dir():
            raise FileNotFoundError(f"{directory}: no such directory")
        found = [directory] if (directory / METRICS).is_file() else sorted(
            child for child in directory.iterdir() if (child / METRICS).is_file())
        if not found and not (directory / EVALUATION).is_file():
            raise FileNotFoundError(f"{directory}: no {METRICS} there or in its immediate subdirectories, "
                                    f"and no {EVALUATION}")
        runs += [run for run in found if run not in runs]
        candidates = [directory / EVALUATION, *(run / EVALUATION for run in found)]
        evaluations += [p for p in candidates if p.is_file() and p not in evaluations]
    return runs, evaluations


def _names(paths: list[Path]) -> list[str]:
    names = [p.name for p in paths]
    if len(set(names)) < len(names):   # e.g. two demo directories, each with sft/ and dpo/
        names = [f"{p.parent.name}/{p.name}" for p in paths]
    return names


def _read_mapping(path: Path, parse) -> dict:
    """config.yaml or manifest.json as a dict; {} when there is none."""
    if not path.is_file():
        return {}
    try:
        data = parse(path.read_text(encoding="utf-8"))
    except (ValueError, yaml.YAMLError) as err:
        raise ValueError(f"{path}: cannot be parsed ({err})") from None
    return data if isinstance(data, dict) else {}


def load_run(path: Path, name: str) -> Run:
    return Run(path, name, _read_mapping(path / "config.yaml", yaml.safe_load),
               _read_mapping(path / "manifest.json", json.loads), read_metrics(path / METRICS))


def write_evaluation(directory: Path, title: str, columns: list[str], rows: list[list], **extra) -> Path:
    """Write the evaluation table that `read_evaluation` reads (extra keys ride along, unrendered)."""
    path = directory / EVALUATION
    path.write_text(json.dumps({"title": title, "columns": columns, "rows": rows, **extra}, indent=2))
    return path


def read_evaluation(path: Path) -> dict:
    """An evaluation table: {"title": str, "columns": [str, ...], "rows": [[cell, ...], ...]}."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not JSON ({err.msg}, line {err.lineno})") from None
    if not (isinstance(data, dict) and isinstance(data.get("columns"), list) and isinstance(data.get("rows"), list)):
        raise ValueError(f'{path}: expected {{"title": ..., "columns": [...], "rows": [[...], ...]}}')
    for number, row in enumerate(data["rows"], 1):
        if not isinstance(row, list) or len(row) != len(data["columns"]):
            raise ValueError(f"{path}: row {number} is not a list of {len(data['columns'])} cells")
    return data


# ----- HTML pieces -----
def _cell(value) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, str):
        return html.escape(value)
    return html.escape(json.dumps(value))


def _table(header: list[str], rows: list[list]) -> str:
    def td(value) -> str:
        numeric = isinstance(value, int | float) and not isinstance(value, bool)
        return f'<td class="num">{_cell(value)}</td>' if numeric else f"<td>{_cell(value)}</td>"

    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(map(td, row)) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _method(config: dict) -> str:
    loss = config.get("loss") if isinstance(config.get("loss"), dict) else {}
    return config.get("recipe") or loss.get("name") or ""


def _model(config: dict) -> str:
    model = config.get("model")
    return model.get("name", "") if isinstance(model, dict) else str(model or "")


def _runs_table(runs: list[Run]) -> str:
    rows = [[run.name, run.config.get("command", ""), _method(run.config), _model(run.config), run.steps,
             run.manifest.get("created", ""), str(run.path)] for run in runs]
    table = _table(["run", "command", "recipe / loss", "model", "steps", "started", "directory"], rows)
    argv = [f"<li><b>{html.escape(run.name)}</b>: <code>{html.escape(' '.join(run.manifest['argv']))}</code></li>"
            for run in runs if run.manifest.get("argv")]
    return table + (f"<p>Started as:</p><ul>{''.join(argv)}</ul>" if argv else "")


def _chart(chart: Chart, runs: list[Run]) -> str | None:
    series = []
    for i, run in enumerate(runs):
        color = PALETTE[i % len(PALETTE)]
        for keys, dashed in ((chart.train, False), (chart.eval, True)):
            curve = run.curve(keys)
            if curve:
                series.append(Series(run.name + (" \u00b7 eval" if dashed else ""), *curve, color=color,
                                     dashed=dashed))
    return line_chart(series, chart.title, "step", chart.y_label, width=720) if series else None


def _phase_chart(run: Run) -> str | None:
    logged = [k.removeprefix("train/time/") for k in run.metrics if k.startswith("train/time/")]
    phases = [p for p in PHASES if p in logged] + sorted(p for p in logged if p not in PHASES and p != "step")
    if "step" in logged:
        phases.append("step")
    series = [Series("whole step" if p == "step" else p, *run.curve((f"train/time/{p}",)), dashed=p == "step")
              for p in phases]
    return line_chart(series, f"Time per phase: {run.name}", "step", "seconds", width=720) if series else None


def _plots(runs: list[Run]) -> str:
    charts = [_chart(chart, runs) for chart in CHARTS] + [_phase_chart(run) for run in runs]
    figures = "".join(f"<figure>{svg}</figure>" for svg in charts if svg)
    if not figures:
        return "<p>No training metrics to plot yet.</p>"
    return ('<p class="meta">Solid lines: training (per step); dashed: evaluation on held-out data.</p>'
            f'<div class="charts">{figures}</div>')


def _final_evaluation(runs: list[Run]) -> str:
    keys = list(dict.fromkeys(k for run in runs for k in run.metrics if k.startswith("eval/")))
    if not keys:
        return ""
    rows = [[key.removeprefix("eval/")] + [run.final(key) for run in runs] for key in keys]
    return "<h3>Final evaluation of each run</h3>" + _table(["metric"] + [run.name for run in runs], rows)


def _evaluation(runs: list[Run], evaluations: list[Path]) -> str:
    parts = []
    for path in evaluations:
        data = read_evaluation(path)
        parts.append(f"<h3>{html.escape(data.get('title') or path.parent.name)}</h3>")
        parts.append(_table(data["columns"], data["rows"]))
    parts.append(_final_evaluation(runs))
    return "".join(parts) or "<p>No evaluation logged.</p>"


def _flatten(config: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in config.items():
        if isinstance(value, dict) and value:
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _config_differences(runs: list[Run]) -> str:
    if len(runs) < 2:
        return ""
    configs = [_flatten(run.config) for run in runs]
    rows = []
    for key in dict.fromkeys(k for config in configs for k in config):
        values = [config.get(key, "\u2013") for config in configs]   # a dash where a run lacks the setting
        if len({json.dumps(v, default=str) for v in values}) > 1:
            rows.append([key, *values])
    if not rows:
        return "<h2>Configuration</h2><p>The runs' configurations are identical.</p>"
    table = _table(["setting"] + [run.name for run in runs], rows)
    return (f"<h2>Configuration differences</h2><details><summary>{len(rows)} settings differ between the runs"
            f"</summary>{table}</details>")


# ----- the page -----
STYLE = """
body { font-family: sans-serif; margin: 24px auto; max-width: 1520px; padding: 0 16px; color: #222; }
h1 { font-size: 22px; } h2 { font-size: 18px; margin-top: 32px; border-bottom: 1px solid #ddd; }
.meta { color: #666; }
.charts { display: grid; grid-template-columns: repeat(auto-fill, minmax(600px, 1fr)); gap: 12px; }
figure { margin: 0; } svg.chart { width: 100%; height: auto; }
table { border-collapse: collapse; margin: 12px 0 20px; font-size: 14px; }
h3 { font-size: 15px; margin-bottom: 4px; }
th, td { border: 1px solid #ddd; padding: 4px 10px; text-align: left; vertical-align: top; }
th { background: #f4f4f4; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
td:last-child { word-break: break-all; } code { font-size: 13px; word-break: break-all; }
"""

# Once the page is laid out: on each chart, data-drawn counts the series whose line has a length or whose marker
# a size, and data-frame gives the plot area's box in page pixels; data-charts-drawn on <body> says how many
# charts have every series with points drawn ("drawn/total"). The rendering test reads them back.
CHECK_DRAWN = """
(() => {
  const charts = [...document.querySelectorAll("svg.chart")];
  let complete = 0;
  for (const chart of charts) {
    const groups = [...chart.querySelectorAll("g.series")];
    const drawn = groups.filter(g => {
      const line = g.querySelector("path.line");
      const markers = [...g.querySelectorAll("circle.marker")];
      return (line && line.getTotalLength() > 0) || markers.some(m => m.getBBox().width > 0);
    }).length;
    const box = chart.querySelector("rect.frame").getBoundingClientRect();
    chart.setAttribute("data-drawn", drawn);
    chart.setAttribute("data-frame", [box.left, box.top, box.width, box.height].map(Math.round).join(" "));
    if (drawn === groups.filter(g => g.dataset.points !== "0").length) complete++;
  }
  document.body.setAttribute("data-charts-drawn", complete + "/" + charts.length);
})();
"""


def _figures(dirs: list[Path]) -> str:
    """Charts saved next to an evaluation table (an experiment's .svg files), inlined."""
    charts = [path.read_text(encoding="utf-8").replace(f' xmlns="{SVG_NAMESPACE}"', "")
              for directory in dirs for path in sorted(directory.glob("*.svg"))]
    return "<h2>Figures</h2>" + "".join(charts) if charts else ""


def render(runs: list[Run], evaluations: list[Path], title: str, notes: list[str], figures: str = "") -> str:
    notes_html = "".join(f"<li>{html.escape(n)}</li>" for n in notes)
    curves = ["<h2>Training curves</h2>", _plots(runs)] if runs else []
    body = [f"<h1>{html.escape(title)}</h1>",
            f'<p class="meta">alignkit report, {time.strftime("%Y-%m-%d %H:%M")}, {len(runs)} run(s)</p>',
            _runs_table(runs) if runs else "", f'<ul class="notes">{notes_html}</ul>' if notes else "",
            *curves, figures, "<h2>Evaluation</h2>", _evaluation(runs, evaluations),
            _config_differences(runs)]
    return (f'<!doctype html>\n<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
            f"<style>{STYLE}</style></head>\n<body>\n" + "\n".join(body) + f"\n<script>{CHECK_DRAWN}</script>\n"
            "</body></html>\n")


def default_output(run_dirs: list[Path]) -> Path:
    return run_dirs[0] / "report.html" if len(run_dirs) == 1 else Path("report.html")


def build_report(run_dirs: list[str | Path], output: str | Path | None = None, title: str | None = None) -> Path:
    """Write the HTML report of `run_dirs` (run directories, or parents of several) to `output`; return its path."""
    dirs = [Path(d) for d in run_dirs]
    paths, evaluations = find_runs(dirs)
    runs = [load_run(path, name) for path, name in zip(paths, _names(paths), strict=True)]
    notes = [f"{run.name}: {METRICS} has no metrics yet" for run in runs if not run.metrics]
    names = [run.name for run in runs] or [d.name for d in dirs]
    title = title or "alignkit report: " + (", ".join(names) if len(names) <= 6 else f"{len(names)} runs")
    output = Path(output) if output else default_output(dirs)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(render(runs, evaluations, title, notes, _figures(dirs)), encoding="utf-8")
    return output


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR",
                        help="run directories, or directories whose subdirectories are runs (the demo's)")
    parser.add_argument("--output", metavar="PATH",
                        help="where to write the page (default: report.html in the one RUN_DIR, else ./report.html)")
    parser.add_argument("--title", help="the page's title")


def run(args: argparse.Namespace) -> int:
    print(build_report(args.run_dirs, args.output, args.title))
    return 0
