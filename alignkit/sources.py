"""Build any reward source or pairwise judge from a short spec, as a command line gives it.

The factory sits above both `rewards/` (reward protocols, reward models, rules, transforms) and
`judges/` (generative judges, which build on the reward protocols); neither imports it.

A spec is `KIND:TARGET[,key=value...]` or a YAML file holding a mapping with `kind`:

    rm:runs/reward-20261123-101500               scalar reward model (a run, checkpoint or model folder)
    rm:runs/rm-heads,aggregate=min               K-head reward model, worst-case aggregate
    pm:runs/pairwise-rm-20261123-1030            pairwise preference model (SNGP uncertainty)
    implicit:runs/dpo-1,baseline=runs/sft-1,beta=0.1
    rule:my_rewards.py:exact_match,timeout_s=5   a Python function (prompt, completion, reference) -> float
    rule:my_rewards.py:verify,isolation=process,memory_mb=512   ... run in killable worker processes
    builtin:verdict_match                         a built-in rule: exact_match or verdict_match
    task:arithmetic                               a built-in task's gold reward (its verifier)
    judge:http://127.0.0.1:8000,model=default    generative pairwise judge over HTTP
    judge:runs/judge-sft-1,swap=false            generative pairwise judge on a local model
    scorer:http://127.0.0.1:8000                 generative pointwise judge (scores 1..9)
    router.yaml                                  {kind: router, fast: SPEC, strong: SPEC, threshold: 1.4}
    shaped.yaml                                  {kind: transformed, source: SPEC, steps: [running_norm]}
    pms.yaml                                     {kind: judge_ensemble, members: [pm:run-a, pm:run-b]}

Values are read as YAML scalars (`true`, `0.1`, `null`). A nested spec (router, ensemble) is a
string spec or a mapping.
"""

from __future__ import annotations

from pathlib import Path

import yaml

from alignkit.registry import Registry

SOURCES = Registry("reward source kind")
BACKEND_OPTIONS = {"model", "timeout_s", "retries", "backoff_s", "max_concurrency", "cache", "api_key",
                   "extra_body", "batch_size"}


def parse_spec(spec: str | dict) -> dict:
    """The mapping a spec stands for: {"kind": ..., "target": ..., options}."""
    if isinstance(spec, dict):
        return dict(spec)
    if spec.endswith((".yaml", ".yml")) and Path(spec).is_file():
        data = yaml.safe_load(Path(spec).read_text())
        if not isinstance(data, dict) or "kind" not in data:
            raise ValueError(f"{spec}: a source file must hold a mapping with a 'kind'")
        return data
    kind, sep, rest = spec.partition(":")
    if not sep or not kind:
        kinds = ", ".join(SOURCES.names())
        raise ValueError(f"source {spec!r} must look like KIND:TARGET[,key=value...]; kinds: {kinds}")
    target, *pairs = _split_options(rest)
    options = {}
    for pair in pairs:
        key, eq, value = pair.partition("=")
        if not eq:
            raise ValueError(f"source {spec!r}: option {pair!r} is not key=value")
        options[key.strip()] = yaml.safe_load(value)
    return {"kind": kind, "target": target, **options}


def _split_options(text: str) -> list[str]:
    """TARGET,key=value,... where the target itself may contain commas only inside a URL query."""
    parts = text.split(",")
    target = [parts.pop(0)]
    while parts and "=" not in parts[0]:
        target.append(parts.pop(0))
    return [",".join(target), *parts]


def build_source(spec: str | dict):
    """A RewardSource or a PairwiseJudge for `spec` (see the module docstring)."""
    config = parse_spec(spec)
    kind = config.pop("kind")
    return SOURCES.call(kind, **config)


def _load(path: str, head: str = "causal_lm"):
    from alignkit.models.loading import ModelConfig, load_model_and_tokenizer

    return load_model_and_tokenizer(ModelConfig(name=path), head=head)


def _backend(target: str, options: dict):
    from alignkit.judges.backends import HTTPBackend, LocalBackend

    if target.startswith(("http://", "https://")):
        options.pop("batch_size", None)
        return HTTPBackend(target, **options)
    model, tokenizer = _load(target)
    return LocalBackend(model, tokenizer, **options)


def _split_backend(options: dict) -> tuple[dict, dict]:
    backend = {k: v for k, v in options.items() if k in BACKEND_OPTIONS}
    return backend, {k: v for k, v in options.items() if k not in BACKEND_OPTIONS}


