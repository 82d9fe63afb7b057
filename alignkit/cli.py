"""`alignkit <command>`: YAML config plus dotted overrides; every run writes one directory."""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

import yaml
from rich.console import Console
from rich.table import Table

from alignkit import distributed
from alignkit.algorithms import PREFERENCE_LOSSES, REWARD_LOSSES, UNPAIRED_LOSSES
from alignkit.config import ConfigError, apply_overrides, build, describe, load_yaml, to_dict
from alignkit.registry import Registry

COMMANDS = Registry("command")
console = Console()


def _loss_table() -> str:
    lines = ["paired losses (comparison data):"]
    lines += [f"  {e.name:<9} {e.summary}  [{e.paper}]" for e in PREFERENCE_LOSSES]
    lines += ["unpaired losses (rating data; bco takes either, data.kind=rating for ratings):"]
    lines += [f"  {e.name:<9} {e.summary}  [{e.paper}]" for e in UNPAIRED_LOSSES]
    return "\n".join(lines)


def _reward_loss_table() -> str:
    return "\n".join(["reward losses:"] + [f"  {e.name:<14} {e.summary}  [{e.paper}]" for e in REWARD_LOSSES])


def _recipe_table() -> str:
    from alignkit.algorithms.advantages import ADVANTAGES
    from alignkit.train.rl import RECIPES

    lines = ["recipes (--recipe NAME; any rl.* option can still be overridden):"]
    lines += [f"  {e.name:<22} {e.summary}  [{e.paper}]" for e in RECIPES]
    lines += ["advantage estimators (rl.advantage=NAME):"]
    lines += [f"  {e.name:<22} {e.summary}" for e in ADVANTAGES]
    return "\n".join(lines)


def _experiment_table() -> str:
    from alignkit.experiments import EXPERIMENTS

    return "\n".join(["experiments:"] + [f"  {e.name:<20} {e.summary}  [{e.paper}]" for e in EXPERIMENTS])


EPILOGS = {"preference": _loss_table, "dpo": _loss_table, "reward": _reward_loss_table, "rl": _recipe_table,
           "experiment": _experiment_table}


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="YAML config file")
    parser.add_argument("--model", help='model: "tiny", a local directory, or a hub id')
    parser.add_argument("--resume", metavar="RUN_DIR", help="continue a killed run from its last checkpoint")
    parser.add_argument("overrides", nargs="*", metavar="key.path=value",
                        help="dotted overrides, e.g. train.lr=1e-4 data.train=pairs.jsonl")


def _resolve(args, extra: dict | None = None) -> dict:
    from alignkit.train.rundir import RunDir

    if args.resume:
        data = RunDir(args.resume).read_config()
        data.pop("command", None)
        return data
    data = load_yaml(args.config) if args.config else {}
    for key, value in (extra or {}).items():
        if value is not None:
            data = apply_overrides(data, [f"{key}={value}"])
    return apply_overrides(data, args.overrides)


def summary_table(rows: dict[str, float]) -> Table:
    table = Table()
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key, value in rows.items():
        table.add_row(key, f"{value:.4f}" if isinstance(value, float) else str(value))
    return table


def _run_training(command: str, args, extra: dict | None = None) -> int:
    from alignkit.train import config_from, train

    cfg = config_from(_resolve(args, extra))
    result = train(cfg, command, resume=args.resume)
    rows = {k: v for k, v in result.metrics.items() if not k.startswith("eval/reward_margin")}
    _report(f"alignkit {command}: final evaluation", summary_table(rows), result.run.path)
    return 0


def _report(title: str, table: Table, run_path) -> None:
    """The final table and the run directory, printed by rank 0 only under torchrun."""
    if distributed.is_main():
        console.print(title)
        console.print(table)
        console.print(f"run directory: {run_path}", soft_wrap=True)


@COMMANDS.register("sft", summary="supervised fine-tuning on demonstrations",
                   config="alignkit.train.recipes:RunConfig")
def cmd_sft(args) -> int:
    return _run_training("sft", args, {"model.name": args.model})


@COMMANDS.register("preference", summary="offline preference training with any registered loss",
                   config="alignkit.train.recipes:RunConfig")
def cmd_preference(args) -> int:
    return _run_training("preference", args, {"model.name": args.model, "loss.name": args.loss})


