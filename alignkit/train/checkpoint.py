"""Sharded, pickle-free checkpoints, and the export of a trained model.

A checkpoint is a folder `step-NNNNNNN`:

    dcp/                   model weights and optimizer tensors, as torch.distributed.checkpoint (DCP) files
    optimizer.json         the rest of the optimizer state (param groups); tensors point into dcp/
    state.json             the training state; each tensor is replaced by {"__tensor__": key} ...
    state.safetensors      ... and stored here under that key
    rng/rank-00000.json    one rank's random streams (python, numpy); torch's in rng/rank-00000.safetensors
    complete               written last: {"step": ..., "world_size": ...}

All ranks call `save_checkpoint`, `load_checkpoint` and `export_model`; they are collective when
torch.distributed is initialised, and work the same in one plain process. Models may hold FSDP2
shards (`fully_shard`): DCP reshards on load, so a checkpoint written by 2 ranks loads into 1
unsharded model and the other way round.

Saves are atomic: written to `.step-NNNNNNN.tmp`, then renamed into place by rank 0. A kill during
a save leaves at most a stale `.tmp` folder behind, which is ignored and cleared by the next save;
`latest` is itself replaced atomically and only after the rename.

Nothing is unpickled from disk without an allow-list. Our own files are JSON and safetensors.
DCP's `.metadata` is a pickle: it is read here by an unpickler that builds only DCP's metadata
classes (`ALLOWED_GLOBALS`). DCP's tensor files are read by torch itself with
`torch.load(..., weights_only=True)` (`FileSystemReader.read_data`, torch 2.13). DCP loads items
stored as bytes with a full `torch.load`, so checkpoints holding any are refused; we never write one.
Old-format checkpoints (a pickled `state.pt`) are still found by `latest_checkpoint`, then refused.
"""

from __future__ import annotations

import copy
import json
import os
import pickle
import random
import shutil
import warnings
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
import torch.distributed.checkpoint as dcp
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.metadata import BytesStorageMetadata, Metadata, StorageMeta
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)
from torch.distributed.fsdp import FSDPModule

from alignkit import distributed

LATEST = "latest"
COMPLETE = "complete"
LEGACY_STATE = "state.pt"   # the old format: a pickle, never loaded
DCP = "dcp"
OPTIMIZER = "optimizer.json"
STATE = "state"
RNG = "rng"

TRAINED_MODULES = ("model", "policy")   # the loop's names for the trained model, offline and online
TENSOR = "__tensor__"   # JSON placeholders for what JSON cannot hold
TUPLE = "__tuple__"

_DCP_METADATA = "torch.distributed.checkpoint.metadata"
# Every global a DCP `.metadata` pickle of ours names (found by tracing `find_class` on real
# checkpoints, single process and FSDP2), plus torch dtypes (see `_allowed`).
ALLOWED_GLOBALS = frozenset({
    (_DCP_METADATA, "Metadata"),
    (_DCP_METADATA, "StorageMeta"),
    (_DCP_METADATA, "MetadataIndex"),
    (_DCP_METADATA, "TensorStorageMetadata"),
    (_DCP_METADATA, "TensorProperties"),
    (_DCP_METADATA, "ChunkStorageMetadata"),
    (_DCP_METADATA, "BytesStorageMetadata"),    # allowed to be named, then refused with a clear message
    (_DCP_METADATA, "_MEM_FORMAT_ENCODING"),
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch.serialization", "_get_layout"),     # looks a layout up by name
    ("torch", "Size"),
    ("pathlib", "PosixPath"),                   # StorageMeta.checkpoint_id
    ("pathlib._local", "PosixPath"),            # the same, as Python 3.13 names it
})


class UnsafeCheckpointError(RuntimeError):
    """A checkpoint file would need unrestricted unpickling (or is not what we write); it is not loaded."""


class CheckpointWriteError(RuntimeError):
    """A checkpoint could not be written (disk full, ...); the previous one is untouched."""


class CorruptCheckpointError(UnsafeCheckpointError):
    """A checkpoint file is truncated or unreadable (not an attempt to run code): an older one may serve."""


# ----- saving and loading -----

