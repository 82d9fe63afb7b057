"""DPO throughput and peak memory: alignkit against TRL's DPOTrainer, side by side, on CPU in fp32.

    python benchmarks/dpo_vs_trl.py --steps 20 --batch-size 8 --prompt-chars 64 --answer-chars 64

Both tools train the same Llama-style model (about 4.2M parameters, 32k vocabulary, saved once
and loaded by each run) on the same synthetic preference pairs, with the same batch size, steps,
learning rate (constant, no warmup), beta, gradient clipping and AdamW, in fp32 without gradient
checkpointing, evaluation or checkpointing (alignkit always writes one final checkpoint; that
is counted against it). The training set holds exactly steps x batch-size pairs, so each tool
sees every pair exactly once.

Each configuration runs in its own fresh subprocess:
  alignkit        alignkit.train.train(cfg, "preference"); reference log-probs precomputed (default)
  trl-default     DPOTrainer with a reference copy, reference forward at every step (TRL's default)
  trl-precompute  DPOTrainer with precompute_ref_log_probs=True

Measured per run:
  tokens/s   prompt+chosen plus prompt+rejected tokens (BOS and EOS included, padding not) of
             all pairs, divided by the wall time of the whole job: data loading and tokenization,
             the reference pass, the training steps and (alignkit) the final save. Imports,
             building the model and writing the data file are outside the timed region.
  peak RSS   ru_maxrss of the process. Every child imports the same modules (torch, transformers,
             datasets, trl, alignkit) and loads the model the same way, so the baselines match;
             the RSS at the start of the timed region is reported as well.
  losses     first and last training-step loss (both should start at ln 2 = 0.6931). TRL logs
             every step to an in-memory callback for this (nothing printed or reported); alignkit
             writes its usual metrics line per step.
  other load cores that other processes kept busy during the run. With 2 threads on 2 cores any
             outside load stalls every parallel op, so such runs are flagged; --repeats N runs the
             tools round-robin N times and keeps each one's fastest run.

Writes a table to stdout and, with --out, the same rows (plus every run) as JSON. The defaults
take about 3.5 minutes on an idle 2-core machine, nearly all of it TRL's.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import string
import tempfile
import time
from pathlib import Path

import isolated
from isolated import ENV, rss_mib

TOOLS = ("alignkit", "trl-default", "trl-precompute")
TARGET_SPEEDUP = 1.5
MAX_OTHER_LOAD = 0.2  # cores kept busy by other processes before a run counts as disturbed
MODEL_SIZE = {"vocab_size": 32000, "hidden_size": 64, "intermediate_size": 256, "num_layers": 2}
ALPHABET = string.ascii_letters + string.digits + " " * 8 + ".,"


# ----- settings shared by both tools -----
def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=20, help="optimizer steps")
    parser.add_argument("--batch-size", type=int, default=8, help="preference pairs per step")
    parser.add_argument("--prompt-chars", type=int, default=64, help="mean prompt length (1 char = 1 token)")
    parser.add_argument("--answer-chars", type=int, default=64, help="mean chosen/rejected length")
    parser.add_argument("--length-jitter", type=float, default=0.25,
                        help="lengths are uniform in mean*(1 +- jitter); 0 gives fixed lengths")
    parser.add_argument("--lr", type=float, default=1e-5)
    parser.add_argument("--beta", type=float, default=0.1)
    parser.add_argument("--max-grad-norm", type=float, default=1.0)
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads in every run")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=1,
                        help="run the tools round-robin this many times and keep each one's fastest run")
    parser.add_argument("--tools", nargs="+", choices=TOOLS, default=list(TOOLS))
    parser.add_argument("--out", type=Path, help="write the result rows as JSON here")
    parser.add_argument("--workdir", type=Path, help="keep model, data and run folders here (default: temp)")
    parser.add_argument("--child", choices=TOOLS, help=argparse.SUPPRESS)
    parser.add_argument("--spec", type=Path, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def random_text(rng: random.Random, mean: int, jitter: float) -> str:
    low, high = max(1, round(mean * (1 - jitter))), max(1, round(mean * (1 + jitter)))
    return "".join(rng.choice(ALPHABET) for _ in range(rng.randint(low, high)))


def make_records(n: int, args: argparse.Namespace) -> list[dict]:
    rng = random.Random(args.seed)
    return [{"prompt": random_text(rng, args.prompt_chars, args.length_jitter),
             "chosen": random_text(rng, args.answer_chars, args.length_jitter),
             "rejected": random_text(rng, args.answer_chars, args.length_jitter)} for _ in range(n)]


def length_limits(records: list[dict]) -> tuple[int, int]:
    """(max_length, max_prompt_length) in tokens, with room to spare: nothing gets truncated."""
    prompt = max(len(r["prompt"]) for r in records) + 1  # + BOS
    answer = max(max(len(r["chosen"]), len(r["rejected"])) for r in records) + 1  # + EOS
    return prompt + answer + 8, prompt + 4


def prepare(args: argparse.Namespace, workdir: Path) -> dict:
    """Save the model and tokenizer once, write the data file; return the spec every child reads."""
    from alignkit.models import tiny_model, tiny_tokenizer

    model = tiny_model(**MODEL_SIZE, seed=args.seed)
    model.save_pretrained(workdir / "model")
    tiny_tokenizer(vocab_size=MODEL_SIZE["vocab_size"]).save_pretrained(workdir / "model")
    records = make_records(args.steps * args.batch_size, args)
    data = workdir / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    max_length, max_prompt_length = length_limits(records)
    return {
        "model": str(workdir / "model"), "data": str(data), "workdir": str(workdir),
        "params": sum(p.numel() for p in model.parameters()),
        "steps": args.steps, "batch_size": args.batch_size, "lr": args.lr, "beta": args.beta,
        "max_grad_norm": args.max_grad_norm, "threads": args.threads, "seed": args.seed,
        "max_length": max_length, "max_prompt_length": max_prompt_length,
    }


# ----- inside one child process -----
def import_stack() -> None:
    """The same imports in every child, so that their baseline RSS is the same."""
    import datasets
    import torch  # noqa: F401
    import transformers
    import trl  # noqa: F401

    import alignkit.train  # noqa: F401

    datasets.disable_progress_bars()
    transformers.logging.set_verbosity_error()


def load_model(spec: dict):
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(spec["model"], dtype=torch.float32)


def load_tokenizer(spec: dict):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(spec["model"])


def read_records(path: str) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]




def alignkit_config(spec: dict):
    from alignkit.config import build
    from alignkit.train import RunConfig

    return build(RunConfig, {
        "output_dir": str(Path(spec["workdir"]) / "runs"), "run_name": "alignkit",
        "data": {"train": spec["data"], "eval_fraction": 0.0, "seed": spec["seed"],
                 "tokenize": {"max_length": spec["max_length"], "template": "plain",
                              "max_prompt_length": spec["max_prompt_length"]}},
        "loss": {"name": "dpo", "beta": spec["beta"]},
        "train": {"steps": spec["steps"], "batch_size": spec["batch_size"], "lr": spec["lr"],
                  "weight_decay": 0.0, "schedule": "constant", "warmup_steps": 0,
                  "max_grad_norm": spec["max_grad_norm"], "precision": "fp32", "eval_every": 0,
                  "save_every": 0, "seed": spec["seed"], "progress": False},
    })


def run_alignkit(spec: dict) -> dict:
    from alignkit.train import train

    model, tokenizer, cfg = load_model(spec), load_tokenizer(spec), alignkit_config(spec)
    start_rss, start = rss_mib(), time.perf_counter()
    result = train(cfg, "preference", model=model, tokenizer=tokenizer)
    wall = time.perf_counter() - start
    log = result.run.metrics()
    steps = [row for row in log if "train/loss" in row]
    truncated = next(row["truncated"] for row in log if row.get("event") == "data")
    if truncated:
        raise RuntimeError(f"alignkit truncated {truncated} sequences: raise the length limits")
    examples = result.method.objective.splits["train"]
    step_s = [n / row["train/tokens_per_s"] for n, row in zip(_step_tokens(result), steps, strict=True)]
    return {"tokens": sum(len(e) for e in examples), "wall_s": wall, "loop_s": sum(step_s),
            "start_rss_mib": start_rss, "losses": [row["train/loss"] for row in steps]}


def _step_tokens(result) -> list[int]:
    """Tokens of each optimizer step, in the trainer's own data order."""
    trainer, examples = result.method, result.method.objective.splits["train"]
    return [sum(len(examples[i]) for i in trainer.batch_indices(step)) for step in range(trainer.total_steps)]


