"""Progress: a live bar on a terminal, plain periodic lines otherwise (logs, CI)."""

from __future__ import annotations

import sys
import time

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


def _fields(metrics: dict) -> str:
    parts = [f"loss {metrics['loss']:.4f}"] if "loss" in metrics else []
    if "reward/mean" in metrics:
        parts.append(f"reward {metrics['reward/mean']:.3f}")
    failed = metrics.get("reward/failures", 0) + metrics.get("judge/failures", 0)
    if failed:
        parts.append(f"{failed:.0f} failed")
    if "tokens_per_s" in metrics:
        parts.append(f"{metrics['tokens_per_s']:.0f} tok/s")
    return "  ".join(parts)


class ProgressReporter:
    def __init__(self, total: int, description: str, start: int = 0, every_s: float = 10.0,
                 enabled: bool = True, console: Console | None = None):
        self.total, self.start_step, self.every_s = total, start, every_s
        self.console = console or Console(stderr=True)
        self.live = enabled and sys.stderr.isatty()
        self.enabled = enabled
        self._started = self._last_print = time.monotonic()
        self._bar = None
        if self.live:
            self._bar = Progress(TextColumn(description), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                                 TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TextColumn("eta"),
                                 TimeRemainingColumn(), console=self.console, transient=False)
            self._task = self._bar.add_task(description, total=total, completed=start, info="")
            self._bar.start()
        self.description = description

    def update(self, step: int, metrics: dict) -> None:
        if self._bar is not None:
            self._bar.update(self._task, completed=step, info=_fields(metrics))
            return
        now = time.monotonic()
        if self.enabled and (now - self._last_print >= self.every_s or step == self.total):
            done = step - self.start_step
            eta = (now - self._started) / max(done, 1) * (self.total - step)
            self.console.print(f"{self.description} step {step}/{self.total}  {_fields(metrics)}  eta {eta:.0f}s",
                               highlight=False)
            self._last_print = now

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()
