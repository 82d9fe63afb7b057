"""Rollout engines: prompts in, sampled completions with their log-probs out."""

from alignkit.registry import Registry
from alignkit.rollout.base import FINISH_REASONS, Completion, Generator, SamplingConfig
from alignkit.rollout.hf import TransformersGenerator

GENERATORS = Registry("generator")
GENERATORS.register("transformers", summary="the policy in this process, batched decoding with a KV cache")(
    TransformersGenerator
)

__all__ = ["FINISH_REASONS", "GENERATORS", "Completion", "Generator", "SamplingConfig", "TransformersGenerator"]
