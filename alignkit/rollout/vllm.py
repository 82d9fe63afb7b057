"""A rollout engine on vLLM, running in this process next to the trainer (colocated).

The engine core runs in this process (`VLLM_ENABLE_V1_MULTIPROCESSING=0`, set before vLLM is
imported), so `sync_weights` hands the trainer's tensors straight to the engine's model with
`LLM.collective_rpc` (in process, nothing is serialised) and its `load_weights`, which maps checkpoint
names onto vLLM's fused layers. Quantised engines, pipeline and data parallel engines are not supported.

Weight sync streams: `full_parameters` yields one (name, full tensor) pair at a time, so a model
sharded with FSDP2's `fully_shard` (DTensor parameters) is all-gathered one tensor at a time, never as
a whole extra copy (see `full_parameters` for the memory bound). Gathering is a collective: every rank
of the trainer must call `sync_weights` (or run `full_parameters` to the end) at the same point.

Under torchrun (torch.distributed initialised), every rank builds its own VLLMGenerator with vLLM's
external launcher (`distributed_executor_backend="external_launcher"`): the engine's one worker runs
in this process, on the GPU of LOCAL_RANK. With `tensor_parallel_size=N` (world size a multiple of N),
the blocks of N consecutive ranks [0..N-1], [N..2N-1], ... each run one engine, a tensor-parallel shard
per rank. The engines of a group must see identical requests, so `generate` gathers the group's prompts
and sampling parameters (in rank order), each rank submits the whole joint batch and keeps its own
share of the outputs; the group's ranks must pass the same constructor `seed`, and all of them must
call `generate`, `sync_weights`, `sleep` and `wake_up` together (each with at least one prompt:
`generate` returns early on an empty list and would leave its group waiting). Different ranks should
pass different `generate` seeds, or equal rows of two ranks sample with equal seeds.

vLLM facts this relies on, read in vLLM's source and examples (not run here, no GPU):
`ExecutorWithExternalLauncher` asserts VLLM_ENABLE_V1_MULTIPROCESSING=0, runs one worker in the calling
process and takes its rank, local rank and rendezvous from RANK, LOCAL_RANK, MASTER_ADDR and
MASTER_PORT (env://); vLLM's examples and TRL's colocated mode pass one explicit seed to every rank of a
tensor-parallel group; vLLM lays ranks out as (external data parallel) x pipeline x tensor, so tensor
groups are consecutive ranks; the plain uni-process executor would put every rank's engine on rank 0
and cuda:0 (hence the external launcher under torchrun for N=1 too). Not verified without GPUs: that
vLLM joins an already initialised trainer process group (as verl and TRL rely on), that every
`load_weights` consumes its iterator lazily and to the end (an engine that stops early leaves the
other ranks waiting in the gather), and that `SamplingParams` pickle (they are gathered with
`all_gather_object` over a gloo group).

Log-probs: the engine is built with `logprobs_mode="processed_logprobs"`, vLLM's log-probs after all
logits processors, temperature *and* top-k / top-p. With top-k and top-p off that is exactly
alignkit's definition, log softmax(logits / temperature)[token]; with either on, vLLM renormalises
over the kept tokens, so its values exceed ours by -log(kept probability mass) (a warning says so).
No vLLM mode returns the temperature-scaled log-prob before truncation: "raw_logprobs" ignores the
temperature, "*_logits" need the full-vocabulary normaliser. Greedy requests (temperature 0) get
log softmax(logits), as the transformers generator gives.

Without vLLM or without CUDA the constructor raises a RuntimeError; the "transformers" generator
works everywhere.
"""

from __future__ import annotations

import copy
import os
import tempfile
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
from torch import Tensor

from alignkit.rollout.base import Completion, SamplingConfig, prompt_seeds

INSTALL_HINT = ('VLLMGenerator needs vLLM and a CUDA GPU: pip install "alignkit[vllm]" on a CUDA machine. '
                'The "transformers" generator works everywhere.')
LAUNCHER_ENV = ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")   # what vLLM's external launcher reads


