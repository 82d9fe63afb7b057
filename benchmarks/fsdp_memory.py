"""FSDP2 memory per rank, and agreement across world sizes, for a 135M-parameter model on CPU ranks.

    python benchmarks/fsdp_memory.py --out-dir benchmarks/results

The model has SmolLM2-135M's shape (hidden 576, intermediate 1536, 30 layers, 9 heads, 3 KV heads,
vocab 49152, tied embeddings: 134.5M parameters) with random weights, built in every process with
a fixed seed; the tokenizer is alignkit's character tokenizer padded to the same vocabulary. Each
configuration but dpo-plain runs under `torchrun --nproc-per-node N` (gloo, fp32, FSDP2 from
`alignkit.distributed`, so world size 1 is FSDP2 too) for 2 optimizer steps, in fresh processes:

  dpo-wsN        `alignkit.train.train(cfg, "preference")`, loss dpo, 8 pairs of the built-in
                 "language" task per step over all ranks, micro-batches of 2 pairs at every N
  grpo-wsN       `run_rl`, recipe grpo, 2 prompts per rank ("arithmetic"), group 4, 8 new tokens,
                 micro-batches of 4 completions, reward = completion length in characters
  dpo-ws2-zero2  dpo-ws2 with train.distributed.reshard_after_forward=false
  dpo-ws1-ac     dpo-ws1 with train.activation_checkpointing=true
  dpo-plain      dpo without torchrun: one plain process, no process group, no FSDP2
  dpo-wsN-mmap   dpo-wsN with MALLOC_MMAP_THRESHOLD_=65536: glibc then maps every block of 64 KiB or
                 more on its own and unmaps it when freed, so the RSS follows the live tensors instead
                 of also keeping freed FSDP2 all-gather buffers (and activations) in malloc's free lists
  dpo-ws2-zero2-mmap, dpo-ws1-ac-mmap
                 dpo-ws2-zero2 and dpo-ws1-ac with MALLOC_MMAP_THRESHOLD_=65536

Measured on every rank (each rank writes its own row):
  RSS            ru_maxrss after the imports, after building the model (the baseline: every rank holds
                 the whole model until `fully_shard`), before the final checkpoint and export (the
                 training part), and at exit (the final export gathers the full weights on rank 0);
                 also the current RSS right before the 2nd optimizer step, and the same after
                 `malloc_trim(0)` (close to the bytes actually in use).
  held bytes     right before the 2nd optimizer step (`Loop.apply_gradients` wrapped): the local
                 shards (`DTensor.to_local()`) of the trained parameters, of their gradients, and of
                 every tensor in the AdamW state. The ratio to world size 1 should be about 1/N.
  losses         dpo: train/loss; grpo: train/loss/policy, with the reward std (the signal varies).
  agreement      dpo only: the first step's gradient (`full_tensor()`, one parameter at a time, against
                 the one dpo-ws1 saved) and the final weights (RUN_DIR/model/model.safetensors) against
                 dpo-ws1, as max abs differences, next to the largest gradient and weight update.

Threads: 1 per rank at every world size (on a shared 2-core machine, 2 OpenMP threads ran a
forward/backward about 10x slower than 1 whenever another process held a core). The final
checkpoint is written without optimizer state. Every configuration is reported, failures included
(with their error). Writes OUT_DIR/fsdp_memory.json and OUT_DIR/fsdp_memory.md; takes about 13
minutes on a 2-core machine.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import isolated
from isolated import ENV, rss_mib

MODEL_SHAPE = {"vocab_size": 49152, "hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30,
               "num_attention_heads": 9, "num_key_value_heads": 3, "tie_word_embeddings": True,
               "max_position_embeddings": 2048, "pad_token_id": 0, "bos_token_id": 2, "eos_token_id": 3}
MIB = 1024 * 1024
CASE_TIMEOUT_S = 900
THREADS = 1  # per rank; see the module docstring


# ----- the configurations -----
MMAP_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536"}  # glibc: blocks >= 64 KiB are mmapped, so freed ones leave RSS
LOSS_KEY = {"dpo": "train/loss", "grpo": "train/loss/policy"}

def case(name: str, method: str, world: int, **options) -> dict:
    return {"name": name, "method": method, "world": world, "torchrun": options.pop("torchrun", True),
            "reshard_after_forward": options.pop("reshard_after_forward", True),
            "activation_checkpointing": options.pop("activation_checkpointing", False), **options}


CASES = [
    case("dpo-ws1", "dpo", 1, grads="save"),
    case("dpo-ws2", "dpo", 2, grads="compare"),
    case("dpo-ws4", "dpo", 4, grads="compare"),
    case("grpo-ws1", "grpo", 1),
    case("grpo-ws2", "grpo", 2),
    case("grpo-ws4", "grpo", 4),
    case("dpo-ws2-zero2", "dpo", 2, reshard_after_forward=False),
    case("dpo-ws1-ac", "dpo", 1, activation_checkpointing=True),
    case("dpo-plain", "dpo", 1, torchrun=False, grads="compare"),
    *(case(f"dpo-ws{n}-mmap", "dpo", n, env=MMAP_ENV) for n in (1, 2, 4)),
    case("dpo-ws2-zero2-mmap", "dpo", 2, reshard_after_forward=False, env=MMAP_ENV),
    case("dpo-ws1-ac-mmap", "dpo", 1, activation_checkpointing=True, env=MMAP_ENV),
]


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out-dir", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--workdir", type=Path, help="keep run folders here (default: a temporary folder)")
    parser.add_argument("--cases", nargs="+", choices=[c["name"] for c in CASES],
                        default=[c["name"] for c in CASES])
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--spec", type=Path, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


# ----- inside one rank -----
def import_stack() -> None:
    import torch  # noqa: F401
    import transformers

    import alignkit.train  # noqa: F401
    import alignkit.train.rl  # noqa: F401

    transformers.logging.set_verbosity_error()


def current_rss_mib() -> float:
    import psutil

    return psutil.Process().memory_info().rss / MIB


def build_model(seed: int):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from alignkit.models.tiny import tiny_tokenizer

    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(**MODEL_SHAPE)), tiny_tokenizer(vocab_size=MODEL_SHAPE["vocab_size"])


def trimmed_rss_mib() -> float:
    """The current RSS after glibc hands its free pages back (`malloc_trim`): close to the live bytes."""
    import ctypes

    ctypes.CDLL("libc.so.6").malloc_trim(0)
    return current_rss_mib()


def local_bytes(tensor) -> int:
    from torch.distributed.tensor import DTensor

    local = tensor.to_local() if isinstance(tensor, DTensor) else tensor
    return local.numel() * local.element_size()


def held_bytes(loop) -> dict:
    """This rank's bytes of trained parameters, their gradients and the optimizer state (local shards)."""
    import torch

    params = list(loop.container.parameters())
    state = [v for s in loop.optimizer.state.values() for v in s.values() if isinstance(v, torch.Tensor)]
    return {"params": sum(local_bytes(p) for p in params),
            "grads": sum(local_bytes(p.grad) for p in params if p.grad is not None),
            "optimizer": sum(local_bytes(t) for t in state)}


