"""Pairwise preference model with uncertainty (Xu et al. 2025, arXiv 2510.20369): the loss against
its closed form, accumulation, the SNGP head, symmetric judging, training, saving and reloading."""

import math
import random
import string

import pytest
import torch

from alignkit.algorithms import PAIRWISE_LOSSES, pairwise_loss
from alignkit.cli import main
from alignkit.config import build
from alignkit.models import (
    ModelConfig,
    PairwiseConfig,
    PreferenceModel,
    load_model_and_tokenizer,
    load_preference_model,
    tiny_model_and_tokenizer,
)
from alignkit.models.pairwise import SNGPHead, SpectralLinear
from alignkit.rewards import Preference, PreferenceEnsemble, PreferenceModelJudge
from alignkit.tasks.cipher import CipherTask
from alignkit.train import RunConfig, train


def _logsig(x: float) -> float:
    return -math.log1p(math.exp(-x))


# ----- the loss -----
LOGITS, LABELS, MARGINS = [1.5, -0.5, 0.25, 2.0], [1.0, 0.0, 0.5, 0.5], [2.0, -1.0, 0.5, 0.0]


@pytest.mark.parametrize("scaled", [False, True])
def test_weighted_bce_matches_its_closed_form(scaled):
    got = pairwise_loss("bce", logits=torch.tensor(LOGITS, dtype=torch.float64),
                        labels=torch.tensor(LABELS, dtype=torch.float64),
                        margins=torch.tensor(MARGINS, dtype=torch.float64), scaled=scaled)
    # by hand: -w [l log s(g) + (1 - l) log s(-g)], w = |margin| when scaled
    want = [-(abs(m) if scaled else 1.0) * (lab * _logsig(g) + (1 - lab) * _logsig(-g))
            for g, lab, m in zip(LOGITS, LABELS, MARGINS, strict=True)]
    assert got.tolist() == pytest.approx(want, rel=1e-12)
    assert want[2] == pytest.approx((abs(0.5) if scaled else 1.0) * (0.25 / 2 + math.log1p(math.exp(-0.25))))


def test_every_pairwise_loss_has_a_closed_form_case_and_scaled_needs_margins():
    assert PAIRWISE_LOSSES.names() == ["bce"]
    with pytest.raises(ValueError, match="margin"):
        pairwise_loss("bce", logits=torch.zeros(2), labels=torch.ones(2), scaled=True)


# ----- the input: one sequence, read at its last token -----
def test_comparison_is_one_sequence_through_the_chat_template():
    from alignkit.models import PairEncoder

    _, tok = tiny_model_and_tokenizer(chat_template=True)
    encoded = PairEncoder(tok).encode("abc=", "xy", "z")
    assert tok.decode(encoded.prompt + encoded.completion) == (
        "<|user|>abc=\n[assistant_1]\nxy\n[assistant_2]\nz<|assistant|></s>")


def test_hidden_state_is_read_at_the_last_non_pad_token_on_either_side():
    from alignkit.models.pairwise import last_token_states

    hidden = torch.arange(8.0).view(2, 4, 1)
    right = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    left = torch.tensor([[0, 1, 1, 1], [0, 0, 1, 1]])
    assert last_token_states(hidden, right).flatten().tolist() == [2.0, 5.0]
    assert last_token_states(hidden, left).flatten().tolist() == [3.0, 7.0]


# ----- accumulation -----
def _cfg(tmp_path, **sections) -> RunConfig:
    data = {"output_dir": str(tmp_path), "data": {"task_size": 48, "eval_size": 16},
            "train": {"steps": 1, "batch_size": 8, "lr": 1e-3, "progress": False}}
    for key, value in sections.items():
        data[key] = {**data.get(key, {}), **value}
    return build(RunConfig, data)


def _tiny_pm(head: str = "sngp", seed: int = 0, **options) -> tuple[PreferenceModel, object]:
    lm, tok = tiny_model_and_tokenizer(seed=seed)
    return PreferenceModel.from_causal_lm(lm, PairwiseConfig(head=head, features=64, **options)), tok


