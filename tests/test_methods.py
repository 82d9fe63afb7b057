"""Methods end to end on the built-in task: every loss trains, SFT+DPO learns, R3M finds flips."""

import json

import pytest
import torch

from alignkit.algorithms import PREFERENCE_LOSSES, UNPAIRED_LOSSES
from alignkit.config import build
from alignkit.models import completion_logprobs, tiny_model_and_tokenizer
from alignkit.tasks import CipherTask
from alignkit.train import RunConfig, train


def _run(tmp_path, command, model, tok, **sections):
    data = {"output_dir": str(tmp_path), "data": {"eval_size": 100},
            "train": {"progress": False, "batch_size": 16}}
    for key, value in sections.items():
        data[key] = {**data.get(key, {}), **value}
    return train(build(RunConfig, data), command, model=model, tokenizer=tok)


def _sft(tmp_path, steps=30):
    model, tok = tiny_model_and_tokenizer(seed=0)
    _run(tmp_path, "sft", model, tok, data={"task_size": 600}, train={"steps": steps, "batch_size": 32,
                                                                       "lr": 3e-3})
    return model, tok


@pytest.mark.parametrize("loss", PREFERENCE_LOSSES.names())
def test_every_paired_loss_trains_and_lowers_its_loss(tmp_path, loss):
    model, tok = tiny_model_and_tokenizer(seed=0)
    options = {"name": loss, **({"weights": {"dpo": 1.0, "nll": 0.1}} if loss == "mix" else {})}
    result = _run(tmp_path, "preference", model, tok, loss=options, data={"task_size": 64},
                  train={"steps": 12, "lr": 2e-3, "schedule": "constant"})
    rows = [r for r in result.run.metrics() if "train/loss" in r]
    first, last = rows[0]["train/loss"], sum(r["train/loss"] for r in rows[-3:]) / 3
    assert last < first, f"{loss}: loss {first:.4f} -> {last:.4f}"


@pytest.mark.parametrize("loss", UNPAIRED_LOSSES.names())
def test_unpaired_losses_learn_from_thumbs_up_and_down(tmp_path, loss):
    """Held-out: the implicit reward ranks desirable above undesirable answers (AUC > 0.6)."""
    model, tok = _sft(tmp_path, steps=15)
    result = _run(tmp_path, "preference", model, tok, loss={"name": loss, "beta": 0.1},
                  data={"task_size": 1000, "kind": "rating"}, train={"steps": 40, "lr": 1e-3})
    objective = result.method.objective
    assert type(objective).__name__ == "UnpairedObjective"
    held_out = objective.splits["eval"]
    with torch.no_grad():
        logps, _ = completion_logprobs(model, [e.encoded for e in held_out], objective.pad_id)
    reward = logps - objective.reference["eval"][:, 0]
    good = torch.tensor([e.label for e in held_out])
    auc = (reward[good][:, None] > reward[~good][None, :]).float().mean().item()
    assert auc > 0.6, auc


def test_r3m_dpo_flags_most_flipped_pairs_and_few_clean_ones(tmp_path):
    """30% of labels flipped: measured precision 0.80, recall 0.87 (docs/methods.md)."""
    model, tok = _sft(tmp_path)
    n = 400
    result = _run(tmp_path, "preference", model, tok,
                  data={"task_size": n, "flip_rate": 0.3},
                  loss={"name": "r3m_dpo", "beta": 0.5, "lam": 0.5},
                  train={"steps": 50, "lr": 1e-4})
    _, flipped = CipherTask().comparisons(n, 0, 0.3)
    flagged = {row["index"] for row in json.loads((result.run.path / "r3m_outliers.json").read_text())}
    true_pos = sum(flipped[i] for i in flagged)
    precision, recall = true_pos / len(flagged), true_pos / sum(flipped)
    assert recall >= 0.75, recall
    assert precision >= 0.7, precision
    assert result.metrics["r3m/flagged"] == len(flagged)


def test_r3m_report_names_records_by_file_and_line(tmp_path):
    rows = [{"prompt": f"{a}{b}=", "chosen": "ab", "rejected": "ba"} for a in "abcd" for b in "abcd"]
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    model, tok = tiny_model_and_tokenizer(seed=0)
    result = _run(tmp_path, "preference", model, tok, data={"train": str(path), "eval_fraction": 0.25},
                  loss={"name": "r3m_dpo", "lam": 0.3}, train={"steps": 2, "batch_size": 12})
    report = json.loads((result.run.path / "r3m_outliers.json").read_text())
    assert report, "with lambda 0.3 every pair starts with delta > 0"
    for row in report:
        assert row["origin"] == f"{path}:{row['index'] + 1}"
        assert row["delta"] > 0
