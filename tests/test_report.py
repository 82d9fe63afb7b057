"""`alignkit report` and its SVG charts: closed-form geometry, a page from real tiny runs, headless Chromium."""

import html
import json
import math
import os
import re
import shutil
import struct
import subprocess
import xml.etree.ElementTree as ET
import zlib

import numpy as np
import pytest
import yaml

from alignkit.cli import main
from alignkit.config import build
from alignkit.plots import PALETTE, Series, line_chart, nice_ticks, save_chart
from alignkit.report import build_report
from alignkit.train import RunConfig, train
from alignkit.train.rl import config_from, run_rl

pytestmark = pytest.mark.usefixtures("one_torch_thread")
RL_STEPS, SFT_STEPS, EVAL_EVERY = 3, 2, 2
ARITHMETIC = {"task": "arithmetic", "task_options": {"max_operand": 9}, "task_size": 64, "eval_size": 8}
EVALUATION = {"title": "held-out accuracy", "columns": ["model", "accuracy", "n"],
              "rows": [["base", 0.195, 200], ["after GRPO", 0.41, 200]]}


# ----- reading charts back out of SVG and HTML -----
def charts(page: str) -> dict[str, str]:
    found = re.findall(r'(<svg class="chart" data-title="([^"]*)".*?</svg>)', page, re.S)
    return {html.unescape(title): svg for svg, title in found}


def series_of(svg: str) -> dict[str, tuple[int, str]]:
    """Series name -> (data-points, the group's markup)."""
    groups = re.findall(r'<g class="series" data-name="([^"]*)" data-points="(\d+)">(.*?)</g>', svg, re.S)
    return {html.unescape(name): (int(points), body) for name, points, body in groups}


def drawn_points(group: str) -> int:
    """Vertices of the group's line plus its lone-point markers."""
    line = re.search(r'<path class="line" d="([^"]*)"', group)
    return (len(re.findall("[ML]", line.group(1))) if line else 0) + group.count('class="marker"')


def frame_of(svg: str) -> tuple[float, float, float, float]:
    m = re.search(r'<rect class="frame" x="([\d.]+)" y="([\d.]+)" width="([\d.]+)" height="([\d.]+)"', svg)
    return tuple(float(v) for v in m.groups())


# ----- plots.py, closed form -----
def test_nice_ticks_are_round_and_cover_the_range():
    assert nice_ticks(0, 1) == [0, 0.2, 0.4, 0.6, 0.8, 1.0]
    assert nice_ticks(0.13, 0.97) == [0, 0.2, 0.4, 0.6, 0.8, 1.0]
    assert nice_ticks(-7, 23) == [-10, 0, 10, 20, 30]
    assert nice_ticks(0, 300) == [0, 100, 200, 300]
    assert nice_ticks(0.0012, 0.0019) == [0.0012, 0.0014, 0.0016, 0.0018, 0.002]
    assert nice_ticks(3, 3) == [2.6, 2.8, 3.0, 3.2, 3.4]   # a constant gets a range around it
    assert nice_ticks(1, 3) == [1, 1.5, 2, 2.5, 3] and nice_ticks(1, 3, integer=True) == [1, 2, 3]
    with pytest.raises(ValueError):
        nice_ticks(1, math.nan)


def test_a_point_maps_to_its_pixel():
    svg = line_chart([Series("a", [0, 5, 10], [0, 0.25, 1])], "t", "x", "y", width=640, height=320)
    left, top, width, height = frame_of(svg)
    assert (left, top, height) == (64, 34, 240)   # x ticks 0..10 and y ticks 0..1 span the frame exactly
    (points, group), = series_of(svg).values()
    d = re.search(r'class="line" d="([^"]*)"', group).group(1)
    assert d == f"M64.0 274.0L{round(64 + width / 2, 2)} 214.0L{round(64 + width, 2)} 34.0"
    assert points == 3 and ">0.2<" in svg and ">10<" in svg


def test_band_is_a_closed_outline_and_widens_the_y_range():
    svg = line_chart([Series("a", [0, 1, 2], [1, 1, 1], lows=[0, 0.5, 0], highs=[3, 1.5, 2])], "t", "x", "y")
    band = re.search(r'<path class="band" d="([^"]*)"', svg).group(1)
    assert band.startswith("M") and band.endswith("Z") and len(re.findall("[ML]", band)) == 6
    _, top, _, height = frame_of(svg)
    assert band.startswith(f"M64.0 {top}")    # the high of 3 is the top tick
    assert f" {top + height}L" in band or band.endswith(f" {top + height}Z")   # a low of 0 is the bottom