def trl_config(spec: dict, precompute: bool):
    from trl import DPOConfig

    return DPOConfig(
        output_dir=str(Path(spec["workdir"]) / "trl"), report_to="none", use_cpu=True,
        bf16=False, fp16=False, gradient_checkpointing=False,  # TRL defaults: bf16 and checkpointing on
        learning_rate=spec["lr"], lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
        optim="adamw_torch", max_grad_norm=spec["max_grad_norm"], beta=spec["beta"], loss_type=["sigmoid"],
        per_device_train_batch_size=spec["batch_size"], gradient_accumulation_steps=1, max_steps=spec["steps"],
        max_length=spec["max_length"], truncation_mode="keep_start",  # TRL 1.16 has no max_prompt_length
        precompute_ref_log_probs=precompute, precompute_ref_batch_size=spec["batch_size"],
        eval_strategy="no", save_strategy="no", logging_strategy="steps", logging_steps=1,
        disable_tqdm=True, dataloader_num_workers=0, seed=spec["seed"], data_seed=spec["seed"],
    )


def step_recorder():
    """A TrainerCallback that keeps the loss of every step and when the step loop ran."""
    from transformers import TrainerCallback

    class StepRecorder(TrainerCallback):
        def __init__(self):
            self.losses, self.begin, self.end = [], None, None

        def on_train_begin(self, args, state, control, **kwargs):
            self.begin = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            self.end = time.perf_counter()

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                self.losses.append(logs["loss"])

    return StepRecorder()