@COMMANDS.register("reward", summary="train a scalar reward model (Bradley-Terry or R3M) on comparisons",
                   config="alignkit.train.recipes:RunConfig")
def cmd_reward(args) -> int:
    return _run_training("reward", args, {"model.name": args.model, "loss.name": args.loss})


@COMMANDS.register("pairwise-rm", summary="train a pairwise preference model P(a > b) with SNGP uncertainty",
                   config="alignkit.train.recipes:RunConfig")
def cmd_pairwise_rm(args) -> int:
    return _run_training("pairwise-rm", args, {"model.name": args.model})


@COMMANDS.register("judge-sft", summary="Think-RM stage 1: SFT a generative judge on judgement traces",
                   config="alignkit.train.recipes:RunConfig")
def cmd_judge_sft(args) -> int:
    return _run_training("judge-sft", args, {"model.name": args.model})


@COMMANDS.register("rl", summary="online RL: GRPO, PPO, DAPO, Self-Rewarding PPO, pairwise RLHF, ... (--recipe)",
                   config="alignkit.train.rl:RLRunConfig")
def cmd_rl(args) -> int:
    from alignkit.train.rl import config_from, run_rl

    result = run_rl(config_from(_resolve(args, {"model.name": args.model, "recipe": args.recipe})),
                    resume=args.resume)
    rows = {**{f"before/{k}": v for k, v in result.initial_metrics.items()}, **result.metrics}
    _report("alignkit rl: held-out evaluation (greedy)", summary_table(rows), result.run.path)
    return 0


@COMMANDS.register("best-of-n", summary="each prompt's best of N sampled completions by a reward source, as JSON lines",
                   config="alignkit.bestofn:BestOfNConfig")
def cmd_best_of_n(args) -> int:
    from alignkit.bestofn import BestOfNConfig, best_of_n

    cfg = build(BestOfNConfig, _resolve(args, {"model.name": args.model}))
    rows = best_of_n(cfg)
    scored = [row["score"] for row in rows if not row["failed"]]
    summary = {"prompts": len(rows), "failed": len(rows) - len(scored),
               "mean best score": sum(scored) / len(scored) if scored else float("nan")}
    if distributed.is_main():
        console.print(summary_table(summary))
        console.print(f"written: {cfg.output}", soft_wrap=True)
    return 0


@COMMANDS.register("serve", summary="serve a model over an OpenAI-compatible chat and text completions API",
                   arguments="alignkit.serve:add_arguments")
def cmd_serve(args) -> int:
    from alignkit.serve import run

    return run(args)


@COMMANDS.register("eval-rm", summary="evaluate a reward source on comparisons: accuracy, calibration, length bias",
                   arguments="alignkit.evaluation.cli:add_arguments")
def cmd_eval_rm(args) -> int:
    from alignkit.evaluation.cli import run

    return run(args)


@COMMANDS.register("dpo", summary="alias of `preference` (default loss dpo)",
                   config="alignkit.train.recipes:RunConfig")
def cmd_dpo(args) -> int:
    return cmd_preference(args)


def _demo_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quick", action="store_true", help="a one-minute version")
    parser.add_argument("--output-dir", default="runs")
    parser.add_argument("--seed", type=int, default=0)


def _experiment_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("name", help="experiment name (see the list below)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--quick", action="store_true", help="a small version (what the tests run)")
    parser.add_argument("--output-dir", default="runs")


@COMMANDS.register("demo", summary="base -> SFT -> reward model -> DPO, GRPO, Self-Rewarding PPO; gold-reward table",
                   arguments="alignkit.cli:_demo_arguments")
def cmd_demo(args) -> int:
    from alignkit.demo import run_demo

    result = run_demo(quick=args.quick, output_dir=args.output_dir, seed=args.seed, echo=console.print)
    columns = next(iter(result.rows.values()))
    table = Table(title="held-out prompts, scored by the task's hidden gold reward")
    for name in ["method", *columns]:
        table.add_column(name, justify="left" if name == "method" else "right", no_wrap=True)
    for method, values in result.rows.items():
        table.add_row(method, *(f"{v:.3f}" for v in values.values()))
    console.print(table)
    console.print("stage times: " + ", ".join(f"{name} {s:.0f} s" for name, s in result.seconds.items()))
    console.print(f"report: {result.path / 'report.html'}", soft_wrap=True)
    return 0


