"""Every trainer at two ranks (under torchrun) or in one process, recording what the equivalence test compares.

`python -m torch.distributed.run --nproc-per-node 2 train_worker.py OUT` runs each case with FSDP2 and
micro-batches of 1; the test runs the same cases in its own process (`run_cases`) with whole batches.
Each case records the gradient of its first optimizer step (gathered from the shards), the final
weights (RUN_DIR/model) and, online, the token ids this rank sampled at the first step.
"""

from __future__ import annotations

import contextlib
import json
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from alignkit import distributed
from alignkit.models import tiny_model_and_tokenizer, tiny_reward_model
from alignkit.models.pairwise import PairwiseConfig, PreferenceModel
from alignkit.rewards.models import RewardModel
from alignkit.rewards.rules import RuleReward
from alignkit.train import RunConfig, train
from alignkit.train.experience import Collector
from alignkit.train.loop import Loop, TrainConfig
from alignkit.train.rl import config_from, run_rl

OFFLINE = {  # name -> (command, loss, extra train.* options)
    "sft": ("sft", {}, {}),
    "sft-checkpointed": ("sft", {}, {"activation_checkpointing": True}),
    "dpo": ("preference", {"name": "dpo"}, {}),
    "dpo-bf16": ("preference", {"name": "dpo"}, {"precision": "bf16"}),
    "kto": ("preference", {"name": "kto"}, {}),
    "reward": ("reward", {"name": "bradley_terry"}, {}),
    "pairwise": ("pairwise-rm", {}, {}),
}
ONLINE = {"grpo": {}, "ppo": {}, "grpo-rm": {}, "dapo": {"overlong_buffer": 0}}   # grpo-rm: a sharded reward model
SELF_IMPROVING = {"iterative-dpo": {"steps_per_round": 2}, "nash-md": {}, "cream": {"steps_per_round": 2},
                  "rso": {"steps_per_round": 2, "rule_options": {"beta": 100.0}}, "spin": {"steps_per_round": 2},
                  "inpo": {"steps_per_round": 2}, "self-rewarding-lm": {"steps_per_round": 1},
                  "online-dpo": {}, "sppo": {"steps_per_round": 2}, "dno": {"steps_per_round": 2},
                  "raft": {"steps_per_round": 2}, "rest": {"steps_per_round": 2, "rule_options": {"threshold": 2}}}
UNTRAINED = {"self-rewarding-lm"}   # a tiny model cannot judge yet: every round has no comparisons
ANY_BATCH = {"dapo"}   # dynamic sampling rounds prompts up to a multiple of the world size: other batches
CASES = (*OFFLINE, *ONLINE, *SELF_IMPROVING)
# The whole gradient within this relative distance of one process's, by norm, instead of element by element:
# bf16 (FSDP2 casts whole layers, one process autocasts per op); rewards a sharded model computes, whose
# float32 rounding the group normalisation of GRPO magnifies.
# INPO and SPPO: squared losses towards 1/(2 eta) = 67 and eta (P - 1/2) make gradients of norm 60 to 3e3, where
# float32 rounding passes the absolute tolerance (measured: 1.1e-7 and 1.2e-7 of the norm apart).
LOOSE = {"dpo-bf16": 0.03, "grpo-rm": 1e-4, "inpo": 1e-6, "sppo": 1e-6}


def _train_options(micro: int | None) -> dict:
    return {"steps": 2, "batch_size": 8, "micro_batch_size": micro, "lr": 1e-3, "progress": False}


def _model(command: str):
    model, tokenizer = tiny_model_and_tokenizer(seed=0)
    if command == "reward":
        return tiny_reward_model(model), tokenizer
    if command == "pairwise-rm":   # a linear head: SNGP's spectral norm moves with every forward pass
        return PreferenceModel.from_causal_lm(model, PairwiseConfig(head="linear")), tokenizer
    return model, tokenizer


def run_offline(name: str, out: Path, micro: int | None):
    command, loss, options = OFFLINE[name]
    model, tokenizer = _model(command)
    cfg = RunConfig(output_dir=str(out), run_name=name, loss=loss,
                    train=TrainConfig(**_train_options(micro), **options))
    cfg.data.task_size, cfg.data.eval_size = 24, 6
    return train(cfg, command, model=model, tokenizer=tokenizer).run.path


def run_online(name: str, out: Path, micro: int | None):
    model, tokenizer = tiny_model_and_tokenizer(seed=0)
    cfg = config_from({"recipe": name if name in SELF_IMPROVING else name.split("-")[0], "output_dir": str(out),
                       "run_name": name, "comparisons": SELF_IMPROVING.get(name, {}),
                       "data": {"task": "arithmetic", "task_options": {"max_operand": 9}, "eval_size": 6},
                       "rollout": {"max_new_tokens": 4},
                       "train": {**_train_options(micro), "lr": 1e-2},
                       "rl": {"prompts_per_step": 4, "group_size": 2 if name == "ppo" else 4, **ONLINE.get(name, {})}})
    reward = (RewardModel(tiny_reward_model(tiny_model_and_tokenizer(seed=5)[0]), tokenizer) if name == "grpo-rm"
              else RuleReward(lambda prompt, completion, reference: float(len(completion))))  # varies from the start
    sources = {} if name in ("spin", "self-rewarding-lm") else {"reward": reward}   # no reward, or its own judge
    path = run_rl(cfg, model=model, tokenizer=tokenizer, **sources).run.path
    if distributed.active() and isinstance(reward, RewardModel):
        assert distributed.is_sharded(reward.model), "the reward model is sharded like the policy"
    return path


class Recorder:
    """First-step gradients (full tensors) and sampled token ids, per case."""

    def __init__(self):
        self.grads: dict[str, torch.Tensor] = {}
        self.tokens: list[list[int]] = []
        self.case = ""

    @contextlib.contextmanager
    def installed(self):
        apply, collect = Loop.apply_gradients, Collector.collect
        recorder = self

        def apply_gradients(loop):
            if not recorder.grads:
                for name, p in loop.container.named_parameters():
                    if p.grad is not None:
                        grad = p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
                        recorder.grads[name] = grad.detach().float().clone()
            return apply(loop)

        def collect_first(collector, policy, step, timer):
            exp, stats = collect(collector, policy, step, timer)
            if step == 0 and not recorder.tokens:
                recorder.tokens = [c.token_ids for c in exp.completions]
            return exp, stats

        Loop.apply_gradients, Collector.collect = apply_gradients, collect_first
        try:
            yield self
        finally:
            Loop.apply_gradients, Collector.collect = apply, collect


def run_cases(out: Path, micro: int | None, cases=CASES) -> None:
    """Run each case, writing OUT/NAME.grads.safetensors and OUT/NAME.tokens.rank-R.json."""
    with Recorder().installed() as recorder:
        for name in cases:
            recorder.grads, recorder.tokens = {}, []
            (run_offline if name in OFFLINE else run_online)(name, out / "runs", micro)
            if distributed.is_main():
                save_file({k: v.contiguous() for k, v in recorder.grads.items()}, out / f"{name}.grads.safetensors")
            (out / f"{name}.tokens.rank-{distributed.rank()}.json").write_text(json.dumps(recorder.tokens))


if __name__ == "__main__":
    torch.set_num_threads(1)
    distributed.init()
    run_cases(Path(sys.argv[1]), micro=1)
    distributed.shutdown()