class VLLMGenerator:
    """Batched sampling with a vLLM engine that shares this process (and its GPU) with the trainer.

    `model_path_or_model` is a checkpoint directory or hub id, or a transformers model (a peft LoRA
    model too): then only its config is written to a temporary directory, the engine starts from
    dummy weights, and the model's weights are pushed in with `sync_weights`. The tokenizer is saved
    next to it so the engine detokenizes with exactly the trainer's tokenizer. `engine_kwargs` go to
    `vllm.LLM` (e.g. `enforce_eager=True`, `max_num_seqs=256`).

    Under torchrun every rank builds one, with `tensor_parallel_size` ranks (consecutive ones) per
    engine and the same `seed` on the ranks of one engine (see the module docstring).
    """

    def __init__(self, model_path_or_model, tokenizer, *, gpu_memory_utilization: float = 0.3,
                 dtype: str = "bfloat16", enable_sleep_mode: bool = False, max_model_len: int | None = None,
                 seed: int = 0, tensor_parallel_size: int = 1, **engine_kwargs):
        for key in ("logprobs_mode", "load_format", "distributed_executor_backend"):
            if key in engine_kwargs:
                raise ValueError(f"VLLMGenerator sets {key} itself")
        parallel = parallel_options(tensor_parallel_size, engine_kwargs)
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"   # the engine core in this process
        try:
            from vllm import LLM
        except ImportError as err:
            raise RuntimeError(f"{INSTALL_HINT} (vllm is not importable: {err})") from err
        if not torch.cuda.is_available():
            raise RuntimeError(f"{INSTALL_HINT} (no CUDA device is visible)")
        group = _tensor_parallel_group(tensor_parallel_size, seed) if tensor_parallel_size > 1 else None

        self._dir = tempfile.TemporaryDirectory(prefix="alignkit-vllm-")
        in_memory = not isinstance(model_path_or_model, str | os.PathLike)
        if isinstance(tokenizer, str | os.PathLike):
            tokenizer_path = str(tokenizer)
        else:
            tokenizer.save_pretrained(self._dir.name)
            tokenizer_path = self._dir.name
        if in_memory:
            _save_config(model_path_or_model, self._dir.name)
            model_path = self._dir.name
        else:
            model_path = str(model_path_or_model)
        options = dict(tokenizer=tokenizer_path, dtype=dtype, gpu_memory_utilization=gpu_memory_utilization,
                       enable_sleep_mode=enable_sleep_mode, seed=seed, logprobs_mode="processed_logprobs",
                       load_format="dummy" if in_memory else "auto", **parallel, **engine_kwargs)
        if max_model_len is not None:
            options["max_model_len"] = max_model_len
        llm = LLM(model=model_path, **options)
        self.llm = llm if group is None else GroupEngine(llm, group)
        self.weight_dtype = _torch_dtype(dtype)
        pids = self.llm.collective_rpc(_worker_pid)
        if pids != [os.getpid()]:
            raise RuntimeError(f"the vLLM engine's worker runs in process(es) {pids}, not in this one "
                               f"({os.getpid()}); VLLMGenerator needs VLLM_ENABLE_V1_MULTIPROCESSING=0 "
                               "set before vLLM is first used")
        self.eos_ids = _eos_ids(self.llm.get_tokenizer(), model_path)
        self._asleep = False
        self._warned_truncation = False
        if in_memory:
            self.sync_weights(model_path_or_model)

    def generate(self, prompts: Sequence[list[int]], sampling: SamplingConfig,
                 seed: int | Sequence[int]) -> list[Completion]:
        """One completion per prompt; `seed` is an int or one per prompt (vLLM seeds each request)."""
        from vllm import SamplingParams, TokensPrompt

        if any(len(p) == 0 for p in prompts):
            raise ValueError("every prompt needs at least one token")
        seeds = prompt_seeds(seed, len(prompts))
        if not prompts:
            return []
        self._wake()
        truncated = sampling.temperature > 0 and (sampling.top_k > 0 or sampling.top_p < 1.0)
        if truncated and not self._warned_truncation:
            self._warned_truncation = True
            warnings.warn("with top_k / top_p, vLLM's log-probs are renormalised over the kept tokens: they exceed "
                          "log softmax(logits / temperature) by -log(kept mass) (see alignkit.rollout.vllm)",
                          stacklevel=2)
        greedy = sampling.temperature == 0
        params = [
            SamplingParams(n=1, temperature=sampling.temperature, top_p=sampling.top_p,
                           top_k=sampling.top_k if sampling.top_k > 0 else -1, max_tokens=sampling.max_new_tokens,
                           stop=list(sampling.stop) or None, seed=None if greedy else seeds[row],
                           logprobs=0, detokenize=True, skip_special_tokens=True)
            for row in range(len(prompts))
        ]
        outputs = self.llm.generate([TokensPrompt(prompt_token_ids=list(p)) for p in prompts],
                                    sampling_params=params, use_tqdm=False)
        return [_to_completion(out, list(p), eos_ids=self.eos_ids) for out, p in zip(outputs, prompts, strict=True)]

    def sync_weights(self, model) -> None:
        """Load `model`'s current weights into the engine (a LoRA model: merged), then drop cached prefixes.

        The weights stream in one full tensor at a time, cast to the engine's dtype (`full_parameters`); for
        an FSDP2 model this is a collective, so every rank of the trainer must call it at the same point."""
        self._wake()
        with torch.no_grad():
            self.llm.collective_rpc(_load_weights, args=(full_parameters(model, self.weight_dtype),))
        self.llm.reset_prefix_cache()

    def sleep(self, level: int = 1) -> None:
        """Free the engine's GPU memory while the trainer steps (needs enable_sleep_mode=True).

        Level 1 moves the weights to CPU memory and drops the KV cache; level 2 drops both (call
        `sync_weights` after waking). `generate` and `sync_weights` wake the engine first."""
        self.llm.sleep(level=level)
        self._asleep = True

    def wake_up(self) -> None:
        self.llm.wake_up()
        self._asleep = False

    def _wake(self) -> None:
        if self._asleep:
            self.wake_up()


