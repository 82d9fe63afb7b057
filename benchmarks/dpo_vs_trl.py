"""DPO throughput and peak memory: alignkit against TRL's DPOTrainer, side by side, on CPU.

    python benchmarks/dpo_vs_trl.py --model smollm2-135m --threads 1 2 --precision fp32 bf16 --repeats 3

Both tools train the same model (benchmarks/shapes.py: `micro`, `50m` or `smollm2-135m`, saved once
and loaded by each run in fp32) on the same synthetic preference pairs (random characters, lengths
given in the model's tokens), with the same batch size, steps, learning rate (constant, no warmup),
beta, gradient clipping and AdamW, without gradient checkpointing, evaluation or intermediate
checkpoints. Both write the final weights inside the timed job and neither writes the optimizer state:
TRL's `trainer.save_model()` after `train()`, alignkit its final checkpoint and exported model with
train.save_final_optimizer=false (alignkit writes the weights twice, in its checkpoint and as a
Hugging Face folder; that is counted against it). Numerics are equal:
`fp32` runs both in float32; `bf16` runs both under bf16 autocast with float32 weights (alignkit
train.precision=bf16, TRL bf16=True). The training set holds exactly steps x batch-size pairs.

Each configuration runs in its own fresh subprocess:
  alignkit        alignkit.train.train(cfg, "preference"); reference log-probs precomputed (default)
  trl-default     DPOTrainer with a reference copy, reference forward at every step (TRL's default)
  trl-precompute  DPOTrainer with precompute_ref_log_probs=True
  alignkit-baseline  alignkit as found in --alignkit-baseline DIR, to measure a change of alignkit's
                  own against an earlier commit's source:
                  `mkdir /tmp/before && git archive HEAD~1 alignkit | tar -x -C /tmp/before`

Measured per run:
  job tokens/s   prompt+chosen plus prompt+rejected tokens (BOS and EOS included, padding not) of
                 all pairs, divided by the wall time of the whole training job: data loading and
                 tokenization, the reference pass, the steps and the final save. Imports
                 and loading the model are outside (`process_s` in the JSON includes them).
  loop tokens/s  the same tokens over the step loop alone: alignkit from the start of its first step
                 to the end of its last, TRL from on_train_begin to its last on_step_end (its
                 per-step reference forward, for trl-default, is inside). The JSON splits the rest
                 into setup_s (before the loop: tokenizing, the reference pass) and finish_s (after
                 it: the final save; alignkit's evaluation and TRL's end-of-training callbacks).
  peak RSS       ru_maxrss of the process (same imports and model load in every child).
  losses         first and last training-step loss (both should start at ln 2 = 0.6931).
  other load     cores that other processes kept busy during the run.

Every configuration (--threads x --precision) and tool runs --repeats times, interleaved: each
repeat runs every configuration's tools back to back before the next repeat starts. The table shows
each tool's median figures, and alignkit's speed-up as the median over repeats of alignkit's tokens/s
over the other tool's in the same repeat, with its range. Writes the table to stdout and, with
--out, the settings, the summary and every run as JSON. TRL must be installed in the interpreter
that runs this script (`pip install trl`), and alignkit importable from it.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import isolated
import shapes
from isolated import ENV, rss_mib

TOOLS = ("alignkit", "alignkit-baseline", "trl-default", "trl-precompute")
PRECISIONS = ("fp32", "bf16")
MAX_OTHER_LOAD = 0.2  # cores kept busy by other processes before a run counts as disturbed


# ----- settings shared by both tools -----
def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=list(shapes.MODELS), default="micro", help="benchmarks/shapes.py")
    parser.add_argument("--steps", type=int, default=20, help="optimizer steps")
    parser.add_argument("--batch-size", type=int, default=8, help="preference pairs per step")
    parser.add_argument("--prompt-tokens", type=int, default=64, help="mean prompt length, in the model's tokens")
    parser.add_argument("--answer-tokens", type=int, default=64, help="mean chosen/rejected length")
    parser.add_argument("--length-jitter", type=float, default=0.25,
                        help="lengths are uniform in mean*(1 +- jitter); 0 gives fixed lengths")
    parser.add_argument("--lr", type=float, default=1e-5)
    parser.add_argument("--beta", type=float, default=0.1)
    parser.add_argument("--max-grad-norm", type=float, default=1.0)
    parser.add_argument("--threads", type=int, nargs="+", default=[2], help="torch threads; several: one "
                        "configuration each")
    parser.add_argument("--precision", nargs="+", choices=PRECISIONS, default=["fp32"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=1, help="interleaved runs of every configuration and tool")
    parser.add_argument("--tools", nargs="+", choices=TOOLS, default=["alignkit", "trl-default", "trl-precompute"])
    parser.add_argument("--alignkit-baseline", type=Path, metavar="DIR",
                        help="the source tree of tool alignkit-baseline (a folder holding alignkit/)")
    parser.add_argument("--out", type=Path, help="write the settings, summary and every run as JSON here")
    parser.add_argument("--workdir", type=Path, help="keep model, data and run folders here (default: temp)")
    parser.add_argument("--child", choices=TOOLS, help=argparse.SUPPRESS)
    parser.add_argument("--spec", type=Path, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def make_records(n: int, args: argparse.Namespace, chars_per_token: float) -> list[dict]:
    rng = random.Random(args.seed)

    def text(tokens: int) -> str:
        return shapes.random_text(rng, tokens * chars_per_token, args.length_jitter).strip() or "x"

    # A prompt ends in a newline after a visible character and an answer starts with one: BPE tokenizers merge
    # no token across that, so tokenizing prompt and answer apart (alignkit) gives the same tokens as
    # tokenizing them together (TRL); check_boundaries makes sure.
    return [{"prompt": text(args.prompt_tokens) + "\n", "chosen": text(args.answer_tokens),
             "rejected": text(args.answer_tokens)} for _ in range(n)]


def check_boundaries(records: list[dict], tokenizer) -> None:
    """Both tools must train on the same tokens; TRL tokenizes prompt+answer in one piece."""
    def ids(text):
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    for r in records:
        for answer in (r["chosen"], r["rejected"]):
            if ids(r["prompt"]) + ids(answer) != ids(r["prompt"] + answer):
                raise RuntimeError(f"tokens merge across the prompt/answer boundary of {r['prompt']!r}")


def length_limits(records: list[dict], tokenizer) -> tuple[int, int]:
    """(max_length, max_prompt_length) in tokens, with room to spare: nothing gets truncated."""
    def longest(texts):
        return max(len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"])

    prompt = longest([r["prompt"] for r in records]) + 1  # + BOS
    answer = max(longest([r["chosen"] for r in records]), longest([r["rejected"] for r in records])) + 1  # + EOS
    return prompt + answer + 8, prompt + 4


def prepare(args: argparse.Namespace, workdir: Path) -> dict:
    """Save the model and tokenizer once, write the data file; return what every configuration shares."""
    from transformers import AutoTokenizer

    model = shapes.save_model(args.model, workdir / "model", args.seed)
    records = make_records(args.steps * args.batch_size, args, model["chars_per_token"])
    data = workdir / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    tokenizer = AutoTokenizer.from_pretrained(workdir / "model")
    check_boundaries(records, tokenizer)
    max_length, max_prompt_length = length_limits(records, tokenizer)
    return {
        "model_name": args.model, "model": str(workdir / "model"), "data": str(data), "workdir": str(workdir),
        "params": model["params"], "vocab_size": model["vocab_size"],
        "steps": args.steps, "batch_size": args.batch_size, "lr": args.lr, "beta": args.beta,
        "max_grad_norm": args.max_grad_norm, "seed": args.seed,
        "max_length": max_length, "max_prompt_length": max_prompt_length,
        "alignkit_baseline": str(args.alignkit_baseline.resolve()) if args.alignkit_baseline else None,
    }


def configurations(shared: dict, args: argparse.Namespace) -> list[dict]:
    return [{**shared, "threads": threads, "precision": precision}
            for threads in args.threads for precision in args.precision]


def label(spec: dict) -> str:
    return f"{spec['model_name']}, {spec['threads']} thread{'s' * (spec['threads'] > 1)}, {spec['precision']}"


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
                  "max_grad_norm": spec["max_grad_norm"], "precision": spec["precision"], "eval_every": 0,
                  "save_every": 0, "save_final_optimizer": False, "seed": spec["seed"], "progress": False},
    })


def time_steps(cls) -> list[float]:
    """Wrap cls.train_step (timing only); the list holds the first step's start and the last one's end."""
    stamps, step = [], cls.train_step

    def timed(self, *args, **kwargs):
        stamps[:1] = stamps[:1] or [time.perf_counter()]
        out = step(self, *args, **kwargs)
        stamps[1:] = [time.perf_counter()]
        return out

    cls.train_step = timed
    return stamps


def run_alignkit(spec: dict) -> dict:
    import alignkit
    from alignkit.train import train
    from alignkit.train.offline import OfflineMethod

    model, tokenizer, cfg = load_model(spec), load_tokenizer(spec), alignkit_config(spec)
    stamps = time_steps(OfflineMethod)
    start_rss, start = rss_mib(), time.perf_counter()
    result = train(cfg, "preference", model=model, tokenizer=tokenizer)
    wall = time.perf_counter() - start
    log = result.run.metrics()
    truncated = next(row["truncated"] for row in log if row.get("event") == "data")
    if truncated:
        raise RuntimeError(f"alignkit truncated {truncated} sequences: raise the length limits")
    examples = result.method.objective.splits["train"]
    shutil.rmtree(result.run.path)  # a 135M run leaves half a gigabyte
    return {"tokens": sum(len(e) for e in examples), "wall_s": wall, "loop_s": stamps[1] - stamps[0],
            "setup_s": stamps[0] - start, "finish_s": start + wall - stamps[1], "start_rss_mib": start_rss,
            "losses": [row["train/loss"] for row in log if "train/loss" in row],
            "alignkit_source": str(Path(alignkit.__file__).parent)}


def trl_config(spec: dict, precompute: bool):
    from trl import DPOConfig

    return DPOConfig(
        output_dir=str(Path(spec["workdir"]) / "trl"), report_to="none", use_cpu=True,
        bf16=spec["precision"] == "bf16", fp16=False,  # TRL's default is bf16 on
        gradient_checkpointing=False,  # TRL's default is on
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
    trainer.save_model(str(Path(spec["workdir"]) / "trl" / "final"))
    wall = time.perf_counter() - start
    shutil.rmtree(Path(spec["workdir"]) / "trl")
    data = trainer.train_dataset
    lengths = [len(p) + len(c) for p, c in zip(data["prompt_ids"], data["chosen_ids"], strict=True)]
    lengths += [len(p) + len(r) for p, r in zip(data["prompt_ids"], data["rejected_ids"], strict=True)]
    if max(lengths) > spec["max_length"]:
        raise RuntimeError("TRL truncated sequences: raise the length limits")
    if getattr(trainer, "_total_train_tokens", sum(lengths)) != sum(lengths):  # TRL's own count of trained tokens
        raise RuntimeError(f"TRL trained on {trainer._total_train_tokens} tokens, expected {sum(lengths)}")
    return {"tokens": sum(lengths), "wall_s": wall, "loop_s": recorder.end - recorder.begin,
            "setup_s": recorder.begin - start, "finish_s": start + wall - recorder.end, "start_rss_mib": start_rss,
            "losses": recorder.losses}


def child_main(tool: str, spec_path: Path) -> None:
    def run(spec: dict) -> dict:
        if tool.startswith("alignkit"):
            return run_alignkit(spec)
        return run_trl(spec, precompute=tool == "trl-precompute")

    isolated.child(tool, spec_path, import_stack, run)


# ----- the parent: one subprocess per run, then the table -----
def launch(tool: str, spec_path: Path, spec: dict) -> dict:
    env = {"PYTHONPATH": spec["alignkit_baseline"]} if tool == "alignkit-baseline" else {}
    row = isolated.launch(__file__, tool, spec_path, spec["threads"], Path(spec["workdir"]) / f"{tool}.json", env)
    row["job_tokens_per_s"] = row["tokens"] / row["wall_s"]
    row["loop_tokens_per_s"] = row["tokens"] / row["loop_s"]
    return row


def spread(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def summarise(runs: list[dict], spec: dict, tools) -> list[dict]:
    """Per tool: its median figures, and alignkit's per-repeat ratios against it (median and range)."""
    mine = [r for r in runs if r["config"] == label(spec)]
    ours = {r["repeat"]: r for r in mine if r["tool"] == "alignkit"}
    rows = []
    for tool in tools:
        theirs = [r for r in mine if r["tool"] == tool]
        row = {"config": label(spec), "tool": tool, "runs": len(theirs), "tokens": theirs[0]["tokens"],
               **{key: statistics.median(r[key] for r in theirs)
                  for key in ("job_tokens_per_s", "loop_tokens_per_s", "peak_rss_mib", "wall_s", "loop_s")},
               "first_loss": statistics.median(r["losses"][0] for r in theirs),
               "final_loss": statistics.median(r["losses"][-1] for r in theirs),
               "other_load": max(r["other_load"] for r in theirs)}
        paired = [(ours[r["repeat"]], r) for r in theirs if r["repeat"] in ours]
        if tool != "alignkit" and paired:
            row["job_speedup"] = spread([a["job_tokens_per_s"] / t["job_tokens_per_s"] for a, t in paired])
            row["loop_speedup"] = spread([a["loop_tokens_per_s"] / t["loop_tokens_per_s"] for a, t in paired])
            row["rss_ratio"] = spread([a["peak_rss_mib"] / t["peak_rss_mib"] for a, t in paired])
        rows.append(row)
    return rows


