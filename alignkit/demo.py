"""The embedded default: a tiny base model, SFT on demonstrations, then DPO on preferences.

Held-out preference accuracy is the share of held-out pairs whose chosen answer the model finds
more likely (length-normalised log-prob) than the rejected one; chance is 0.5.
"""

from __future__ import annotations

from alignkit.config import build
from alignkit.models import tiny_model_and_tokenizer
from alignkit.train import RunConfig, train

# A short SFT leaves room for DPO to show what the preference data adds.
BETA, DPO_LR = 0.1, 3e-4
SIZES = {
    False: {"sft": (1000, 25), "dpo": (3000, 800)},   # (examples, optimizer steps)
    True: {"sft": (600, 15), "dpo": (1000, 300)},
}


def run_demo(quick: bool = False, output_dir: str = "runs", seed: int = 0) -> dict[str, float]:
    model, tokenizer = tiny_model_and_tokenizer(seed=seed)
    sizes = SIZES[quick]
    common = {"output_dir": output_dir, "data": {"eval_size": 200, "seed": seed}}
    sft_cfg = build(RunConfig, {**common, "data": {**common["data"], "task_size": sizes["sft"][0]},
                                "train": {"steps": sizes["sft"][1], "batch_size": 32, "lr": 3e-3,
                                          "warmup_steps": 10, "seed": seed}})
    sft = train(sft_cfg, "sft", model=model, tokenizer=tokenizer)
    dpo_cfg = build(RunConfig, {**common, "data": {**common["data"], "task_size": sizes["dpo"][0]},
                                "loss": {"name": "dpo", "beta": BETA},
                                "train": {"steps": sizes["dpo"][1], "batch_size": 16, "lr": DPO_LR,
                                          "seed": seed}})
    base_model, _ = tiny_model_and_tokenizer(seed=seed)
    base = train(build(RunConfig, {**common, "loss": {"name": "dpo"}, "train": {"steps": 0}}),
                 "eval", model=base_model, tokenizer=tokenizer)
    dpo = train(dpo_cfg, "preference", model=sft.model, tokenizer=tokenizer)
    return {
        "base model": base.initial_metrics["eval/preference_accuracy"],
        "after SFT": dpo.initial_metrics["eval/preference_accuracy"],
        "after SFT + DPO": dpo.metrics["eval/preference_accuracy"],
    }