def _to_completion(request_output, prompt_ids: list[int], eos_ids=()) -> Completion:
    """A Completion from one vLLM RequestOutput (n=1, logprobs=0, include_stop_str_in_output False).

    vLLM finishes with "stop" and stop_reason None on the EOS token, an int stop_reason on another
    stop token (e.g. generation_config's extra EOS ids), and a str stop_reason on a stop string; the
    token that ended it is in `token_ids` either way. Its text leaves out the stop string, which
    alignkit's text keeps. Older vLLM checks the length limit before EOS, so an EOS as the last
    allowed token is reported as "length": that counts as "eos" here.
    """
    out = request_output.outputs[0]
    token_ids = list(out.token_ids)
    text = out.text
    if out.finish_reason == "stop" and isinstance(out.stop_reason, str):
        reason = "stop"
        text += out.stop_reason
    elif out.finish_reason == "stop":
        reason = "eos"
    elif out.finish_reason == "length":
        reason = "eos" if token_ids and token_ids[-1] in set(eos_ids) else "length"
    else:
        raise RuntimeError(f"vLLM finished a request with {out.finish_reason!r} ({out.stop_reason!r})")
    steps = out.logprobs
    if steps is None or len(steps) != len(token_ids):
        raise RuntimeError("vLLM returned no log-prob for some sampled tokens (was logprobs=0 requested?)")
    logprobs = [float(step[token].logprob) for step, token in zip(steps, token_ids, strict=True)]
    return Completion(list(prompt_ids), token_ids, text, logprobs, reason)


# --- one engine per group of ranks under torchrun ----------------------------------------------------

def parallel_options(tensor_parallel_size: int, engine_kwargs: dict) -> dict:
    """vLLM's parallelism options for the engine of this process, after checking them.

    Without torch.distributed: one engine on one GPU. Under torchrun: vLLM's external launcher (the
    engine's worker in this process), `tensor_parallel_size` consecutive ranks per engine."""
    size = tensor_parallel_size
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ValueError(f"tensor_parallel_size must be a positive int, got {size!r}")
    for key in ("pipeline_parallel_size", "data_parallel_size"):
        if engine_kwargs.get(key, 1) != 1:
            raise ValueError(f"VLLMGenerator supports tensor parallelism only: {key} must be 1")
    if not _distributed():
        if size != 1:
            raise ValueError(f"tensor_parallel_size={size} needs torch.distributed: launch one process per GPU with "
                             f"torchrun (a world size that is a multiple of {size}) and initialise the process "
                             "group before building the generator")
        return {"tensor_parallel_size": 1}
    world = torch.distributed.get_world_size()
    if world % size:
        raise ValueError(f"the world size {world} is not a multiple of tensor_parallel_size={size}: each engine "
                         f"takes {size} consecutive ranks")
    missing = [name for name in LAUNCHER_ENV if name not in os.environ]
    if missing:
        raise ValueError(f"vLLM's external launcher reads {', '.join(LAUNCHER_ENV)} from the environment "
                         f"(torchrun sets them); missing: {', '.join(missing)}")
    return {"tensor_parallel_size": size, "distributed_executor_backend": "external_launcher"}


def tensor_parallel_groups(world_size: int, size: int) -> list[list[int]]:
    """The ranks of each engine: blocks of `size` consecutive ranks, as vLLM lays out tensor-parallel groups."""
    if size < 1 or world_size % size:
        raise ValueError(f"the world size {world_size} is not a multiple of tensor_parallel_size={size}")
    return [list(range(start, start + size)) for start in range(0, world_size, size)]


