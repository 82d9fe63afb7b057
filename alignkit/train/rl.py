"""From a config to a finished online RL run: `alignkit rl --recipe NAME`.

A recipe is a named set of config defaults that reproduces one method (the paper index of
`alignkit rl --help`); a config file and dotted overrides go on top. Self-Rewarding PPO adds a
first stage: SFT on demonstrations, whose model becomes the policy, the reference and, against the
untouched base model, the reward.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch

from alignkit import distributed
from alignkit.config import ConfigError, build, merge, to_dict
from alignkit.data.records import PromptRecord
from alignkit.data.tokenize import Encoder, TokenizeConfig
from alignkit.judges.policy import self_judge
from alignkit.judges.templates import pairwise_messages
from alignkit.models.loading import ModelConfig, load_model_and_tokenizer
from alignkit.registry import Registry
from alignkit.rewards.transforms import ReferenceSampler, RunningNorm, Transformed
from alignkit.rollout import GENERATORS, SamplingConfig
from alignkit.sources import build_source
from alignkit.tasks import TASKS
from alignkit.train.comparisons import ComparisonConfig, ComparisonMethod, frozen_copies, reads_initial
from alignkit.train.loop import Loop, TrainConfig
from alignkit.train.online import OnlineMethod, RLConfig, make_critic
from alignkit.train.recipes import load_files, open_run, prepare_model
from alignkit.train.rundir import RunDir


@dataclass
class RLDataConfig:
    train: str | None = None        # prompt records (file, saved dataset or hub id); None: built-in task
    eval: str | None = None         # held-out prompts; default: `eval_fraction` of `train`
    eval_fraction: float = 0.1      # held out of `train` when no `eval` is given
    kind: str = "prompt"            # or "judgement": judge prompts with the gold verdict (Think-RM stage 2)
    columns: dict | None = None     # our field name -> column name in the data
    on_error: str = "raise"         # or "skip": drop bad records, report their count and examples
    max_record_chars: int = 1_000_000  # a record with more characters of text is a bad record (on_error)
    split: str = "train"            # the split of a saved dataset or hub dataset
    task: str = "arithmetic"        # built-in task used when `train` is empty
    task_options: dict = field(default_factory=dict)  # e.g. {max_operand: 9}
    task_size: int = 1000           # built-in task: training prompts
    eval_split: str = "eval"        # built-in task split evaluated on: "eval" (in-distribution) or "ood"
    eval_size: int = 100            # built-in task: held-out prompts
    judge_template: str = "pairwise"  # judgement data: the template judge prompts are rendered with
    seed: int = 0                   # built-in task generation and the held-out draw
    tokenize: TokenizeConfig = field(default_factory=TokenizeConfig)

    RANGES = {"eval_fraction": (0, 1), "task_size": (1, None), "eval_size": (0, None), "max_record_chars": (1, None)}


@dataclass
class RolloutConfig:
    backend: str = "transformers"   # or "vllm" (CUDA, optional extra)
    options: dict = field(default_factory=dict)   # backend arguments, e.g. batch_size
    max_new_tokens: int = 32        # completion length limit (tokens)
    temperature: float = 1.0        # 0: greedy
    top_p: float = 1.0              # nucleus sampling; 1: off
    top_k: int = 0                  # 0: off
    stop: list[str] = field(default_factory=list)   # a single string is one stop string

    RANGES = {"max_new_tokens": (1, None), "temperature": (0, None), "top_p": (0, 1), "top_k": (0, None)}

    def sampling(self) -> SamplingConfig:
        return SamplingConfig(self.max_new_tokens, self.temperature, self.top_p, self.top_k, tuple(self.stop))


RL_TRAIN_DEFAULTS = {"steps": 100, "lr": 1e-5, "schedule": "constant"}  # train.* defaults of an RL run


METHODS = ("policy-gradient", "comparisons")


@dataclass
class RLRunConfig:
    recipe: str | None = None       # a named method preset (alignkit rl --help lists them)
    method: str = "policy-gradient"  # or "comparisons": a self-improvement loop configured by comparisons.*
    model: ModelConfig = field(default_factory=ModelConfig)
    reference: str | None = None    # KL reference; default: the initial policy
    reward: str | dict | None = "task"     # reward source spec (docs/rewards.md); "task": the task's gold reward
    judge: str | dict | None = None        # pairwise judge spec; default for pairwise advantages: `reward` as BT
    eval_reward: str | dict | None = None  # held-out scoring; default: the task's gold reward, else `reward`
    data: RLDataConfig = field(default_factory=RLDataConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(**RL_TRAIN_DEFAULTS))
    rl: RLConfig = field(default_factory=RLConfig)
    comparisons: ComparisonConfig = field(default_factory=ComparisonConfig)
    sft: dict | None = None         # Self-Rewarding PPO stage 1: train.* options of an SFT run on demonstrations
    output_dir: str = "runs"        # where run directories go
    run_name: str | None = None     # default: rl-<time stamp>

    CHOICES = {"method": METHODS}


@dataclass
class RLResult:
    run: RunDir
    metrics: dict
    initial_metrics: dict
    loop: Loop
    method: OnlineMethod


RECIPES = Registry("RL recipe")


def _recipe(name: str, defaults: dict, **about) -> None:
    """Register a recipe: a function returning its config defaults."""
    RECIPES.register(name, **about)(lambda: copy.deepcopy(defaults))


_PPO = {"rl": {"advantage": "gae", "normalize_advantages": True, "kl_coef": 0.01, "kl_in": "reward",
               "ppo_epochs": 2, "mini_batches": 2, "critic_lr": 1e-4, "critic": "separate", "group_size": 1}}
_recipe("grpo", {"rl": {"advantage": "grpo", "aggregation": "seq-mean-token-mean"}},
        summary="group-normalised outcome rewards, clipped surrogate", paper="Shao et al. 2024, arXiv 2402.03300")
_recipe("dr-grpo", {"rl": {"advantage": "dr_grpo", "aggregation": "seq-mean-token-sum-norm"}},
        summary="GRPO without std scaling, constant-length aggregation", paper="Liu et al. 2025, arXiv 2503.20783")
_recipe("dapo", {"rl": {"advantage": "grpo", "aggregation": "token-mean", "clip_high": 0.28,
                        "dynamic_sampling": True, "overlong_buffer": 8}},
        summary="clip-higher, dynamic sampling, token-mean, overlong shaping", paper="Yu et al. 2025, arXiv 2503.14476")
_recipe("gspo", {"rl": {"advantage": "grpo", "importance_ratio": "sequence", "clip_low": 3e-4, "clip_high": 4e-4,
                        "aggregation": "seq-mean-token-mean"}},
        summary="sequence-level importance ratio", paper="Zheng et al. 2025, arXiv 2507.18071")
_recipe("rloo", {"rl": {"advantage": "rloo", "kl_coef": 0.05, "kl_in": "reward"}},
        summary="leave-one-out baseline, sequence KL in the reward", paper="Ahmadian et al. 2024, arXiv 2402.14740")
_recipe("reinforce-pp", {"rl": {"advantage": "reinforce_pp", "kl_coef": 0.01, "kl_in": "reward"}},
        summary="token returns with k1 KL in the reward, global whitening", paper="Hu et al. 2025, arXiv 2501.03262")
_recipe("reinforce-pp-baseline", {"rl": {"advantage": "reinforce_pp_baseline", "kl_coef": 0.01}},
        summary="group-mean baseline, global whitening, k3 KL loss", paper="Hu et al. 2025, arXiv 2501.03262")
_recipe("remax", {"rl": {"advantage": "remax"}},
        summary="the greedy completion's reward as the baseline", paper="Li et al. 2023, arXiv 2310.10505")
_recipe("ppo", _PPO, summary="GAE with a critic, clipped value loss, k1 KL in the reward",
        paper="Ouyang et al. 2022, arXiv 2203.02155")
_recipe("self-rewarding-ppo", {**_PPO, "reward": "srppo", "sft": {"epochs": 1, "lr": 3e-3, "batch_size": 32}},
        summary="SFT, then PPO on log pi_SFT - log pi_base at EOS (demonstrations only)",
        paper="Zhang et al. 2025, arXiv 2510.21090")
_recipe("pairwise-rlhf", {"rl": {"advantage": "pairwise", "preference_signal": "sign", "kl_coef": 1e-4,
                                 "aggregation": "seq-mean-token-mean"}},
        summary="GRPO-style advantages from a pairwise judge's verdicts", paper="Hong et al. 2025, arXiv 2505.16265")
_recipe("router-rlhf", {"rl": {"advantage": "pairwise_mean", "preference_signal": "logit"}},
        summary="RLOO from preference logits of an uncertainty-routed judge", paper="Xu et al. 2025, arXiv 2510.20369")
_recipe("think-rm", {"reward": "builtin:verdict_match", "data": {"kind": "judgement", "task": "cipher"},
                     "rl": {"advantage": "grpo", "kl_coef": 1e-4}},
        summary="Think-RM stage 2: RL of a generative judge on verdict correctness",
        paper="Hong et al. 2025, arXiv 2505.16265")



def _self_improving(name: str, comparisons: dict, rl: dict | None = None, **about) -> None:
    """A self-improvement loop: sample, judge, build comparisons, train (`comparisons.*`)."""
    _recipe(name, {"method": "comparisons", "comparisons": comparisons, "rl": {"group_size": 4, **(rl or {})},
                   **about.pop("extra", {})}, **about)


_ITERATIVE = {"steps_per_round": 8, "reference": "round"}
_self_improving("online-dpo", {"rule": "best-worst", "loss": "dpo"}, {"group_size": 2},
                summary="DPO on a fresh pair of policy samples per prompt each step, ranked by the reward or judge",
                paper="Guo et al. 2024, arXiv 2402.04792")
_self_improving("iterative-dpo", {**_ITERATIVE, "rule": "best-worst", "loss": "dpo"},
                summary="rounds of sample, rank, DPO against the round's starting policy (loss=ipo works too)",
                paper="Xu et al. 2023, arXiv 2312.16682; Xiong et al. 2023, arXiv 2312.11456")
_self_improving("self-rewarding-lm", {**_ITERATIVE, "rule": "best-worst", "loss": "dpo"},
                {"max_failure_rate": 1.0}, extra={"reward": "self"},
                summary="the policy scores its own samples with an additive 5-point rubric, then DPO each round",
                paper="Yuan et al. 2024, arXiv 2401.10020")
_self_improving("cream", {**_ITERATIVE, "rule": "best-worst", "loss": "cream", "ranking": "implicit",
                          "consistency": "avg"}, extra={"reward": None},
                summary="self-rewarding by the DPO implicit reward; Kendall consistency with the last iterate's "
                        "ranking smooths the labels", paper="Wang et al. 2024, arXiv 2410.12735")
_self_improving("spin", {**_ITERATIVE, "rule": "reference-vs-sample", "loss": "dpo"}, {"group_size": 1},
                extra={"reward": None},
                summary="demonstrations as chosen, the previous iterate's samples as rejected",
                paper="Chen et al. 2024, arXiv 2401.01335")
_self_improving("sppo", {**_ITERATIVE, "rule": "win-rate", "loss": "sppo", "loss_options": {"beta": 0.1}},
                {"group_size": 5},
                summary="squared loss of log pi/pi_t to eta (win rate - 1/2) for the best and worst of K samples",
                paper="Wu et al. 2024, arXiv 2405.00675")
_self_improving("dno", {**_ITERATIVE, "rule": "soft-pairs", "loss": "dno"},
                summary="regression to P(y beats y') against the current iterate (soft-label DPO, reference pi_t)",
                paper="Rosset et al. 2024, arXiv 2404.03715")
_self_improving("inpo", {**_ITERATIVE, "reference": "initial", "rule": "best-worst", "loss": "inpo"},
                summary="squared loss on binary pairs against both pi_ref and the current iterate",
                paper="Zhang et al. 2024, arXiv 2407.00617")
_self_improving("nash-md", {"rule": "against-alternative", "loss": "nash-md", "sampler": "mixture"},
                {"group_size": 2},
                summary="policy samples against samples of the geometric mixture with the reference; REINFORCE on "
                        "P(win) - 1/2 with a KL penalty", paper="Munos et al. 2023, arXiv 2312.00886")
_self_improving("raft", {"steps_per_round": 4, "rule": "best", "loss": "sft"},
                summary="best-of-N by the reward, then fine-tuning on the kept answers",
                paper="Dong et al. 2023, arXiv 2304.06767")
_self_improving("rest", {"steps_per_round": 8, "epochs": 2, "rule": "threshold", "loss": "sft",
                         "rule_options": {"threshold": 0.5}},
                summary="grow (sample) then improve (fine-tune on answers above a reward threshold), in rounds",
                paper="Gulcehre et al. 2023, arXiv 2308.08998")
_self_improving("rso", {"steps_per_round": 8, "sampler": "reference", "rule": "rso", "loss": "dpo"}, {"group_size": 8},
                summary="statistical rejection sampling from the initial policy towards the optimal policy, then DPO",
                paper="Liu et al. 2023, arXiv 2309.06657")

TRAIN_KEYS = tuple(f.name for f in dataclasses.fields(TrainConfig))


def split_options(options: dict) -> tuple[dict, dict]:
    """({train.* options}, {rl.* options}) of one flat dict of both."""
    return ({k: v for k, v in options.items() if k in TRAIN_KEYS},
            {k: v for k, v in options.items() if k not in TRAIN_KEYS})


def config_from(data: dict) -> RLRunConfig:
    """Recipe defaults, then `data` (a config file with overrides applied) on top."""
    moved = [k for k in (data.get("rl") or {}) if k in TRAIN_KEYS]
    if moved:
        raise ConfigError(f"rl.{moved[0]} is train.{moved[0]}: options every trainer shares live in train.* "
                          f"({', '.join(moved)})")
    recipe = data.get("recipe")
    defaults = merge({"train": RL_TRAIN_DEFAULTS}, RECIPES.get(recipe).fn() if recipe else {})
    return build(RLRunConfig, merge(defaults, data))


# ----- prompts: which records, and how they become prompts with a reference answer -----
PROMPT_DATA = Registry("RL prompt data")


@PROMPT_DATA.register("prompt", summary="prompts with an optional reference answer")
def _prompt_records(records: list, cfg: RLDataConfig) -> list[PromptRecord]:
    return records


@PROMPT_DATA.register("judgement", summary="judge prompts for (prompt, a, b); the reference is the gold verdict")
def _judge_prompts(records: list, cfg: RLDataConfig) -> list[PromptRecord]:
    return [PromptRecord(pairwise_messages(cfg.judge_template, r.prompt, r.a, r.b), r.verdict, r.index, r.origin)
            for r in records]


def _task_records(cfg: RLDataConfig, kind: str, n: int, seed: int, split: str) -> list:
    task = TASKS.get(cfg.task).fn(**cfg.task_options)
    maker = {"prompt": "prompts", "judgement": "judgements"}[kind]
    if not hasattr(task, maker):
        raise ConfigError(f"task {cfg.task!r} has no {kind} data")
    return getattr(task, maker)(n, seed, split=split)


def load_prompts(cfg: RLDataConfig) -> tuple[list[PromptRecord], list[PromptRecord]]:
    convert = PROMPT_DATA.get(cfg.kind).fn
    if cfg.train is None:
        return (convert(_task_records(cfg, cfg.kind, cfg.task_size, cfg.seed, "train"), cfg),
                convert(_task_records(cfg, cfg.kind, cfg.eval_size, cfg.seed + 10_000, cfg.eval_split), cfg))
    train, evaluation, _ = load_files(cfg, cfg.kind)
    return convert(train, cfg), convert(evaluation, cfg)


# ----- Self-Rewarding PPO stage 1 -----
def _self_rewarding_stage(cfg: RLRunConfig, base, tokenizer, run: RunDir):
    """SFT on demonstrations; returns (policy, reference, reward): log pi_SFT - log pi_base, normalised.

    The SFT model is kept in the run directory (`sft-model/`), so a resumed run reuses it.
    """
    from alignkit.rewards.implicit import ImplicitReward

    saved = run.path / "sft-model"
    if not (saved / "config.json").exists():
        sft_run = _sft(cfg, copy.deepcopy(base), tokenizer)
        if distributed.is_main():
            shutil.copytree(sft_run / "model", saved.with_name(".sft-model.tmp"), dirs_exist_ok=True)
            os.replace(saved.with_name(".sft-model.tmp"), saved)
        distributed.barrier()
    sft, frozen = (load_model_and_tokenizer(build(ModelConfig, {"name": str(saved), "dtype": cfg.model.dtype}))[0]
                   for _ in range(2))
    frozen.eval().requires_grad_(False)
    reward = ImplicitReward(frozen, base.eval().requires_grad_(False), tokenizer, tokenize=cfg.data.tokenize)
    return sft, frozen, Transformed(reward, RunningNorm())


def _sft(cfg: RLRunConfig, model, tokenizer):
    """Stage 1 on the run's own data: `data.train` as demonstrations (their prompts are the RL prompts),
    or the built-in task's demonstrations."""
    from alignkit.train.recipes import DataConfig, RunConfig, train

    shared = ("train", "eval", "eval_fraction", "columns", "on_error", "max_record_chars", "split", "task",
              "task_options", "task_size", "eval_size", "seed", "tokenize")   # the user's demonstrations, when given
    sft_cfg = RunConfig(model=cfg.model, data=DataConfig(**{key: getattr(cfg.data, key) for key in shared}),
                        train=build(TrainConfig, {"progress": cfg.train.progress,
                                                  "distributed": to_dict(cfg.train.distributed), **cfg.sft}),
                        output_dir=cfg.output_dir, run_name=f"{cfg.run_name}-sft" if cfg.run_name else None)
    return train(sft_cfg, "sft", model=model, tokenizer=tokenizer).run.path