def full_tensor(tensor):
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor


def grad_file(folder: Path, name: str) -> Path:
    return folder / f"{name}.safetensors"


def save_grads(loop, folder: Path) -> dict:
    """Write each parameter's full gradient to its own file (one full tensor in memory at a time)."""
    from safetensors.torch import save_file

    from alignkit import distributed

    folder.mkdir(parents=True, exist_ok=True)
    largest = 0.0
    for name, p in loop.container.named_parameters():
        grad = full_tensor(p.grad).detach()
        largest = max(largest, float(grad.abs().max()))
        if distributed.is_main():
            save_file({"grad": grad.contiguous()}, grad_file(folder, name))
    return {"grad_max_abs": largest}


def compare_grads(loop, folder: Path) -> dict:
    """Max abs difference of each full gradient from the saved one (gathered on every rank, compared on 0)."""
    from safetensors.torch import load_file

    from alignkit import distributed

    worst, where = 0.0, ""
    for name, p in loop.container.named_parameters():
        grad = full_tensor(p.grad).detach()
        if distributed.is_main():
            diff = float((grad - load_file(grad_file(folder, name))["grad"]).abs().max())
            worst, where = (diff, name) if diff > worst else (worst, where)
    return {"grad_max_abs_diff": worst, "grad_worst_param": where}


