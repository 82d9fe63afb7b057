"""K reward heads on one backbone: the per-head loss, accumulation, aggregation and reloading."""

import math

import pytest
import torch

from alignkit.algorithms import reward_loss
from alignkit.cli import main
from alignkit.config import build
from alignkit.models import reward_head_scores, reward_scores, tiny_model, tiny_model_and_tokenizer, tiny_reward_model
from alignkit.rewards import Ensemble, RewardModel
from alignkit.train import RunConfig, train

R_W = [[1.5, 0.5, -1.0], [-0.25, 0.0, 2.0]]   # 2 pairs x 3 heads
R_L = [[0.5, 1.0, -2.0], [0.75, -0.5, 1.0]]
MARGINS = [0.5, -0.25]


def _logsig(x: float) -> float:
    return -math.log1p(math.exp(-x))


def test_k_head_bradley_terry_is_the_mean_of_the_per_head_losses():
    got = reward_loss("bradley_terry", chosen_rewards=torch.tensor(R_W, dtype=torch.float64),
                      rejected_rewards=torch.tensor(R_L, dtype=torch.float64),
                      margins=torch.tensor(MARGINS, dtype=torch.float64), centering=0.01)
    want = [sum(-_logsig(w - rl - m) + 0.01 * (w + rl) ** 2 for w, rl in zip(ws, ls, strict=True)) / 3
            for ws, ls, m in zip(R_W, R_L, MARGINS, strict=True)]
    assert got.tolist() == pytest.approx(want, rel=1e-12)


def test_k_head_r3m_keeps_one_outlier_variable_per_head():
    lam = 0.4
    got = reward_loss("r3m", chosen_rewards=torch.tensor(R_W, dtype=torch.float64),
                      rejected_rewards=torch.tensor(R_L, dtype=torch.float64), lam=lam)

    def per_head(w: float, rl: float) -> float:
        delta = max(math.log(1 / lam - 1) - (w - rl), 0.0)
        return -_logsig(w - rl + delta) + lam * delta

    want = [sum(per_head(w, rl) for w, rl in zip(ws, ls, strict=True)) / 3 for ws, ls in zip(R_W, R_L, strict=True)]
    assert got.tolist() == pytest.approx(want, rel=1e-12)


def _cfg(tmp_path, **sections) -> RunConfig:
    data = {"output_dir": str(tmp_path), "data": {"task_size": 48, "eval_size": 16},
            "train": {"steps": 3, "batch_size": 8, "lr": 1e-3, "progress": False}}
    for key, value in sections.items():
        data[key] = {**data.get(key, {}), **value}
    return build(RunConfig, data)


