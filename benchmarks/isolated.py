"""Running one tool of a side-by-side benchmark in a fresh process, and what the machine did meanwhile."""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ENV = {
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "TQDM_DISABLE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "WANDB_DISABLED": "true",
}


def rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def busy_cpu_s() -> float:
    """CPU seconds the whole machine has spent busy (steal included), over all cores."""
    import psutil

    times = psutil.cpu_times()
    return sum(times) - times.idle - getattr(times, "iowait", 0.0)


def children_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def launch(script: str, tool: str, spec_path: Path, threads: int, result_path: Path, env: dict | None = None) -> dict:
    """Run `script --child TOOL --spec SPEC` in a fresh process and read the JSON row it writes.

    `env` adds to the child's environment. Adds `other_load`: the cores that other processes kept busy
    meanwhile (any outside load stalls every parallel op on a small shared machine, so such runs are
    worth flagging), and `process_s`: the child's whole wall time, imports included.
    """
    env = {**os.environ, **ENV, "OMP_NUM_THREADS": str(threads), **(env or {})}
    cmd = [sys.executable, script, "--child", tool, "--spec", str(spec_path)]
    busy, ours, started = busy_cpu_s(), children_cpu_s(), time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-8000:])
        raise RuntimeError(f"{tool} run failed with exit code {proc.returncode}")
    process_s = time.perf_counter() - started
    foreign = (busy_cpu_s() - busy) - (children_cpu_s() - ours)
    row = json.loads(result_path.read_text())
    row["other_load"], row["process_s"] = max(0.0, foreign) / process_s, process_s
    return row


def child(tool: str, spec_path: Path, import_stack, run) -> None:
    """The child side of `launch`: imports, threads and seeds as the spec says, then `run(spec)`, whose
    row is written with the peak RSS where `launch` reads it."""
    import random

    spec = json.loads(spec_path.read_text())
    os.environ["HF_DATASETS_CACHE"] = str(Path(spec["workdir"]) / f"hf-cache-{tool}")
    import_stack()
    import torch

    torch.set_num_threads(spec["threads"])
    torch.manual_seed(spec["seed"])
    random.seed(spec["seed"])
    out = run(spec)
    out.update(tool=tool, peak_rss_mib=rss_mib(), threads=torch.get_num_threads())
    (Path(spec["workdir"]) / f"{tool}.json").write_text(json.dumps(out))


def git_state() -> dict:
    """The commit measured, and whether alignkit/ differed from it."""
    def git(*args):
        return subprocess.run(["git", *args], cwd=Path(__file__).parent, capture_output=True, text=True).stdout.strip()

    return {"commit": git("rev-parse", "--short", "HEAD"), "alignkit_dirty": bool(git("status", "--porcelain", "--",
                                                                                        "../alignkit"))}


def round_robin(spec: dict, workdir: Path, tools, repeats: int, launch_tool) -> list[dict]:
    """Write the spec, then run every tool `repeats` times, alternating; `launch_tool(tool, spec_path)` runs one."""
    return interleaved([spec], workdir, tools, repeats, lambda tool, spec_path, _: launch_tool(tool, spec_path))


def interleaved(specs: list[dict], workdir: Path, tools, repeats: int, launch_tool) -> list[dict]:
    """Run every tool under every spec `repeats` times: each repeat runs all specs' tools back to back,
    so slow drift of a shared machine falls on all of them alike. `launch_tool(tool, spec_path, spec)`
    runs one; each row gets its `repeat`."""
    paths = [workdir / f"spec-{i}.json" for i in range(len(specs))]
    for spec, path in zip(specs, paths, strict=True):
        path.write_text(json.dumps(spec))
    runs, total = [], repeats * len(specs) * len(tools)
    for repeat in range(repeats):
        for spec, path in zip(specs, paths, strict=True):
            for tool in tools:
                print(f"[{len(runs) + 1}/{total}] running {tool} ...", file=sys.stderr, flush=True)
                runs.append({**launch_tool(tool, path, spec), "repeat": repeat})
    return runs