def _sources(cfg: RLRunConfig, model, tokenizer, run: RunDir):
    """(policy, reference, reward, judge)."""
    if cfg.reward == "srppo":
        if not cfg.sft:
            raise ConfigError("reward=srppo needs the sft stage (use --recipe self-rewarding-ppo)")
        policy, reference, reward = _self_rewarding_stage(cfg, model, tokenizer, run)
        return policy, reference, reward, None
    reference = load_model_and_tokenizer(build(ModelConfig, {"name": cfg.reference}))[0] if cfg.reference else None
    reward = build_source(_default_task(cfg.reward, cfg)) if cfg.reward not in (None, "self") else cfg.reward
    judge = build_source(cfg.judge) if cfg.judge else None
    if judge is not None and not hasattr(judge, "compare"):
        raise ConfigError(f"judge {cfg.judge!r} is a pointwise reward source; pass it as reward= instead")
    return model, reference, reward, judge


def _needs_reference(cfg: RLRunConfig) -> bool:
    """Whether the run keeps a frozen copy of the initial policy: a KL term, or a loop that reads or samples it."""
    if cfg.method == "comparisons":
        return reads_initial(cfg.comparisons)
    return bool(cfg.rl.kl_coef)


def _default_task(spec, cfg: RLRunConfig):
    """"task" stands for the gold reward of the run's built-in task."""
    return {"kind": "task", "target": cfg.data.task, "task_options": cfg.data.task_options} if spec == "task" else spec


