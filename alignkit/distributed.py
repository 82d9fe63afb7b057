"""torch.distributed under torchrun: the process group, FSDP2 sharding, and the reductions the loop needs.

The same command runs in one process or under `torchrun --nproc-per-node N` (and multi-node
`torchrun --nnodes M --rdzv-endpoint HOST:PORT`): `init()` joins the process group when torchrun's
environment says so, and every helper here degrades to the identity in one process. Algorithms
never see any of it; the loop, the data sharding and the checkpoints do.

Sharding follows the usual FSDP2 recipe: `fully_shard` on every decoder layer, then on the root, with
a mixed-precision policy (bf16 compute, fp32 gradient reduction, fp32 master weights) when the
run's precision is bf16. `reshard_after_forward=True` frees each layer's gathered parameters after
its forward (ZeRO-3); `False` keeps them until the backward (ZeRO-2: more memory, fewer gathers).
"""

from __future__ import annotations

import datetime
import gc
import os
import types
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor, nn

BACKENDS = ("auto", "gloo", "nccl")


@dataclass
class DistributedConfig:
    backend: str = "auto"                 # auto: nccl on CUDA, gloo on CPU
    reshard_after_forward: bool = True    # True: ZeRO-3 behaviour; False: ZeRO-2 (parameters kept between passes)
    cpu_offload: bool = False             # FSDP2 CPUOffloadPolicy: parameters, gradients and optimizer state on CPU
    timeout_s: int = 600                  # a collective waiting longer than this fails the job (a dead peer)

    RANGES = {"timeout_s": (1, None)}
    CHOICES = {"backend": BACKENDS}


def launched() -> bool:
    """True when this process was started by torchrun (or any launcher that sets the env:// variables)."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def init(cfg: DistributedConfig | None = None) -> None:
    """Join the process group when launched by torchrun; a no-op in a plain process or if already joined."""
    cfg = cfg or DistributedConfig()
    if cfg.backend not in BACKENDS:
        raise ValueError(f"train.distributed.backend must be one of {BACKENDS}, got {cfg.backend!r}")
    if not launched() or dist.is_initialized():
        return
    cuda = torch.cuda.is_available()
    backend = cfg.backend if cfg.backend != "auto" else ("nccl" if cuda else "gloo")
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=cfg.timeout_s))


def shutdown() -> None:
    """Leave the process group at the end of a command. Garbage is collected first: FSDP2 state freed
    during interpreter exit after the group is gone can abort the process."""
    if not active():
        return
    gc.collect()
    dist.barrier()
    dist.destroy_process_group()


def active() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if active() else 0


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    return rank() == 0


def device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def barrier() -> None:
    if active():
        dist.barrier()


def _comm_device() -> torch.device:
    return device() if active() and dist.get_backend() == "nccl" else torch.device("cpu")


def all_reduce(values: Tensor, op: str = "sum") -> Tensor:
    """A reduced copy of `values` over all ranks (sum, max or min); the tensor itself in one process."""
    if not active():
        return values
    out = values.detach().to(_comm_device(), torch.float64 if values.is_floating_point() else values.dtype).clone()
    dist.all_reduce(out, op={"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}[op])
    return out.to(values.device, values.dtype)


def reduce_sums(sums: dict[str, float]) -> dict[str, float]:
    """Sum each value over all ranks (every rank must hold the same keys)."""
    if not active() or not sums:
        return dict(sums)
    keys = sorted(sums)
    total = all_reduce(torch.tensor([float(sums[k]) for k in keys], dtype=torch.float64))
    return dict(zip(keys, total.tolist(), strict=True))


def broadcast_object(obj):
    """Rank 0's `obj` on every rank (a run directory path, a decision)."""
    if not active():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather_objects(obj) -> list:
    """Every rank's `obj`, in rank order, on every rank."""
    if not active():
        return [obj]
    out = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def shard_of(items: list) -> list:
    """This rank's contiguous share of `items`, whose length must divide evenly over the ranks."""
    n, world = len(items), world_size()
    if n % world:
        raise ValueError(f"{n} items do not split evenly over {world} ranks")
    per = n // world
    return items[rank() * per:(rank() + 1) * per]


# ----- FSDP2 -----
def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The transformer blocks of a Hugging Face model (by its `_no_split_modules` class names)."""
    names = set()
    for module in model.modules():
        names.update(getattr(module, "_no_split_modules", None) or ())
    return [m for m in model.modules() if type(m).__name__ in names]


def enable_activation_checkpointing(model: nn.Module) -> None:
    """Recompute each decoder layer's activations in the backward instead of keeping them."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    if not hasattr(inner, "gradient_checkpointing_enable"):
        raise ValueError(f"{type(inner).__name__} has no per-layer activation checkpointing")
    inner.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if hasattr(inner, "enable_input_require_grads"):
        inner.enable_input_require_grads()  # frozen embeddings (LoRA) still let gradients reach the layers


def shard(model: nn.Module, cfg: DistributedConfig, precision: str = "fp32") -> nn.Module:
    """FSDP2: `fully_shard` per decoder layer, then the root. Identity outside a process group.

    With `precision` bf16 the layers compute in bf16 and reduce gradients in fp32, on fp32 master
    weights. Extra trainable modules (a value head) are sharded at their root only.
    """
    if not active():
        return model
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if precision == "bf16" \
        else MixedPrecisionPolicy()
    options = {"mp_policy": mp, "reshard_after_forward": cfg.reshard_after_forward,
               "offload_policy": CPUOffloadPolicy() if cfg.cpu_offload else OffloadPolicy()}
    for layer in decoder_layers(model):
        fully_shard(layer, **options)
    fully_shard(model, **options)
    _register_methods(model)
    return model


# Methods that run the model without calling its `forward` (the chunked log-prob head, a preference
# model's pooled features) must still gather the root's parameters and reduce their gradients:
# FSDP2 wraps them like `forward` once registered.
CALL = "_alignkit_call"
FORWARD_METHODS = ("predict", "accumulate_posterior")   # entry points only: nested calls would reshard early


def _call(self, fn, *args, **kwargs):
    return fn(*args, **kwargs)


def _register_methods(model: nn.Module) -> None:
    from torch.distributed.fsdp import register_fsdp_forward_method

    setattr(model, CALL, types.MethodType(_call, model))
    for name in (CALL, *FORWARD_METHODS):
        if hasattr(model, name):
            register_fsdp_forward_method(model, name)


def forward_call(model: nn.Module, fn, *args, **kwargs):
    """`fn(*args, **kwargs)` as if it were `model`'s forward (for a sharded root); `fn` returns tensors."""
    call = getattr(model, CALL, None)
    return call(fn, *args, **kwargs) if call is not None else fn(*args, **kwargs)


def is_sharded(model: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return any(isinstance(m, FSDPModule) for m in model.modules())