@COMMANDS.register("experiment", summary="a seed paper's claim at small scale: seeds, 95% CIs, table, plots",
                   arguments="alignkit.cli:_experiment_arguments")
def cmd_experiment(args) -> int:
    from alignkit.experiments import run_experiment

    path, _ = run_experiment(args.name, args.seeds, quick=args.quick, output_dir=args.output_dir, echo=console.print)
    console.print((path / "results.md").read_text(), soft_wrap=True)
    console.print(f"results: {path}", soft_wrap=True)
    return 0


@COMMANDS.register("report", summary="a static HTML report (offline) of one or more run directories, side by side",
                   arguments="alignkit.report:add_arguments")
def cmd_report(args) -> int:
    from alignkit.report import run

    return run(args)


def _epilog(entry) -> str | None:
    """The command's tables (losses, recipes), then its configuration keys when it takes a config."""
    parts = [EPILOGS[entry.name]()] if entry.name in EPILOGS else []
    if "config" in entry.meta:
        parts.append(_key_table(_import(entry.meta["config"])))
    return "\n\n".join(parts) or None


def _key_table(cls) -> str:
    rows = describe(cls)
    width = max(len(key) for key, *_ in rows)
    lines = ["configuration keys (key.path=value; `alignkit config COMMAND` prints them as YAML):"]
    lines += [f"  {key:<{width}}  {kind} = {default}  {line}" for key, kind, default, line in rows]
    return "\n".join(lines)


def _config_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("name", help="a training command: " + ", ".join(e.name for e in COMMANDS if "config" in e.meta))
    parser.add_argument("overrides", nargs="*", metavar="key.path=value",
                        help="shown resolved, as a run would (rl: recipe=NAME shows a recipe's defaults)")


@COMMANDS.register("config", summary="print a command's full default configuration as YAML (with overrides applied)",
                   arguments="alignkit.cli:_config_arguments")
def cmd_config(args) -> int:
    entry = COMMANDS.get(args.name)
    if "config" not in entry.meta:
        raise ConfigError(f"{args.name!r} takes no configuration; these do: "
                          + ", ".join(e.name for e in COMMANDS if "config" in e.meta))
    data = apply_overrides({}, args.overrides)
    if args.name == "rl":
        from alignkit.train.rl import config_from

        cfg = config_from(data)
    else:
        cfg = build(_import(entry.meta["config"]), data)
    print(yaml.safe_dump(to_dict(cfg), sort_keys=False), end="")
    return 0


def _import(spec: str):
    module, _, name = spec.partition(":")
    return getattr(importlib.import_module(module), name)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="alignkit", description="Train language models from feedback.")
    sub = parser.add_subparsers(dest="command", required=True)
    for entry in COMMANDS:
        p = sub.add_parser(entry.name, help=entry.summary.replace("%", "%%"), description=entry.summary,
                           epilog=_epilog(entry),
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        if "arguments" in entry.meta:
            _import(entry.meta["arguments"])(p)
            continue
        _common(p)
        if entry.name == "rl":
            p.add_argument("--recipe", help="a named method preset (see the list below)")
        if entry.name in ("preference", "dpo", "reward"):
            p.add_argument("--loss", default="dpo" if entry.name == "dpo" else None,
                           help="loss name (see the list below)")
    return parser


def _console_logging() -> None:
    """alignkit's status lines (run directory, skipped records, server address) on stdout, as plain lines."""
    logger = logging.getLogger("alignkit")
    for handler in [h for h in logger.handlers if getattr(h, "alignkit_console", False)]:
        logger.removeHandler(handler)
    handler = logging.StreamHandler(sys.stdout)
    handler.alignkit_console = True
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _console_logging()
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # our own progress is enough; theirs fires on every checkpoint
    try:
        code = COMMANDS.get(args.command).fn(args)
        distributed.shutdown()
        return code
    except (ConfigError, KeyError, TypeError, ValueError, FileNotFoundError, RuntimeError) as err:
        if os.environ.get("ALIGNKIT_DEBUG"):
            raise
        message = err.args[0] if isinstance(err, KeyError) and err.args else err
        print(f"alignkit: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