def own_share(outputs: Sequence, counts: Sequence[int], index: int) -> list:
    """The outputs of the group's rank `index`, out of those of the group's joint batch, which holds
    `counts[i]` requests of rank i, in rank order."""
    if len(outputs) != sum(counts):
        raise RuntimeError(f"the engine returned {len(outputs)} outputs for a joint batch of {sum(counts)} requests")
    start = sum(counts[:index])
    return list(outputs[start:start + counts[index]])


class GroupEngine:
    """A `vllm.LLM` that is one tensor-parallel shard of an engine spread over a group of ranks.

    vLLM's external launcher needs the engines of a group to get identical requests: `generate` gathers
    the group's (prompt, sampling parameters) pairs in rank order, submits the joint batch and returns
    this rank's share of the outputs. Every other attribute is the engine's (`llm`)."""

    def __init__(self, llm, group):
        self.llm, self.group = llm, group
        self.index = torch.distributed.get_rank(group)

    def generate(self, prompts, sampling_params, use_tqdm: bool = False):
        if not isinstance(sampling_params, Sequence):
            sampling_params = [sampling_params] * len(prompts)
        batches = _gather(list(zip(prompts, sampling_params, strict=True)), self.group)
        joint = [request for batch in batches for request in batch]
        outputs = []
        if joint:
            outputs = self.llm.generate([prompt for prompt, _ in joint], sampling_params=[p for _, p in joint],
                                        use_tqdm=use_tqdm)
        return own_share(outputs, [len(batch) for batch in batches], self.index)

    def __getattr__(self, name):
        return getattr(self.llm, name)


def _tensor_parallel_group(size: int, seed: int):
    """This rank's engine group (a new gloo group, to gather requests), once its ranks agree on `seed`.

    Every rank must call it: creating groups is a collective."""
    groups = tensor_parallel_groups(torch.distributed.get_world_size(), size)
    group, _ = torch.distributed.new_subgroups_by_enumeration(groups, backend="gloo")
    seeds = _gather(seed, group)
    if len(set(seeds)) != 1:
        raise ValueError(f"the ranks of one tensor-parallel engine passed the seeds {seeds}: vLLM's external "
                         "launcher needs one seed on all of them (e.g. seed=base + rank // tensor_parallel_size)")
    return group


def _gather(value, group) -> list:
    """`value` of every rank of `group`, in rank order."""
    values = [None] * torch.distributed.get_world_size(group)
    torch.distributed.all_gather_object(values, value, group=group)
    return values


def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def _torch_dtype(dtype) -> torch.dtype | None:
    """The torch dtype of vLLM's `dtype` option ("bfloat16", "half", torch.float16, ...); None for "auto"."""
    if isinstance(dtype, torch.dtype):
        return dtype
    value = getattr(torch, str(dtype), None)
    return value if isinstance(value, torch.dtype) else None


# --- weights for the engine ----------------------------------------------------------------------------

def full_parameters(model, dtype: torch.dtype | None = None) -> Iterator[tuple[str, Tensor]]:
    """(checkpoint name, full tensor) pairs of `model`, one at a time: what vLLM's `load_weights` reads.

    The names and tensors of `model.state_dict()` (persistent buffers included), in its order, cast to
    `dtype` (None: as they are). A peft LoRA model's adapters are merged into the base weights, the
    model itself is left as it is. A model sharded with FSDP2's `fully_shard` holds DTensor shards:
    each is cast, then all-gathered (`full_tensor()`) just before it is yielded.

    Gathering is a collective: every rank of the mesh must run this iterator to the end, at the same
    point, also a rank without an engine (`for _ in full_parameters(model): pass`).

    Memory: the iterator keeps no reference to what it yielded, so with a consumer that drops each
    tensor before asking for the next, the gathered data alive at any time is one tensor, at most the
    largest one in `dtype` (plus its local shard cast to `dtype`). A consumer whose loop variable still
    holds the previous tensor while the next is gathered (vLLM's `load_weights` loops do) holds two.
    A LoRA-merged weight is made from its full base weight and delta: for a moment up to three more
    tensors of its size (base, delta, sum; four when cast). An unsharded model's tensors are yielded as
    they are (no copy) unless cast.
    """
    if getattr(model, "peft_config", None) is not None:
        yield from _merged_lora_weights(model, dtype)
        return
    for name, tensor in model.state_dict().items():
        yield name, _full(tensor, dtype)


