"""GRPO throughput, memory and reward: alignkit against TRL's GRPOTrainer, side by side, on CPU in fp32.

    python benchmarks/grpo_vs_trl.py --steps 30 --group-size 8 --prompts-per-step 8 --max-completion-length 8

Both tools start from the same weights: a Llama-style model of about 4.2M parameters with a 32k
vocabulary, given one short SFT pass on the arithmetic task (single-digit sums) so that the
verifier reward is neither always 0 nor always 1. Both then run GRPO with the same prompts (the
same plain text, BOS first), the same reward function (1 for the exact sum), group size, prompts
per step, max completion length, sampling (temperature 1, no top-k/top-p), steps, learning rate
(constant), AdamW, gradient clipping at 1, beta 0 (no reference model), one update per generation
batch, per-sequence token-mean loss (TRL loss_type "grpo", alignkit seq-mean-token-mean), group
std scaling, fp32 and no gradient checkpointing.

Each tool runs in its own fresh subprocess. Measured per run:
  completions/s  steps x prompts x G divided by the wall time of training (model loading, imports
                 and data preparation outside; alignkit's final checkpoint inside)
  phases         alignkit: its own per-step phase times; TRL: time inside
                 `_generate_and_score_completions` (generation + reward) and the rest (update)
  peak RSS       ru_maxrss of the process
  reward         mean training reward over the first and the last 10 steps, and greedy accuracy after
                 training on fresh prompts of the training operand pairs (both tools scored by the
                 same code). At this size the model memorises pairs and answers none of the task's
                 held-out pairs, so the held-out split would say nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TOOLS = ("alignkit", "trl")
ENV = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TQDM_DISABLE": "1",
       "TOKENIZERS_PARALLELISM": "false", "WANDB_DISABLED": "true"}
MODEL_SIZE = {"vocab_size": 32000, "hidden_size": 64, "intermediate_size": 256, "num_layers": 2}
TASK = {"max_operand": 9}
TARGET_SPEEDUP = 2.0


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--group-size", type=int, default=8)
    parser.add_argument("--prompts-per-step", type=int, default=8)
    parser.add_argument("--max-completion-length", type=int, default=8)
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--sft-steps", type=int, default=120)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=1, help="runs per tool, alternating; the median is kept")
    parser.add_argument("--eval-prompts", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", help="write every run and the summary as JSON")
    parser.add_argument("--child", nargs=2, metavar=("TOOL", "SPEC"), help=argparse.SUPPRESS)
    return parser.parse_args(argv)


# ----- the parent: one SFT model, then each tool in a fresh process -----
def prepare(args, workdir: Path) -> dict:
    """Save the SFT-initialised model and tokenizer both tools start from."""
    from alignkit.config import build
    from alignkit.models import tiny_model, tiny_tokenizer
    from alignkit.train import RunConfig, train

    model, tokenizer = tiny_model(**MODEL_SIZE, seed=args.seed), tiny_tokenizer(MODEL_SIZE["vocab_size"])
    cfg = build(RunConfig, {"data": {"task": "arithmetic", "task_options": TASK, "task_size": 2000, "eval_size": 16},
                            "train": {"steps": args.sft_steps, "lr": 3e-3, "batch_size": 32, "progress": False},
                            "output_dir": str(workdir / "sft")})
    result = train(cfg, "sft", model=model, tokenizer=tokenizer)
    result.model.save_pretrained(workdir / "model")
    tokenizer.save_pretrained(workdir / "model")
    params = sum(p.numel() for p in model.parameters())
    return {"model": str(workdir / "model"), "workdir": str(workdir), "params": params, **vars(args)}


def run_child(tool: str, spec: dict) -> dict:
    env = {**os.environ, **ENV, "OMP_NUM_THREADS": str(spec["threads"])}
    out = subprocess.run([sys.executable, __file__, "--child", tool, json.dumps(spec)], env=env,
                         capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"{tool} failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


# ----- the children -----
def prompts(spec: dict, split: str, n: int) -> list:
    from alignkit.tasks import ArithmeticTask

    """`train`: the prompts both tools train on; `fresh`: other prompts of the same (training) operand pairs."""
    seed = spec["seed"] + (0 if split == "train" else 10_000)
    return ArithmeticTask(**TASK).prompts(n, seed=seed, split="train")


def greedy_accuracy(model, tokenizer, spec: dict) -> float:
    """Greedy completions of fresh prompts (BOS + prompt), scored by the task's verifier."""
    from alignkit.rollout import SamplingConfig, TransformersGenerator
    from alignkit.tasks import ArithmeticTask

    records = prompts(spec, "fresh", spec["eval_prompts"])
    ids = [[tokenizer.bos_token_id] + tokenizer(r.prompt, add_special_tokens=False)["input_ids"] for r in records]
    completions = TransformersGenerator(model, tokenizer).generate(
        ids, SamplingConfig(max_new_tokens=spec["max_completion_length"], temperature=0.0), seed=0)
    task = ArithmeticTask(**TASK)
    return sum(task.gold_reward(r.prompt, c.text) for r, c in zip(records, completions, strict=True)) / len(records)


