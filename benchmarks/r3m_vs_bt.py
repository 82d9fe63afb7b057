"""R3M against plain Bradley-Terry reward models on comparisons with 30% of the labels flipped.

For each seed: one SFT backbone (the tiny model, shared by both runs), then two scalar reward
models trained on the same noisy built-in cipher comparisons, one with `bradley_terry` and one
with `r3m`. Prints each run's clean held-out accuracy (the eval split is never flipped) and how
well R3M's flagged pairs (`r3m_outliers.json`) match the truly flipped ones.

    python benchmarks/r3m_vs_bt.py [--seeds 0 1 2 3] [--lam 0.1] [--lr 1e-4] [--epochs 10]

The defaults are the setting of tests/test_r3m_vs_bt.py.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import tempfile
import time


def sft_backbone(output_dir: str, steps: int):
    from alignkit.config import build
    from alignkit.models import tiny_model_and_tokenizer
    from alignkit.train import RunConfig, train

    model, tok = tiny_model_and_tokenizer(seed=0)
    cfg = build(RunConfig, {"output_dir": output_dir, "data": {"task_size": 600, "eval_size": 50},
                            "train": {"steps": steps, "batch_size": 32, "lr": 3e-3, "progress": False}})
    with contextlib.redirect_stdout(io.StringIO()):
        train(cfg, "sft", model=model, tokenizer=tok)
    return model, tok


def reward_run(output_dir: str, backbone, tok, loss: dict, args, seed: int):
    from alignkit.config import build
    from alignkit.models import tiny_reward_model
    from alignkit.train import RunConfig, train

    cfg = build(RunConfig, {
        "output_dir": output_dir, "loss": loss,
        "data": {"task_size": args.task_size, "eval_size": args.eval_size, "flip_rate": args.flip_rate, "seed": seed},
        "train": {"epochs": args.epochs, "batch_size": args.batch_size, "lr": args.lr, "progress": False}})
    with contextlib.redirect_stdout(io.StringIO()):
        return train(cfg, "reward", model=tiny_reward_model(backbone), tokenizer=tok)


def outlier_scores(run_path, flipped: list[bool]) -> tuple[float, float, int, float]:
    """Precision and recall of the flagged pairs (delta > 0), how many, and the precision of the
    k most suspicious (largest delta; the report is sorted that way), k = the number flipped."""
    rows = json.loads((run_path / "r3m_outliers.json").read_text())
    flagged = {row["index"] for row in rows}
    hits, k = sum(flipped[i] for i in flagged), sum(flipped)
    top_k = sum(flipped[row["index"]] for row in rows[:k]) / max(1, k)
    return hits / max(1, len(flagged)), hits / max(1, k), len(flagged), top_k


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3])
    parser.add_argument("--lam", type=float, default=0.1)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--epochs", type=float, default=10)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--task-size", type=int, default=1000)
    parser.add_argument("--eval-size", type=int, default=400)
    parser.add_argument("--flip-rate", type=float, default=0.3)
    parser.add_argument("--sft-steps", type=int, default=100)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    import torch
    from transformers.utils import logging

    from alignkit.tasks import CipherTask

    torch.set_num_threads(args.threads)
    logging.disable_progress_bar()
    print(f"tiny model, {args.sft_steps} SFT steps; reward models on {args.task_size} pairs "
          f"({args.flip_rate:.0%} flipped), {args.epochs:g} epochs of {args.batch_size}, lr {args.lr:g}, "
          f"r3m lambda {args.lam:g}; clean held-out accuracy on {args.eval_size} pairs")
    print(f"{'seed':>4} {'BT acc':>7} {'R3M acc':>8} {'R3M-BT':>7} {'flipped':>8} {'flagged':>8} "
          f"{'precision':>9} {'recall':>7} {'top-k prec':>10} {'seconds':>8}")
    diffs = []
    with tempfile.TemporaryDirectory() as tmp:
        backbone, tok = sft_backbone(tmp, args.sft_steps)
        for seed in args.seeds:
            started = time.perf_counter()
            bt = reward_run(tmp, backbone, tok, {"name": "bradley_terry"}, args, seed)
            r3m = reward_run(tmp, backbone, tok, {"name": "r3m", "lam": args.lam}, args, seed)
            _, flipped = CipherTask().comparisons(args.task_size, seed, args.flip_rate)
            precision, recall, n_flagged, top_k = outlier_scores(r3m.run.path, flipped)
            acc_bt, acc_r3m = bt.metrics["eval/accuracy"], r3m.metrics["eval/accuracy"]
            diffs.append(acc_r3m - acc_bt)
            seconds = time.perf_counter() - started
            print(f"{seed:>4} {acc_bt:>7.3f} {acc_r3m:>8.3f} {acc_r3m - acc_bt:>+7.3f} {sum(flipped):>8} "
                  f"{n_flagged:>8} {precision:>9.2f} {recall:>7.2f} {top_k:>10.2f} {seconds:>8.1f}", flush=True)
    print(f"R3M - BT: mean {sum(diffs) / len(diffs):+.3f}, min {min(diffs):+.3f}, max {max(diffs):+.3f}")


if __name__ == "__main__":
    main()
