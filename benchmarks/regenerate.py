"""Regenerate every measured figure in README.md and docs/experiments.md, recording the commit of each.

    python benchmarks/regenerate.py                                   # all six figures: about 20 min on 2 cores
    python benchmarks/regenerate.py --only demo-quick                 # one figure: about a minute
    python benchmarks/regenerate.py --only demo r3m-noise             # several
    python benchmarks/regenerate.py --only routing --quick --seeds 0 --dry-run   # check this script cheaply
    python -m pytest -m slow tests/test_results_at_head.py            # the quick demo against README's table

The figures and where they go:
- demo, demo-quick: `alignkit demo` and `alignkit demo --quick` at seed 0, each a table in README.md,
  section "## The demo's result";
- r3m-noise, overoptimization, routing, self-rewarding-ppo: `alignkit experiment NAME --seeds 0 1 2`
  on one torch thread, each a table and a plot in its section of docs/experiments.md. Every plot the
  experiment draws is copied to docs/experiments/NAME-METRIC.svg.

Each figure is rewritten in place between `<!-- figures:NAME:start -->` and `<!-- figures:NAME:end -->`
(added at the end of its section when the markers are missing). It ends with the line "Made at commit
... by `...`.", and nothing outside the markers changes. benchmarks/results/figures.json keeps, per
figure: the command, the commit, whether it was dirty (tracked files other than the ones this script
writes differed from it), the date, the seconds it took, the numbers, and the seeds' raw rows. The
commit and the dirty flag are read once, before anything is written.

Prose that quotes or interprets these numbers is not rewritten. At the end the script lists those
paragraphs to re-read, each with the numbers it quotes that the new block does not contain.

Tables show the mean ± half-width of the 95% confidence interval over seeds
(alignkit/experiments/base.py). What is bold is stated in each table function's docstring.

--quick runs each experiment small and the quick demo in place of the full one. Those numbers check
this script; they are not results, so --quick writes only with --dry-run or into a copy (--root).
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_SEEDS = [0, 1, 2]
WRITTEN = ("README.md", "docs", "benchmarks/results")  # left out of the dirty check: this script writes them
RECORD = Path("benchmarks/results/figures.json")
RULES = ("top_q", "least_confident", "random")
ROUTING_ROWS = ((200, 0.3), (600, 0.1), (600, 0.3), (2000, 0.2), (2000, 0.5))  # all 54 rows: results.md
NUMBER = re.compile(r"(?<![\w.])[+-]?\d+\.\d{2,3}(?!\d)")


@dataclass(frozen=True)
class Prose:
    """A paragraph that quotes or interprets a figure: found by `opening`, searched from `section` on."""

    section: str | None
    opening: str
    why: str


@dataclass(frozen=True)
class Figure:
    doc: str
    section: str
    image: tuple[str, str] | None = None  # (alt text, plotted metric) for docs/experiments/NAME-METRIC.svg
    prose: tuple[Prose, ...] = ()


DEMO_SECTION = "## The demo's result"
FIGURES = {
    "demo": Figure("README.md", DEMO_SECTION, prose=(
        Prose(None, "Install and run the main job, about a minute", "the full demo's time"),
        Prose(DEMO_SECTION, "`alignkit demo` on this 2-core CPU", "the full demo's time (40-60 s)"),
        Prose(DEMO_SECTION, "The best continuation scores about", "interprets the demo table"),
    )),
    "demo-quick": Figure("README.md", DEMO_SECTION, prose=(
        Prose(None, "alignkit demo [--quick]", "the quick demo's time (about 20 s)"),
        Prose(DEMO_SECTION, "The best continuation scores about", "the quick demo's time (about 20-30 s)"),
        Prose(DEMO_SECTION, "The quick run's Self-Rewarding PPO", "interprets the quick-demo table"),
    )),
    "r3m-noise": Figure("docs/experiments.md", "## r3m-noise", ("accuracy against corruption", "accuracy"), (
        Prose(None, "| `r3m-noise` |", "time for 3 seeds"),
        Prose("## r3m-noise", "The direction reproduced", "interprets the table; quotes per-seed gains"),
    )),
    "overoptimization": Figure("docs/experiments.md", "## overoptimization", ("gold against sqrt KL", "gold"), (
        Prose(None, "| `overoptimization` |", "time for 3 seeds"),
        Prose("## overoptimization", "The claim reproduced.", "interprets the table and the curve"),
        Prose("## overoptimization", "With three seeds the intervals are wide", "interprets the intervals"),
    )),
    "routing": Figure("docs/experiments.md", "## routing", ("accuracy against budget", "accuracy"), (
        Prose(None, "| `routing` |", "time for 3 seeds"),
        Prose("## routing", "The setting, per seed", "states ties left out per seed and equal judge-call fractions"),
        Prose("## routing", "The claim reproduced against random", "interprets the table"),
        Prose("## routing", "But SNGP routing was not the best rule", "interprets the table"),
    )),
    "self-rewarding-ppo": Figure("docs/experiments.md", "## self-rewarding-ppo", ("gold on ood prompts", "gold_ood"), (
        Prose(None, "| `self-rewarding-ppo` |", "time for 3 seeds"),
        Prose("## self-rewarding-ppo", "Self-Rewarding PPO beat its SFT model", "interprets the table"),
        Prose("## self-rewarding-ppo", "What did **not** show", "quotes SFT's gold in and out of distribution"),
    )),
}


@dataclass
class Measurement:
    command: str  # the alignkit command this equals
    seconds: float
    numbers: dict | list  # the demo's rows by method, or an experiment's summary rows
    run_dir: Path
    seed_rows: list[dict] = field(default_factory=list)


@dataclass(frozen=True)
class GitState:
    commit: str
    dirty: bool


# ----- measuring -----
def measure(name: str, args: argparse.Namespace) -> Measurement:
    if name in ("demo", "demo-quick"):
        return measure_demo(name == "demo-quick" or args.quick, args.output_dir)
    return measure_experiment(name, args.seeds, args.quick, args.output_dir)


def measure_demo(quick: bool, output_dir: str) -> Measurement:
    from alignkit.demo import run_demo

    started = time.perf_counter()
    result = run_demo(quick=quick, output_dir=output_dir, seed=0, echo=print)
    command = "alignkit demo --quick --seed 0" if quick else "alignkit demo --seed 0"
    return Measurement(command, round(time.perf_counter() - started, 1), result.rows, result.path)


def measure_experiment(name: str, seeds: list[int], quick: bool, output_dir: str) -> Measurement:
    import torch

    from alignkit.experiments import run_experiment

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the docs' results were measured
    started = time.perf_counter()
    try:
        path, summary = run_experiment(name, seeds, quick=quick, output_dir=output_dir, echo=print)
    finally:
        torch.set_num_threads(threads)
    seconds = round(time.perf_counter() - started, 1)
    rows = [json.loads(line) for line in (path / "results.jsonl").read_text().splitlines()]
    command = f"alignkit experiment {name} --seeds {' '.join(map(str, seeds))}" + (" --quick" if quick else "")
    return Measurement(command, seconds, summary, path, rows)


# ----- tables -----
def markdown_table(columns: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def bold_if(text: str, condition: bool) -> str:
    return f"**{text}**" if condition else text


def with_ci(row: dict, metric: str, digits: int = 3, signed: bool = False) -> str:
    mean = f"{row[metric]:+.{digits}f}" if signed else f"{row[metric]:.{digits}f}"
    return f"{mean} ± {row[metric + '_ci']:.{digits}f}"


def demo_table(rows: dict[str, dict[str, float]]) -> str:
    """Every model's row. Bold: the highest gold, gold ood and win rate."""
    columns = list(next(iter(rows.values())))
    best = {c: max(values[c] for values in rows.values()) for c in ("gold", "gold ood", "win vs SFT")}
    cells = [[method, *(bold_if(f"{v:.3f}", best.get(c) == v) for c, v in values.items())]
             for method, values in rows.items()]
    return markdown_table(["method", *columns], cells)


