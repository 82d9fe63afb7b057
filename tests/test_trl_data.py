"""Data in the shapes Hugging Face TRL documents: conversational and implicit-prompt preferences, completions
as chat messages, text rows, tool calls, and multi-turn chats whose assistant turns are all trained."""

import json

import pytest

from alignkit.config import build
from alignkit.data import Encoder, TokenizeConfig, collate, load_records
from alignkit.models import tiny_model_and_tokenizer, tiny_tokenizer
from alignkit.train import RunConfig, train

USER = {"role": "user", "content": "Sky?"}
BLUE, GREEN = {"role": "assistant", "content": "Blue."}, {"role": "assistant", "content": "Green."}
CHAT = [USER, {"role": "assistant", "content": "a1"}, {"role": "user", "content": "u2"},
        {"role": "assistant", "content": "a2"}]
CALL = {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Oslo"}}}
TOOL_CHAT = [USER, {"role": "assistant", "content": None, "tool_calls": [CALL]},
             {"role": "tool", "name": "get_weather", "content": "rain"}, {"role": "assistant", "content": "Grey."}]
# Like the tiny template, with tool calls and assistant text inside {% generation %} markers.
GENERATION_TEMPLATE = (
    "{% for m in messages %}<|{{ m.role }}|>"
    "{% if m.role == 'assistant' %}{% generation %}{{ m.content or '' }}"
    "{% for c in m.tool_calls or [] %}[{{ c.function.name }}]{% endfor %}</s>{% endgeneration %}"
    "{% else %}{{ m.content }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
TOOL_TEMPLATE = GENERATION_TEMPLATE.replace("{% generation %}", "").replace("{% endgeneration %}", "")
LAST_ONLY_TEMPLATE = "{{ messages[-1].content }}{% if add_generation_prompt %}<|assistant|>{% endif %}"


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def chat_tokenizer(template=None):
    tok = tiny_tokenizer(200, chat_template=True)
    if template:
        tok.chat_template = template
    return tok


def text(tok, ids) -> str:
    return "".join(tok.convert_ids_to_tokens(list(ids)))


def trained_text(tok, encoded) -> str:
    """The tokens a loss sees, through collate's score mask."""
    batch = collate([encoded], tok.pad_token_id)
    return text(tok, batch.input_ids[0][batch.score_mask[0].bool()].tolist())


def one(tmp_path, kind, row):
    return load_records(write_jsonl(tmp_path / "d.jsonl", [row]), kind).records[0]


# --- preferences -------------------------------------------------------------------------------------


def test_conversational_preference_with_explicit_prompt(tmp_path):
    record = one(tmp_path, "comparison", {"prompt": [USER], "chosen": [BLUE], "rejected": [GREEN]})
    assert (record.prompt, record.chosen, record.rejected) == ([USER], "Blue.", "Green.")
    tok = chat_tokenizer()
    encoder = Encoder(tok)
    assert text(tok, encoder.encode(record.prompt, record.chosen).completion) == "Blue.</s>"
    assert text(tok, encoder.encode(record.prompt, record.rejected).completion) == "Green.</s>"


def test_conversational_preference_with_implicit_prompt(tmp_path):
    record = one(tmp_path, "comparison", {"chosen": [USER, BLUE], "rejected": [USER, GREEN]})
    assert (record.prompt, record.chosen, record.rejected) == ([USER], "Blue.", "Green.")
    tok = chat_tokenizer()
    encoded = Encoder(tok).encode(record.prompt, record.chosen)
    assert (text(tok, encoded.prompt), text(tok, encoded.completion)) == ("<|user|>Sky?<|assistant|>", "Blue.</s>")


def test_implicit_prompt_of_plain_strings_is_their_shared_prefix(tmp_path):
    record = one(tmp_path, "comparison", {"chosen": "The sky is blue.", "rejected": "The sky is green."})
    assert (record.prompt, record.chosen, record.rejected) == ("The sky is", " blue.", " green.")


def test_implicit_prompt_needs_a_shared_start(tmp_path):
    assert one(tmp_path, "comparison", {"chosen": [USER, BLUE], "rejected": [USER, GREEN]}).prompt == [USER]
    with pytest.raises(ValueError, match="field 'prompt': missing"):
        one(tmp_path, "comparison", {"chosen": [BLUE], "rejected": [GREEN]})


def test_dpo_trains_on_implicit_prompt_conversations(tmp_path):
    rows = [{"chosen": [{"role": "user", "content": f"q{i}"}, BLUE],
             "rejected": [{"role": "user", "content": f"q{i}"}, GREEN]} for i in range(4)]
    result = _train(tmp_path, rows, "preference", {"loss": {"name": "dpo"}})
    assert result.metrics


# --- completions as messages, text rows ------------------------------------------------------------------


@pytest.mark.parametrize(("kind", "extra"), [("demonstration", {}), ("rating", {"label": True})])
def test_completion_as_messages(tmp_path, kind, extra):
    record = one(tmp_path, kind, {"prompt": [USER], "completion": [BLUE], **extra})
    assert (record.prompt, record.completion) == ([USER], "Blue.")
    tok = chat_tokenizer()
    assert trained_text(tok, Encoder(tok).encode(record.prompt, record.completion)) == "Blue.</s>"


def test_kto_trains_on_message_completions(tmp_path):
    rows = [{"prompt": [{"role": "user", "content": f"q{i}"}], "completion": [BLUE if i % 2 else GREEN],
             "label": bool(i % 2)} for i in range(4)]
    assert _train(tmp_path, rows, "preference", {"loss": {"name": "kto"}}).metrics


@pytest.mark.parametrize("template", [None, "chat"])
def test_text_rows_train_the_whole_text_after_bos(tmp_path, template):
    record = one(tmp_path, "demonstration", {"text": "Once upon a time."})
    assert (record.prompt, record.completion) == ("", "Once upon a time.")
    tok = chat_tokenizer() if template else tiny_tokenizer(200)
    encoded = Encoder(tok).encode(record.prompt, record.completion)
    assert (text(tok, encoded.prompt), text(tok, encoded.completion)) == ("<s>", "Once upon a time.</s>")


# --- tool calls ----------------------------------------------------------------------------------------


def test_tool_calls_are_rendered_by_the_chat_template(tmp_path):
    record = one(tmp_path, "demonstration", {"messages": TOOL_CHAT})
    assert record.prompt == [USER]
    assert record.completion[0]["tool_calls"] == [CALL] and record.completion[1]["role"] == "tool"
    tok = chat_tokenizer(TOOL_TEMPLATE)
    encoded = Encoder(tok).encode(record.prompt, record.completion)
    assert "[get_weather]" in text(tok, encoded.prompt + encoded.completion)
    assert trained_text(tok, encoded) == "[get_weather]</s>Grey.</s>"  # the tool's answer is context


def test_tool_calls_in_a_prompt_reach_the_template(tmp_path):
    record = one(tmp_path, "demonstration", {"prompt": TOOL_CHAT[:3], "completion": "Grey."})
    tok = chat_tokenizer(TOOL_TEMPLATE)
    assert "[get_weather]" in text(tok, Encoder(tok).encode(record.prompt, record.completion).prompt)


# --- multi-turn chats --------------------------------------------------------------------------------


@pytest.mark.parametrize(("template", "turns", "trained"), [
    (None, "all", "a1</s>a2</s>"), (None, "last", "a2</s>"),
    (GENERATION_TEMPLATE, "all", "a1</s>a2</s>"), (GENERATION_TEMPLATE, "last", "a2</s>"),
])
def test_multi_turn_trains_the_assistant_turns_only(tmp_path, template, turns, trained):
    record = one(tmp_path, "demonstration", {"messages": CHAT})
    tok = chat_tokenizer(template)
    encoder = Encoder(tok, TokenizeConfig(assistant_turns=turns))
    encoded = encoder.encode(record.prompt, record.completion)
    whole = "<|user|>Sky?<|assistant|>a1</s><|user|>u2<|assistant|>a2</s>"
    assert text(tok, encoded.prompt + encoded.completion) == whole
    assert trained_text(tok, encoded) == trained
    assert encoder.appended == 0


def test_multi_turn_with_the_plain_template():
    tok = tiny_tokenizer(200)
    encoded = Encoder(tok).encode(CHAT[:1], CHAT[1:])
    whole = "<s>user: Sky?\nassistant: a1</s>user: u2\nassistant: a2</s>"
    assert text(tok, encoded.prompt + encoded.completion) == whole
    assert trained_text(tok, encoded) == "a1</s>a2</s>"


def test_assistant_turns_is_a_checked_choice():
    from alignkit.config import ConfigError

    assert build(TokenizeConfig, {"assistant_turns": "last"}).assistant_turns == "last"
    with pytest.raises(ConfigError, match="assistant_turns"):
        build(TokenizeConfig, {"assistant_turns": "first"})


def test_turns_the_template_does_not_extend_are_appended_and_counted():
    tok = chat_tokenizer(LAST_ONLY_TEMPLATE)
    encoder = Encoder(tok)
    encoded = encoder.encode(CHAT[:1], CHAT[1:])
    assert trained_text(tok, encoded) == "a1</s>a2</s>"
    encoder.encode([USER], "Blue.")
    assert encoder.appended == 2


def test_multi_turn_sft_run_logs_the_appended_count(tmp_path):
    rows = [{"messages": [{"role": "user", "content": f"q{i}"}, *CHAT[1:]]} for i in range(4)]
    result = _train(tmp_path, rows, "sft", {}, tokenizer=chat_tokenizer(LAST_ONLY_TEMPLATE))
    logged = [json.loads(line) for line in (result.run.path / "metrics.jsonl").read_text().splitlines()]
    (data,) = [entry for entry in logged if entry.get("event") == "data"]
    assert data["appended_without_template"] == 6  # 4 training records, 2 held out


def _train(tmp_path, rows, command, options, tokenizer=None):
    model, tok = tiny_model_and_tokenizer(vocab_size=200, chat_template=True)
    cfg = build(RunConfig, {"output_dir": str(tmp_path / "runs"), **options,
                            "data": {"train": write_jsonl(tmp_path / "train.jsonl", rows),
                                     "eval": write_jsonl(tmp_path / "eval.jsonl", rows[:2])},
                            "train": {"steps": 1, "batch_size": 2, "progress": False}})
    return train(cfg, command, model=model, tokenizer=tokenizer or tok)