def load(spec: dict):
    import torch
    from transformers import AutoTokenizer, LlamaForCausalLM

    torch.manual_seed(spec["seed"])
    return LlamaForCausalLM.from_pretrained(spec["model"]), AutoTokenizer.from_pretrained(spec["model"])


def run_alignkit(spec: dict) -> dict:
    from alignkit.train.rl import config_from, run_rl

    model, tokenizer = load(spec)
    cfg = config_from({
        "recipe": "grpo", "output_dir": str(Path(spec["workdir"]) / "alignkit"),
        "data": {"task": "arithmetic", "task_options": TASK, "task_size": spec["steps"] * spec["prompts_per_step"],
                 "eval_size": 0, "seed": spec["seed"]},
        "rollout": {"max_new_tokens": spec["max_completion_length"], "temperature": 1.0},
        "rl": {"steps": spec["steps"], "prompts_per_step": spec["prompts_per_step"], "group_size": spec["group_size"],
               "lr": spec["lr"], "aggregation": "seq-mean-token-mean", "max_grad_norm": 1.0, "progress": False,
               "seed": spec["seed"], "precision": "fp32"}})
    started = time.perf_counter()
    result = run_rl(cfg, model=model, tokenizer=tokenizer)
    seconds = time.perf_counter() - started
    rows = [r for r in result.run.metrics() if "train/time/step" in r]
    phases = {key.removeprefix("train/time/"): sum(r.get(key, 0.0) for r in rows)
              for key in ("train/time/generate", "train/time/score", "train/time/reference", "train/time/advantage",
                          "train/time/update", "train/time/sync")}
    rewards = [r["train/reward/mean"] for r in rows]
    return {"seconds": seconds, "phases": phases, "rewards": rewards,
            "greedy_accuracy": greedy_accuracy(model, tokenizer, spec)}


def run_trl(spec: dict) -> dict:
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    from alignkit.tasks import ArithmeticTask

    model, tokenizer = load(spec)
    task = ArithmeticTask(**TASK)
    records = prompts(spec, "train", spec["steps"] * spec["prompts_per_step"])
    # TRL tokenizes string prompts without special tokens: BOS is written in, as alignkit's plain template does
    data = Dataset.from_list([{"prompt": tokenizer.bos_token + r.prompt} for r in records])

    def exact_sum(prompts, completions, **_):
        return [task.gold_reward(p.removeprefix(tokenizer.bos_token), c)
                for p, c in zip(prompts, completions, strict=True)]

    n = spec["prompts_per_step"] * spec["group_size"]
    config = GRPOConfig(
        output_dir=str(Path(spec["workdir"]) / "trl"), max_steps=spec["steps"], per_device_train_batch_size=n,
        gradient_accumulation_steps=1, steps_per_generation=1, num_generations=spec["group_size"],
        num_iterations=1, max_completion_length=spec["max_completion_length"], temperature=1.0, top_k=0, top_p=1.0,
        beta=0.0, loss_type="grpo", scale_rewards="group", learning_rate=spec["lr"], lr_scheduler_type="constant",
        warmup_steps=0, max_grad_norm=1.0, optim="adamw_torch", weight_decay=0.0, bf16=False, fp16=False,
        gradient_checkpointing=False, use_cpu=True, logging_steps=1, report_to="none", save_strategy="no",
        seed=spec["seed"], dataloader_num_workers=0, disable_tqdm=True, use_vllm=False)
    trainer = GRPOTrainer(model=model, reward_funcs=[exact_sum], args=config, train_dataset=data,
                          processing_class=tokenizer)
    generate, spent = trainer._generate_and_score_completions, [0.0]

    def timed(*args, **kwargs):
        started = time.perf_counter()
        try:
            return generate(*args, **kwargs)
        finally:
            spent[0] += time.perf_counter() - started

    trainer._generate_and_score_completions = timed
    started = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - started
    rewards = [row["reward"] for row in trainer.state.log_history if "reward" in row]
    return {"seconds": seconds, "phases": {"generate+score": spent[0], "update and rest": seconds - spent[0]},
            "rewards": rewards, "greedy_accuracy": greedy_accuracy(trainer.model, tokenizer, spec)}