def r3m_noise_table(summary: list[dict]) -> str:
    """One row per corruption level. Bold: R3M's largest paired gain."""
    rows = {(r["method"], r["corruption"]): r for r in summary}
    levels = sorted({r["corruption"] for r in summary})
    top = max(levels, key=lambda level: rows["R3M", level]["accuracy_gain"])
    cells = []
    for level in levels:
        bt, r3m = rows["Bradley-Terry", level], rows["R3M", level]
        flips = f"{bt['flip_precision']:.3f} / {r3m['flip_precision']:.3f}" if level > 0 else "–"
        cells.append([f"{level:.1f}", with_ci(bt, "accuracy"), with_ci(r3m, "accuracy"),
                      bold_if(with_ci(r3m, "accuracy_gain", signed=True), level == top), flips])
    columns = ["corruption", "Bradley-Terry", "R3M", "gain (paired)", "flip precision, BT / R3M"]
    return markdown_table(columns, cells)


def routing_table(summary: list[dict]) -> str:
    """The fast model alone, the docs' (size, budget) rows, then the judge on every pair.
    Bold: a paired gain over random routing whose 95% interval excludes 0."""
    rows = {(r["router"], r["budget"]): r for r in summary}
    sizes = sorted({int(r["router"].split(", ")[1].split()[0]) for r in summary})
    budgets = sorted({r["budget"] for r in summary})
    chosen = [(s, b) for s, b in ROUTING_ROWS if s in sizes and b in budgets]
    chosen = chosen or [(s, b) for s in sizes for b in budgets if 0 < b < 1]  # --quick has none of the docs' rows
    cells = [[str(sizes[0]), "0 (fast model alone)", *routing_cells(rows, sizes[0], 0.0)]] if 0.0 in budgets else []
    cells += [[str(size), str(budget), *routing_cells(rows, size, budget)] for size, budget in chosen]
    if 1.0 in budgets:
        cells += routing_full_budget(rows, sizes)
    columns = ["training pairs", "budget q", "top_q (SNGP)", "least_confident", "random", "top_q - random (paired)"]
    return markdown_table(columns, cells)