def _full(tensor: Tensor, dtype: torch.dtype | None = None) -> Tensor:
    """All of `tensor`, detached, in `dtype`: all-gathered if it is a DTensor (cast first, so less travels)."""
    tensor = tensor.detach()
    if dtype is not None:
        tensor = tensor.to(dtype)
    return tensor.full_tensor() if _is_dtensor(tensor) else tensor


def _is_dtensor(tensor) -> bool:
    if not torch.distributed.is_available():
        return False
    from torch.distributed.tensor import DTensor

    return isinstance(tensor, DTensor)


def _merged_lora_weights(model, dtype: torch.dtype | None) -> Iterator[tuple[str, Tensor]]:
    configs = list(model.peft_config.values())
    kinds = {str(getattr(c.peft_type, "value", c.peft_type)) for c in configs}
    if len(configs) != 1 or kinds != {"LORA"}:
        raise ValueError(f"VLLMGenerator merges one plain LoRA adapter; this peft model has {sorted(kinds)} "
                         f"adapters {list(model.peft_config)}: merge it (merge_and_unload) and pass that model")
    base = model.get_base_model()
    layers = {name: m for name, m in base.named_modules() if hasattr(m, "get_delta_weight") and hasattr(m, "lora_A")}
    for name, tensor in base.state_dict().items():
        if ".lora_" in name or ".original_module." in name:
            continue
        owner, _, leaf = name.rpartition(".base_layer.")
        if owner in layers and leaf == "weight":
            yield _checkpoint_name(name, model.peft_config), _merged(tensor, layers[owner], owner, dtype)
        else:
            yield _checkpoint_name(name, model.peft_config), _full(tensor, dtype)


def _checkpoint_name(name: str, adapters) -> str:
    """The plain model's name of a peft base model's tensor (no `base_layer`, no `modules_to_save`)."""
    name = name.replace(".base_layer.", ".")
    for adapter in adapters:
        name = name.replace(f".modules_to_save.{adapter}.", ".")
    return name


def _merged(weight: Tensor, layer, name: str, dtype: torch.dtype | None) -> Tensor:
    """A LoRA layer's base weight plus its adapters' delta, full and in `dtype`; a new tensor (the layer is kept)."""
    delta = _lora_delta(layer, name)
    merged = _full(weight) + (_full(delta) if isinstance(delta, Tensor) else delta)
    return merged if dtype is None else merged.to(dtype)


def _lora_delta(layer, name: str) -> torch.Tensor | float:
    delta: torch.Tensor | float = 0.0
    if layer.disable_adapters:
        return delta
    for adapter in layer.active_adapters:
        known = adapter in layer.lora_A or adapter in getattr(layer, "lora_embedding_A", {})
        if adapter in layer.merged_adapters or not known:
            continue
        special = (adapter in getattr(layer, "lora_variant", {}) or getattr(layer, "use_dora", {}).get(adapter)
                   or getattr(layer, "lora_bias", {}).get(adapter))
        if special:
            raise ValueError(f"{name}: VLLMGenerator merges plain LoRA only (not DoRA or lora_bias); "
                             "merge the model (merge_and_unload) and pass that")
        delta = delta + layer.get_delta_weight(adapter)
    return delta


def _save_config(model, directory: str) -> None:
    """config.json (and generation_config.json) of a model in memory: all vLLM needs to build dummy weights."""
    base = model.get_base_model() if getattr(model, "peft_config", None) is not None else model
    config = copy.deepcopy(base.config)
    config.architectures = [_architecture(base)]   # how vLLM picks its model class
    config.save_pretrained(directory)
    if getattr(base, "generation_config", None) is not None:
        base.generation_config.save_pretrained(directory)


def _architecture(model) -> str:
    """The name of the model's class; for an FSDP2 model, of the class `fully_shard` wrapped (FSDP<name>)."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:   # torch.distributed not built, or torch < 2.6
        return type(model).__name__
    return next(cls for cls in type(model).__mro__ if not issubclass(cls, FSDPModule)).__name__


def _eos_ids(tokenizer, model_path: str) -> list[int]:
    """The ids the engine stops on: its tokenizer's EOS and the generation config's."""
    configured = None
    if Path(model_path, "generation_config.json").exists():
        from transformers import GenerationConfig

        configured = GenerationConfig.from_pretrained(model_path).eos_token_id
    configured = configured if isinstance(configured, list) else [configured]
    return list(dict.fromkeys(i for i in [tokenizer.eos_token_id, *configured] if i is not None))


def _worker_pid(worker) -> int:
    return os.getpid()


def _load_weights(worker, weights) -> None:
    worker.get_model().load_weights(weights)