def test_nan_and_none_break_the_line_and_lone_points_become_markers():
    svg = line_chart([Series("a", [0, 1, 2, 3, 4, 5], [1, math.nan, 2, 3, None, 4])], "t", "x", "y")
    points, group = series_of(svg)["a"]
    line = re.search(r'class="line" d="([^"]*)"', group).group(1)
    assert points == 4 and line.count("M") == 1 and line.count("L") == 1   # only 2 -> 3 is a line
    assert group.count('class="marker"') == 2                                  # x = 0 and x = 5 stand alone


def test_one_point_is_a_marker_and_colours_follow_the_palette():
    svg = line_chart([Series("a", [1, 2], [1, 2]), Series("b", [7], [3], dashed=True)], "t", "x", "y")
    groups = series_of(svg)
    assert 'class="line"' not in groups["b"][1] and groups["b"][1].count('class="marker"') == 1
    assert PALETTE[0] in groups["a"][1] and PALETTE[1] in groups["b"][1]
    assert 'stroke-dasharray="5 3"' in svg   # the dashed series' legend sample


@pytest.mark.parametrize("series", [[], [Series("a", [1, 2], [None, math.nan])]])
def test_nothing_to_plot_is_a_clear_error(series):
    with pytest.raises(ValueError, match="line_chart"):
        line_chart(series, "t", "x", "y")


def test_bad_series_are_rejected():
    with pytest.raises(ValueError, match="2 xs but 1 ys"):
        Series("a", [1, 2], [1])
    with pytest.raises(ValueError, match="both lows and highs"):
        Series("a", [1], [1], lows=[0])


def test_saved_chart_is_a_standalone_svg_file(tmp_path):
    svg = line_chart([Series("<a & b>", [0, 1], [1, 2])], "t & u", "x", "y")
    root = ET.fromstring(save_chart(tmp_path / "c.svg", svg).read_text())
    assert root.tag == "{http://www.w3.org/2000/svg}svg"


# ----- the report, from real tiny runs -----
@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory):
    """A parent directory like the demo's: tiny GRPO, PPO and SFT runs, and an evaluation.json."""
    parent = tmp_path_factory.mktemp("demo")
    for recipe in ("grpo", "ppo"):
        run_rl(config_from({"recipe": recipe, "output_dir": str(parent), "data": ARITHMETIC,
                            "rollout": {"max_new_tokens": 4},
                            "train": {"steps": RL_STEPS, "eval_every": EVAL_EVERY, "progress": False},
                            "rl": {"prompts_per_step": 4, "group_size": 4}}))
    train(build(RunConfig, {"output_dir": str(parent), "data": {"task_size": 16, "eval_size": 4},
                            "train": {"steps": SFT_STEPS, "batch_size": 4, "progress": False}}), "sft")
    (parent / "evaluation.json").write_text(json.dumps(EVALUATION))
    return parent


def run_names(parent) -> dict[str, str]:
    """recipe or command -> run directory name."""
    out = {}
    for config in sorted(parent.glob("*/config.yaml")):
        data = yaml.safe_load(config.read_text())
        out[data.get("recipe") or data["command"]] = config.parent.name
    return out


@pytest.fixture(scope="module")
def page(demo_dir):
    return build_report([demo_dir], demo_dir / "report.html").read_text()


def test_report_has_no_external_reference(page):
    for pattern in (r"https?:", r"\bsrc\s*=", r"\bhref\s*=", r"url\(", r"@import", r"//[\w.-]+\.\w"):
        assert not re.search(pattern, page, re.I), pattern


def test_report_draws_each_quantity_for_every_run_that_logged_it(demo_dir, page):
    names, found = run_names(demo_dir), charts(page)
    grpo, ppo, sft = names["grpo"], names["ppo"], names["sft"]
    assert {"Reward", "KL to the reference", "Loss (training loss; policy loss in RL)", "Value loss",
            "Response length", f"Time per phase: {grpo}", f"Time per phase: {ppo}"} <= set(found)
    assert "Preference accuracy" not in found           # nobody logged it: no empty chart
    assert f"Time per phase: {sft}" not in found

    evaluations = len({0, *range(EVAL_EVERY, RL_STEPS, EVAL_EVERY), RL_STEPS})
    reward = series_of(found["Reward"])
    assert {name: points for name, (points, _) in reward.items()} == {
        grpo: RL_STEPS, f"{grpo} \u00b7 eval": evaluations, ppo: RL_STEPS, f"{ppo} \u00b7 eval": evaluations}
    assert all(drawn_points(group) == points for points, group in reward.values())
    assert set(series_of(found["KL to the reference"])) == {ppo}   # GRPO's default has no reference
    loss = series_of(found["Loss (training loss; policy loss in RL)"])
    assert loss[sft][0] == SFT_STEPS and drawn_points(loss[sft][1]) == SFT_STEPS and f"{sft} \u00b7 eval" in loss
    phases = series_of(found[f"Time per phase: {ppo}"])
    assert list(phases) == ["generate", "score", "reference", "advantage", "update", "sync", "whole step"]


