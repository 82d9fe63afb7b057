"""Atomic checkpoints: written to a temporary folder, then renamed into place.

A kill during a save leaves at most a stale `.tmp` folder behind, which is ignored and cleared
by the next save; `latest` is itself replaced atomically and only after the rename.
"""

from __future__ import annotations

import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch

LATEST = "latest"


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def save_checkpoint(root: Path, step: int, model, tokenizer, state: dict, keep: int = 2) -> Path:
    """Save model (save_pretrained, safetensors), tokenizer and training state for `step`."""
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:07d}"
    tmp = root / f".step-{step:07d}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp / "model", safe_serialization=True)
    tokenizer.save_pretrained(tmp / "model")
    torch.save({**state, "step": step, "rng": rng_state()}, tmp / "state.pt")
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    _write_text_atomic(root / LATEST, final.name)
    _prune(root, keep)
    return final


def _prune(root: Path, keep: int) -> None:
    steps = sorted(p for p in root.glob("step-*") if p.is_dir())
    for old in steps[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    for stale in root.glob(".step-*.tmp"):
        shutil.rmtree(stale, ignore_errors=True)


def latest_checkpoint(root: Path) -> Path | None:
    """The newest complete checkpoint, or None."""
    pointer = root / LATEST
    if pointer.exists():
        candidate = root / pointer.read_text().strip()
        if (candidate / "state.pt").exists():
            return candidate
    complete = sorted(p for p in root.glob("step-*") if (p / "state.pt").exists())
    return complete[-1] if complete else None


def resume_point(root: Path, resume: bool) -> Path | None:
    """The checkpoint to continue from when resuming (an error if there is none), else None."""
    if not resume:
        return None
    checkpoint = latest_checkpoint(root)
    if checkpoint is None:
        raise RuntimeError(f"nothing to resume: no complete checkpoint in {root}")
    return checkpoint


def restore_weights(model, checkpoint: Path) -> None:
    """Load the weights saved by `save_checkpoint` into `model` (adapters only for peft models)."""
    from safetensors.torch import load_file

    folder = checkpoint / "model"
    if (folder / "adapter_model.safetensors").exists():
        from peft import set_peft_model_state_dict

        set_peft_model_state_dict(model, load_file(folder / "adapter_model.safetensors"))
        return
    restored = type(model).from_pretrained(folder, dtype=next(model.parameters()).dtype)
    model.load_state_dict(restored.state_dict())


def load_state(checkpoint: Path) -> dict:
    return torch.load(checkpoint / "state.pt", weights_only=False)
