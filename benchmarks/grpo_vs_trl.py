"""GRPO throughput, memory and reward: alignkit against TRL's GRPOTrainer, side by side, on CPU in fp32.

    python benchmarks/grpo_vs_trl.py --steps 30 --group-size 8 --prompts-per-step 8 --max-completion-length 8

Both tools train the same model (benchmarks/shapes.py; by default `micro`, about 4.2M parameters
with a 32k vocabulary, the character tokenizer padded to 32k tokens, so the LM head is the expensive
part: a vocabulary-head micro-benchmark) from the same weights: the model after a short alignkit SFT
on the built-in arithmetic task (single-digit sums), done once and saved, so the verifier reward
starts neither at 0 nor at 1 (`--sft-steps 0` takes the model as it is, for SmolLM2-135M). Then
GRPO, in each tool:

  prompts      the task's training prompts ("3+4="), steps x prompts-per-step of them, the same list
               for both; the same tokens for both: BOS + prompt (alignkit's plain template; TRL gets
               the string with BOS written in and no chat template; checked at start-up)
  reward       1 for the exact sum, else 0 (ArithmeticTask.gold_reward on the decoded completion)
  sampling     G completions per prompt, temperature 1, no top-k / top-p, at most
               --max-completion-length tokens, EOS ends a completion
  update       one AdamW step per generation batch (TRL num_iterations=1, steps_per_generation=1;
               alignkit ppo_epochs=1, mini_batches=1; TRL keeps its default fused AdamW kernel,
               alignkit uses torch.optim.AdamW), clipped surrogate (eps 0.2), beta 0 (no reference
               model), group std scaling (eps 1e-4), per-sequence token mean then mean over sequences
               (TRL loss_type "grpo", alignkit "seq-mean-token-mean"), constant lr, no warmup or weight
               decay, gradient clipping at 1, fp32 (TRL bf16=False), no activation / gradient
               checkpointing (TRL's default is on), no saving, logging or eval inside the loop
               (alignkit writes its metrics line per step and one final checkpoint)

Each run is a fresh subprocess with the same imports (torch, transformers, datasets, trl, alignkit),
the same torch thread count and seed. Measured per run:
  completions/s  steps x prompts x G over the training loop's wall time: alignkit from the start
                 of its first step to the end of its last, TRL from on_train_begin to the last
                 on_step_end (data loader included). Model loading, imports, building the trainer
                 and alignkit's final checkpoint are outside; `setup+save s` shows them.
  phases         alignkit: its own per-step phase times (metrics.jsonl). TRL: timers wrapped
                 around its methods (timing only): generate = _generate_single_turn (model.generate),
                 score = _calculate_rewards, prepare = the rest of _generate_and_score_completions
                 (tokenize, pad, advantages), update = the step minus _prepare_inputs (forward,
                 backward, clipping, AdamW, scheduler). other = loop minus the phases.
  peak RSS       ru_maxrss of the child; RSS before training shown as well (same imports, same model)
  reward         mean training reward over the first and the last 10 steps (each tool's own samples;
                 the verdict compares the last 10, within two binomial standard errors), and held-out
                 accuracy after training, greedy and sampled (temperature 1, 32 samples of each of
                 the task's held-out operand pairs), scored by the same code for both
  other load     cores kept busy by other processes during the run; with a shared CPU any outside
                 load stalls every op, so such runs are flagged

--repeats N runs the tools alternately N times and reports each tool's median run (by completions/s).
Writes a markdown table to stdout and, with --out, everything as JSON. The defaults take about
1 minute per repeat on an idle 2-core machine (TRL's run is about 45 s of it) plus 15 s of SFT.
One thread by default: on a 2-core machine shared with other jobs a second thread stalls on any
outside load, and it helps a model this small little (--threads 2 to measure it).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import isolated
import shapes
from isolated import ENV, rss_mib

TOOLS = ("alignkit", "trl")
TARGET_SPEEDUP = 2.0
MAX_OTHER_LOAD = 0.2  # cores kept busy by other processes before a run counts as disturbed
TASK = {"max_operand": 9}
ADVANTAGE_EPS = 1e-4  # TRL's (r - mean) / (std + 1e-4); alignkit's grpo estimator takes eps as an option
SAMPLES_PER_HELD_OUT = 32


# ----- settings shared by both tools -----
def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=list(shapes.MODELS), default="micro", help="benchmarks/shapes.py")
    parser.add_argument("--steps", type=int, default=30, help="GRPO steps (one generation batch and one update each)")
    parser.add_argument("--group-size", type=int, default=8, help="completions per prompt (G)")
    parser.add_argument("--prompts-per-step", type=int, default=8)
    parser.add_argument("--max-completion-length", type=int, default=8, help="new tokens at most, EOS included")
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--sft-steps", type=int, default=250, help="alignkit SFT steps (batch 32) before GRPO")
    parser.add_argument("--sft-lr", type=float, default=3e-3)
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads in every run")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=1,
                        help="run the tools alternately this many times and report each one's median run")
    parser.add_argument("--tools", nargs="+", choices=TOOLS, default=list(TOOLS))
    parser.add_argument("--out", type=Path, help="write the summary and every run as JSON here")
    parser.add_argument("--workdir", type=Path,
                        help="keep the SFT model and run folders here, and reuse a matching SFT model (default: temp)")
    parser.add_argument("--child", choices=TOOLS, help=argparse.SUPPRESS)
    parser.add_argument("--spec", type=Path, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def train_prompts(spec: dict) -> list:
    """The prompt records both tools train on (alignkit builds the same list from its data config)."""
    from alignkit.tasks import ArithmeticTask

    return ArithmeticTask(**TASK).prompts(spec["steps"] * spec["prompts_per_step"], spec["seed"], split="train")


def held_out_prompts() -> list[str]:
    """Every operand pair the task holds out of training, once."""
    from alignkit.tasks import ArithmeticTask

    task = ArithmeticTask(**TASK)
    return [f"{a}+{b}=" for a in range(task.max_operand + 1) for b in range(task.max_operand + 1)
            if task.held_out(a, b)]


def held_out_accuracy(model, tokenizer, max_new_tokens: int) -> dict:
    """Greedy and sampled (temperature 1) accuracy on the held-out pairs, decoded by alignkit's generator."""
    from alignkit.rollout import SamplingConfig, TransformersGenerator
    from alignkit.tasks import ArithmeticTask

    task, prompts = ArithmeticTask(**TASK), held_out_prompts()
    ids = [[tokenizer.bos_token_id] + tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    generator = TransformersGenerator(model, tokenizer, batch_size=256)
    out = {}
    for name, temperature, n in (("greedy", 0.0, 1), ("sampled", 1.0, SAMPLES_PER_HELD_OUT)):
        completions = generator.generate([i for i in ids for _ in range(n)],
                                         SamplingConfig(max_new_tokens=max_new_tokens, temperature=temperature),
                                         seed=12345)
        rewards = [task.gold_reward(p, c.text) for p, c in zip([p for p in prompts for _ in range(n)], completions,
                                                              strict=True)]
        out[name] = sum(rewards) / len(rewards)
    return out


def prepare(args: argparse.Namespace, workdir: Path) -> dict:
    """SFT the random model once (or reuse a matching one in --workdir); return the spec every child reads."""
    from alignkit.config import build
    from alignkit.train import RunConfig, train

    key = {"model": args.model, "task": TASK, "sft_steps": args.sft_steps, "sft_lr": args.sft_lr, "seed": args.seed}
    saved, stamp = workdir / "sft-model", workdir / "sft-model" / "benchmark-sft.json"
    if stamp.exists() and json.loads(stamp.read_text())["key"] == key:
        info = json.loads(stamp.read_text())
        print(f"reusing the SFT model in {saved}", file=sys.stderr, flush=True)
    else:
        import torch

        torch.set_num_threads(args.threads)
        print(f"SFT: {args.sft_steps} steps ...", file=sys.stderr, flush=True)
        model, tokenizer = shapes.MODELS[args.model](args.seed)
        started = time.perf_counter()
        if args.sft_steps:
            cfg = build(RunConfig, {
                "output_dir": str(workdir / "sft-runs"),
                "data": {"task": "arithmetic", "task_options": TASK, "task_size": 32 * args.sft_steps,
                         "eval_size": 16, "seed": args.seed, "tokenize": {"template": "plain"}},
                "train": {"steps": args.sft_steps, "batch_size": 32, "lr": args.sft_lr, "precision": "fp32",
                          "seed": args.seed, "progress": False}})
            train(cfg, "sft", model=model, tokenizer=tokenizer)
        model.save_pretrained(saved)
        tokenizer.save_pretrained(saved)
        params = sum(p.numel() for p in model.parameters())
        info = {"key": key, "sft_s": time.perf_counter() - started, "params": params, "vocab_size": len(tokenizer),
                "held_out": held_out_accuracy(model, tokenizer, args.max_completion_length)}
        stamp.write_text(json.dumps(info))
    return {
        "model_name": args.model, "vocab_size": info["vocab_size"], "model": str(saved), "workdir": str(workdir),
        "params": info["params"], "sft_held_out": info["held_out"],
        "steps": args.steps, "group_size": args.group_size, "prompts_per_step": args.prompts_per_step,
        "max_completion_length": args.max_completion_length, "lr": args.lr, "sft_steps": args.sft_steps,
        "sft_lr": args.sft_lr, "threads": args.threads, "seed": args.seed,
    }


# ----- inside one child process -----
def import_stack() -> None:
    """The same imports in every child, so that their baseline RSS is the same."""
    import datasets
    import torch  # noqa: F401
    import transformers
    import trl  # noqa: F401

    import alignkit.train.rl  # noqa: F401

    datasets.disable_progress_bars()
    transformers.logging.set_verbosity_error()


def load_model_and_tokenizer(spec: dict):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(spec["model"], dtype=torch.float32)
    return model, AutoTokenizer.from_pretrained(spec["model"])




class Clock:
    """Seconds spent inside wrapped callables, by phase; wrapping only measures, it changes nothing."""

    def __init__(self):
        self.seconds: dict[str, float] = {}
        self.first: float | None = None
        self.last: float | None = None

    def wrap(self, fn, phase: str, edges: bool = False):
        def timed(*args, **kwargs):
            started = time.perf_counter()
            if edges and self.first is None:
                self.first = started
            try:
                return fn(*args, **kwargs)
            finally:
                ended = time.perf_counter()
                self.seconds[phase] = self.seconds.get(phase, 0.0) + ended - started
                if edges:
                    self.last = ended

        return timed


def alignkit_config(spec: dict):
    from alignkit.train.rl import config_from

    return config_from({
        "recipe": "grpo", "output_dir": str(Path(spec["workdir"]) / "runs"), "run_name": "alignkit",
        "data": {"task": "arithmetic", "task_options": TASK, "task_size": spec["steps"] * spec["prompts_per_step"],
                 "eval_size": 0, "seed": spec["seed"], "tokenize": {"template": "plain"}},
        "rollout": {"max_new_tokens": spec["max_completion_length"], "temperature": 1.0, "top_p": 1.0, "top_k": 0},
        "train": {"steps": spec["steps"], "lr": spec["lr"], "weight_decay": 0.0, "schedule": "constant",
                  "warmup_steps": 0, "max_grad_norm": 1.0, "precision": "fp32", "eval_every": 0, "save_every": 0,
                  "seed": spec["seed"], "progress": False},
        "rl": {"prompts_per_step": spec["prompts_per_step"], "group_size": spec["group_size"],
               "advantage": "grpo", "advantage_options": {"eps": ADVANTAGE_EPS},
               "aggregation": "seq-mean-token-mean", "ppo_epochs": 1, "mini_batches": 1, "clip_low": 0.2,
               "clip_high": 0.2, "kl_coef": 0.0, "entropy_coef": 0.0},
    })


def run_alignkit(spec: dict) -> dict:
    from alignkit.train import online
    from alignkit.train.rl import run_rl

    model, tokenizer = load_model_and_tokenizer(spec)
    cfg, clock = alignkit_config(spec), Clock()
    online.OnlineMethod.train_step = clock.wrap(online.OnlineMethod.train_step, "step", edges=True)
    start_rss, started = rss_mib(), time.perf_counter()
    result = run_rl(cfg, model=model, tokenizer=tokenizer)
    wall = time.perf_counter() - started
    rows = [r for r in result.run.metrics() if "train/time/step" in r]
    if len(rows) != spec["steps"] or any(r.get("train/groups") != spec["prompts_per_step"] for r in rows):
        raise RuntimeError("alignkit did not run every step with every group")
    phases = {p: sum(r.get(f"train/time/{p}", 0.0) for r in rows)
              for p in ("generate", "score", "reference", "advantage", "update", "sync")}
    loop = clock.last - clock.first
    phases["other"] = loop - sum(phases.values())
    n = spec["prompts_per_step"] * spec["group_size"]
    return {"loop_s": loop, "wall_s": wall, "start_rss_mib": start_rss, "phases": phases,
            "rewards": [r["train/reward/mean"] for r in rows],
            "completion_tokens": sum(r["train/response_length/mean"] * n for r in rows),
            "held_out": held_out_accuracy(result.method.policy, tokenizer, spec["max_completion_length"])}


def trl_config(spec: dict):
    from trl import GRPOConfig

    n = spec["prompts_per_step"] * spec["group_size"]
    return GRPOConfig(
        output_dir=str(Path(spec["workdir"]) / "runs" / "trl"), report_to="none", use_cpu=True,
        bf16=False, fp16=False, activation_checkpointing=False, gradient_checkpointing=False,  # TRL: bf16, ckpt on
        max_steps=spec["steps"], per_device_train_batch_size=n, gradient_accumulation_steps=1,
        steps_per_generation=1, num_generations=spec["group_size"], num_iterations=1,
        max_completion_length=spec["max_completion_length"], temperature=1.0, top_p=1.0, top_k=0, min_p=None,
        repetition_penalty=1.0, beta=0.0, loss_type="grpo", scale_rewards="group", epsilon=0.2,
        mask_truncated_completions=False, learning_rate=spec["lr"], lr_scheduler_type="constant", warmup_steps=0,
        weight_decay=0.0, optim="adamw_torch_fused", max_grad_norm=1.0,  # TRL's default AdamW kernel
        use_vllm=False, log_completions=False, eval_strategy="no", save_strategy="no", logging_strategy="no",
        disable_tqdm=True, dataloader_num_workers=0, seed=spec["seed"], data_seed=spec["seed"],
    )


def step_clock():
    """A TrainerCallback that marks when the step loop ran and how long each step took."""
    from transformers import TrainerCallback

    class StepClock(TrainerCallback):
        def __init__(self):
            self.begin, self.end, self.step_s, self._step = None, None, 0.0, None

        def on_train_begin(self, args, state, control, **kwargs):
            self.begin = time.perf_counter()

        def on_step_begin(self, args, state, control, **kwargs):
            self._step = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            self.end = time.perf_counter()
            self.step_s += self.end - self._step

    return StepClock()


def run_trl(spec: dict) -> dict:
    from datasets import Dataset
    from transformers import PrinterCallback
    from trl import GRPOTrainer

    from alignkit.data.tokenize import Encoder, TokenizeConfig
    from alignkit.tasks import ArithmeticTask

    model, tokenizer = load_model_and_tokenizer(spec)
    task, records = ArithmeticTask(**TASK), train_prompts(spec)
    # TRL tokenizes a string prompt as it is (no chat template, no special tokens added by this tokenizer):
    # BOS is written in, which gives the tokens of alignkit's plain template.
    rows = [{"prompt": tokenizer.bos_token + r.prompt} for r in records]
    encoder = Encoder(tokenizer, TokenizeConfig(template="plain"))
    if tokenizer(text=[rows[0]["prompt"]])["input_ids"][0] != encoder.encode(records[0].prompt).prompt:
        raise RuntimeError("TRL and alignkit would see different prompt tokens")
    rewards, lengths = [], []

    def exact_sum(prompts, completions, completion_ids, **_):
        out = [task.gold_reward(p.removeprefix(tokenizer.bos_token), c) for p, c in zip(prompts, completions,
                                                                                        strict=True)]
        rewards.append(sum(out) / len(out))
        lengths.extend(len(ids) for ids in completion_ids)
        return out

    clock, steps = Clock(), step_clock()
    start_rss, started = rss_mib(), time.perf_counter()
    trainer = GRPOTrainer(model=model, reward_funcs=[exact_sum], args=trl_config(spec),
                          train_dataset=Dataset.from_list(rows), processing_class=tokenizer, callbacks=[steps])
    trainer.remove_callback(PrinterCallback)
    if getattr(trainer.model, "is_gradient_checkpointing", False):
        raise RuntimeError("TRL turned gradient checkpointing on")
    for name, phase in (("_generate_single_turn", "generate"), ("_calculate_rewards", "score"),
                        ("_generate_and_score_completions", "collect"), ("_prepare_inputs", "inputs")):
        setattr(trainer, name, clock.wrap(getattr(trainer, name), phase))
    trainer.train()
    wall = time.perf_counter() - started
    if len(rewards) != spec["steps"]:
        raise RuntimeError(f"TRL scored {len(rewards)} batches, expected {spec['steps']}")
    s = clock.seconds
    loop = steps.end - steps.begin
    phases = {"generate": s["generate"], "score": s["score"],
              "prepare": s["collect"] - s["generate"] - s["score"], "update": steps.step_s - s["inputs"]}
    phases["other"] = loop - sum(phases.values())
    return {"loop_s": loop, "wall_s": wall, "start_rss_mib": start_rss, "phases": phases, "rewards": rewards,
            "completion_tokens": sum(lengths),
            "held_out": held_out_accuracy(trainer.model, tokenizer, spec["max_completion_length"])}


def child_main(tool: str, spec_path: Path) -> None:
    isolated.child(tool, spec_path, import_stack,
                   lambda spec: run_alignkit(spec) if tool == "alignkit" else run_trl(spec))


# ----- the parent: one subprocess per run, then the table -----




def launch(tool: str, spec_path: Path, spec: dict) -> dict:
    row = isolated.launch(__file__, tool, spec_path, spec["threads"], Path(spec["workdir"]) / f"{tool}.json")
    completions = spec["steps"] * spec["prompts_per_step"] * spec["group_size"]
    row["completions_per_s"] = completions / row["loop_s"]
    row["reward_first10"] = statistics.mean(row["rewards"][:10])
    row["reward_last10"] = statistics.mean(row["rewards"][-10:])
    row["samples_last10"] = len(row["rewards"][-10:]) * spec["prompts_per_step"] * spec["group_size"]
    row["mean_completion_tokens"] = row["completion_tokens"] / completions
    return row


def median_run(runs: list[dict], tool: str) -> dict:
    mine = sorted((r for r in runs if r["tool"] == tool), key=lambda r: r["completions_per_s"])
    return mine[(len(mine) - 1) // 2]


def table(rows: list[dict], spec: dict, repeats: int) -> str:
    base = next((r for r in rows if r["tool"] == "trl"), None)
    sft = spec["sft_held_out"]
    lines = [f"model {spec['model_name']}: {spec['params'] / 1e6:.2f}M params, vocab {spec['vocab_size']}; "
             f"{spec['steps']} steps x {spec['prompts_per_step']} prompts x G={spec['group_size']}, "
             f"max {spec['max_completion_length']} new tokens, lr {spec['lr']}, fp32, {spec['threads']} thread(s); "
             f"median of {repeats} run(s) per tool", f"SFT start: held-out greedy {sft['greedy']:.3f}, "
             f"sampled {sft['sampled']:.3f}", "",
             "| tool | completions/s | vs TRL | loop s | setup+save s | peak RSS MiB | RSS before MiB "
             "| reward, first / last 10 steps | held-out greedy | held-out sampled | tokens/completion | other load |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ratio = f"{r['completions_per_s'] / base['completions_per_s']:.2f}x" if base else "-"
        lines.append(f"| {r['tool']} | {r['completions_per_s']:.1f} | {ratio} | {r['loop_s']:.1f} "
                     f"| {r['wall_s'] - r['loop_s']:.1f} | {r['peak_rss_mib']:.0f} | {r['start_rss_mib']:.0f} "
                     f"| {r['reward_first10']:.3f} / {r['reward_last10']:.3f} "
                     f"| {r['held_out']['greedy']:.3f} | {r['held_out']['sampled']:.3f} "
                     f"| {r['mean_completion_tokens']:.2f} | {r['other_load']:.2f} |")
    lines += ["", "Seconds per phase over the whole loop (share of the loop):", ""]
    for r in rows:
        parts = ", ".join(f"{k} {v:.2f} ({v / r['loop_s']:.0%})" for k, v in r["phases"].items())
        lines.append(f"- {r['tool']}: {parts}")
    return "\n".join(lines)


def verdicts(rows: list[dict]) -> list[str]:
    by_tool = {r["tool"]: r for r in rows}
    out = []
    if {"alignkit", "trl"} <= by_tool.keys():
        ak, trl = by_tool["alignkit"], by_tool["trl"]
        speedup = ak["completions_per_s"] / trl["completions_per_s"]
        # binomial standard errors of the two reward means (10 steps x prompts x G samples each)
        se = sum(r["reward_last10"] * (1 - r["reward_last10"]) / r["samples_last10"] for r in (ak, trl)) ** 0.5
        no_worse = ak["reward_last10"] >= trl["reward_last10"] - 2 * se
        met = speedup >= TARGET_SPEEDUP and no_worse
        out.append(f"alignkit/TRL: {speedup:.2f}x the completions/s, reward {ak['reward_last10']:.3f} vs "
                   f"{trl['reward_last10']:.3f} (2 s.e. of the difference: {2 * se:.3f}), peak RSS "
                   f"{ak['peak_rss_mib'] / trl['peak_rss_mib']:.2f}x: target (>= {TARGET_SPEEDUP}x at no worse "
                   f"reward) {'met' if met else 'NOT met'}")
    busy = [r["tool"] for r in rows if r["other_load"] > MAX_OTHER_LOAD]
    if busy:
        out.append(f"warning: other processes kept {MAX_OTHER_LOAD}+ cores busy during {', '.join(busy)}; "
                   "timings are disturbed: rerun on an idle machine")
    return out


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.child:
        child_main(args.child, args.spec)
        return
    os.environ.update(ENV)
    with tempfile.TemporaryDirectory(prefix="grpo_vs_trl-") as tmp:
        workdir = args.workdir or Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        spec = prepare(args, workdir)
        runs = isolated.round_robin(spec, workdir, args.tools, args.repeats,
                                    lambda tool, spec_path: launch(tool, spec_path, spec))
    rows = [median_run(runs, tool) for tool in args.tools]
    print(table(rows, spec, args.repeats))
    notes = verdicts(rows)
    print("\n" + "\n".join(notes))
    if args.out:
        report = {"settings": {**spec, "repeats": args.repeats}, "rows": rows, "verdicts": notes, "all_runs": runs}
        args.out.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
