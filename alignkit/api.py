"""One call per method: `alignkit.DPO(model=..., data=..., **options).train()`.

Keywords are the configuration keys (`alignkit config COMMAND` lists them all):
- a section as a mapping: `train={"lr": 1e-5, "steps": 100}`, `rollout={"max_new_tokens": 64}`;
- a leaf key by its last name when that name is unique in the config: `lr=1e-5`, `steps=100`,
  `max_new_tokens=64` (an ambiguous name is an error listing the full keys to use);
- a loss's own options by name: `beta=0.1` for DPO, `desirable_weight=1.33` for KTO.

`data` (and `eval_data`) is a path, a hub id, a list of dicts or a `datasets.Dataset`. In-memory data
is written once as JSON lines under `output_dir/.data/` (named by its content hash), so the run's
manifest hashes it and `--resume` finds it again.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from alignkit.algorithms import PREFERENCE_LOSSES, UNPAIRED_LOSSES
from alignkit.config import ConfigError, build, describe, merge


@dataclass
class TrainResult:
    run_dir: Path
    model_path: Path     # RUN_DIR/model: a plain Hugging Face folder (the adapter for LoRA runs)
    metrics: dict        # final evaluation
    initial_metrics: dict


class Method:
    """A training command with its defaults; `train()` runs it once and returns a TrainResult."""

    command = "preference"
    defaults: dict = {}

    def __init__(self, model="tiny", data=None, eval_data=None, *, tokenizer=None, reward=None, judge=None,
                 **options):
        for name, source in (("reward", reward), ("judge", judge)):
            if isinstance(source, str | dict):   # a spec (docs/rewards.md), not an object
                options[name] = source
        self.model, self.tokenizer = model, tokenizer
        self.reward, self.judge = (s if not isinstance(s, str | dict) else None for s in (reward, judge))
        self.options = merge(self.defaults, _nest(self._config_class(), options, self._loss_names()))
        self.options.setdefault("output_dir", "runs")
        for key, value in (("train", data), ("eval", eval_data)):
            if value is not None:
                self.options.setdefault("data", {})[key] = _as_path(value, Path(self.options["output_dir"]))
        if isinstance(model, str):
            self.options.setdefault("model", {})["name"] = model

    def _config_class(self):
        from alignkit.train.recipes import RunConfig

        return RunConfig

    def _loss_names(self) -> set[str]:
        name = self.options_loss_name()
        registry = UNPAIRED_LOSSES if name in UNPAIRED_LOSSES and name not in PREFERENCE_LOSSES else PREFERENCE_LOSSES
        return set(registry.get(name).defaults()) if name in registry else set()

    def options_loss_name(self) -> str | None:
        return self.defaults.get("loss", {}).get("name")

    def _models(self) -> dict:
        return {} if isinstance(self.model, str) else {"model": self.model, "tokenizer": self.tokenizer}

    def train(self) -> TrainResult:
        from alignkit.train import train

        result = train(build(self._config_class(), self.options), self.command, **self._models())
        return TrainResult(result.run.path, result.run.path / "model", result.metrics, result.initial_metrics)


class SFT(Method):
    command = "sft"


class DPO(Method):
    defaults = {"loss": {"name": "dpo"}}


class KTO(Method):
    defaults = {"loss": {"name": "kto"}, "data": {"kind": "rating"}}


class Preference(Method):
    """Any registered preference loss: `Preference(loss="simpo", data=..., beta=2.0)`."""

    def __init__(self, loss: str, model="tiny", data=None, eval_data=None, **options):
        self.defaults = {"loss": {"name": loss}}
        super().__init__(model, data, eval_data, **options)


class RewardModel(Method):
    command = "reward"
    defaults = {"loss": {"name": "bradley_terry"}}

    def _loss_names(self) -> set[str]:
        from alignkit.algorithms import REWARD_LOSSES

        return set(REWARD_LOSSES.get(self.options_loss_name()).defaults())


class RL(Method):
    """Online RL with a recipe: `RL("grpo", model=..., data=prompts, reward="rule:r.py:fn", steps=100)`."""

    command = "rl"

    def __init__(self, recipe: str, model="tiny", data=None, eval_data=None, **options):
        self.recipe = recipe
        super().__init__(model, data, eval_data, **options)
        self.options["recipe"] = recipe

    def _config_class(self):
        from alignkit.train.rl import RLRunConfig

        return RLRunConfig

    def _loss_names(self) -> set[str]:
        return set()

    def train(self) -> TrainResult:
        from alignkit.train.rl import config_from, run_rl

        result = run_rl(config_from(self.options), reward=self.reward, judge=self.judge, **self._models())
        return TrainResult(result.run.path, result.run.path / "model", result.metrics, result.initial_metrics)


class GRPO(RL):
    def __init__(self, model="tiny", data=None, eval_data=None, **options):
        super().__init__("grpo", model, data, eval_data, **options)


class PPO(RL):
    def __init__(self, model="tiny", data=None, eval_data=None, **options):
        super().__init__("ppo", model, data, eval_data, **options)


# ----- keywords to config keys -----
def _nest(cls, options: dict, loss_names: set[str]) -> dict:
    """Config sections as given, unique leaf names and loss options put under their full keys."""
    leaves: dict[str, list[str]] = {}
    for key, *_ in describe(cls):
        leaves.setdefault(key.rsplit(".", 1)[-1], []).append(key)
    sections = {key.split(".", 1)[0] for key, *_ in describe(cls)}
    out: dict = {}
    for name, value in options.items():
        if name in sections and (isinstance(value, dict) or "." not in _full(leaves, name, name)):
            out = merge(out, {name: value})
        elif name in loss_names:
            out = merge(out, {"loss": {name: value}})
        else:
            out = merge(out, _at(_full(leaves, name), value))
    return out


def _full(leaves: dict[str, list[str]], name: str, default: str | None = None) -> str:
    matches = leaves.get(name, [])
    if len(matches) == 1:
        return matches[0]
    if default is not None:
        return default
    if matches:
        raise ConfigError(f"option {name!r} is ambiguous: use a section, e.g. {matches[0].split('.')[0]}={{...}} "
                          f"for one of {', '.join(matches)}")
    raise ConfigError(f"unknown option {name!r}: `alignkit config COMMAND` lists the configuration keys")


def _at(path: str, value) -> dict:
    head, _, rest = path.partition(".")
    return {head: _at(rest, value) if rest else value}


def _as_path(data, root: Path) -> str:
    """A path or hub id as it is; in-memory rows written once as JSON lines, named by their content."""
    if isinstance(data, str | Path):
        return str(data)
    rows = [dict(row) for row in data]
    text = "".join(json.dumps(row, sort_keys=True) + "\n" for row in rows)
    path = root / ".data" / f"{hashlib.sha256(text.encode()).hexdigest()[:16]}.jsonl"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(text)
        tmp.replace(path)
    return str(path)