def routing_cells(rows: dict, size: int, budget: float) -> list[str]:
    top, least, rand = (rows[f"{rule}, {size} pairs", budget] for rule in RULES)
    if budget in (0.0, 1.0):  # every rule routes nothing, or everything: one accuracy
        first = with_ci(top, "accuracy") if top["accuracy_ci"] else f"{top['accuracy']:.3f}"
        return [first, f"{least['accuracy']:.3f}", f"{rand['accuracy']:.3f}", "0"]
    apart = abs(top["accuracy_gain"]) > top["accuracy_gain_ci"]
    return [with_ci(top, "accuracy"), with_ci(least, "accuracy"), with_ci(rand, "accuracy"),
            bold_if(with_ci(top, "accuracy_gain", signed=True), apart)]


def routing_full_budget(rows: dict, sizes: list[int]) -> list[list[str]]:
    """One row labelled "any" when every training-set size gives the same accuracy at q = 1, else one per size."""
    accuracies = {rows[f"top_q, {size} pairs", 1.0]["accuracy"] for size in sizes}
    if len(accuracies) == 1:
        return [["any", "1.0", *routing_cells(rows, sizes[0], 1.0)]]
    return [[str(size), "1.0", *routing_cells(rows, size, 1.0)] for size in sizes]


def overoptimization_table(summary: list[dict]) -> str:
    """One row per proxy: gold at the start, at its best and at the end, with KL and proxy at the end.
    Bold: the highest best gold and the highest final gold."""
    curves: dict[str, list[dict]] = {}
    for row in sorted(summary, key=lambda r: r["step"]):
        curves.setdefault(row["reward model"], []).append(row)
    peaks = {name: max(curve, key=lambda r: r["gold"]) for name, curve in curves.items()}
    best_peak = max(p["gold"] for p in peaks.values())
    best_end = max(curve[-1]["gold"] for curve in curves.values())
    cells = []
    for name, curve in curves.items():
        first, peak, last = curve[0], peaks[name], curve[-1]
        cells.append([name, with_ci(first, "gold"),
                      f"{bold_if(with_ci(peak, 'gold'), peak['gold'] == best_peak)} ({peak['step']})",
                      bold_if(with_ci(last, "gold"), last["gold"] == best_end), with_ci(last, "sqrt_kl", 2),
                      f"{first['proxy']:.2f} → {last['proxy']:.2f}"])
    end = max(r["step"] for r in summary)
    columns = ["proxy", "gold at step 0", "best gold (step)", f"gold at step {end}", f"sqrt KL at step {end}",
               f"proxy at step 0 → {end}"]
    return markdown_table(columns, cells)


