"""README's quick-demo table holds at the code being tested.

    python -m pytest -m slow tests/test_results_at_head.py    # about a minute on 2 cores
    python benchmarks/regenerate.py --only demo-quick          # rewrite the table when a change moves it

The table is the block between `<!-- figures:demo-quick:start -->` and `<!-- figures:demo-quick:end -->`
in README.md, "## The demo's result", written by benchmarks/regenerate.py from `alignkit demo --quick`
at seed 0.

Tolerance: 0.02 absolute on every number of the table. What was measured: three runs of
`run_demo(quick=True, seed=0)` on the same 2-core CPU gave bit-identical rows (largest difference
0.0), twice at one commit and once at the next. The demo samples with fixed seeds on one torch
thread, so on one machine it is deterministic, and README's rounding to 3 decimals adds at most
0.0005. The rest of the margin is for other CPUs and math libraries, where a few of the 150 sampled
completions per model can differ: one changed win-rate verdict moves a rate by 1/150 ≈ 0.007. A
change to the code that moves any number by more than 0.02 fails here until the table is regenerated.
"""

from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"
START, END = "<!-- figures:demo-quick:start -->", "<!-- figures:demo-quick:end -->"
TOLERANCE = 0.02


def cells(line: str) -> list[str]:
    return [cell.strip().strip("*") for cell in line.strip().strip("|").split("|")]


def readme_quick_table() -> dict[str, dict[str, float]]:
    """README's quick-demo table as {method: {column: value}}."""
    text = README.read_text(encoding="utf-8")
    assert START in text and END in text, f"README.md has no {START} ... {END} block"
    block = text.split(START, 1)[1].split(END, 1)[0]
    header, _, *rows = [cells(line) for line in block.splitlines() if line.startswith("|")]
    return {row[0]: dict(zip(header[1:], map(float, row[1:]), strict=True)) for row in rows}


def test_readme_quick_demo_table_is_there_and_parses():
    table = readme_quick_table()
    assert {"base", "SFT", "DPO", "GRPO on RM", "Self-Rewarding PPO"} <= set(table)
    assert all(len(values) == 5 for values in table.values())


@pytest.mark.slow
def test_quick_demo_matches_readme_within_tolerance(tmp_path):
    from alignkit.demo import run_demo

    expected = readme_quick_table()
    measured = run_demo(quick=True, output_dir=str(tmp_path), seed=0, echo=lambda *_: None).rows
    assert {m: list(v) for m, v in measured.items()} == {m: list(v) for m, v in expected.items()}
    off = {f"{method} / {column}": (expected[method][column], round(value, 4))
           for method, values in measured.items() for column, value in values.items()
           if abs(value - expected[method][column]) > TOLERANCE}
    assert not off, (f"README's quick-demo table (README, measured) differs by more than {TOLERANCE}: {off}; "
                     "rerun `python benchmarks/regenerate.py --only demo-quick`")