def ratio(row: dict, key: str, digits: int = 2) -> str:
    if key not in row:
        return "-"
    s = row[key]
    return f"{s['median']:.{digits}f} ({s['min']:.{digits}f}-{s['max']:.{digits}f})"


def print_table(summary: list[dict], shared: dict, repeats: int) -> None:
    print(f"\nmodel {shared['model_name']}: {shared['params'] / 1e6:.1f}M params, vocab {shared['vocab_size']}; "
          f"{shared['steps']} steps x {shared['batch_size']} pairs, lr {shared['lr']}, beta {shared['beta']}; "
          f"{summary[0]['tokens']} tokens per run; median of {repeats} interleaved run(s)\n")
    header = ("| configuration | tool | job tokens/s | loop tokens/s | peak RSS MiB | alignkit x, job "
              "| alignkit x, loop | alignkit RSS / tool's | first / final loss | other load |")
    print(header + "\n" + "|---" * header.count(" | ") + "|---|")
    for r in summary:
        print(f"| {r['config']} | {r['tool']} | {r['job_tokens_per_s']:.0f} | {r['loop_tokens_per_s']:.0f} "
              f"| {r['peak_rss_mib']:.0f} | {ratio(r, 'job_speedup')} | {ratio(r, 'loop_speedup')} "
              f"| {ratio(r, 'rss_ratio')} | {r['first_loss']:.4f} / {r['final_loss']:.4f} | {r['other_load']:.2f} |")
    print("\nalignkit x: alignkit's tokens/s over the row's, per repeat: median (range). job: the whole training\n"
          "job; loop: the steps alone. alignkit RSS / tool's: below 1 is less memory for alignkit.\n"
          f"Losses should start at ln 2 = {math.log(2):.4f}. other load: cores other processes kept busy "
          f"(above {MAX_OTHER_LOAD}, a 2-thread run waits for time slices).")


