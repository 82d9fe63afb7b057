import pytest

from alignkit.config import ConfigError, apply_overrides, build, load_yaml
from alignkit.train import RunConfig


def test_yaml_plus_dotted_overrides_build_a_typed_config(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  lr: 0.001\n  batch_size: 4\nloss:\n  name: ipo\n")
    data = apply_overrides(load_yaml(path), ["train.lr=1e-5", "loss.beta=0.2", "model.tiny.hidden_size=32",
                                             "data.train=pairs.jsonl", "train.progress=false"])
    cfg = build(RunConfig, data)
    assert cfg.train.lr == 1e-5 and isinstance(cfg.train.lr, float)
    assert cfg.train.batch_size == 4 and cfg.train.progress is False
    assert cfg.loss == {"name": "ipo", "beta": 0.2}
    assert cfg.model.tiny.hidden_size == 32 and cfg.data.train == "pairs.jsonl"


def test_unknown_key_suggests_the_right_one():
    with pytest.raises(ConfigError, match=r"unknown config key 'train.lrr'; did you mean 'lr'"):
        build(RunConfig, {"train": {"lrr": 1}})


@pytest.mark.parametrize("data,message", [
    ({"train": {"steps": "many"}}, "train.steps must be int"),
    ({"train": {"batch_size": 2.5}}, "train.batch_size must be int"),
    ({"train": {"progress": "yes"}}, "train.progress must be bool"),
    ({"train": 3}, "train must be a mapping"),
    ({"train": {"lr": None}}, "train.lr may not be null"),
])
def test_wrong_types_name_the_key(data, message):
    with pytest.raises(ConfigError, match=message):
        build(RunConfig, data)


def test_bad_override_and_bad_yaml_are_clear(tmp_path):
    with pytest.raises(ConfigError, match="key.path=value"):
        apply_overrides({}, ["train.lr"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_yaml(bad)
    with pytest.raises(ConfigError, match="not found"):
        load_yaml(tmp_path / "missing.yaml")
