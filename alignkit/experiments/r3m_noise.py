"""R3M against Bradley-Terry reward models as more and more preference labels are flipped at random.

The claim (Bukharin et al., arXiv 2406.15568): giving each training pair a sparse outlier variable
delta_i, l1-penalised and updated in closed form (algorithms.md section 4), makes a reward model
robust to corrupted labels, where plain Bradley-Terry comes to fit the flipped pairs. Here, per seed:
one SFT backbone on the cipher task, then at each corruption level two scalar reward models from it,
`bradley_terry` and `r3m` (lambda 0.1), trained on the same corrupted comparisons in the same order:
the setting measured in tests/test_r3m_vs_bt.py (whose numbers seed 0 at 30% reproduces), with the
backbone, data and data order drawn from the seed. Accuracy is agreement with the gold ordering on
clean held-out pairs (the eval split is never flipped, and cipher labels follow the gold reward
exactly); `accuracy_gain` is accuracy minus Bradley-Terry's for the same seed and level. For a
given seed the levels share their pairs, and each level's flips include the lower level's: one
uniform draw per pair decides.

Outlier detection: the k training pairs a trained model finds least consistent with their label
(smallest margin r(chosen) - r(rejected)), k the number of flipped pairs; `flip_precision` is the
share of them that were flipped. Flagging at random scores the corruption level, so without flips
(nothing to find) it is set to that chance value, 0. For R3M the k pairs are those of largest
delta_i = max(log(1/lambda - 1) - margin, 0) under the final model (r3m_outliers.json keeps each
pair's delta from the last time training saw it).
"""

from __future__ import annotations

from pathlib import Path

from alignkit.config import build
from alignkit.experiments.base import EXPERIMENTS
from alignkit.models import tiny_model_and_tokenizer, tiny_reward_model
from alignkit.rewards import RewardModel
from alignkit.tasks import CipherTask
from alignkit.train import RunConfig, train

LOSSES = {"Bradley-Terry": {"name": "bradley_terry"}, "R3M": {"name": "r3m", "lam": 0.1}}
SETTINGS = {
    False: {"levels": (0.0, 0.1, 0.2, 0.3, 0.4), "pairs": 1000, "epochs": 10, "eval_pairs": 400},
    True: {"levels": (0.0, 0.3), "pairs": 300, "epochs": 4, "eval_pairs": 200},
}


def _train(workdir: Path, name: str, command: str, data: dict, train_options: dict, model, tokenizer,
           loss: dict | None = None):
    cfg = build(RunConfig, {"output_dir": str(workdir), "run_name": name, "loss": loss or {},
                            "data": {"task": "cipher", **data}, "train": {"progress": False, **train_options}})
    return train(cfg, command, model=model, tokenizer=tokenizer)


def _sft_backbone(workdir: Path, seed: int):
    model, tokenizer = tiny_model_and_tokenizer(seed=seed)
    _train(workdir, "sft", "sft", {"task_size": 600, "eval_size": 50, "seed": seed},
           {"steps": 100, "batch_size": 32, "lr": 3e-3, "seed": seed}, model, tokenizer)
    return model, tokenizer


def _flip_precision(reward_model, tokenizer, pairs: list, flipped: list[bool]) -> float:
    k = sum(flipped)
    if k == 0:
        return 0.0
    prompts = [p.prompt for p in pairs]
    scores = RewardModel(reward_model, tokenizer, batch_size=64).score(
        prompts * 2, [p.chosen for p in pairs] + [p.rejected for p in pairs]).values
    margins = scores[:len(pairs)] - scores[len(pairs):]
    suspects = margins.argsort()[:k].tolist()
    return sum(flipped[i] for i in suspects) / k


def _reward_models(workdir: Path, backbone, tokenizer, setting: dict, level: float, seed: int) -> list[dict]:
    """Both reward models at one corruption level, each from the backbone, on the same pairs in the same order."""
    pairs, flipped = CipherTask().comparisons(setting["pairs"], seed, flip_rate=level)
    data = {"task_size": setting["pairs"], "eval_size": setting["eval_pairs"], "flip_rate": level, "seed": seed}
    rows = []
    for method, loss in LOSSES.items():
        result = _train(workdir, f"{loss['name']}-{level:g}", "reward", data,
                        {"epochs": setting["epochs"], "batch_size": 16, "lr": 1e-4, "seed": seed},
                        tiny_reward_model(backbone), tokenizer, loss)
        rows.append({"method": method, "corruption": level, "accuracy": result.metrics["eval/accuracy"],
                     "flip_precision": _flip_precision(result.model, tokenizer, pairs, flipped)})
    baseline = rows[0]["accuracy"]  # Bradley-Terry, first in LOSSES
    return [{**row, "accuracy_gain": row["accuracy"] - baseline} for row in rows]


@EXPERIMENTS.register(
    "r3m-noise", summary="R3M against Bradley-Terry reward models as random label corruption rises",
    paper="Bukharin et al. 2024, arXiv 2406.15568", group=("method", "corruption"),
    metrics=("accuracy", "accuracy_gain", "flip_precision"),
    plots=[{"x": "corruption", "y": "accuracy", "title": "Clean held-out reward accuracy against label corruption",
            "x_label": "share of training labels flipped", "y_label": "held-out accuracy (gold ordering)"},
           {"x": "corruption", "y": "accuracy_gain", "title": "Accuracy gain over Bradley-Terry (same seed and pairs)",
            "x_label": "share of training labels flipped", "y_label": "accuracy minus Bradley-Terry's"}])
def r3m_noise(seed: int, quick: bool, workdir: Path) -> list[dict]:
    setting = SETTINGS[quick]
    backbone, tokenizer = _sft_backbone(workdir, seed)
    rows = []
    for level in setting["levels"]:
        rows += _reward_models(workdir, backbone, tokenizer, setting, level, seed)
    return rows
