"""A rollout engine on vLLM, running in this process next to the trainer (colocated, one GPU).

The engine core runs in this process (`VLLM_ENABLE_V1_MULTIPROCESSING=0`, set before vLLM is
imported), so `sync_weights` hands the trainer's tensors straight to the engine's model with
`LLM.collective_rpc` (in process, nothing is serialised) and its `load_weights`, which maps checkpoint
names onto vLLM's fused layers. Tensor parallelism and quantised engines are not supported.

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

import numpy as np
import torch

from alignkit.rollout.base import Completion, SamplingConfig

INSTALL_HINT = ('VLLMGenerator needs vLLM and a CUDA GPU: pip install "alignkit[vllm]" on a CUDA machine. '
                'The "transformers" generator works everywhere.')


class VLLMGenerator:
    """Batched sampling with a vLLM engine that shares this process (and its GPU) with the trainer.

    `model_path_or_model` is a checkpoint directory or hub id, or a transformers model (a peft LoRA
    model too): then only its config is written to a temporary directory, the engine starts from
    dummy weights, and the model's weights are pushed in with `sync_weights`. The tokenizer is saved
    next to it so the engine detokenizes with exactly the trainer's tokenizer. `engine_kwargs` go to
    `vllm.LLM` (e.g. `enforce_eager=True`, `max_num_seqs=256`).
    """

    def __init__(self, model_path_or_model, tokenizer, *, gpu_memory_utilization: float = 0.3,
                 dtype: str = "bfloat16", enable_sleep_mode: bool = False, max_model_len: int | None = None,
                 seed: int = 0, **engine_kwargs):
        if engine_kwargs.get("tensor_parallel_size", 1) != 1:
            raise ValueError("VLLMGenerator runs one engine worker in this process: tensor_parallel_size must be 1")
        for key in ("logprobs_mode", "load_format"):
            if key in engine_kwargs:
                raise ValueError(f"VLLMGenerator sets {key} itself")
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"   # the engine core in this process
        try:
            from vllm import LLM
        except ImportError as err:
            raise RuntimeError(f"{INSTALL_HINT} (vllm is not importable: {err})") from err
        if not torch.cuda.is_available():
            raise RuntimeError(f"{INSTALL_HINT} (no CUDA device is visible)")

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
                       load_format="dummy" if in_memory else "auto", **engine_kwargs)
        if max_model_len is not None:
            options["max_model_len"] = max_model_len
        self.llm = LLM(model=model_path, **options)
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

    def generate(self, prompts: Sequence[list[int]], sampling: SamplingConfig, seed: int) -> list[Completion]:
        from vllm import SamplingParams, TokensPrompt

        if any(len(p) == 0 for p in prompts):
            raise ValueError("every prompt needs at least one token")
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
                           stop=list(sampling.stop) or None, seed=None if greedy else row_seed(seed, row),
                           logprobs=0, detokenize=True, skip_special_tokens=True)
            for row in range(len(prompts))
        ]
        outputs = self.llm.generate([TokensPrompt(prompt_token_ids=list(p)) for p in prompts],
                                    sampling_params=params, use_tqdm=False)
        return [_to_completion(out, list(p), eos_ids=self.eos_ids) for out, p in zip(outputs, prompts, strict=True)]

    def sync_weights(self, model) -> None:
        """Load `model`'s current weights into the engine (a LoRA model: merged), then drop cached prefixes."""
        self._wake()
        with torch.no_grad():
            self.llm.collective_rpc(_load_weights, args=(engine_weights(model),))
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


def row_seed(seed: int, row: int) -> int:
    """The sampling seed of one prompt: distinct per (call seed, row), stable across machines."""
    return int(np.random.SeedSequence([seed % 2**64, row]).generate_state(1)[0])


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


def engine_weights(model) -> Iterator[tuple[str, torch.Tensor]]:
    """(checkpoint name, tensor) pairs of `model`, what vLLM's `load_weights` reads; a peft LoRA model's
    adapters are merged into the base weights (the model itself is left as it is)."""
    if getattr(model, "peft_config", None) is None:
        for name, tensor in model.state_dict().items():
            yield name, tensor.detach()
        return
    yield from _merged_lora_weights(model)


def _merged_lora_weights(model) -> Iterator[tuple[str, torch.Tensor]]:
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
            tensor = tensor + _lora_delta(layers[owner], owner)
        name = name.replace(".base_layer.", ".")
        for adapter in model.peft_config:
            name = name.replace(f".modules_to_save.{adapter}.", ".")
        yield name, tensor.detach()


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
    config.architectures = [type(base).__name__]   # how vLLM picks its model class
    config.save_pretrained(directory)
    if getattr(base, "generation_config", None) is not None:
        base.generation_config.save_pretrained(directory)


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
