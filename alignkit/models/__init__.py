"""Models: loading, the tiny offline model, memory-lean sequence log-probs, pairwise preference models."""

from alignkit.models.loading import ModelConfig, ModelLoadError, load_model_and_tokenizer
from alignkit.models.logprobs import (
    completion_logprobs,
    naive_token_logprobs,
    reward_head_scores,
    reward_scores,
    sequence_logprobs,
    token_logprobs,
)
from alignkit.models.pairwise import (
    PREFERENCE_HEADS,
    PairEncoder,
    PairwiseConfig,
    PreferenceModel,
    load_preference_model,
)
from alignkit.models.tiny import TinyConfig, tiny_model, tiny_model_and_tokenizer, tiny_reward_model, tiny_tokenizer

__all__ = [
    "PREFERENCE_HEADS",
    "ModelConfig",
    "ModelLoadError",
    "PairEncoder",
    "PairwiseConfig",
    "PreferenceModel",
    "TinyConfig",
    "completion_logprobs",
    "load_model_and_tokenizer",
    "load_preference_model",
    "naive_token_logprobs",
    "reward_head_scores",
    "reward_scores",
    "sequence_logprobs",
    "tiny_model",
    "tiny_model_and_tokenizer",
    "tiny_reward_model",
    "tiny_tokenizer",
    "token_logprobs",
]