def test_report_tables_put_the_runs_side_by_side(demo_dir, page):
    names = run_names(demo_dir)
    assert "<h3>held-out accuracy</h3>" in page and "<td>after GRPO</td><td class=\"num\">0.41</td>" in page
    final = page.split("<h3>Final evaluation of each run</h3>")[1].split("</table>")[0]
    header = re.findall(r"<th>([^<]*)</th>", final)
    assert header == ["metric", *sorted(names.values())]
    assert "<td>sampled_reward</td>" in final and "<td>loss</td>" in final
    assert "settings differ between the runs" in page and "<td>rl.kl_coef</td>" in page


def test_cli_writes_to_the_run_directory_or_to_output(demo_dir, tmp_path, capsys, monkeypatch):
    one = demo_dir / run_names(demo_dir)["ppo"]
    assert main(["report", str(one)]) == 0
    assert capsys.readouterr().out.strip() == str(one / "report.html")
    monkeypatch.chdir(tmp_path)
    assert main(["report", str(one), str(demo_dir / run_names(demo_dir)["sft"]), "--title", "two runs"]) == 0
    assert capsys.readouterr().out.strip() == "report.html"
    assert "<title>two runs</title>" in (tmp_path / "report.html").read_text()


# ----- the report, from hand-written run directories -----
def write_run(path, lines: list[str], config: dict | None = None):
    path.mkdir(parents=True)
    (path / "config.yaml").write_text(yaml.safe_dump(config or {"command": "sft"}))
    (path / "metrics.jsonl").write_text("".join(line + "\n" for line in lines))
    return path


def test_repeated_steps_keep_the_last_line_and_events_are_skipped(tmp_path):
    run = write_run(tmp_path / "a", ['{"step": 1, "train/loss": 3}', '{"step": 2, "train/loss": 9}',
                                     '{"step": 2, "event": "skipped_nonfinite", "train/loss": 99}',
                                     '{"step": 2, "train/loss": 2}', '{"step": 3, "train/loss": 1}',
                                     '{"step": 3, "eval/loss": 1.5}'])
    page = build_report([run], tmp_path / "r.html").read_text()
    points, group = series_of(charts(page)["Loss (training loss; policy loss in RL)"])["a"]
    assert points == 3 and drawn_points(group) == 3 and "99" not in group
    assert '<td>loss</td><td class="num">1.5</td>' in page


def test_a_bad_metrics_line_names_the_file_and_line(tmp_path, capsys):
    run = write_run(tmp_path / "a", ['{"step": 1, "train/loss": 3}', '{"step": 2, "train/lo'])
    assert main(["report", str(run)]) == 2
    assert f"{run / 'metrics.jsonl'}, line 2: not JSON" in capsys.readouterr().err
    write_run(tmp_path / "b", ['{"train/loss": 3}'])
    with pytest.raises(ValueError, match=r"line 1: expected a JSON object with an integer \"step\""):
        build_report([tmp_path / "b"])


def test_empty_metrics_are_noted_and_missing_runs_are_an_error(tmp_path):
    write_run(tmp_path / "parent" / "a", [])
    write_run(tmp_path / "parent" / "b", ['{"step": 1, "train/loss": 3}'])
    (tmp_path / "parent" / "notes").mkdir()
    page = build_report([tmp_path / "parent"]).read_text()
    assert "a: metrics.jsonl has no metrics yet" in page and list(series_of(page)) == ["b"]
    with pytest.raises(FileNotFoundError, match="no metrics.jsonl there or in its immediate subdirectories"):
        build_report([tmp_path / "parent" / "notes"])


def test_a_malformed_evaluation_json_names_the_file(tmp_path):
    run = write_run(tmp_path / "a", ['{"step": 1, "train/loss": 3}'])
    (run / "evaluation.json").write_text('{"columns": ["a", "b"], "rows": [[1]]}')
    with pytest.raises(ValueError, match=f"{run / 'evaluation.json'}: row 1 is not a list of 2 cells"):
        build_report([run])