def run_trl(spec: dict, precompute: bool) -> dict:
    from datasets import Dataset
    from transformers import PrinterCallback
    from trl import DPOTrainer

    model, tokenizer = load_model(spec), load_tokenizer(spec)
    reference = None if precompute else load_model(spec)  # a copy: None would reload it inside the timer
    config, recorder = trl_config(spec, precompute), step_recorder()
    start_rss, start = rss_mib(), time.perf_counter()
    # The same sequences as alignkit's plain template: BOS + prompt, answer + EOS (TRL appends EOS).
    rows = [{**r, "prompt": tokenizer.bos_token + r["prompt"]} for r in read_records(spec["data"])]
    trainer = DPOTrainer(model=model, ref_model=reference, args=config, train_dataset=Dataset.from_list(rows),
                         processing_class=tokenizer, callbacks=[recorder])
    trainer.remove_callback(PrinterCallback)
    trainer.train()
    wall = time.perf_counter() - start
    data = trainer.train_dataset
    lengths = [len(p) + len(c) for p, c in zip(data["prompt_ids"], data["chosen_ids"], strict=True)]
    lengths += [len(p) + len(r) for p, r in zip(data["prompt_ids"], data["rejected_ids"], strict=True)]
    if max(lengths) > spec["max_length"]:
        raise RuntimeError("TRL truncated sequences: raise the length limits")
    if getattr(trainer, "_total_train_tokens", sum(lengths)) != sum(lengths):  # TRL's own count of trained tokens
        raise RuntimeError(f"TRL trained on {trainer._total_train_tokens} tokens, expected {sum(lengths)}")
    return {"tokens": sum(lengths), "wall_s": wall,
            "loop_s": recorder.end - recorder.begin, "start_rss_mib": start_rss, "losses": recorder.losses}


def child_main(tool: str, spec_path: Path) -> None:
    def run(spec: dict) -> dict:
        return run_alignkit(spec) if tool == "alignkit" else run_trl(spec, precompute=tool == "trl-precompute")

    isolated.child(tool, spec_path, import_stack, run)


# ----- the parent: one subprocess per tool, then the table -----




def launch(tool: str, spec_path: Path, workdir: Path) -> dict:
    threads = json.loads(spec_path.read_text())["threads"]
    row = isolated.launch(__file__, tool, spec_path, threads, workdir / f"{tool}.json")
    row["tokens_per_s"] = row["tokens"] / row["wall_s"]
    return row


def add_ratios(rows: list[dict]) -> None:
    """speedup: alignkit tokens/s over this run's; memory: this run's peak RSS over alignkit's."""
    base = next((r for r in rows if r["tool"] == "alignkit"), None)
    for row in rows:
        row["alignkit_speedup"] = base["tokens_per_s"] / row["tokens_per_s"] if base else None
        row["rss_vs_alignkit"] = row["peak_rss_mib"] / base["peak_rss_mib"] if base else None


