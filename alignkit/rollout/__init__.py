"""Rollout engines: prompts in, sampled completions with their log-probs out."""

from alignkit.registry import Registry
from alignkit.rollout.base import FINISH_REASONS, Completion, Generator, SamplingConfig
from alignkit.rollout.hf import TransformersGenerator

GENERATORS = Registry("generator")
GENERATORS.register("transformers", summary="the policy in this process, batched decoding with a KV cache")(
    TransformersGenerator
)


@GENERATORS.register("vllm", summary="vLLM engine in this process (CUDA, optional extra)")
def _vllm_generator(model, tokenizer, *, gpu_memory_utilization: float = 0.3, dtype: str = "bfloat16",
                    enable_sleep_mode: bool = False, max_model_len: int | None = None, seed: int = 0,
                    tensor_parallel_size: int = 1, **engine_kwargs):
    """alignkit.rollout.vllm.VLLMGenerator, imported on first use: importing alignkit never imports vLLM."""
    from alignkit.rollout.vllm import VLLMGenerator

    return VLLMGenerator(model, tokenizer, gpu_memory_utilization=gpu_memory_utilization, dtype=dtype,
                         enable_sleep_mode=enable_sleep_mode, max_model_len=max_model_len, seed=seed,
                         tensor_parallel_size=tensor_parallel_size, **engine_kwargs)


__all__ = ["FINISH_REASONS", "GENERATORS", "Completion", "Generator", "SamplingConfig", "TransformersGenerator"]