def self_rewarding_table(summary: list[dict]) -> str:
    """One row per number of demonstrations. Bold: SRPPO's gold ood where its 95% interval and SFT's are apart."""
    rows = {(r["method"], r["demonstrations"]): r for r in summary}
    cells = []
    for count in sorted({r["demonstrations"] for r in summary}):
        sft, rl = rows["SFT", count], rows["Self-Rewarding PPO", count]
        apart = abs(rl["gold_ood"] - sft["gold_ood"]) > rl["gold_ood_ci"] + sft["gold_ood_ci"]
        cells.append([str(count), with_ci(sft, "gold_ood"), bold_if(with_ci(rl, "gold_ood"), apart),
                      with_ci(rl, "win_ood"), with_ci(sft, "gold_in"), with_ci(rl, "gold_in"),
                      with_ci(rl, "kl_to_sft", 2)])
    columns = ["demonstrations", "SFT, gold ood", "SRPPO, gold ood", "SRPPO win rate vs SFT, ood",
               "SFT, gold in-dist", "SRPPO, gold in-dist", "SRPPO KL to SFT"]
    return markdown_table(columns, cells)


TABLES = {"demo": demo_table, "demo-quick": demo_table, "r3m-noise": r3m_noise_table,
          "overoptimization": overoptimization_table, "routing": routing_table,
          "self-rewarding-ppo": self_rewarding_table}


def render(name: str, numbers: dict | list) -> str:
    """The block's body without its last line: the table, and the plot the docs show."""
    body = TABLES[name](numbers)
    image = FIGURES[name].image
    if image:
        body += f"\n\n![{image[0]}](experiments/{name}-{image[1]}.svg)"
    return body


def made_at(state: GitState, command: str) -> str:
    where = f"commit {state.commit}" + (" with uncommitted changes" if state.dirty else "")
    return f"Made at {where} by `{command}`."


def regenerate_command(name: str, args: argparse.Namespace) -> str:
    parts = ["python benchmarks/regenerate.py --only", name]
    if args.quick:
        parts.append("--quick")
    if not name.startswith("demo") and args.seeds != DEFAULT_SEEDS:
        parts += ["--seeds", *map(str, args.seeds)]
    return " ".join(parts)


# ----- writing -----
def replace_block(text: str, name: str, block: str, section: str) -> str:
    """`text` with the block between NAME's markers replaced, or added at the end of `section`."""
    start, end = f"<!-- figures:{name}:start -->", f"<!-- figures:{name}:end -->"
    marked = f"{start}\n\n{block}\n\n{end}"
    pattern = re.compile(re.escape(start) + ".*?" + re.escape(end), re.DOTALL)
    if pattern.search(text):
        return pattern.sub(lambda _: marked, text, count=1)
    print(f"{name}: no markers yet; adding the block at the end of '{section}'")
    return insert_at_section_end(text, section, marked)


def insert_at_section_end(text: str, section: str, block: str) -> str:
    lines = text.split("\n")
    if section not in lines:
        raise SystemExit(f"regenerate.py: heading '{section}' not found")
    start = lines.index(section)
    level = len(section) - len(section.lstrip("#"))
    headings = [i for i in range(start + 1, len(lines)) if re.match(rf"#{{1,{level}}} ", lines[i])]
    end = headings[0] if headings else len(lines)
    while end > start + 1 and not lines[end - 1].strip():
        end -= 1
    tail = lines[end:] if lines[end:end + 1] == [""] else ["", *lines[end:]]
    return "\n".join(lines[:end] + ["", block] + tail)


def copy_plots(run_dir: Path, name: str, root: Path) -> list[str]:
    """Every plot of the experiment as docs/experiments/NAME-METRIC.svg; returns the paths written."""
    target = root / "docs" / "experiments"
    target.mkdir(parents=True, exist_ok=True)
    copied = []
    for svg in sorted(run_dir.glob("*.svg")):
        shutil.copyfile(svg, target / f"{name}-{svg.name}")
        copied.append(f"docs/experiments/{name}-{svg.name}")
    return copied


def record(root: Path, name: str, entry: dict) -> None:
    """Update figures.json: one entry per figure, in FIGURES' order, the others kept."""
    path = root / RECORD
    figures = json.loads(path.read_text()) if path.exists() else {}
    figures[name] = entry
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({n: figures[n] for n in FIGURES if n in figures}, indent=1) + "\n")


def entry(name: str, measurement: Measurement, command: str, state: GitState, plots: list[str]) -> dict:
    return {"command": command, "runs": measurement.command, "commit": state.commit, "dirty": state.dirty,
            "date": datetime.now(UTC).isoformat(timespec="seconds"), "seconds": measurement.seconds,
            "doc": FIGURES[name].doc, "plots": plots, "numbers": measurement.numbers,
            "seed_rows": measurement.seed_rows}