class Probe:
    """Wraps `Loop.apply_gradients` (gradients at step 1, held bytes at step 2) and `Loop.save`."""

    def __init__(self, spec: dict):
        self.spec, self.calls, self.out = spec, 0, {}

    def on_apply(self, loop) -> None:
        self.calls += 1
        grads, folder = self.spec.get("grads"), Path(self.spec["workdir"]) / "dpo-ws1-grads"
        if self.calls == 1 and grads:
            self.out["rss_peak_before_grad_gather_mib"] = rss_mib()
            self.out.update(save_grads(loop, folder) if grads == "save" else compare_grads(loop, folder))
            self.out["rss_peak_after_grad_gather_mib"] = rss_mib()
        if self.calls == self.spec["steps"]:
            self.out.update({f"{k}_bytes": v for k, v in held_bytes(loop).items()})
            self.out.update(rss_peak_at_capture_mib=rss_mib(), rss_now_at_capture_mib=current_rss_mib())
            self.out["rss_trimmed_at_capture_mib"] = trimmed_rss_mib()

    def on_save(self) -> None:
        self.out.setdefault("rss_peak_train_mib", rss_mib())

    @contextlib.contextmanager
    def installed(self):
        from alignkit.train.loop import Loop

        apply, save, probe = Loop.apply_gradients, Loop.save, self

        def apply_gradients(loop):
            probe.on_apply(loop)
            return apply(loop)

        def save_once(loop, *args, **kwargs):
            probe.on_save()
            return save(loop, *args, **kwargs)

        Loop.apply_gradients, Loop.save = apply_gradients, save_once
        try:
            yield self
        finally:
            Loop.apply_gradients, Loop.save = apply, save


def train_options(spec: dict, micro: int) -> dict:
    return {"steps": spec["steps"], "micro_batch_size": micro, "schedule": "constant", "precision": "fp32",
            "progress": False, "seed": spec["seed"], "save_final_optimizer": False,
            "activation_checkpointing": spec["activation_checkpointing"],
            "distributed": {"reshard_after_forward": spec["reshard_after_forward"]}}


def run_dpo(spec: dict, model, tokenizer):
    from alignkit.config import build
    from alignkit.train import RunConfig, train

    cfg = build(RunConfig, {
        "output_dir": str(Path(spec["workdir"]) / "runs"), "run_name": spec["name"],
        "data": {"task": "language", "task_size": 8 * spec["steps"], "eval_size": 0, "seed": spec["seed"]},
        "loss": {"name": "dpo", "beta": 0.1},
        "train": {**train_options(spec, micro=2), "batch_size": 8, "lr": 1e-4},
    })
    return train(cfg, "preference", model=model, tokenizer=tokenizer)


def completion_length(prompt, completion, reference) -> float:
    return float(len(completion))


def run_grpo(spec: dict, model, tokenizer):
    from alignkit.rewards.rules import RuleReward
    from alignkit.train.rl import config_from, run_rl

    cfg = config_from({
        "recipe": "grpo", "output_dir": str(Path(spec["workdir"]) / "runs"), "run_name": spec["name"],
        "data": {"task": "arithmetic", "task_size": 16, "eval_size": 0, "seed": spec["seed"]},
        "rollout": {"max_new_tokens": 8},
        "train": {**train_options(spec, micro=4), "lr": 1e-5},
        "rl": {"prompts_per_step": 2 * spec["world"], "group_size": 4},
    })
    return run_rl(cfg, model=model, tokenizer=tokenizer, reward=RuleReward(completion_length))