def save_checkpoint(root: Path, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None,
                    state: dict, *, keep: int = 2, save_optimizer: bool = True) -> Path:
    """Save `model`, `optimizer` and `state` as `root/step-NNNNNNN`, keeping the `keep` newest checkpoints.

    `state` (the same on every rank) is a nested dict of JSON values and CPU tensors. Each rank's
    random streams are saved too. With `save_optimizer=False` the optimizer state is left out.
    """
    root = Path(root)
    final, tmp = root / f"step-{step:07d}", root / f".step-{step:07d}.tmp"
    if distributed.rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        (tmp / RNG).mkdir(parents=True)
    distributed.barrier()
    try:
        _save_tensors(tmp, model, optimizer if save_optimizer else None)
        _write_tree(_rng_state(), tmp / RNG / f"rank-{distributed.rank():05d}")
        if distributed.rank() == 0:
            _write_tree({**state, "step": step}, tmp / STATE)
        distributed.barrier()
        if distributed.rank() == 0:
            (tmp / COMPLETE).write_text(json.dumps({"step": step, "world_size": distributed.world_size()}))
    except (OSError, CheckpointException) as err:   # a full disk, a lost mount: nothing half-written stays
        shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointWriteError(f"could not write a checkpoint in {root} ({err}); the previous checkpoint, "
                                   f"{latest_checkpoint(root) or 'none yet'}, is intact") from None
    if distributed.rank() == 0:
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        _write_text_atomic(root / LATEST, final.name)
        _prune(root, keep)
    distributed.barrier()
    return final


def load_checkpoint(checkpoint: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None) -> dict:
    """Load a checkpoint into `model` (and `optimizer`), restore this rank's random streams, and
    return the saved `state` with its `"step"`. Every file is checked before anything is changed."""
    checkpoint = Path(checkpoint)
    marker = _read_marker(checkpoint)
    reader = SafeFileSystemReader(checkpoint / DCP)
    reader.read_metadata()   # refused here: inside dcp.load the error would come back as an AssertionError
    state = _read_tree(checkpoint / STATE)
    rng = _read_tree(_rng_file(checkpoint, marker["world_size"]))
    if optimizer is None:
        _load_model(reader, model)
    else:
        _load_model_and_optimizer(reader, model, optimizer, _optimizer_skeleton(checkpoint))
    _set_rng_state(rng)
    return state


def _save_tensors(folder: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None) -> None:
    """Model weights, and the optimizer's tensors, into `folder/dcp`; the optimizer's other values into JSON."""
    if optimizer is None:
        tensors = {"model": get_model_state_dict(model)}
    else:
        model_state, optimizer_state = get_state_dict(model, optimizer)
        optimizer_tensors = {}
        skeleton = _encode(optimizer_state, optimizer_tensors)
        tensors = {"model": model_state, "optim": optimizer_tensors}
        if distributed.rank() == 0:
            (folder / OPTIMIZER).write_text(json.dumps(skeleton))
    with _quiet_single_process():
        dcp.save(tensors, storage_writer=FileSystemWriter(folder / DCP))


def _optimizer_skeleton(checkpoint: Path):
    if not (checkpoint / OPTIMIZER).exists():
        raise RuntimeError(f"{checkpoint} has no optimizer state (saved with save_optimizer=False); "
                           "load it without an optimizer")
    return _read_json(checkpoint / OPTIMIZER)


@contextmanager
def _reading(folder: Path):
    """DCP's errors on a damaged tensor file, as a CorruptCheckpointError naming the folder."""
    try:
        yield
    except CheckpointException as err:
        raise CorruptCheckpointError(f"{folder}: a tensor file is truncated or damaged ({err})") from None


def _load_model(reader: FileSystemReader, model: torch.nn.Module) -> None:
    tensors = {"model": get_model_state_dict(model)}
    with _quiet_single_process(), _reading(Path(reader.path)):
        dcp.load(tensors, storage_reader=reader)
    set_model_state_dict(model, tensors["model"])


def _load_model_and_optimizer(reader: FileSystemReader, model: torch.nn.Module,
                              optimizer: torch.optim.Optimizer, skeleton) -> None:
    """DCP fills the live state dicts in place (in this world's sharding); the saved skeleton then
    puts the optimizer's tensors back among its saved param groups."""
    model_state, optimizer_state = get_state_dict(model, optimizer)
    optimizer_tensors = {}
    _encode(optimizer_state, optimizer_tensors)
    tensors = {"model": model_state, "optim": optimizer_tensors}
    with _quiet_single_process(), _reading(Path(reader.path)):
        dcp.load(tensors, storage_reader=reader)
    set_state_dict(model, optimizer, model_state_dict=tensors["model"],
                   optim_state_dict=_decode(skeleton, tensors["optim"]))


def restore_weights(model: torch.nn.Module, checkpoint: Path) -> None:
    """Read the weights of a checkpoint's trained model (`model` offline, `policy` online) into `model`,
    leaving random streams and everything else alone (for evaluating intermediate checkpoints)."""
    checkpoint = Path(checkpoint)
    _read_marker(checkpoint)
    reader = SafeFileSystemReader(checkpoint / DCP)
    saved = reader.read_metadata().state_dict_metadata
    name = next((n for n in TRAINED_MODULES if any(k.startswith(f"model.{n}.") for k in saved)), None)
    if name is None:
        raise ValueError(f"{checkpoint} holds none of the trained modules {TRAINED_MODULES}")
    _load_model(reader, torch.nn.ModuleDict({name: model}))