def write(name: str, measurement: Measurement, block: str, command: str, state: GitState, root: Path) -> None:
    figure = FIGURES[name]
    doc = root / figure.doc
    doc.write_text(replace_block(doc.read_text(), name, block, figure.section))
    plots = copy_plots(measurement.run_dir, name, root) if figure.image else []
    record(root, name, entry(name, measurement, command, state, plots))
    print(f"{name}: wrote {figure.doc}" + "".join(f", {p}" for p in plots) + f" and {RECORD}")


# ----- git -----
def git(*args: str) -> str:
    return subprocess.run(["git", *args], cwd=ROOT, check=True, capture_output=True, text=True).stdout.strip()


def git_state() -> GitState:
    excluded = [f":(exclude){path}" for path in WRITTEN]
    changed = git("status", "--porcelain", "--untracked-files=no", "--", ".", *excluded)
    return GitState(git("rev-parse", "--short", "HEAD"), bool(changed))


# ----- prose to re-read -----
def find_paragraph(lines: list[str], prose: Prose) -> int | None:
    start = lines.index(prose.section) if prose.section in lines else 0
    return next((i for i in range(start, len(lines)) if prose.opening in lines[i]), None)


def paragraph_text(lines: list[str], first: int) -> str:
    """The paragraph from line `first` to a blank line, a code fence or a heading."""
    end = first + 1
    while end < len(lines) and lines[end].strip() and not lines[end].startswith(("```", "#")):
        end += 1
    return "\n".join(lines[first:end])


def numbers_in(text: str) -> set[str]:
    return {n.lstrip("+-") for n in NUMBER.findall(text)}


def reread(name: str, block: str, root: Path) -> list[str]:
    """One line per paragraph of this figure's prose: where it is, why, and quoted numbers the block lacks."""
    figure = FIGURES[name]
    lines = (root / figure.doc).read_text().split("\n")
    out = []
    for prose in figure.prose:
        first = find_paragraph(lines, prose)
        if first is None:
            out.append(f"  {figure.doc}: paragraph opening {prose.opening!r} not found (edited?)")
            continue
        missing = sorted(numbers_in(paragraph_text(lines, first)) - numbers_in(block), key=float)
        note = f"; quotes {', '.join(missing)}, not in the new block" if missing else ""
        out.append(f"  {figure.doc}:{first + 1}: {prose.why}{note}\n      {lines[first].strip()[:110]}")
    return out


def print_reminder(done: dict[str, tuple[Measurement, str]], root: Path, dry_run: bool) -> None:
    print("\nRe-read by hand: these paragraphs quote or interpret the figures just made, and are not rewritten"
          + (" (dry run: nothing was written)" if dry_run else "") + ":")
    for name, (measurement, block) in done.items():
        print(f"{name} (took {measurement.seconds:.0f} s):")
        print("\n".join(reread(name, block, root)))


# ----- main -----
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", nargs="+", choices=list(FIGURES), default=list(FIGURES), metavar="FIGURE",
                        help=f"figures to make, of: {', '.join(FIGURES)} (default: all)")
    parser.add_argument("--quick", action="store_true", help="small settings, to check this script (not results)")
    parser.add_argument("--seeds", type=int, nargs="+", default=DEFAULT_SEEDS, help="the experiments' seeds")
    parser.add_argument("--dry-run", action="store_true", help="print the blocks; write nothing")
    parser.add_argument("--root", type=Path, default=ROOT, help="where README.md and docs/ are (default: the repo)")
    parser.add_argument("--output-dir", default=str(ROOT / "runs"), help="where the runs go")
    args = parser.parse_args(argv)
    if args.quick and not args.dry_run and args.root.resolve() == ROOT:
        parser.error("--quick numbers are not results: add --dry-run, or --root a copy of README.md and docs/")
    return args


def main(argv: list[str] | None = None) -> int:
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    args = parse_args(argv)
    state = git_state()
    done = {}
    for name in dict.fromkeys(args.only):
        measurement = measure(name, args)
        command = regenerate_command(name, args)
        block = render(name, measurement.numbers) + "\n\n" + made_at(state, command)
        done[name] = (measurement, block)
        if args.dry_run:
            print(f"\n<!-- figures:{name}:start -->\n\n{block}\n\n<!-- figures:{name}:end -->\n")
        else:
            write(name, measurement, block, command, state, args.root)
    print_reminder(done, args.root, args.dry_run)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
