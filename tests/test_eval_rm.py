"""`alignkit eval-rm` and source specs: every kind of source, on files written here."""

import json
import math

import pytest
import torch

from alignkit.cli import main
from alignkit.data.records import BestOfN, Comparison
from alignkit.evaluation.cli import load_eval_records
from alignkit.evaluation.rm import best_of_n_scores, evaluate, score_pairs
from alignkit.models.loading import resolve_model_path
from alignkit.models.tiny import tiny_model_and_tokenizer
from alignkit.rewards import CallStats, ImplicitReward, Preference, RuleReward
from alignkit.sources import SOURCES, build_source, parse_spec

RULES = '''
def length(prompt, completion, reference):
    return float(len(completion))

def picky(prompt, completion, reference):
    if "bad" in completion:
        raise ValueError("refuses to score")
    return 1.0
'''


@pytest.fixture
def rules(tmp_path):
    path = tmp_path / "rules.py"
    path.write_text(RULES)
    return path


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture
def pairs_file(tmp_path):
    rows = [
        {"prompt": "q1", "chosen": "a long good answer", "rejected": "short", "subset": "alpacaeval-easy"},
        {"prompt": "q2", "chosen": "tiny", "rejected": "a long bad answer", "subset": "alpacaeval-easy"},
        {"prompt": "q3", "chosen": "longer one", "rejected": "short", "subset": "donotanswer"},
        {"prompt": "q4", "chosen": "ok", "rejected": "no", "subset": "donotanswer"},
    ]
    return write_jsonl(tmp_path / "pairs.jsonl", rows)


class AlwaysA:
    """A maximally position-biased pairwise judge."""

    def __init__(self):
        self.stats = CallStats()

    def compare(self, prompts, a, b):
        return Preference(torch.ones(len(prompts)))


def test_parse_spec_reads_targets_options_and_yaml(tmp_path):
    assert parse_spec("rule:f.py:fn,timeout_s=5,on_error=raise") == {
        "kind": "rule", "target": "f.py:fn", "timeout_s": 5, "on_error": "raise"}
    assert parse_spec("judge:http://h:1/v1,swap=false")["swap"] is False
    router = tmp_path / "router.yaml"
    router.write_text("kind: router\nfast: rm:x\nstrong: judge:http://h:1\nthreshold: 1.2\n")
    assert parse_spec(str(router))["threshold"] == 1.2
    with pytest.raises(ValueError, match="KIND:TARGET"):
        parse_spec("nothing")
    with pytest.raises(KeyError, match="unknown reward source kind 'nope'"):
        build_source("nope:x")
    assert {"rm", "pm", "implicit", "rule", "judge", "scorer", "router", "ensemble"} <= set(SOURCES.names())


def test_a_scalar_source_is_scored_exactly(pairs_file, rules):
    records = load_eval_records(str(pairs_file))
    report, probs = evaluate(build_source(f"rule:{rules}:length"), records)
    assert report["accuracy"] == 0.5     # pair 2 prefers the longer, rejected answer; pair 4 ties (wrong)
    assert report["subsets"]["alpacaeval-easy"] == {"accuracy": 0.5, "count": 2}
    assert report["length_bias"]["accuracy_longer_rejected"] == 0.0
    assert report["length_bias"]["accuracy_longer_chosen"] == 1.0
    assert report["length_bias"]["length_correlation"] == pytest.approx(1.0)
    expected = [1 / (1 + math.exp(-d)) for d in (13, -13, 5, 0)]
    assert probs.tolist() == pytest.approx(expected)
    assert report["rewardbench_v1"]["sections"] == {"Chat": 0.5, "Safety": 0.5}


def test_failures_count_as_wrong_and_are_reported(pairs_file, rules):
    report, _ = evaluate(build_source(f"rule:{rules}:picky"), load_eval_records(str(pairs_file)))
    assert report["failed"] == 1 and report["accuracy"] == 0.0   # the rest tie at 1.0: ties are wrong
    assert report["source_metrics"]["source/failures"] == 1