@SOURCES.register("rm", summary="scalar (or K-head) reward model trained by `alignkit reward`")
def _reward_model(*, target: str, **options):
    from alignkit.rewards.models import RewardModel

    model, tokenizer = _load(target, head="reward")
    return RewardModel(model, tokenizer, **options)


@SOURCES.register("pm", summary="pairwise preference model trained by `alignkit pairwise-rm`")
def _preference_model(*, target: str, **options):
    from alignkit.rewards.preference_model import PreferenceModelJudge

    model, tokenizer = _load(target, head="pairwise")
    return PreferenceModelJudge(model, tokenizer, **options)


@SOURCES.register("implicit", summary="beta * (log pi_target - log pi_baseline): DPO's or SRPPO's reward")
def _implicit(*, target: str, baseline: str, **options):
    from alignkit.rewards.implicit import ImplicitReward

    model, tokenizer = _load(target)
    reference, _ = _load(baseline)
    return ImplicitReward(model, reference, tokenizer, **options)


@SOURCES.register("rule", summary="a Python function file.py:name: (prompt, completion, reference) -> float, or "
                  "TRL's (prompts, completions, completion_ids, **columns) -> list")
def _rule(*, target: str, **options):
    from alignkit.rewards.rules import BatchRuleReward, RuleReward, is_batch_function, load_rule

    fn = load_rule(target)   # per sample (prompt, completion, reference), or TRL's batch signature
    return (BatchRuleReward if is_batch_function(fn) else RuleReward)(fn, **options)


@SOURCES.register("builtin", summary="a built-in rule: exact_match, or verdict_match (Think-RM stage 2)")
def _builtin(*, target: str, **options):
    from alignkit.judges.templates import verdict_match
    from alignkit.rewards.rules import RuleReward, exact_match

    builtin = {"exact_match": exact_match, "verdict_match": verdict_match}
    if target not in builtin:
        raise ValueError(f"unknown built-in rule {target!r}; known: {', '.join(sorted(builtin))}")
    return RuleReward(builtin[target], **options)


@SOURCES.register("task", summary="the gold reward of a built-in task (e.g. task:arithmetic, its verifier)")
def _task(*, target: str, task_options: dict | None = None, **options):
    from alignkit.rewards.rules import RuleReward
    from alignkit.tasks import TASKS

    task = TASKS.get(target).fn(**(task_options or {}))
    return RuleReward(lambda prompt, completion, reference: task.gold_reward(prompt, completion), **options)


@SOURCES.register("judge", summary="generative pairwise judge: an HTTP endpoint or a local model")
def _judge(*, target: str, **options):
    from alignkit.judges.generative import GenerativeJudge

    backend, judge = _split_backend(options)
    return GenerativeJudge(_backend(target, backend), **judge)


@SOURCES.register("scorer", summary="generative pointwise judge (a score per answer): HTTP or local")
def _scorer(*, target: str, **options):
    from alignkit.judges.generative import GenerativeScorer

    backend, scorer = _split_backend(options)
    return GenerativeScorer(_backend(target, backend), **scorer)


@SOURCES.register("router", summary="fast judge, deferring uncertain pairs to a strong judge (YAML spec)")
def _router(*, fast, strong, **options):
    from alignkit.rewards.base import RewardComparison
    from alignkit.rewards.routing import UncertaintyRouter

    def judge(spec):
        source = build_source(spec)
        return source if hasattr(source, "compare") else RewardComparison(source)

    return UncertaintyRouter(judge(fast), judge(strong), **options)


@SOURCES.register("transformed", summary="a source whose scores pass through transforms (YAML spec)")
def _transformed(*, source, steps):
    """steps: [running_norm, {clip: {low: -5, high: 5}}, {par: {m: 4}}, ...]; par and log_sigmoid score
    reference-policy samples with `source`, from a sampler that `alignkit rl` binds (elsewhere they raise)."""
    from alignkit.rewards.transforms import Transformed, build_steps

    return Transformed(build_source(source), *build_steps(steps))


@SOURCES.register("judge_ensemble", summary="K pairwise judges: mean logit, std of logits as uncertainty (YAML)")
def _judge_ensemble(*, members):
    from alignkit.rewards.base import RewardComparison
    from alignkit.rewards.preference_model import PreferenceEnsemble

    judges = [build_source(m) for m in members]
    return PreferenceEnsemble([j if hasattr(j, "compare") else RewardComparison(j) for j in judges])


@SOURCES.register("ensemble", summary="K reward sources aggregated by mean, min or mean minus k std (YAML spec)")
def _ensemble(*, members, **options):
    from alignkit.rewards.models import Ensemble

    return Ensemble([build_source(m) for m in members], **options)