def child(tool: str, spec: dict) -> None:
    import torch

    torch.set_num_threads(spec["threads"])
    result = {"alignkit": run_alignkit, "trl": run_trl}[tool](spec)
    result["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    result["completions_per_s"] = spec["steps"] * spec["prompts_per_step"] * spec["group_size"] / result["seconds"]
    print(json.dumps(result))


# ----- report -----
def summarise(runs: dict[str, list[dict]]) -> dict[str, dict]:
    out = {}
    for tool, results in runs.items():
        best = sorted(results, key=lambda r: r["completions_per_s"])[len(results) // 2]
        last = best["rewards"][-10:]
        first = best["rewards"][:10]
        out[tool] = {**best, "reward_first10": statistics.mean(first) if first else float("nan"),
                     "reward_last10": statistics.mean(last) if last else float("nan")}
    return out


def table(summary: dict[str, dict], spec: dict) -> str:
    base = summary["trl"]["completions_per_s"]
    lines = [f"model: {spec['params'] / 1e6:.1f}M parameters, vocab {MODEL_SIZE['vocab_size']}; "
             f"{spec['steps']} steps of {spec['prompts_per_step']} prompts x G={spec['group_size']}, "
             f"max {spec['max_completion_length']} tokens, {spec['threads']} thread(s)", "",
             "| tool | completions/s | speed-up vs TRL | peak RSS (MiB) | reward, first / last 10 steps "
             "| greedy accuracy after |", "|---|---|---|---|---|---|"]
    for tool in TOOLS:
        row = summary[tool]
        lines.append(f"| {tool} | {row['completions_per_s']:.1f} | {row['completions_per_s'] / base:.2f}x | "
                     f"{row['peak_rss_mib']:.0f} | {row['reward_first10']:.3f} / {row['reward_last10']:.3f} | "
                     f"{row['greedy_accuracy']:.3f} |")
    lines.append("")
    for tool in TOOLS:
        phases = ", ".join(f"{k} {v:.1f}s" for k, v in summary[tool]["phases"].items())
        lines.append(f"{tool} phases (total {summary[tool]['seconds']:.1f}s): {phases}")
    ratio = summary["alignkit"]["completions_per_s"] / base
    lines.append(f"\ntarget: >= {TARGET_SPEEDUP}x TRL's throughput at no worse reward -> "
                 f"{'met' if ratio >= TARGET_SPEEDUP else 'NOT met'} ({ratio:.2f}x)")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.child:
        child(args.child[0], json.loads(args.child[1]))
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        spec = prepare(args, Path(tmp))
        spec.pop("child"), spec.pop("out")
        runs = {tool: [] for tool in TOOLS}
        for _ in range(args.repeats):
            for tool in TOOLS:
                runs[tool].append(run_child(tool, spec))
        summary = summarise(runs)
        print(table(summary, spec))
        if args.out:
            Path(args.out).write_text(json.dumps({"spec": spec, "summary": summary, "runs": runs}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