def test_a_position_biased_judge_scores_chance_not_perfect():
    pairs = [Comparison("q", f"good {i}", f"bad {i}") for i in range(200)]
    result = score_pairs(AlwaysA(), pairs, seed=3)
    accuracy = (result.probs > 0.5).float().mean().item()
    assert 0.4 < accuracy < 0.6
    assert score_pairs(AlwaysA(), pairs, seed=3).probs.tolist() == result.probs.tolist()   # seeded


def test_best_of_n_sets_use_rewardbench2_credit(tmp_path, rules):
    rows = [
        {"prompt": "q", "chosen": ["the longest answer"], "rejected": ["a", "bb", "ccc"], "subset": "Focus"},
        {"prompt": "q", "chosen": ["tie"], "rejected": ["abc", "xy", "z"], "subset": "Focus"},     # 2-way tie: 1/2
        {"prompt": "q", "chosen": ["x"], "rejected": ["longer", "yy", "zz"], "subset": "Math"},
    ]
    records = load_eval_records(str(write_jsonl(tmp_path / "bon.jsonl", rows)))
    assert isinstance(records[0], BestOfN)
    report, probs = evaluate(build_source(f"rule:{rules}:length"), records)
    assert probs is None
    assert report["rewardbench_v2"]["subsets"]["Focus"]["score"] == 0.75
    assert report["rewardbench_v2"]["subsets"]["Math"]["score"] == 0.0
    assert report["accuracy"] == 0.375                            # unweighted mean over subsets


def test_a_pairwise_judge_ranks_best_of_n_by_its_mean_preference():
    record = BestOfN("q", ("good",), ("bad", "worse"))
    assert best_of_n_scores(AlwaysA(), record) == [1.0, 0.5, 0.0]


def test_implicit_and_reward_model_sources_load_from_saved_folders(tmp_path, pairs_file):
    policy, tokenizer = tiny_model_and_tokenizer(seed=1)
    base, _ = tiny_model_and_tokenizer(seed=2)
    for name, model in (("policy", policy), ("base", base)):
        model.save_pretrained(tmp_path / name)
        tokenizer.save_pretrained(tmp_path / name)
    source = build_source(f"implicit:{tmp_path / 'policy'},baseline={tmp_path / 'base'},beta=0.5")
    records = load_eval_records(str(pairs_file))
    report, probs = evaluate(source, records)
    direct = ImplicitReward(policy, base, tokenizer, beta=0.5)
    chosen = direct.score([r.prompt for r in records], [r.chosen for r in records]).values.double()
    rejected = direct.score([r.prompt for r in records], [r.rejected for r in records]).values.double()
    assert probs.tolist() == pytest.approx(torch.sigmoid(chosen - rejected).tolist(), abs=1e-5)
    assert report["pairs"] == 4


def test_resolve_model_path_finds_a_runs_final_model(tmp_path):
    from alignkit.models.loading import ModelLoadError

    run = tmp_path / "run"
    (run / "checkpoints" / "step-0000005").mkdir(parents=True)
    with pytest.raises(ModelLoadError, match="no final model yet"):
        resolve_model_path(str(run))
    (run / "model").mkdir()
    assert resolve_model_path(str(run)) == str(run / "model")
    assert resolve_model_path(str(run / "model")) == str(run / "model")
    assert resolve_model_path("some/hub-id") == "some/hub-id"


def test_cli_prints_json_with_agreement(pairs_file, rules, capsys):
    code = main(["eval-rm", str(pairs_file), "--source", f"rule:{rules}:length", "--source",
                 f"rule:{rules}:picky", "--json"])
    assert code == 0
    out = json.loads(capsys.readouterr().out)
    assert [s["accuracy"] for s in out["sources"]] == [0.5, 0.0]
    assert out["agreement"][0]["agreement"] == 0.25