def _eval_reward(cfg: RLRunConfig, reward):
    if cfg.eval_reward:
        return build_source(_default_task(cfg.eval_reward, cfg))
    if cfg.data.train is None and cfg.data.kind == "prompt":
        return build_source(_default_task("task", cfg))
    return reward if cfg.reward not in ("srppo", "self") else None


def _bind_reference(cfg: RLRunConfig, sources, reference_policy, tokenizer) -> None:
    """Give reference transform steps (par, log_sigmoid) a sampler on a frozen copy of the reference policy.

    The copy is made before any training and stays unsharded: under torchrun each rank samples its own
    share of prompts locally, out of lockstep.
    """
    sampler = None
    for source in sources:
        if getattr(source, "needs_sampler", False):
            sampler = sampler or ReferenceSampler(
                copy.deepcopy(reference_policy).to(distributed.device()), tokenizer, sampling=cfg.rollout.sampling(),
                tokenize=cfg.data.tokenize, seed=cfg.train.seed, batch_size=cfg.rollout.options.get("batch_size", 64))
            source.bind_reference(sampler)


def scoring_models(*sources) -> list:
    """The models inside reward sources and judges that every rank calls on an equal share (each class names
    them in `shardable`), once each: under torchrun they are sharded like the policy."""
    found = {}
    for source in sources:
        for name in getattr(source, "shardable", ()):
            value = getattr(source, name)
            for item in value if isinstance(value, list) else [value]:
                models = [item] if isinstance(item, torch.nn.Module) else scoring_models(item)
                found.update((id(m), m) for m in models)
    return list(found.values())