def run_rank(spec: dict) -> dict:
    """One rank of one configuration: join the group, build the model, train with the probe installed."""
    from alignkit import distributed

    distributed.init()
    after_imports = rss_mib()
    model, tokenizer = build_model(spec["seed"])
    row = {"rank": distributed.rank(), "world": distributed.world_size(), "rss_after_imports_mib": after_imports,
           "rss_after_build_mib": rss_mib(), "params_total": sum(p.numel() for p in model.parameters())}
    started = time.perf_counter()
    with Probe(spec).installed() as probe:
        result = (run_dpo if spec["method"] == "dpo" else run_grpo)(spec, model, tokenizer)
    row.update(probe.out, train_wall_s=time.perf_counter() - started, run_dir=str(result.run.path))
    steps = [r for r in result.run.metrics() if LOSS_KEY[spec["method"]] in r]
    row["losses"] = [r[LOSS_KEY[spec["method"]]] for r in steps]
    row["reward_std"] = [r["train/reward/std"] for r in steps if "train/reward/std" in r]
    row["grad_norms"] = [r["train/grad_norm"] for r in steps]
    return row


def child_main(name: str, spec_path: Path) -> None:
    rank = int(os.environ.get("RANK", 0))
    isolated.child(f"{name}.rank{rank}", spec_path, import_stack, run_rank)


# ----- the parent: one torchrun per configuration -----
def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def command(spec: dict, spec_path: Path) -> list[str]:
    script = [__file__, "--child", spec["name"], "--spec", str(spec_path)]
    if not spec["torchrun"]:
        return [sys.executable, *script]
    return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(spec["world"]),
            "--master-addr", "127.0.0.1", "--master-port", str(free_port()), *script]


def error_text(output: str) -> str:
    """The last exception line of a failed run's output (the full tail is kept in the JSON)."""
    lines = [ln.strip() for ln in output.splitlines() if "Error" in ln or "error" in ln]
    return lines[-1][:400] if lines else output.strip()[-400:]


def launch(spec: dict, workdir: Path) -> dict:
    """Run one configuration; returns its status, wall time, outside load and per-rank rows."""
    spec_path = workdir / f"{spec['name']}.spec.json"
    spec_path.write_text(json.dumps(spec))
    env = {**os.environ, **ENV, "OMP_NUM_THREADS": str(spec["threads"]), "PYTHONUNBUFFERED": "1",
           **spec.get("env", {})}
    busy, ours, started = isolated.busy_cpu_s(), isolated.children_cpu_s(), time.perf_counter()
    try:
        done = subprocess.run(command(spec, spec_path), env=env, capture_output=True, text=True,
                              timeout=CASE_TIMEOUT_S)
        code, output = done.returncode, done.stdout + done.stderr
    except subprocess.TimeoutExpired as err:
        code, output = "timeout", f"{err.stdout or ''}{err.stderr or ''}"
    wall = time.perf_counter() - started
    foreign = (isolated.busy_cpu_s() - busy) - (isolated.children_cpu_s() - ours)
    ranks = [json.loads(p.read_text()) for p in sorted(workdir.glob(f"{spec['name']}.rank*.json"))]
    out = {"case": spec["name"], "ok": code == 0 and len(ranks) == spec["world"], "exit": code, "wall_s": wall,
           "other_load": max(0.0, foreign) / wall, "ranks": ranks}
    if not out["ok"]:
        out.update(error=error_text(output), output_tail=output[-6000:])
    return out


def case_spec(entry: dict, args: argparse.Namespace, workdir: Path) -> dict:
    return {**entry, "workdir": str(workdir), "steps": args.steps, "seed": args.seed,
            "threads": THREADS}


def run_all(args: argparse.Namespace, workdir: Path) -> list[dict]:
    results = []
    for entry in (c for c in CASES if c["name"] in args.cases):
        print(f"running {entry['name']} ...", file=sys.stderr, flush=True)
        result = launch(case_spec(entry, args, workdir), workdir)
        status = "ok" if result["ok"] else f"FAILED: {result['error']}"
        print(f"  {result['wall_s']:.0f} s, {status}", file=sys.stderr, flush=True)
        results.append(result)
    return results


# ----- what the runs mean: ratios to world size 1, agreement of weights -----
def held_total(row: dict) -> int:
    return row["params_bytes"] + row["grads_bytes"] + row["optimizer_bytes"]


