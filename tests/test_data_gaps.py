"""Data the trainers used to mishandle: chat-message comparisons for the pairwise preference model, the
trained-token mask of KTO's mismatched pairs, in-memory sources, and absurdly large records."""

import json

import pytest

from alignkit.config import ConfigError, build
from alignkit.data import Encoder, TokenizeConfig, load_records
from alignkit.data.loaders import DataError
from alignkit.data.records import parse_comparison
from alignkit.models import PairEncoder, PairwiseConfig, PreferenceModel, completion_logprobs, tiny_model_and_tokenizer
from alignkit.train import RunConfig, train
from alignkit.train.objectives import RatedExample, UnpairedObjective
from alignkit.train.recipes import DataConfig, load_files
from alignkit.train.rl import RLDataConfig

USER = {"role": "user", "content": "Sky?"}
BLUE, GREEN = {"role": "assistant", "content": "Blue."}, {"role": "assistant", "content": "Green."}
CALL = {"type": "function", "function": {"name": "weather", "arguments": {"city": "Oslo"}}}
TOOL_TURNS = [{"role": "assistant", "content": None, "tool_calls": [CALL]},
              {"role": "tool", "name": "weather", "content": "rain"}, {"role": "assistant", "content": "Grey."}]
PAIRS = [{"prompt": f"{i}+1=", "chosen": str(i + 1), "rejected": str(i + 2)} for i in range(6)]


def _decoded(tok, encoded) -> str:
    return tok.decode(encoded.prompt + encoded.completion)


# ----- the pairwise preference model reads TRL's conversational comparisons -----
@pytest.mark.parametrize("row", [{"prompt": [USER], "chosen": [BLUE], "rejected": [GREEN]},
                                 {"chosen": [USER, BLUE], "rejected": [USER, GREEN]}],
                         ids=["explicit-prompt", "implicit-prompt"])
def test_a_conversational_comparison_is_the_sequence_of_its_text_form(row):
    _, tok = tiny_model_and_tokenizer(chat_template=True)
    pairs = PairEncoder(tok)
    record = parse_comparison(row)
    assert pairs.encode(record.prompt, record.chosen, record.rejected) == pairs.encode("Sky?", "Blue.", "Green.")


def test_message_completions_are_written_as_role_lines_with_their_tool_calls():
    _, tok = tiny_model_and_tokenizer(chat_template=True)
    record = parse_comparison({"prompt": [{"role": "system", "content": "Be brief."}, USER],
                               "chosen": TOOL_TURNS, "rejected": [GREEN]})
    assert _decoded(tok, PairEncoder(tok).encode(record.prompt, record.chosen, record.rejected)) == (
        "<|user|>system: Be brief.\nuser: Sky?\n[assistant_1]\nassistant: " + json.dumps([CALL])
        + "\ntool: rain\nassistant: Grey.\n[assistant_2]\nGreen.<|assistant|></s>")


def test_pairwise_rm_trains_on_conversational_comparisons(tmp_path):
    rows = [{"chosen": [{"role": "user", "content": f"{i}+1="}, {"role": "assistant", "content": str(i + 1)}],
             "rejected": [{"role": "user", "content": f"{i}+1="}, {"role": "assistant", "content": str(i + 2)}]}
            for i in range(8)]
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    lm, tok = tiny_model_and_tokenizer(chat_template=True)
    cfg = build(RunConfig, {"output_dir": str(tmp_path), "data": {"train": str(path), "eval_fraction": 0.25},
                            "train": {"steps": 1, "batch_size": 2, "progress": False}})
    result = train(cfg, "pairwise-rm", model=PreferenceModel.from_causal_lm(lm, PairwiseConfig(features=16)),
                   tokenizer=tok)
    as_text = {f"<|user|>{i}+1=\n[assistant_1]\n{i + 1}\n[assistant_2]\n{i + 2}<|assistant|></s>" for i in range(8)}
    assert {_decoded(tok, e.forward) for e in result.method.objective.splits["train"]} < as_text
    assert "eval/symmetric_accuracy" in result.metrics


# ----- KTO's mismatched pairs keep the completion's trained-token mask -----
def _rated(encoder, prompt: str, turns: list[dict]) -> RatedExample:
    return RatedExample(encoder.encode(prompt, turns), True, encoder.cfg.max_length)


MULTI_TURN = [{"role": "assistant", "content": "a1"}, {"role": "user", "content": "u2"},
              {"role": "assistant", "content": "a2"}]