@contextmanager
def _quiet_single_process():
    """DCP warns when torch.distributed is not initialised; one process is a use we mean."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


# ----- the checkpoint folder -----

def _read_marker(checkpoint: Path) -> dict:
    if (checkpoint / COMPLETE).exists():
        return _read_json(checkpoint / COMPLETE)
    if (checkpoint / LEGACY_STATE).exists():
        raise UnsafeCheckpointError(
            f"{checkpoint} is an old-format checkpoint: its {LEGACY_STATE} is a pickle, which could run "
            "arbitrary code, so it is not loaded (its model/ folder is safetensors and loads with from_pretrained)")
    raise FileNotFoundError(f"{checkpoint} is not a complete checkpoint (no {COMPLETE} marker)")


def _is_complete(folder: Path) -> bool:
    """Complete in the new format, or in the old one (so that resuming refuses it loudly)."""
    return (folder / COMPLETE).exists() or (folder / LEGACY_STATE).exists()


def _write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


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
        if _is_complete(candidate):
            return candidate
    complete = sorted(p for p in root.glob("step-*") if _is_complete(p))
    return complete[-1] if complete else None


def complete_checkpoints(root: Path) -> list[Path]:
    """Every complete checkpoint, newest first (the one `latest` names leads)."""
    found = sorted((p for p in Path(root).glob("step-*") if _is_complete(p)), reverse=True)
    latest = latest_checkpoint(root)
    return ([latest] if latest else []) + [p for p in found if p != latest]


# ----- nested values as JSON plus safetensors -----

def _encode(value, tensors: dict, key: str = ""):
    """`value` as JSON: each tensor is moved into `tensors` under its path and replaced by a placeholder."""
    if isinstance(value, torch.Tensor):
        tensors[key] = value
        return {TENSOR: key}
    if isinstance(value, tuple):
        return {TUPLE: [_encode(v, tensors, f"{key}/{i}") for i, v in enumerate(value)]}
    if isinstance(value, list):
        return [_encode(v, tensors, f"{key}/{i}") for i, v in enumerate(value)]
    if isinstance(value, dict):
        for name in value:
            if not isinstance(name, str) or name in (TENSOR, TUPLE):
                raise TypeError(f"cannot save {key or 'the state'}: key {name!r} is not a plain string")
        return {name: _encode(v, tensors, f"{key}/{name}" if key else name) for name, v in value.items()}
    if value is None or isinstance(value, bool | int | float | str):
        return value
    raise TypeError(f"cannot save {key or 'the state'}: a {type(value).__name__} is neither JSON nor a tensor")


def _decode(value, tensors: dict):
    """The inverse of `_encode`."""
    if isinstance(value, list):
        return [_decode(v, tensors) for v in value]
    if isinstance(value, dict):
        if TENSOR in value:
            return tensors[value[TENSOR]]
        if TUPLE in value:
            return tuple(_decode(v, tensors) for v in value[TUPLE])
        return {name: _decode(v, tensors) for name, v in value.items()}
    return value


def _write_tree(tree, stem: Path) -> None:
    """`tree` as `stem.json`, its tensors in `stem.safetensors`."""
    tensors = {}
    stem.with_suffix(".json").write_text(json.dumps(_encode(tree, tensors)))
    if tensors:
        owned = {k: t.detach().cpu().clone(memory_format=torch.contiguous_format) for k, t in tensors.items()}
        save_file(owned, stem.with_suffix(".safetensors"))


def _read_tree(stem: Path):
    tensors_file = stem.with_suffix(".safetensors")
    tensors = _read_safetensors(tensors_file) if tensors_file.exists() else {}
    return _decode(_read_json(stem.with_suffix(".json")), tensors)


def _read_json(path: Path):
    try:
        return json.loads(path.read_bytes())
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CorruptCheckpointError(f"{path} is not JSON ({err}); it is not loaded") from err


def _read_safetensors(path: Path) -> dict:
    try:
        return load_file(path)
    except SafetensorError as err:
        raise CorruptCheckpointError(f"{path} is not a safetensors file ({err}); it is not loaded") from err


# ----- random streams -----

def _rng_state() -> dict:
    kind, keys, position, has_gauss, gauss = np.random.get_state()
    state = {"python": random.getstate(),
             "numpy": (kind, keys.tolist(), int(position), int(has_gauss), float(gauss)),
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), *rest))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _rng_file(checkpoint: Path, saved_world_size: int) -> Path:
    """This rank's saved streams; rank 0's (with a warning) for a rank the saving world did not have."""
    own = checkpoint / RNG / f"rank-{distributed.rank():05d}"
    if own.with_suffix(".json").exists() or saved_world_size == distributed.world_size():
        return own
    warnings.warn(f"{checkpoint} was saved by {saved_world_size} ranks and has no random streams for rank "
                  f"{distributed.rank()}; restoring rank 0's. Resuming at another world size is exact for weights and "
                  "optimizer state, not for random streams.", stacklevel=3)
    return checkpoint / RNG / "rank-00000"


# ----- DCP metadata without arbitrary unpickling -----

class _MetadataUnpickler(pickle.Unpickler):
    """Builds only the globals on the allow-list; refuses, before calling anything, every other."""

    def __init__(self, file, path: Path):
        super().__init__(file)
        self.path = path

    def find_class(self, module: str, name: str):
        if _allowed(module, name):
            return super().find_class(module, name)
        raise UnsafeCheckpointError(f"{self.path} tries to load the global {module}.{name}, which DCP metadata "
                                    "never holds; it is not unpickled")


def _allowed(module: str, name: str) -> bool:
    if (module, name) in ALLOWED_GLOBALS:
        return True
    return module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)


class SafeFileSystemReader(FileSystemReader):
    """DCP's file reader, reading `.metadata` with the allow-listed unpickler and refusing bytes items.

    It reads only the global `.metadata` (no keyword arguments, so DCP does not fall back to
    per-rank metadata files)."""

    def read_metadata(self) -> Metadata:
        path = Path(self._get_metadata_path())
        with open(path, "rb") as file:
            try:
                metadata = _MetadataUnpickler(file, path).load()
            except (EOFError, pickle.UnpicklingError) as err:
                raise CorruptCheckpointError(f"{path} is truncated or damaged ({type(err).__name__}: {err})") from err
        if not isinstance(metadata, Metadata):
            raise UnsafeCheckpointError(f"{path} holds a {type(metadata).__name__}, not DCP metadata")
        for key, item in metadata.state_dict_metadata.items():
            if isinstance(item, BytesStorageMetadata):
                raise UnsafeCheckpointError(f"{path}: item {key!r} is stored as bytes, which DCP loads with an "
                                            "unrestricted torch.load; it is not loaded")
        if metadata.storage_meta is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


# ----- export -----

def export_model(model: torch.nn.Module, tokenizer, path: Path, *, merge_lora: bool = False) -> Path:
    """Write `model` (and `tokenizer`, if given) as a plain Hugging Face folder at `path`.

    FSDP2 shards are gathered first (collective), then rank 0 writes. A peft model is written as its
    adapter; with `merge_lora`, also as a plain model with the adapter merged in, in `path/merged`.
    """
    path = Path(path)
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    full_state = get_model_state_dict(model, options=options)   # empty on ranks other than 0
    if distributed.rank() == 0:
        tmp = path.with_name(f".{path.name}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        _save_pretrained(model, tokenizer, _without_tied_copies(model, full_state), tmp)
        if merge_lora and _is_peft(model):
            _save_pretrained(_merged_copy(model, full_state), tokenizer, None, tmp / "merged")
        shutil.rmtree(path, ignore_errors=True)
        os.replace(tmp, path)
    distributed.barrier()
    return path


def _without_tied_copies(model: torch.nn.Module, state: dict) -> dict:
    """`state` without the second name of a tied parameter (an LM head tied to the embeddings): gathered
    shards are separate copies, which `save_pretrained` would write twice."""
    names: dict[int, list[str]] = {}
    for name, parameter in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(parameter), []).append(name)
    again = {name for group in names.values() for name in group[1:]}
    return {key: value for key, value in state.items() if key not in again}


def _save_pretrained(model, tokenizer, state: dict | None, folder: Path) -> None:
    """Config, weights (safetensors), generation config where the model has one, tokenizer."""
    model.save_pretrained(folder, state_dict=state)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)


def _is_peft(model: torch.nn.Module) -> bool:
    return hasattr(model, "peft_config") and hasattr(model, "merge_and_unload")


def _merged_copy(model, full_state: dict) -> torch.nn.Module:
    """A plain, unsharded copy of the peft `model` holding `full_state`, its adapter merged in.

    Built on the meta device, then given the gathered tensors themselves. For an unsharded model
    those are the live weights: `safe_merge` adds each adapter into a copy, never in place."""
    from peft import get_peft_model

    base = model.get_base_model()
    adapter = copy.deepcopy(model.peft_config[model.active_adapter])
    with torch.device("meta"):
        copied = get_peft_model(_unsharded_class(base)(base.config), adapter)
    copied.load_state_dict(full_state, assign=True)
    return copied.merge_and_unload(safe_merge=True)


def _unsharded_class(module: torch.nn.Module) -> type:
    """The module's own class: `fully_shard` swaps it for a dynamic FSDP subclass."""
    return next(cls for cls in type(module).__mro__ if not issubclass(cls, FSDPModule))

