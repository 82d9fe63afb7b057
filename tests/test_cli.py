import json
import subprocess

import pytest

from alignkit.algorithms import PREFERENCE_LOSSES, UNPAIRED_LOSSES
from alignkit.cli import main

SMALL = ["data.task_size=32", "data.eval_size=8", "train.steps=2", "train.batch_size=4"]


def test_help_lists_every_loss_with_its_paper(capsys):
    with pytest.raises(SystemExit) as stop:
        main(["preference", "--help"])
    assert stop.value.code == 0
    text = capsys.readouterr().out
    for entry in [*PREFERENCE_LOSSES, *UNPAIRED_LOSSES]:
        assert entry.name in text and entry.paper.split(",")[0] in text


def test_sft_prints_run_directory_and_summary(tmp_path, capsys):
    assert main(["sft", "--model", "tiny", f"output_dir={tmp_path}", *SMALL]) == 0
    out = capsys.readouterr().out
    run = next(tmp_path.glob("sft-*"))
    assert f"run directory: {run}" in out
    assert "final evaluation" in out and "eval/loss" in out
    config = (run / "config.yaml").read_text()
    assert "command: sft" in config and "steps: 2" in config
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["packages"]["torch"] and manifest["seed"] == 0


def test_dpo_from_a_jsonl_file_with_a_bad_record(tmp_path, capsys):
    path = tmp_path / "pairs.jsonl"
    good = [{"prompt": f"{c}=", "chosen": "ab", "rejected": "ba"} for c in "abcdefgh"]
    lines = [json.dumps(r) for r in good[:3]] + ['{"prompt": "x=", "chosen": "a"}'] + [json.dumps(r) for r in good[3:]]
    path.write_text("\n".join(lines) + "\n")
    args = ["dpo", "--model", "tiny", f"output_dir={tmp_path}", f"data.train={path}", "data.eval_fraction=0.25",
            "train.steps=2", "train.batch_size=2"]
    assert main(args) == 2
    assert f"{path}, line 4, field 'rejected': missing" in capsys.readouterr().err
    assert not list(tmp_path.glob("preference-*")), "no run directory for a run that never started"
    assert main([*args, "data.on_error=skip"]) == 0
    out = capsys.readouterr().out
    assert "skipped 1" in out
    run = next(tmp_path.glob("preference-*"))
    data = json.loads((run / "manifest.json").read_text())["data"]
    assert str(path) in data and len(data[str(path)]) == 64


@pytest.mark.parametrize("args,message", [
    (["preference", "--loss", "nope"], "unknown preference loss 'nope'"),
    (["sft", "train.lrr=1"], "did you mean 'lr'"),
    (["preference", "loss.betta=1"], "takes no option"),
    (["sft", "data.train=/does/not/exist.jsonl"], "file not found"),
    (["sft", "--resume", "/does/not/exist"], "config.yaml"),
    (["sft", "data.task=language", "data.eval_split=test"], "unknown task split 'test'"),
])
def test_bad_input_gives_a_one_line_error(tmp_path, capsys, args, message):
    assert main([*args, f"output_dir={tmp_path}", *SMALL] if "--resume" not in args else args) == 2
    assert message in capsys.readouterr().err


def test_an_unknown_experiment_is_a_one_line_error_listing_the_experiments(tmp_path, capsys):
    assert main(["experiment", "nope", "--output-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "nope" in err and "overoptimization" in err and not list(tmp_path.iterdir())


def test_demo_console_script_runs_the_main_job(tmp_path):
    out = subprocess.run(["alignkit", "demo", "--quick", "--output-dir", str(tmp_path)],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "Self-Rewarding PPO" in out.stdout and "report:" in out.stdout
    (demo,) = tmp_path.glob("demo-*")
    evaluation = json.loads((demo / "evaluation.json").read_text())
    gold = {row[0]: dict(zip(evaluation["columns"], row, strict=True))["gold"] for row in evaluation["rows"]}
    assert gold["SFT"] > gold["base"] + 0.1
    for method in ("DPO", "GRPO on RM", "Self-Rewarding PPO"):
        assert gold[method] > gold["SFT"], (method, gold)
    assert sorted(p.name for p in demo.iterdir() if (p / "metrics.jsonl").exists()) == [
        "1-base", "2-sft", "3-reward-model", "4-dpo", "5-grpo", "6-self-rewarding-ppo"]
    assert "<svg" in (demo / "report.html").read_text()


def test_top_level_help_lists_every_command(capsys):
    """argparse %-formats help strings: a summary with '95%' used to crash `alignkit --help`."""
    with pytest.raises(SystemExit) as done:
        main(["--help"])
    assert done.value.code == 0
    out = capsys.readouterr().out
    assert all(name in out for name in ("sft", "dpo", "rl", "experiment", "report")) and "95% CIs" in out


@pytest.mark.parametrize("command, bad, message", [
    ("sft", "train.steps=-3", "train.steps must be >= 1"),
    ("sft", "train.batch_size=0", "train.batch_size must be >= 1"),
    ("sft", "train.precision=fp8", "train.precision must be one of auto, fp32, bf16"),
    ("dpo", "loss.beta=nan", "loss must hold finite numbers"),
    ("rl", "rl.aggregation=token-sum", "rl.aggregation must be one of"),
    ("rl", "rollout.top_p=1.5", "rollout.top_p must be >= 0 and <= 1"),
])
def test_bad_values_fail_before_a_run_directory_exists(tmp_path, capsys, command, bad, message):
    assert main([command, "--model", "tiny", f"output_dir={tmp_path}", bad]) == 2
    assert message in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == [], "no run directory for an invalid config"


def test_a_single_stop_string_is_one_stop_string():
    from alignkit.config import apply_overrides, build
    from alignkit.train.rl import RLRunConfig

    cfg = build(RLRunConfig, apply_overrides({}, ["rollout.stop=</s>"]))
    assert cfg.rollout.stop == ["</s>"]


def test_every_command_has_help_and_training_commands_list_their_keys(capsys):
    from alignkit.cli import COMMANDS, _import
    from alignkit.config import describe

    for entry in COMMANDS:
        with pytest.raises(SystemExit) as done:
            main([entry.name, "--help"])
        assert done.value.code == 0, entry.name
        out = capsys.readouterr().out
        if "config" in entry.meta:
            assert "configuration keys" in out, entry.name
            keys = [key for key, *_ in describe(_import(entry.meta["config"]))]
            assert "model.attn_implementation" in keys, entry.name
            for key in keys:
                assert key in out, (entry.name, key)
    with pytest.raises(SystemExit):
        main(["rl", "--help"])
    rl_help = capsys.readouterr().out
    assert "rl.kl_coef" in rl_help and "rollout.stop" in rl_help and "float = 0.0" in rl_help


def test_config_prints_the_resolved_defaults_as_yaml_that_builds_the_same_config(capsys):
    import yaml

    from alignkit.train.rl import config_from

    assert main(["config", "rl", "recipe=ppo", "train.lr=1e-6"]) == 0
    data = yaml.safe_load(capsys.readouterr().out)
    assert data["rl"]["advantage"] == "gae" and data["train"]["lr"] == 1e-6
    assert config_from(data) == config_from({"recipe": "ppo", "train": {"lr": 1e-6}})
    assert main(["config", "serve"]) == 2
    assert "takes no configuration" in capsys.readouterr().err