# ----- rendering in headless Chromium -----
def unfilter(kind: int, line: bytes, prior: bytes, bpp: int) -> bytes:
    """Undo one PNG row filter: none, sub, up (with numpy), average or Paeth (byte by byte)."""
    row, above = np.frombuffer(line, np.uint8), np.frombuffer(prior, np.uint8)
    if kind in (0, 1, 2):
        return line if kind == 0 else (np.cumsum(row.reshape(-1, bpp), 0, dtype=np.uint8) if kind == 1
                                       else row + above).tobytes()
    out = bytearray(line)
    for i in range(len(out)):
        a, b, c = (out[i - bpp] if i >= bpp else 0), prior[i], (prior[i - bpp] if i >= bpp else 0)
        if kind == 3:
            out[i] = (out[i] + (a + b) // 2) & 255
            continue
        pa, pb, pc = abs(b - c), abs(a - c), abs(a + b - 2 * c)   # |p - a|, |p - b|, |p - c| for p = a + b - c
        out[i] = (out[i] + (a if pa <= pb and pa <= pc else b if pb <= pc else c)) & 255
    return bytes(out)


def read_png(path) -> np.ndarray:
    """An 8-bit RGB or RGBA PNG, non-interlaced (what Chromium writes), as a [height, width, 3] array."""
    data, pos, chunks = path.read_bytes(), 8, []
    while pos < len(data):
        length, kind = struct.unpack(">I4s", data[pos:pos + 8])
        chunks.append((kind, data[pos + 8:pos + 8 + length]))
        pos += 12 + length
    width, height, depth, color, _, _, interlace = struct.unpack(">IIBBBBB", dict(chunks)[b"IHDR"])
    assert depth == 8 and color in (2, 6) and not interlace, "an unexpected PNG layout"
    bpp = 3 if color == 2 else 4
    raw, stride = zlib.decompress(b"".join(body for kind, body in chunks if kind == b"IDAT")), width * bpp
    rows = [bytes(stride)]
    for y in range(height):
        start = y * (stride + 1)
        rows.append(unfilter(raw[start], raw[start + 1:start + 1 + stride], rows[-1], bpp))
    return np.frombuffer(b"".join(rows[1:]), dtype=np.uint8).reshape(height, width, bpp)[..., :3]


def chromium() -> str:
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        if os.environ.get("ALIGNKIT_REQUIRE_CHROMIUM") == "1":
            pytest.fail("ALIGNKIT_REQUIRE_CHROMIUM=1 but neither chromium nor chromium-browser is on PATH")
        pytest.skip("needs a headless browser to check rendering: apt-get install chromium")
    return browser


def test_chromium_draws_every_series(page, demo_dir, tmp_path):
    browser, shot = chromium(), tmp_path / "shot.png"
    out = subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                          "--force-device-scale-factor=1", "--force-color-profile=srgb", "--window-size=1000,1600",
                          f"--user-data-dir={tmp_path / 'profile'}", f"--screenshot={shot}", "--dump-dom",
                          (demo_dir / "report.html").as_uri()], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    dom = out.stdout
    total = len(charts(page))
    assert f'data-charts-drawn="{total}/{total}"' in dom   # the page's script found every series drawn
    pixels, checked = read_png(shot), 0
    for svg in charts(dom).values():
        drawn = int(re.search(r'data-drawn="(\d+)"', svg).group(1))
        assert drawn == sum(points > 0 for points, _ in series_of(svg).values())
        left, top, width, height = map(int, re.search(r'data-frame="([\d ]+)"', svg).group(1).split())
        if top + height > pixels.shape[0]:
            continue
        colours = {bytes.fromhex(c) for c in re.findall(r'<path class="line"[^>]*stroke="#(\w{6})"', svg)}
        inside = pixels[top + 2:top + height - 2, left + 2:left + width - 2].reshape(-1, 1, 3).astype(int)
        distance = np.abs(inside - np.array([list(c) for c in colours])[None]).sum(-1).min(1)
        assert (distance < 40).sum() >= 50, "no line of the series' colours inside the plot area"
        checked += 1
    assert checked >= 2


def test_an_experiment_directory_reports_its_tables_and_inlined_figures_and_chromium_draws_them(tmp_path):
    from alignkit.plots import save_chart

    (tmp_path / "seed-0").mkdir()
    (tmp_path / "evaluation.json").write_text(json.dumps({"title": "toy", "columns": ["method", "score"],
                                                          "rows": [["a", 0.5], ["b", 0.75]]}))
    save_chart(tmp_path / "score.svg", line_chart([Series("a", [0, 1], [0.2, 0.5]), Series("b", [0, 1], [0.3, 0.75])],
                                                  "score", "level", "score"))
    page = build_report([tmp_path]).read_text()
    assert "http" not in page and ">0.75</td>" in page and len(charts(page)) == 1
    out = subprocess.run([chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--window-size=1000,1200",
                          f"--user-data-dir={tmp_path / 'profile'}", "--dump-dom", (tmp_path / "report.html").as_uri()],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and 'data-charts-drawn="1/1"' in out.stdout, out.stderr[-2000:]
