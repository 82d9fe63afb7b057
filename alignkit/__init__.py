"""alignkit: train language models from feedback."""

__version__ = "0.1.0"


_API = ("SFT", "DPO", "KTO", "Preference", "RewardModel", "RL", "GRPO", "PPO", "TrainResult")


def __getattr__(name: str):
    """`alignkit.DPO(...)` and the rest of the one-call API (alignkit/api.py), imported on first use."""
    if name in _API:
        from alignkit import api

        return getattr(api, name)
    raise AttributeError(f"module 'alignkit' has no attribute {name!r}")
