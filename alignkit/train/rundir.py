"""A run directory: resolved config, manifest, metrics.jsonl, checkpoints, reports.

Under torchrun every rank holds the same RunDir, and only rank 0 writes its files.
"""

from __future__ import annotations

import functools
import hashlib
import json
import platform
import sys
import time
from importlib import metadata
from pathlib import Path

import yaml

from alignkit import distributed, tracking

PACKAGES = ("alignkit", "torch", "transformers", "safetensors", "numpy", "peft", "datasets")


def _version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _main_only(method):
    """Rank 0 writes; the other ranks' calls do nothing."""
    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        return method(self, *args, **kwargs) if distributed.is_main() else None
    return wrapper


def _data_hashes(paths: list[str]) -> dict[str, str]:
    hashes = {}
    for p in map(Path, paths):
        if p.is_file():
            hashes[str(p)] = file_sha256(p)
        elif p.is_dir():
            for f in sorted(q for q in p.rglob("*") if q.is_file()):
                hashes[str(f)] = file_sha256(f)
    return hashes


class RunDir:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)
        self.trackers: list = []  # train.report_to's trackers, started and finished by the loop (rank 0)

    @classmethod
    def create(cls, root: str | Path, command: str, name: str | None = None) -> RunDir:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        base = Path(root) / (name or f"{command}-{stamp}")
        path, n = base, 1
        while path.exists():
            n += 1
            path = base.with_name(f"{base.name}-{n}")
        return cls(path)

    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    @_main_only
    def write_config(self, config: dict) -> None:
        (self.path / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))

    def read_config(self) -> dict:
        return yaml.safe_load((self.path / "config.yaml").read_text())

    @_main_only
    def write_manifest(self, seed: int, data_files: list[str]) -> None:
        manifest = {
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "argv": sys.argv,
            "python": platform.python_version(),
            "platform": platform.platform(),
            "packages": {name: _version(name) for name in PACKAGES},
            "seed": seed,
            "data": _data_hashes(data_files),
        }
        (self.path / "manifest.json").write_text(json.dumps(manifest, indent=2))

    @_main_only
    def log(self, record: dict) -> None:
        with open(self.path / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
        tracking.log(self.trackers, record)

    @_main_only
    def truncate_metrics(self, after_step: int, keep_events_only: bool = False) -> None:
        """Drop metric lines past `after_step` (written before a kill, replayed on resume); with
        `keep_events_only`, also that step's metrics (a run starting over keeps its data line)."""
        path = self.path / "metrics.jsonl"
        if path.exists():
            records = [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()]
            kept = [json.dumps(r) for r in records if r.get("step", 0) <= after_step
                    and (not keep_events_only or "event" in r)]
            path.write_text("".join(ln + "\n" for ln in kept))

    def metrics(self) -> list[dict]:
        path = self.path / "metrics.jsonl"
        return [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()] if path.exists() else []

    @_main_only
    def write_json(self, name: str, data) -> Path:
        path = self.path / name
        path.write_text(json.dumps(data, indent=2))
        return path