def print_table(rows: list[dict], spec: dict) -> None:
    print(f"model {spec['params'] / 1e6:.2f}M params, vocab {MODEL_SIZE['vocab_size']}; "
          f"{spec['steps']} steps x {spec['batch_size']} pairs, lr {spec['lr']}, beta {spec['beta']}, "
          f"fp32, {spec['threads']} threads; {rows[0]['tokens']} tokens per run\n")
    header = (f"{'tool':<15}{'tokens/s':>10}{'wall s':>8}{'loop s':>8}{'peak RSS MiB':>14}{'start RSS':>11}"
              f"{'alignkit x':>12}{'RSS/alignkit':>14}{'first loss':>12}{'final loss':>12}{'other load':>12}")
    print(header)
    print("-" * len(header))
    for r in rows:
        speed = f"{r['alignkit_speedup']:.2f}x" if r["alignkit_speedup"] else "-"
        mem = f"{r['rss_vs_alignkit']:.2f}" if r["rss_vs_alignkit"] else "-"
        print(f"{r['tool']:<15}{r['tokens_per_s']:>10.0f}{r['wall_s']:>8.1f}{r['loop_s']:>8.1f}"
              f"{r['peak_rss_mib']:>14.0f}{r['start_rss_mib']:>11.0f}{speed:>12}{mem:>14}"
              f"{r['losses'][0]:>12.4f}{r['losses'][-1]:>12.4f}{r['other_load']:>12.2f}")
    print(f"\nalignkit x: alignkit's tokens/s over the row's (target {TARGET_SPEEDUP}x, RSS/alignkit >= 1).\n"
          "loop s: the training steps alone; the rest of wall s is data preparation, the reference\n"
          "pass (alignkit, trl-precompute) and alignkit's final save.\n"
          "other load: cores that other processes kept busy meanwhile (should be near 0).\n"
          f"Losses should start at ln 2 = {math.log(2):.4f}.\n")


def verdicts(rows: list[dict]) -> list[str]:
    out = []
    for r in rows:
        if r["tool"] != "alignkit" and r["alignkit_speedup"]:
            met = r["alignkit_speedup"] >= TARGET_SPEEDUP and r["rss_vs_alignkit"] >= 1.0
            out.append(f"alignkit vs {r['tool']}: {r['alignkit_speedup']:.2f}x the tokens/s, "
                       f"{1 / r['rss_vs_alignkit']:.2f}x the peak RSS: target {'met' if met else 'NOT met'}")
    busy = [r["tool"] for r in rows if r["other_load"] > MAX_OTHER_LOAD]
    if busy:
        out.append(f"warning: other processes kept {MAX_OTHER_LOAD}+ cores busy during {', '.join(busy)}; "
                   "with 2 threads on 2 cores every parallel op then waits for a time slice: "
                   "rerun on an idle machine")
    return out


def run_all(args: argparse.Namespace, workdir: Path) -> tuple[dict, list[dict], list[dict]]:
    """Every tool `repeats` times, round-robin; returns the spec, each tool's fastest run, all runs."""
    spec = prepare(args, workdir)
    runs = isolated.round_robin(spec, workdir, args.tools, args.repeats,
                                lambda tool, spec_path: launch(tool, spec_path, workdir))
    if len({r["tokens"] for r in runs}) != 1:
        raise RuntimeError(f"token counts differ: {[(r['tool'], r['tokens']) for r in runs]}")
    best = [max((r for r in runs if r["tool"] == t), key=lambda r: r["tokens_per_s"]) for t in args.tools]
    return spec, best, runs


def main() -> None:
    args = parse_args()
    if args.child:
        child_main(args.child, args.spec)
        return
    os.environ.update(ENV)
    with tempfile.TemporaryDirectory(prefix="dpo_vs_trl-") as tmp:
        workdir = args.workdir or Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        spec, rows, runs = run_all(args, workdir)
    add_ratios(rows)
    print_table(rows, spec)
    notes = verdicts(rows)
    print("\n".join(notes))
    if args.out:
        report = {"settings": {**spec, "repeats": args.repeats}, "rows": rows, "verdicts": notes,
                  "all_runs": runs}
        args.out.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