def add_ratios(results: list[dict]) -> None:
    """Each rank's held bytes over world size 1's (same method), next to the ideal 1/N."""
    base = {r["case"].split("-")[0]: r["ranks"][0] for r in results
            if r["ok"] and r["case"] in ("dpo-ws1", "grpo-ws1")}
    for result in (r for r in results if r["ok"]):
        ref = base.get(result["case"].split("-")[0])
        for row in result["ranks"]:
            if ref and "params_bytes" in row:
                row["held_vs_ws1"] = held_total(row) / held_total(ref)
                row["ideal_held_bytes"] = held_total(ref) / row["world"]


def weights_of(run_dir: str) -> dict:
    from safetensors.torch import load_file

    return load_file(Path(run_dir) / "model" / "model.safetensors")


def max_abs_diff(a: dict, b: dict) -> float:
    """Over the tensors both hold (an FSDP2 export may also hold the tied `lm_head.weight`)."""
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a.keys() & b.keys())


def initial_weights(seed: int) -> dict:
    model, _ = build_model(seed)
    return {k: v.detach() for k, v in model.state_dict().items()}


def agreement(results: list[dict], seed: int) -> list[dict]:
    """DPO runs against dpo-ws1: first-step gradient and final weights, with the size of the update."""
    by_case = {r["case"]: r for r in results if r["ok"]}
    if "dpo-ws1" not in by_case:
        return []
    base = weights_of(by_case["dpo-ws1"]["ranks"][0]["run_dir"])
    init = initial_weights(seed)
    update = max_abs_diff(base, {k: init[k] for k in base})
    rows = []
    for name in (c["name"] for c in CASES if c["method"] == "dpo" and c["name"] != "dpo-ws1"):
        if name in by_case:
            rank0 = by_case[name]["ranks"][0]
            rows.append({"case": name, "vs": "dpo-ws1", "grad_max_abs_diff": rank0.get("grad_max_abs_diff"),
                         "grad_worst_param": rank0.get("grad_worst_param"),
                         "grad_max_abs_ws1": by_case["dpo-ws1"]["ranks"][0].get("grad_max_abs"),
                         "weights_max_abs_diff": max_abs_diff(weights_of(rank0["run_dir"]), base),
                         "weights_max_abs_update_ws1": update,
                         "exported_keys": len(weights_of(rank0["run_dir"])),
                         "exported_keys_ws1": len(base),
                         "losses": rank0["losses"], "losses_ws1": by_case["dpo-ws1"]["ranks"][0]["losses"]})
    return rows


# ----- the report -----
def mib(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}"


def bytes_mib(value: float | None) -> str:
    return "-" if value is None else f"{value / MIB:.1f}"