@pytest.mark.parametrize("loss", ["bradley_terry", "r3m"])
def test_k_head_micro_batching_gives_the_full_batch_gradient(tmp_path, loss):
    """One step of batch 8 as 1x8, 8x1 and 3+3+2 micro-batches: the same accumulated gradient."""
    lm, tok = tiny_model_and_tokenizer(seed=0)
    model = tiny_reward_model(lm, heads=3)
    result = train(_cfg(tmp_path, loss={"name": loss}, train={"steps": 1}), "reward", model=model,
                    tokenizer=tok)
    trainer, loop = result.method, result.loop
    ids, state = trainer.batch_indices(1), trainer.objective.state_dict()
    grads = []
    loop.optimizer.step = lambda: grads.append(
        {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    for micro in (8, 1, 3):
        trainer.micro = micro
        trainer.objective.load_state_dict(state)
        trainer.train_step(loop, ids)
    assert "score.weight" in grads[0] and grads[0]["score.weight"].shape[0] == 3
    for other in grads[1:]:
        for name, value in grads[0].items():
            torch.testing.assert_close(other[name], value, atol=1e-6, rtol=1e-4, msg=name)


def test_heads_are_seeded_and_start_different():
    backbone = tiny_model(seed=1)
    a, b = tiny_reward_model(backbone, heads=4), tiny_reward_model(backbone, heads=4)
    torch.testing.assert_close(a.score.weight, b.score.weight)
    rows = a.score.weight
    assert all(not torch.allclose(rows[i], rows[j]) for i in range(4) for j in range(i + 1, 4))
    torch.testing.assert_close(tiny_reward_model(backbone).score.weight, tiny_reward_model(backbone, 1).score.weight)


PROMPTS, COMPLETIONS = ["abc=", "hgfe=", "d="], ["xyz", "qqqq", "a"]


def test_reward_model_source_aggregates_heads_and_reports_their_spread():
    from alignkit.data.tokenize import Encoder

    lm, tok = tiny_model_and_tokenizer(seed=2)
    model = tiny_reward_model(lm, heads=3)
    encoded = [Encoder(tok).encode(p, c) for p, c in zip(PROMPTS, COMPLETIONS, strict=True)]
    with torch.no_grad():
        heads = reward_head_scores(model, encoded, tok.pad_token_id)  # [3 samples, 3 heads]
    rows = heads.tolist()
    mean = [sum(r) / 3 for r in rows]
    std = [math.sqrt(sum((x - m) ** 2 for x in r) / 3) for r, m in zip(rows, mean, strict=True)]
    scores = RewardModel(model, tok, batch_size=2).score(PROMPTS, COMPLETIONS)
    assert scores.values.tolist() == pytest.approx(mean, rel=1e-5)
    assert scores.uncertainty.tolist() == pytest.approx(std, rel=1e-5)
    worst = RewardModel(model, tok, aggregate="min").score(PROMPTS, COMPLETIONS).values
    assert worst.tolist() == pytest.approx([min(r) for r in rows], rel=1e-5)
    cautious = RewardModel(model, tok, aggregate="mean_minus_std", k=0.5).score(PROMPTS, COMPLETIONS).values
    assert cautious.tolist() == pytest.approx([m - 0.5 * s for m, s in zip(mean, std, strict=True)], rel=1e-5)
    with pytest.raises(KeyError, match="unknown ensemble aggregate"):
        RewardModel(model, tok, aggregate="median")
    with pytest.raises(ValueError, match="3 reward heads"):
        reward_scores(model, encoded, tok.pad_token_id)


def test_one_head_keeps_a_plain_score_and_matches_an_ensemble_of_one_head_models():
    lm, tok = tiny_model_and_tokenizer(seed=2)
    single = RewardModel(tiny_reward_model(lm), tok).score(PROMPTS, COMPLETIONS)
    assert single.uncertainty is None
    members = [RewardModel(tiny_reward_model(tiny_model(seed=s)), tok) for s in (3, 4)]
    ensemble = Ensemble(members, "mean_minus_std", k=2.0).score(PROMPTS, COMPLETIONS)
    values = torch.stack([m.score(PROMPTS, COMPLETIONS).values for m in members])
    torch.testing.assert_close(ensemble.uncertainty, values.std(0, unbiased=False))
    torch.testing.assert_close(ensemble.values, values.mean(0) - 2.0 * values.std(0, unbiased=False))


def test_k_head_model_trains_from_config_and_reloads_in_plain_transformers(tmp_path):
    from transformers import AutoModelForSequenceClassification

    result = train(_cfg(tmp_path, model={"heads": 3}, loss={"name": "r3m", "lam": 0.5}), "reward")
    assert result.model.config.num_labels == 3
    assert "eval/reward_std" in result.metrics and result.metrics["eval/reward_std"] > 0
    assert result.method.objective.outliers.delta.shape == (len(result.method.objective.splits["train"]), 3)
    assert (result.run.path / "r3m_outliers.json").exists()
    reloaded = AutoModelForSequenceClassification.from_pretrained(result.run.path / "model")
    seqs = [p.chosen for p in result.method.objective.splits["eval"][:6]]
    with torch.no_grad():
        before = reward_head_scores(result.model.eval(), seqs, result.tokenizer.pad_token_id)
        after = reward_head_scores(reloaded, seqs, result.tokenizer.pad_token_id)
    assert after.shape == (6, 3)
    torch.testing.assert_close(after, before)


def test_reward_command_takes_model_heads(tmp_path, capsys):
    assert main(["reward", "--model", "tiny", "model.heads=2", f"output_dir={tmp_path}", "data.task_size=16",
                 "data.eval_size=8", "train.steps=1", "train.batch_size=4"]) == 0
    assert "eval/reward_std" in capsys.readouterr().out