def run_all(args: argparse.Namespace, workdir: Path) -> tuple[dict, list[dict], list[dict]]:
    shared = prepare(args, workdir)
    specs = configurations(shared, args)
    runs = isolated.interleaved(specs, workdir, args.tools, args.repeats,
                                lambda tool, spec_path, spec: {**launch(tool, spec_path, spec),
                                                               "config": label(spec)})
    for spec in specs:
        counts = {r["tool"]: r["tokens"] for r in runs if r["config"] == label(spec)}
        if len(set(counts.values())) != 1:
            raise RuntimeError(f"token counts differ in {label(spec)}: {counts}")
    summary = [row for spec in specs for row in summarise(runs, spec, args.tools)]
    return shared, summary, runs


def main() -> None:
    args = parse_args()
    if ("alignkit-baseline" in args.tools) != bool(args.alignkit_baseline):
        raise SystemExit("tool alignkit-baseline and --alignkit-baseline DIR go together")
    if args.child:
        child_main(args.child, args.spec)
        return
    os.environ.update(ENV)
    with tempfile.TemporaryDirectory(prefix="dpo_vs_trl-") as tmp:
        workdir = args.workdir or Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        shared, summary, runs = run_all(args, workdir)
    print_table(summary, shared, args.repeats)
    if args.out:
        settings = {**shared, **isolated.git_state(), "threads": args.threads, "precision": args.precision,
                    "repeats": args.repeats, "tools": args.tools}
        args.out.write_text(json.dumps({"settings": settings, "summary": summary, "all_runs": runs}, indent=1))


if __name__ == "__main__":
    main()