@pytest.mark.parametrize("max_length", [512, 24], ids=["whole", "cut"])
def test_a_mismatched_pair_scores_exactly_the_trained_tokens_of_the_borrowed_completion(max_length):
    """The user turn inside a multi-turn completion is context in the pair as in its own example; with a short
    max_length the completion (and its mask) is cut to fit after the other, longer prompt."""
    model, tok = tiny_model_and_tokenizer(chat_template=True)
    encoder = Encoder(tok, TokenizeConfig(max_length=max_length, max_prompt_length=16))
    examples = [_rated(encoder, "a long prompt here", [{"role": "assistant", "content": "x"}]),
                _rated(encoder, "hi", MULTI_TURN)]
    borrowed = examples[1].encoded
    assert 0 in borrowed.mask
    objective = UnpairedObjective({"train": examples, "eval": []}, tok.pad_token_id, {"name": "kto"})
    objective.plan_steps(lambda step: [0, 1], 1)
    pair = next(p for p in objective.splits["train.mismatched"] if (p.prompt_of, p.completion_of) == (0, 1))
    kept = len(pair.encoded.completion)
    assert len(pair.encoded) <= max_length and (kept < len(borrowed.completion)) == (max_length == 24)
    assert pair.encoded.completion == borrowed.completion[:kept]
    assert pair.encoded.mask == borrowed.mask[:kept]
    _, scored = completion_logprobs(model, [pair.encoded], tok.pad_token_id)
    assert scored.tolist() == [sum(borrowed.mask[:kept])]


# ----- in-memory sources -----
def test_a_list_of_dicts_loads_with_rows_counted_from_zero():
    result = load_records([PAIRS[0], {"prompt": "x"}, 7, PAIRS[1]], "comparison", on_error="skip")
    assert [r.origin for r in result.records] == ["<list>:row 0", "<list>:row 3"]
    assert [str(e) for e in result.errors] == ["<list>, row 1, field 'chosen': missing",
                                               "<list>, row 2: expected a dict, got int"]


def test_a_dataset_loads_like_the_list_it_was_made_from():
    datasets = pytest.importorskip("datasets")
    from_list = load_records(PAIRS, "comparison").records
    from_dataset = load_records(datasets.Dataset.from_list(PAIRS), "comparison").records
    assert [(r.prompt, r.chosen, r.rejected) for r in from_dataset] == [(r.prompt, r.chosen, r.rejected)
                                                                         for r in from_list]
    assert from_dataset[2].origin == "<Dataset>:row 2"
    splits = datasets.DatasetDict({"train": datasets.Dataset.from_list(PAIRS[:2]),
                                   "test": datasets.Dataset.from_list(PAIRS[2:])})
    assert len(load_records(splits, "comparison", split="test").records) == 4
    with pytest.raises(DataError, match="no split 'dev'; it has train, test"):
        load_records(splits, "comparison", split="dev")


def test_a_source_of_another_type_is_a_clear_error():
    with pytest.raises(TypeError, match="a path, a hub id, a list of dicts or a datasets.Dataset, got dict"):
        load_records({"data": PAIRS}, "comparison")


# ----- absurd records are bad records -----
HUGE = {"prompt": "p", "chosen": "a" * 2_000_000, "rejected": "b"}


def _jsonl(tmp_path, rows) -> str:
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def test_a_record_over_max_record_chars_raises_with_its_line_and_size(tmp_path):
    path = _jsonl(tmp_path, [PAIRS[0], HUGE, PAIRS[1]])
    with pytest.raises(DataError) as caught:
        load_records(path, "comparison")
    assert str(caught.value) == f"{path}, line 2: a record of 2,000,002 characters, more than " \
                                "data.max_record_chars=1,000,000"


def test_skip_drops_and_counts_records_over_the_limit_chat_messages_included(tmp_path):
    chat = {"prompt": [{"role": "user", "content": "q" * 30}], "chosen": "a", "rejected": "b"}
    result = load_records([PAIRS[0], chat, PAIRS[1]], "comparison", on_error="skip", max_record_chars=20)
    assert len(result.records) == 2 and result.skipped == 1
    assert "skipped 1 bad one; first: <list>, row 1: a record of 36 characters" in result.summary()  # "user" counts too


@pytest.mark.parametrize("config", [DataConfig, RLDataConfig])
def test_max_record_chars_is_a_checked_data_setting(tmp_path, config):
    with pytest.raises(ConfigError, match="max_record_chars must be >= 1"):
        build(config, {"max_record_chars": 0})
    cfg = build(config, {"train": _jsonl(tmp_path, PAIRS), "eval_fraction": 0, "max_record_chars": 6})
    train_records, _, _ = load_files(cfg, "comparison")
    assert len(train_records) == 6  # each 6 characters ("0+1=", "1", "2"): at the limit, not over it
    cfg = build(config, {"train": _jsonl(tmp_path, PAIRS), "max_record_chars": 5})
    with pytest.raises(DataError, match="line 1: a record of 6 characters"):
        load_files(cfg, "comparison")
