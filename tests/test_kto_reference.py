"""KTO's reference point z0 on mismatched pairs drawn within each step (Ethayarajh et al. 2024, arXiv 2402.01306)."""

import json
import shutil

import pytest
import torch

import alignkit.train.objectives as objectives
from alignkit.config import build
from alignkit.models import completion_logprobs, tiny_model_and_tokenizer
from alignkit.train import RunConfig, train

RUNS = [3, 1, 2, 4, 1, 3, 2, 1, 3, 4]  # consecutive records sharing a prompt, 24 in all
LETTERS = "abcdefghijklmnopqrstuvwxyz"


def _ratings(path, prompts: list[str]):
    """One record per prompt, each with its own completion, labels alternating."""
    rows = [{"prompt": p, "completion": LETTERS[k % 26] + LETTERS[k // 26] + "x" * (k % 5), "label": k % 2 == 0}
            for k, p in enumerate(prompts)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _config(tmp_path, train_prompts: list[str], eval_prompts: list[str], **options) -> RunConfig:
    data = {"train": _ratings(tmp_path / "train.jsonl", train_prompts),
            "eval": _ratings(tmp_path / "eval.jsonl", eval_prompts)}
    return build(RunConfig, {"output_dir": str(tmp_path / "runs"), "data": data, "loss": {"name": "kto"},
                             "train": {"steps": 1, "batch_size": 8, "lr": 1e-3, "progress": False, **options}})


def _train(tmp_path, train_prompts: list[str], eval_prompts: list[str]):
    model, tok = tiny_model_and_tokenizer(seed=0)
    return train(_config(tmp_path, train_prompts, eval_prompts), "preference", model=model, tokenizer=tok)


def _grouped_prompts() -> list[str]:
    return [f"{LETTERS[g]}{LETTERS[g + 1]}=" for g, run in enumerate(RUNS) for _ in range(run)]


def _step_stats(monkeypatch, objective, policy, ids):
    """step_stats of the step `ids` under `policy`, and the sequences it scored for z0."""
    scored, real = [], objectives.completion_logprobs

    def recording(model, seqs, pad_id):
        scored.extend(seqs)
        return real(model, seqs, pad_id)

    with monkeypatch.context() as patch:
        patch.setattr(objectives, "completion_logprobs", recording)
        stats = objective.step_stats(policy, [(i, objective.splits["train"][i]) for i in ids])
    return stats, scored


def test_shift_skips_neighbours_with_the_same_prompt():
    from alignkit.train.objectives import shift_to_other_prompts

    prompts = {5: 0, 6: 0, 7: 1, 8: 0}
    assert shift_to_other_prompts([5, 6, 7, 8], prompts) == [(5, 7), (6, 7), (7, 8), (8, 7)]
    assert shift_to_other_prompts([7, 5, 6, 8], prompts) == [(7, 5), (5, 7), (6, 7), (8, 7)]
    assert shift_to_other_prompts([5, 6, 8], prompts) == []


def test_each_step_pairs_prompts_with_other_prompts_completions_and_z0_is_their_mean_log_ratio(tmp_path, monkeypatch):
    prompts = _grouped_prompts()
    result = _train(tmp_path, prompts, prompts[:12])
    method, objective = result.method, result.method.objective
    examples = objective.splits["train"]
    owner = {tuple(e.encoded.completion): i for i, e in enumerate(examples)}
    policy, _ = tiny_model_and_tokenizer(seed=2)  # a policy other than the reference, so z0 is not 0
    reference, _ = tiny_model_and_tokenizer(seed=0)  # the initial policy: KTO's reference
    kl_means = []
    for step in range(3):
        ids = method.batch_indices(step)
        stats, scored = _step_stats(monkeypatch, objective, policy, ids)
        assert len(scored) == len(ids)  # one mismatched pair per example of the step
        step_prompts = [examples[i].encoded.prompt for i in ids]
        for seq in scored:
            j = owner[tuple(seq.completion)]
            assert seq.prompt != examples[j].encoded.prompt, "a mismatched pair is matched"
            assert j in ids, "the completion comes from another example of the same step"
            assert seq.prompt in step_prompts
        with torch.no_grad():
            kl = completion_logprobs(policy, scored, objective.pad_id)[0] - \
                completion_logprobs(reference, scored, objective.pad_id)[0]
        kl_means.append(float(kl.mean()))
        assert float(stats["reference_point"]) == pytest.approx(max(0.0, kl_means[-1]), abs=1e-5)
        assert objective.mismatched_pairs(ids) == objective.mismatched_pairs(list(ids))  # a pure function
    assert max(kl_means) > 0.1  # the closed form is checked off its floor at 0
    held_out = objective.splits["eval"]
    assert objective.eval_pairs and all(held_out[i].encoded.prompt != held_out[j].encoded.prompt
                                        for i, j in objective.eval_pairs)
    epoch = len(examples) // 8
    first, second = ({p for s in range(e * epoch, (e + 1) * epoch) for p in objective.mismatched_pairs(
        method.batch_indices(s))} for e in (0, 1))
    assert first != second  # drawn anew as the batches change


def test_a_step_with_one_prompt_has_no_mismatched_pair_so_z0_is_zero_and_logged(tmp_path, monkeypatch):
    result = _train(tmp_path, ["ab="] * 16, ["ab="] * 4)
    method, objective = result.method, result.method.objective
    ids = method.batch_indices(0)
    policy, _ = tiny_model_and_tokenizer(seed=2)
    stats, scored = _step_stats(monkeypatch, objective, policy, ids)
    assert scored == [], "every pair of this step would be matched"
    assert float(stats["reference_point"]) == 0.0 and stats["kl_pairs"] == 0
    assert objective.mismatched_pairs(ids) == []
    logged = next(r for r in result.run.metrics() if "train/loss" in r)
    assert logged["train/kl_unpaired"] == 1.0 and logged["train/reference_point"] == 0.0
    assert result.metrics["eval/kl_unpaired"] == 1.0 and result.metrics["eval/reference_point"] == 0.0


def test_a_resumed_run_reads_the_pairs_reference_from_its_cache_and_ends_as_a_straight_run(tmp_path):
    """Five steps cross an epoch; resumed after step 2 from a model that is not the reference, the run
    still ends on the straight run's weights: every step's pairs are planned again and their reference
    log-probs come from the run's cache."""
    prompts = _grouped_prompts()
    cfg = _config(tmp_path, prompts, prompts[:8], steps=5, save_every=2, keep_checkpoints=5)
    model, tok = tiny_model_and_tokenizer(seed=0)
    run = train(cfg, "preference", model=model, tokenizer=tok).run.path
    straight = {k: v.clone() for k, v in model.state_dict().items()}
    for step in (4, 5):
        shutil.rmtree(run / "checkpoints" / f"step-{step:07d}")
    other, _ = tiny_model_and_tokenizer(seed=3)
    train(cfg, "preference", resume=run, model=other, tokenizer=tok)
    for name, value in other.state_dict().items():
        torch.testing.assert_close(value, straight[name], msg=name)