@pytest.mark.parametrize("head", ["sngp", "linear"])
def test_pairwise_micro_batching_gives_the_full_batch_gradient(tmp_path, head):
    """One step of batch 8 (16 sequences, both orders) as 1x8, 8x1 and 3+3+2: the same gradient."""
    model, tok = _tiny_pm(head)
    result = train(_cfg(tmp_path), "pairwise-rm", model=model, tokenizer=tok)
    trainer, loop = result.method, result.loop
    ids = trainer.batch_indices(1)
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    grads = []
    loop.optimizer.step = lambda: grads.append(
        {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    for micro in (8, 1, 3):
        model.load_state_dict(weights)  # spectral norm's power-iteration vectors move on every forward
        trainer.micro = micro
        trainer.train_step(loop, ids)
    assert any(name.startswith("head.") for name in grads[0])
    for other in grads[1:]:
        for name, value in grads[0].items():
            torch.testing.assert_close(other[name], value, atol=1e-6, rtol=1e-4, msg=name)


# ----- the SNGP head -----
def test_posterior_precision_is_ridge_plus_the_feature_outer_products():
    head = SNGPHead(8, PairwiseConfig(features=6, ridge=1e-3))
    g = torch.Generator().manual_seed(0)
    first, second = torch.randn(5, 6, generator=g), torch.randn(3, 6, generator=g)
    head.accumulate_features(first)
    head.accumulate_features(second)
    want = 1e-3 * torch.eye(6, dtype=torch.float64)
    for phi in torch.cat([first, second]).double():
        want += torch.outer(phi, phi)
    torch.testing.assert_close(head.precision, want, rtol=1e-12, atol=1e-12)
    head.reset_posterior()  # back to the prior: P = ridge I, so v = ridge phi^T phi / ridge = |phi|^2
    phi = first.double()
    torch.testing.assert_close(head.variance(phi), (phi ** 2).sum(1), rtol=1e-10, atol=1e-12)


def test_calibrated_logit_is_the_logit_divided_by_the_uncertainty():
    model, tok = _tiny_pm("sngp")
    model.head.accumulate_features(torch.randn(40, 64))
    model.eval()
    ids = torch.tensor([[2, 60, 61, 62, 3], [2, 63, 3, 0, 0]])
    mask = (ids != 0).long()
    with torch.no_grad():
        g, (g_hat, u) = model(ids, mask), model.predict(ids, mask)
        phi = model.head.features(model.pooled(ids, mask)).double()
    v = 1e-3 * (phi * torch.linalg.solve(model.head.precision, phi.T).T).sum(1)
    torch.testing.assert_close(u, torch.sqrt(1 + 0.1 * v).float())
    assert torch.equal(g_hat, g / u) and (u > 1).all()


def test_spectral_norm_is_bounded_by_sn_range():
    layer = SpectralLinear(16, bound=2.0)
    torch.testing.assert_close(layer.weight(), torch.eye(16))  # within the bound: untouched
    big = torch.randn(16, 16, generator=torch.Generator().manual_seed(1))  # spectral norm about 8
    with torch.no_grad():
        layer.linear.parametrizations.weight.original.copy_(big)
    for _ in range(50):  # power iteration advances once per training forward
        layer(torch.randn(4, 16))
    top = torch.linalg.matrix_norm(layer.weight().detach(), ord=2)
    assert 1.99 < top <= 2.0 * (1 + 1e-4)


# ----- symmetric judging -----
PROMPTS = ["abc=", "hgfedcba=", "d="]
A, B = ["bca", "aaaaaaaa", "e"], ["bcb", "abcdefgh", "ffff"]


@pytest.mark.parametrize("head", ["sngp", "dropout", "linear"])
def test_judge_is_exactly_symmetric(head):
    model, tok = _tiny_pm(head)
    judge = PreferenceModelJudge(model, tok, batch_size=4)
    ab, ba = judge.compare(PROMPTS, A, B), judge.compare(PROMPTS, B, A)
    torch.testing.assert_close(ab.probs, 1 - ba.probs, atol=1e-6, rtol=0)
    detail = judge.compare_detailed(PROMPTS, A, B)
    torch.testing.assert_close(torch.sigmoid((detail.logit_ab - detail.logit_ba) / 2), ab.probs)
    assert judge.stats.calls == 3 and judge.stats.items == 9
    if head == "linear":
        assert ab.uncertainty is None and detail.uncertainty_ab is None
    else:
        torch.testing.assert_close(ab.uncertainty, ba.uncertainty)


def test_mc_dropout_uncertainty_is_positive_and_seeded():
    model, tok = _tiny_pm("dropout", dropout=0.3, passes=6)
    first = PreferenceModelJudge(model, tok).compare(PROMPTS, A, B)
    again = PreferenceModelJudge(model, tok).compare(PROMPTS, A, B)
    assert (first.uncertainty > 0).all()
    assert torch.equal(first.probs, again.probs) and torch.equal(first.uncertainty, again.uncertainty)
    model.head.seed = 1
    other = PreferenceModelJudge(model, tok).compare(PROMPTS, A, B)
    assert not torch.equal(first.uncertainty, other.uncertainty)


class _Fixed:
    def __init__(self, probs, failed=None):
        self.probs, self.failed = torch.tensor(probs), failed

    def compare(self, prompts, a, b):
        return Preference(self.probs, None, self.failed)


def test_preference_ensemble_averages_logits_and_reports_their_spread():
    logit = lambda p: math.log(p / (1 - p))  # noqa: E731
    members = [_Fixed([0.9, 0.5]), _Fixed([0.6, 0.2]), _Fixed([0.7, 0.3], torch.tensor([False, True]))]
    got = PreferenceEnsemble(members).compare(["p", "q"], ["a", "b"], ["c", "d"])
    first = [logit(0.9), logit(0.6), logit(0.7)]
    mean = sum(first) / 3
    assert got.probs[0].item() == pytest.approx(1 / (1 + math.exp(-mean)), rel=1e-5)
    assert got.uncertainty[0].item() == pytest.approx(math.sqrt(sum((x - mean) ** 2 for x in first) / 3), rel=1e-5)
    assert got.failed.tolist() == [False, True] and got.probs[1].item() == 0.5
    with pytest.raises(ValueError, match="at least two"):
        PreferenceEnsemble(members[:1])


# ----- training, saving, reloading -----
@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """200 steps on the built-in cipher comparisons, no SFT warm start (about 15 s on 2 cores).

    Measured (seed 0): held-out symmetric accuracy 0.505 before, 0.835 after. rff_std=0.5 puts
    W h at the spread the paper's 0.05 gives an 8B model's hidden states (norm ~100 against ~8 here).
    """
    model, tok = tiny_model_and_tokenizer(seed=0)
    cfg = build(RunConfig, {"output_dir": str(tmp_path_factory.mktemp("pm")),
                            "model": {"pairwise": {"rff_std": 0.5}},
                            "data": {"task_size": 600, "eval_size": 200},
                            "train": {"steps": 200, "batch_size": 16, "lr": 5e-4, "progress": False}})
    pm = PreferenceModel.from_causal_lm(model, cfg.model.pairwise)
    return train(cfg, "pairwise-rm", model=pm, tokenizer=tok), cfg


def test_pairwise_model_learns_the_hidden_rule(trained):
    result, _ = trained
    assert result.initial_metrics["eval/symmetric_accuracy"] < 0.6
    assert result.metrics["eval/symmetric_accuracy"] > 0.7
    assert result.metrics["eval/loss"] < result.initial_metrics["eval/loss"] - 0.05
    posterior = [r for r in result.run.metrics() if r.get("event") == "after_training"]
    assert posterior and posterior[0]["posterior/sequences"] == 1200


def _junk(rng: random.Random, n: int) -> str:
    return "".join(rng.choice(string.ascii_uppercase + string.digits + "!?#") for _ in range(n))


def test_uncertainty_is_larger_far_from_the_training_data(trained):
    result, _ = trained
    judge = PreferenceModelJudge(result.model, result.tokenizer)
    seen = CipherTask().comparisons(600, seed=0)[0][:48]  # the training comparisons (data.seed 0)
    near = judge.compare([p.prompt for p in seen], [p.chosen for p in seen], [p.rejected for p in seen])
    rng = random.Random(0)
    far = judge.compare([_junk(rng, 20) for _ in range(48)], [_junk(rng, 15) for _ in range(48)],
                        [_junk(rng, 15) for _ in range(48)])
    assert near.uncertainty.max() < far.uncertainty.min()
    assert torch.linalg.matrix_norm(result.model.head.sn.weight().detach(), ord=2) <= 10.0 * (1 + 1e-4)


def test_saved_model_reloads_with_identical_probabilities(trained, tmp_path):
    result, cfg = trained
    saved = result.run.path / "model"
    pairs = CipherTask().comparisons(12, seed=7)[0]
    args = ([p.prompt for p in pairs], [p.chosen for p in pairs], [p.rejected for p in pairs])
    before = PreferenceModelJudge(result.model, result.tokenizer).compare(*args)
    model, tok = load_preference_model(saved)
    after = PreferenceModelJudge(model, tok).compare(*args)
    torch.testing.assert_close(after.probs, before.probs, rtol=0, atol=1e-6)
    torch.testing.assert_close(after.uncertainty, before.uncertainty, rtol=0, atol=1e-6)
    assert not torch.equal(model.head.precision, 1e-3 * torch.eye(1024, dtype=torch.float64))
    via_config, _ = load_model_and_tokenizer(ModelConfig(name=str(saved)), head="pairwise")
    assert isinstance(via_config, PreferenceModel) and via_config.pairwise.rff_std == 0.5
    resumed = train(cfg, "pairwise-rm", resume=result.run.path)  # a finished run resumes to its end
    torch.testing.assert_close(resumed.model.head.precision, result.model.head.precision)


def test_pairwise_rm_command_from_the_cli(tmp_path, capsys):
    assert main(["pairwise-rm", "--model", "tiny", f"output_dir={tmp_path}", "data.task_size=16",
                 "data.eval_size=8", "train.steps=2", "train.batch_size=4", "model.pairwise.features=32",
                 "model.pairwise.head=dropout"]) == 0
    assert "eval/symmetric_accuracy" in capsys.readouterr().out
    assert main(["pairwise-rm", "--model", "tiny", f"output_dir={tmp_path}", "loss.scaled=true",
                 "data.task_size=16", "data.eval_size=8", "train.steps=1"]) == 2
    assert "margin" in capsys.readouterr().err