def run_rl(cfg: RLRunConfig, resume: str | Path | None = None, model=None, tokenizer=None, *,
           reward=None, judge=None) -> RLResult:
    """Run online RL end to end; with `resume`, continue a killed run from its last checkpoint.

    `reward` (a RewardSource) or `judge` (a PairwiseJudge) objects, when given, replace the specs in `cfg`.
    """
    if resume and not (Path(resume) / "config.yaml").exists():
        raise FileNotFoundError(f"cannot resume {resume}: no config.yaml there")
    if not cfg.train.steps:
        raise ConfigError("train.steps must be set for online RL (RL steps)")
    if model is None:
        model, tokenizer = load_model_and_tokenizer(cfg.model)
    train_records, eval_records = load_prompts(cfg.data)
    encoder = Encoder(tokenizer, cfg.data.tokenize)
    encode = [encoder.encode(r.prompt) for r in train_records], [encoder.encode(r.prompt) for r in eval_records]
    run = open_run(cfg, "rl", resume, cfg.train.seed, [f for f in (cfg.data.train, cfg.data.eval) if f])
    if not resume:
        run.log({"step": 0, "event": "data", "train_prompts": len(train_records), "eval_prompts": len(eval_records),
                 "truncated": encoder.truncated})
    if reward is not None or judge is not None:
        policy, reference = model, None
    else:
        policy, reference, reward, judge = _sources(cfg, model, tokenizer, run)
    eval_reward = _eval_reward(cfg, reward)
    _bind_reference(cfg, (reward, eval_reward), policy if reference is None else reference, tokenizer)
    if reference is None and _needs_reference(cfg):
        reference = copy.deepcopy(policy)
    iterates = frozen_copies(policy, 2) if cfg.method == "comparisons" and cfg.comparisons.ranking == "implicit" else []
    critic, head = make_critic(policy, cfg.rl) if cfg.method == "policy-gradient" else (None, None)
    policy, critic, head = (prepare_model(m, cfg.train) if m is not None else None for m in (policy, critic, head))
    iterates = [prepare_model(m, cfg.train) for m in iterates]
    if reference is not None:
        reference = prepare_model(reference.requires_grad_(False), cfg.train)
    for frozen in scoring_models(reward, judge, eval_reward):
        if not distributed.is_sharded(frozen):
            prepare_model(frozen.requires_grad_(False), cfg.train)
    generator = GENERATORS.call(cfg.rollout.backend, policy, tokenizer, **cfg.rollout.options)
    if reward == "self":
        reward = self_judge(generator, encoder, seed=cfg.train.seed)
    common = {"steps": cfg.train.steps, "seed": cfg.train.seed, "micro_batch_size": cfg.train.micro_batch_size,
              "lr": cfg.train.lr, "reward": reward, "judge": judge, "reference": reference, "eval_prompts": encode[1],
              "eval_records": eval_records, "eval_reward": eval_reward}
    if cfg.method == "comparisons":
        method = ComparisonMethod(policy, tokenizer, generator, encode[0], train_records, cfg.rl,
                                  cfg.rollout.sampling(), comparisons=cfg.comparisons, encoder=encoder,
                                  iterates=iterates, **common)
    else:
        method = OnlineMethod(policy, tokenizer, generator, encode[0], train_records, cfg.rl, cfg.rollout.sampling(),
                              critic=critic, head=head, **common)
    loop = Loop(method, cfg.train, run)
    metrics = loop.fit(resume=bool(resume))
    return RLResult(run, metrics, loop.initial_metrics, loop, method)
