"""Models: loading, the tiny offline model, and memory-lean sequence log-probs."""

from alignkit.models.loading import ModelConfig, ModelLoadError, load_model_and_tokenizer
from alignkit.models.logprobs import (
    completion_logprobs,
    naive_token_logprobs,
    sequence_logprobs,
    token_logprobs,
)
from alignkit.models.tiny import TinyConfig, tiny_model, tiny_model_and_tokenizer, tiny_reward_model, tiny_tokenizer

__all__ = [
    "ModelConfig",
    "ModelLoadError",
    "TinyConfig",
    "completion_logprobs",
    "load_model_and_tokenizer",
    "naive_token_logprobs",
    "sequence_logprobs",
    "tiny_model",
    "tiny_model_and_tokenizer",
    "tiny_reward_model",
    "tiny_tokenizer",
    "token_logprobs",
]