def memory_table(results: list[dict]) -> list[str]:
    lines = ["| case | N | rank | RSS after imports | after build | peak in training | peak at exit "
             "| RSS now before step 2 | same, trimmed | params | grads | AdamW state | held total | ideal total/N "
             "| held / ws1 (ideal 1/N) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for result in results:
        if not result["ok"]:
            continue
        for r in result["ranks"]:
            held = held_total(r) if "params_bytes" in r else None
            ratio = f"{r['held_vs_ws1']:.3f} ({1 / r['world']:.3f})" if "held_vs_ws1" in r else "-"
            lines.append(f"| {result['case']} | {r['world']} | {r['rank']} | {mib(r['rss_after_imports_mib'])} "
                         f"| {mib(r['rss_after_build_mib'])} | {mib(r.get('rss_peak_train_mib'))} "
                         f"| {mib(r['peak_rss_mib'])} | {mib(r.get('rss_now_at_capture_mib'))} "
                         f"| {mib(r.get('rss_trimmed_at_capture_mib'))} "
                         f"| {bytes_mib(r.get('params_bytes'))} | {bytes_mib(r.get('grads_bytes'))} "
                         f"| {bytes_mib(r.get('optimizer_bytes'))} | {bytes_mib(held)} "
                         f"| {bytes_mib(r.get('ideal_held_bytes'))} "
                         f"| {ratio} |")
    return lines


def runs_table(results: list[dict]) -> list[str]:
    lines = ["| case | status | wall s | other load (cores) | loss per step (rank 0) | grad norm per step "
             "| reward std per step |", "|---|---|---|---|---|---|---|"]
    for r in results:
        status = "ok" if r["ok"] else f"FAILED (exit {r['exit']}): `{r['error']}`"
        losses = ", ".join(f"{x:.6f}" for x in r["ranks"][0]["losses"]) if r["ok"] else "-"
        norms = ", ".join(f"{x:.4f}" for x in r["ranks"][0]["grad_norms"]) if r["ok"] else "-"
        spread = ", ".join(f"{x:.2f}" for x in r["ranks"][0]["reward_std"]) if r["ok"] else "-"
        lines.append(f"| {r['case']} | {status} | {r['wall_s']:.0f} | {r['other_load']:.2f} | {losses} "
                     f"| {norms} | {spread or '-'} |")
    return lines


def agreement_table(rows: list[dict]) -> list[str]:
    lines = ["| case vs dpo-ws1 | step-1 grad max abs diff | (max abs grad, ws1) | worst parameter "
             "| final weights max abs diff | (max abs update, ws1) | tensors exported (ws1) |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        grad = "-" if r["grad_max_abs_diff"] is None else f"{r['grad_max_abs_diff']:.3e}"
        lines.append(f"| {r['case']} | {grad} | {r['grad_max_abs_ws1']:.3e} | {r['grad_worst_param'] or '-'} "
                     f"| {r['weights_max_abs_diff']:.3e} | {r['weights_max_abs_update_ws1']:.3e} "
                 f"| {r['exported_keys']} ({r['exported_keys_ws1']}) |")
    return lines


READING = [
    "Reading the tables:",
    "- 'after build' is every rank holding the whole model before `fully_shard`; 'peak in training' is "
    "ru_maxrss just before the final checkpoint, 'peak at exit' after the export (rank 0 gathers the weights).",
    "- 'same, trimmed' is the current RSS after `malloc_trim(0)`: about the bytes in use. Where it is far "
    "below 'RSS now', glibc is keeping freed blocks (FSDP2's all-gather buffers, activations) in its free "
    "lists; the -mmap rows run with MALLOC_MMAP_THRESHOLD_=65536 so that freed blocks leave the RSS.",
    "- GRPO's policy loss is 0 at every step by construction (one update per step: ratio 1, and the "
    "group-normalised advantages average to 0); the gradient is not, see the grad norm.",
    "- other load: cores that other processes kept busy during the run (the machine is shared); it "
    "affects wall times, not memory.",
]


def markdown(results: list[dict], rows: list[dict], args: argparse.Namespace, total_s: float) -> str:
    head = ["# FSDP2 memory per rank and agreement across world sizes (CPU, gloo, fp32)", "",
            "    python benchmarks/fsdp_memory.py --out-dir benchmarks/results", "",
            f"SmolLM2-135M-shaped Llama, random weights (seed {args.seed}), {args.steps} optimizer steps per run. "
            f"Total runtime {total_s / 60:.1f} min. MiB throughout; RSS columns are ru_maxrss (peaks) except "
            "'RSS now'. Held bytes are this rank's local shards, taken right before the optimizer step of "
            "the last step. See the module docstring of benchmarks/fsdp_memory.py for the settings.", "",
            "## Runs", ""]
    return "\n".join([*head, *runs_table(results), "", "## Memory per rank", "", *memory_table(results), "",
                      "## DPO agreement with world size 1", "", *agreement_table(rows), "", *READING, ""])


def main() -> None:
    args = parse_args()
    if args.child:
        child_main(args.child, args.spec)
        return
    os.environ.update(ENV)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="fsdp_memory-") as tmp:
        workdir = (args.workdir or Path(tmp)).resolve()
        workdir.mkdir(parents=True, exist_ok=True)
        results = run_all(args, workdir)
        add_ratios(results)
        rows = agreement(results, args.seed)
    total = time.perf_counter() - started
    args.out_dir.mkdir(parents=True, exist_ok=True)
    report = {"command": "python benchmarks/fsdp_memory.py --out-dir benchmarks/results", "total_s": total,
              "steps": args.steps, "seed": args.seed, "model_shape": MODEL_SHAPE, "runs": results,
              "agreement": rows}
    (args.out_dir / "fsdp_memory.json").write_text(json.dumps(report, indent=2))
    text = markdown(results, rows, args, total)
    (args.out_dir / "fsdp_memory.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
