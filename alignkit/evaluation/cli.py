"""`alignkit eval-rm DATA --source SPEC [--source SPEC ...]`: tables, or one JSON document."""

from __future__ import annotations

import json
import sys

from rich.console import Console
from rich.table import Table

from alignkit.data.loaders import DataError, load_records
from alignkit.evaluation.rm import agreement_report, evaluate
from alignkit.sources import SOURCES, build_source
from alignkit.tasks import TASKS

HELD_OUT_SEED = 10_000  # the eval seed of built-in task data (recipes: data.seed + 10_000)


def add_arguments(parser) -> None:
    parser.add_argument("data", help="comparisons (prompt/chosen/rejected[/subset]) or best-of-n sets "
                                     "(chosen and rejected lists) in any format alignkit reads, or "
                                     "task:NAME[:N] for N held-out pairs of a built-in task")
    parser.add_argument("--source", action="append", required=True, metavar="SPEC",
                        help="KIND:TARGET[,key=value...] or a YAML file; repeat to compare sources. Kinds: "
                             + ", ".join(SOURCES.names()))
    parser.add_argument("--json", action="store_true", help="print one JSON document instead of tables")
    parser.add_argument("--limit", type=int, help="evaluate the first N records only")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--bins", type=int, default=10, help="calibration bins")
    parser.add_argument("--seed", type=int, default=0, help="which pairs a pairwise judge sees in swapped order")
    parser.add_argument("--split", default="train", help="split of a saved dataset or hub dataset")


def load_eval_records(path: str, split: str = "train") -> list:
    """Comparisons, or best-of-n sets when `chosen` holds a list; `task:NAME[:N]` for a built-in task's
    held-out comparisons (N pairs, default 200, from the seed training runs hold out)."""
    if path.startswith("task:"):
        _, name, size = (path.split(":") + ["200"])[:3]
        return TASKS.get(name).fn().comparisons(int(size), seed=HELD_OUT_SEED)[0]
    try:
        return load_records(path, "comparison", split=split).records
    except DataError as err:
        if err.field != "chosen":
            raise
        try:   # `chosen` is not one answer (a string or a chat): maybe a best-of-n set of answers
            return load_records(path, "best_of_n", split=split).records
        except DataError:
            raise err from None


def run(args) -> int:
    records = load_eval_records(args.data, args.split)[:args.limit]
    reports, probs = [], []
    for spec in args.source:
        report, pair_probs = evaluate(build_source(spec), records, batch_size=args.batch_size, seed=args.seed,
                                      bins=args.bins)
        reports.append({"source": spec, **report})
        probs.append(pair_probs)
    measured = [(report["source"], p) for report, p in zip(reports, probs, strict=True) if p is not None]
    agreements = agreement_report(*map(list, zip(*measured, strict=True))) if len(measured) > 1 else []
    if args.json:
        json.dump({"data": args.data, "sources": reports, "agreement": agreements}, sys.stdout, indent=2)
        print()
    else:
        print_tables(reports, agreements)
    failed = [r["source"] for r in reports if r["status"] == "failed"]
    if failed:
        print(f"alignkit eval-rm: every call of {', '.join(failed)} failed: no result", file=sys.stderr)
    return 1 if failed else 0


def _fmt(value) -> str:
    if value is None:
        return "-"
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def _print_table(console: Console, title: str, columns: list[str], rows: list[list]) -> None:
    console.print(title, soft_wrap=True)
    table = Table()
    for i, column in enumerate(columns):
        table.add_column(column, justify="left" if i == 0 else "right")
    for row in rows:
        table.add_row(*[_fmt(v) for v in row])
    console.print(table)


def _summary_rows(report: dict) -> list[list]:
    if "rewardbench_v2" in report:
        return [["sets", report["sets"]], ["best-of-n accuracy (RewardBench 2)", report["accuracy"]]]
    bias = report["length_bias"]
    return [["pairs", report["pairs"]], ["failed", report["failed"]], ["accuracy", report["accuracy"]],
            ["calibration error (ECE)", report["calibration"]["ece"]],
            ["length correlation of scores", bias["length_correlation"]],
            ["accuracy, longer answer rejected", bias["accuracy_longer_rejected"]],
            ["accuracy, longer answer chosen", bias["accuracy_longer_chosen"]]]


def print_tables(reports: list[dict], agreements: list[dict]) -> None:
    console = Console()
    for report in reports:
        if report["status"] == "failed":
            errors = "; ".join(report["errors"]) or "no message kept"
            console.print(f"source {report['source']}: FAILED, every call failed ({report['records']} records); "
                          f"first errors: {errors}", soft_wrap=True)
            continue
        _print_table(console, f"source {report['source']}", ["metric", "value"], _summary_rows(report))
        subsets = report.get("subsets") or report.get("rewardbench_v2", {}).get("subsets", {})
        if len(subsets) > 1 or "rewardbench_v2" in report:
            rows = [[name, v.get("accuracy", v.get("score")), v["count"]] for name, v in sorted(subsets.items())]
            _print_table(console, "per subset", ["subset", "score", "count"], rows)
        if report.get("rewardbench_v1"):
            sections = report["rewardbench_v1"]["sections"]
            rows = [[name, score] for name, score in sections.items()]
            _print_table(console, "RewardBench v1 sections", ["section", "score"],
                         rows + [["overall", report["rewardbench_v1"]["overall"]]])
        metrics = [[k, v] for k, v in report["source_metrics"].items() if v]
        _print_table(console, "source accounting", ["counter", "value"], metrics)
    if agreements:
        rows = [[f"{a['a']} vs {a['b']}", a["agreement"], a["kappa"], a["logit_correlation"]] for a in agreements]
        _print_table(console, "agreement", ["sources", "same decision", "kappa", "logit correlation"], rows)