def test_cli_tables_and_clear_errors(pairs_file, rules, capsys):
    assert main(["eval-rm", str(pairs_file), "--source", f"rule:{rules}:length"]) == 0
    out = capsys.readouterr().out
    assert "accuracy" in out and "RewardBench v1 sections" in out and "longer answer rejected" in out
    assert main(["eval-rm", str(pairs_file), "--source", "rule:missing.py:fn"]) == 2
    assert "not found" in capsys.readouterr().err


def test_router_from_a_yaml_spec(tmp_path, pairs_file, rules):
    spec = tmp_path / "router.yaml"
    spec.write_text(f"kind: router\nfast: {{kind: ensemble, members: ['rule:{rules}:length', 'rule:{rules}:picky']}}\n"
                    f"strong: rule:{rules}:length\nthreshold: 100\n")
    router = build_source(str(spec))
    report, _ = evaluate(router, load_eval_records(str(pairs_file)))
    # picky fails on pair 2's rejected answer, so that pair is routed to the strong judge whatever the threshold.
    assert report["source_metrics"]["source/judge_calls"] == 1
    assert report["pairs"] == 4


def test_rule_reward_from_the_command_line_survives_a_hanging_function(tmp_path, pairs_file):
    slow = tmp_path / "slow.py"
    slow.write_text("import time\ndef wait(prompt, completion, reference):\n    time.sleep(30)\n    return 1.0\n")
    source = build_source(f"rule:{slow}:wait,timeout_s=0.05")
    assert isinstance(source, RuleReward)
    report, probs = evaluate(source, load_eval_records(str(pairs_file)))
    # every call timed out: the source is marked failed, with no accuracy (it used to report 0.0 as a result)
    assert report["status"] == "failed" and "accuracy" not in report and probs is None
    assert report["source_metrics"]["source/timeouts"] == 8 and "timed out" in report["errors"][0]


def test_transforms_compose_on_any_source_from_a_yaml_spec(tmp_path, pairs_file, rules):
    spec = tmp_path / "shaped.yaml"
    spec.write_text(f"kind: transformed\nsource: rule:{rules}:length\n"
                    "steps: [{length_penalty: {alpha: 2.0}}, {clip: {low: -10, high: 10}}, running_norm]\n")
    source = build_source(str(spec))
    scores = source.score(["q", "q"], ["abc", "a" * 30])
    raw = torch.tensor([-3.0, -10.0])                            # 3 - 2*3, and 30 - 60 clipped to -10
    assert scores.values.tolist() == pytest.approx(((raw - raw.mean()) / raw.std(unbiased=False)).tolist(), abs=1e-6)
    report, _ = evaluate(build_source(str(spec)), load_eval_records(str(pairs_file)))
    assert report["accuracy"] == 0.25                            # the penalty now prefers the shorter answers
    with pytest.raises(KeyError, match="unknown reward transform"):
        build_source({"kind": "transformed", "source": f"rule:{rules}:length", "steps": ["square"]})


def test_judge_ensemble_spec_spreads_its_members_logits(rules):
    ensemble = build_source({"kind": "judge_ensemble", "members": [f"rule:{rules}:length", f"rule:{rules}:picky"]})
    preference = ensemble.compare(["q"], ["abcd"], ["ab"])
    # length: sigmoid(4 - 2) -> logit 2; picky: both score 1 -> logit 0. Mean 1, std 1.
    assert preference.probs.tolist() == pytest.approx([1 / (1 + math.exp(-1))], abs=1e-6)
    assert preference.uncertainty.tolist() == pytest.approx([1.0], abs=1e-5)


def test_a_dead_judge_server_is_a_failed_source_and_a_non_zero_exit(pairs_file, rules, capsys):
    import socket

    with socket.socket() as s:   # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    code = main(["eval-rm", str(pairs_file), "--source", f"rule:{rules}:length",
                 "--source", f"judge:http://127.0.0.1:{port},retries=1,timeout_s=1"])
    out, err = capsys.readouterr()
    assert code == 1 and "FAILED, every call failed (4 records)" in out and "accuracy" not in out.split("FAILED")[1]
    assert f"every call of judge:http://127.0.0.1:{port},retries=1,timeout_s=1 failed" in err
