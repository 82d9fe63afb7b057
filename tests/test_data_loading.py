"""Loading records from every supported source, and the errors bad data gives."""

from __future__ import annotations

import json
import pickle
import sys

import pytest

from alignkit.data.loaders import DataError, LoadResult, load_records
from alignkit.data.records import (
    RECORD_KINDS,
    BestOfN,
    Comparison,
    Demonstration,
    FieldError,
    Judgement,
    PromptRecord,
    Rating,
)

CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi?"}]
PAIR = {"prompt": "2+2?", "chosen": "4", "rejected": "5"}


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def data_error(*args, **kwargs) -> DataError:
    """The error load_records raises; exactly a DataError, never a KeyError or decoder error."""
    with pytest.raises(Exception) as caught:
        load_records(*args, **kwargs)
    assert type(caught.value) is DataError, repr(caught.value)
    return caught.value


# --- formats ---------------------------------------------------------------------------------------


def test_jsonl_demonstrations_with_text_and_chat_prompts(tmp_path):
    path = write_jsonl(
        tmp_path / "sft.jsonl",
        [{"prompt": "Say hi", "completion": "hi"}, {"prompt": CHAT, "completion": "Hello."}],
    )
    result = load_records(path, "demonstration")
    assert result.records == [
        Demonstration("Say hi", "hi", index=0, origin=f"{path}:1"),
        Demonstration(CHAT, "Hello.", index=1, origin=f"{path}:2"),
    ]
    assert (result.skipped, result.errors, result.source) == (0, [], str(path))


def test_jsonl_blank_lines_are_ignored_but_lines_keep_their_numbers(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(PAIR) + "\n\n   \n" + json.dumps({**PAIR, "chosen": 3}) + "\n")
    assert "d.jsonl, line 4, field 'chosen'" in str(data_error(path, "comparison"))
    assert len(load_records(path, "comparison", on_error="skip").records) == 1


def test_json_list_and_data_object(tmp_path):
    rows = [PAIR, {**PAIR, "margin": 2}]
    (tmp_path / "list.json").write_text(json.dumps(rows))
    (tmp_path / "wrapped.json").write_text(json.dumps({"data": rows, "version": 1}))
    for name in ("list.json", "wrapped.json"):
        records = load_records(tmp_path / name, "comparison").records
        assert [r.margin for r in records] == [None, 2.0]
        assert records[1].origin == f"{tmp_path / name}:row 1"


def test_json_top_level_must_hold_a_list(tmp_path):
    path = tmp_path / "d.json"
    path.write_text(json.dumps({"rows": [PAIR]}))
    assert "expected a list of objects" in str(data_error(path, "comparison"))


def test_json_row_that_is_not_an_object(tmp_path):
    path = tmp_path / "d.json"
    path.write_text(json.dumps([PAIR, ["a", "b"]]))
    assert str(data_error(path, "comparison")) == f"{path}, row 1: expected a JSON object, got list"


def test_parquet(tmp_path):
    pyarrow = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    path = tmp_path / "prefs.parquet"
    rows = [
        {**PAIR, "margin": 1.5, "subset": "math"},
        {**PAIR, "chosen": "four", "margin": None, "subset": None},
    ]
    pq.write_table(pyarrow.Table.from_pylist(rows), path)
    records = load_records(path, "comparison").records
    assert records == [
        Comparison("2+2?", "4", "5", 1.5, "math", index=0, origin=f"{path}:row 0"),
        Comparison("2+2?", "four", "5", None, None, index=1, origin=f"{path}:row 1"),
    ]


def test_parquet_with_chat_prompts_and_a_bad_row(tmp_path):
    pyarrow = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    path = tmp_path / "sft.parquet"
    rows = [{"prompt": CHAT, "completion": "Hello."}, {"prompt": CHAT, "completion": " "}]
    pq.write_table(pyarrow.Table.from_pylist(rows), path)
    assert str(data_error(path, "demonstration")) == f"{path}, row 1, field 'completion': is empty"
    assert load_records(path, "demonstration", on_error="skip").records[0].prompt == CHAT


def test_csv_comparisons_convert_numbers_and_number_rows_by_line(tmp_path):
    path = tmp_path / "prefs.csv"
    path.write_text(
        "prompt,chosen,rejected,score_chosen,score_rejected,margin,subset\n"
        "2+2?,4,5,9,7.5,,\n"
        '"multi\nline",yes,no,,,0.25,chat\n'
        "3+3?,6,7,1,2,,\n"
    )
    records = load_records(path, "comparison").records
    assert [(r.margin, r.subset) for r in records] == [(1.5, None), (0.25, "chat"), (-1.0, None)]
    assert records[0].prompt == "2+2?" and records[1].prompt == "multi\nline"
    assert [r.origin for r in records] == [f"{path}:2", f"{path}:3", f"{path}:5"]


def test_csv_bad_number_names_line_and_field(tmp_path):
    path = tmp_path / "prefs.csv"
    path.write_text("prompt,chosen,rejected,margin\n2+2?,4,5,1\n2+2?,4,5,big\n")
    assert str(data_error(path, "comparison")) == (
        f"{path}, line 3, field 'margin': expected a number, got 'big'"
    )


def test_csv_row_with_the_wrong_number_of_cells(tmp_path):
    path = tmp_path / "prefs.csv"
    path.write_text("prompt,chosen,rejected\n2+2?,4,5,extra\n")
    assert str(data_error(path, "comparison")) == f"{path}, line 2: has 4 cells, the header has 3"


def test_saved_dataset_directory(tmp_path):
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_list([PAIR, {**PAIR, "chosen": "four"}]).save_to_disk(tmp_path / "saved")
    records = load_records(tmp_path / "saved", "comparison").records
    assert [r.chosen for r in records] == ["4", "four"]
    assert records[1].origin == f"{tmp_path / 'saved'}:row 1"


def test_saved_dataset_dict_takes_the_split(tmp_path):
    datasets = pytest.importorskip("datasets")
    splits = {
        "train": datasets.Dataset.from_list([PAIR]),
        "test": datasets.Dataset.from_list([{**PAIR, "chosen": "four"}, {**PAIR, "chosen": "IV"}]),
    }
    datasets.DatasetDict(splits).save_to_disk(tmp_path / "saved")
    assert [r.chosen for r in load_records(tmp_path / "saved", "comparison").records] == ["4"]
    test = load_records(tmp_path / "saved", "comparison", split="test").records
    assert [r.chosen for r in test] == ["four", "IV"]
    error = data_error(tmp_path / "saved", "comparison", split="validation")
    assert "no split 'validation'" in str(error) and "train" in str(error)


def test_directory_that_is_not_a_saved_dataset(tmp_path):
    pytest.importorskip("datasets")
    assert "save_to_disk" in str(data_error(tmp_path, "comparison"))


def test_hub_id_goes_to_load_dataset_with_the_split(tmp_path, monkeypatch):
    datasets = pytest.importorskip("datasets")
    calls = []

    def fake_load_dataset(name, split):
        calls.append((name, split))
        return datasets.Dataset.from_list([PAIR])

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    result = load_records("owner/prefs", "comparison", split="test")
    assert calls == [("owner/prefs", "test")]
    assert result.records[0].origin == "owner/prefs:row 0"


def test_hub_failure_is_a_data_error(tmp_path, monkeypatch):
    datasets = pytest.importorskip("datasets")

    def unreachable(name, split):
        raise ConnectionError("no network")

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(datasets, "load_dataset", unreachable)
    assert "no network" in str(data_error("owner/prefs", "comparison"))


def test_missing_datasets_package_says_what_to_install(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setitem(sys.modules, "datasets", None)
    assert "pip install 'alignkit[datasets]'" in str(data_error("owner/prefs", "comparison"))


def test_missing_pyarrow_says_what_to_install(tmp_path, monkeypatch):
    path = tmp_path / "d.parquet"
    path.write_bytes(b"PAR1")
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    assert "pip install 'alignkit[datasets]'" in str(data_error(path, "comparison"))


def test_corrupt_parquet(tmp_path):
    pytest.importorskip("pyarrow")
    path = tmp_path / "d.parquet"
    path.write_bytes(b"not parquet at all")
    assert str(data_error(path, "comparison")).startswith(f"{path}: not a readable Parquet file")


# --- record kinds and fields -----------------------------------------------------------------------


def test_record_kinds_registry():
    assert RECORD_KINDS.names() == ["best_of_n", "comparison", "demonstration", "judgement", "prompt", "rating"]
    types = {entry.name: entry.meta["record_type"] for entry in RECORD_KINDS}
    assert types == {
        "best_of_n": BestOfN,
        "comparison": Comparison,
        "demonstration": Demonstration,
        "judgement": Judgement,
        "prompt": PromptRecord,
        "rating": Rating,
    }
    assert all(entry.summary for entry in RECORD_KINDS)


def test_column_mapping(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"question": "2+2?", "good": "4", "bad": "5", "prompt": "x"}])
    columns = {"prompt": "question", "chosen": "good", "rejected": "bad"}
    record = load_records(path, "comparison", columns=columns).records[0]
    assert (record.prompt, record.chosen, record.rejected) == ("2+2?", "4", "5")


def test_column_mapping_error_names_field_and_column(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"question": "2+2?", "chosen": "4", "rejected": "5"}])
    error = data_error(path, "comparison", columns={"prompt": "query"})
    assert str(error) == f"{path}, line 1, field 'prompt': missing (column 'query')"


def test_messages_demonstration(tmp_path):
    messages = [*CHAT, {"role": "assistant", "content": "Hello."}]
    path = write_jsonl(tmp_path / "d.jsonl", [{"messages": messages}])
    record = load_records(path, "demonstration").records[0]
    assert (record.prompt, record.completion) == (CHAT, "Hello.")


@pytest.mark.parametrize(
    ("messages", "problem"),
    [
        (CHAT, "the last message must have role 'assistant', got 'user'"),
        ([{"role": "assistant", "content": "Hi"}], "no prompt messages"),
        ([*CHAT, {"role": "assistant", "content": " "}], "the assistant reply is empty"),
        ([*CHAT, {"role": "assistant", "content": 3}], "message 2: expected a string 'content', got int"),
        ([*CHAT, "Hello."], "message 2: expected an object, got str"),
        ([], "expected a non-empty list of chat messages, got an empty list"),
        ("Hello.", "expected a non-empty list of chat messages, got str"),
    ],
)
def test_bad_messages(tmp_path, messages, problem):
    path = write_jsonl(tmp_path / "d.jsonl", [{"messages": messages}])
    error = data_error(path, "demonstration")
    assert (error.location, error.field) == ("line 1", "messages")
    assert problem in str(error)


def test_margin_from_scores_unless_given(tmp_path):
    rows = [
        {**PAIR, "score_chosen": 8, "score_rejected": 6.5},
        {**PAIR, "score_chosen": 8, "score_rejected": 6, "margin": 0.5},
        {**PAIR, "score_chosen": 8},
    ]
    records = load_records(write_jsonl(tmp_path / "d.jsonl", rows), "comparison").records
    assert [r.margin for r in records] == [1.5, 0.5, None]


@pytest.mark.parametrize(("label", "expected"), [(True, True), (False, False), (1, True), (0, False)])
def test_rating_labels_from_json(tmp_path, label, expected):
    row = {"prompt": "p", "completion": "c", "label": label}
    record = load_records(write_jsonl(tmp_path / "d.jsonl", [row]), "rating").records[0]
    assert record.label is expected


def test_rating_labels_from_csv_strings(tmp_path):
    path = tmp_path / "ratings.csv"
    words = ["true", "FALSE", "1", "0", "Yes", "no"]
    path.write_text("prompt,completion,label\n" + "".join(f"p,c,{word}\n" for word in words))
    labels = [r.label for r in load_records(path, "rating").records]
    assert labels == [True, False, True, False, True, False]


def test_rating_label_errors(tmp_path):
    csv_path = tmp_path / "ratings.csv"
    csv_path.write_text("prompt,completion,label\np,c,maybe\n")
    assert str(data_error(csv_path, "rating")) == (
        f"{csv_path}, line 2, field 'label': expected true/false, yes/no or 1/0, got 'maybe'"
    )
    json_path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "p", "completion": "c", "label": 2}])
    assert "field 'label': expected true/false or 1/0, got 2" in str(data_error(json_path, "rating"))
    text_path = write_jsonl(tmp_path / "t.jsonl", [{"prompt": "p", "completion": "c", "label": "true"}])
    assert "got str" in str(data_error(text_path, "rating"))  # only CSV cells are read as text


def test_prompt_records(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "2+2?", "reference": "4"}, {"prompt": CHAT}])
    records = load_records(path, "prompt").records
    assert [(r.prompt, r.reference) for r in records] == [("2+2?", "4"), (CHAT, None)]


# --- bad rows: each names the file, the line and the field -----------------------------------------


@pytest.mark.parametrize(
    ("kind", "row", "field", "problem"),
    [
        ("comparison", {"prompt": "p", "chosen": "a"}, "rejected", "missing"),
        ("comparison", {**PAIR, "chosen": 4}, "chosen", "expected a string, got int"),
        ("comparison", {**PAIR, "prompt": 7}, "prompt", "expected a string or a list of chat messages"),
        ("comparison", {**PAIR, "prompt": "  "}, "prompt", "is empty"),
        ("comparison", {**PAIR, "rejected": "4"}, "rejected", "is the same text as 'chosen'"),
        ("comparison", {**PAIR, "margin": "1"}, "margin", "expected a number, got str"),
        ("comparison", {**PAIR, "margin": True}, "margin", "expected a number, got bool"),
        ("comparison", {**PAIR, "score_chosen": [1], "score_rejected": 0}, "score_chosen", "got list"),
        ("comparison", {**PAIR, "subset": 3}, "subset", "expected a string, got int"),
        ("demonstration", {"prompt": "p", "completion": ""}, "completion", "is empty"),
        ("demonstration", {"prompt": "p", "completion": None}, "completion", "missing"),
        ("demonstration", {"prompt": [{"role": "user"}], "completion": "c"}, "prompt", "'content', got null"),
        ("rating", {"prompt": "p", "completion": "c"}, "label", "missing"),
        ("prompt", {"prompt": "p", "reference": 1.5}, "reference", "expected a string, got float"),
    ],
)
def test_bad_rows(tmp_path, kind, row, field, problem):
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "ok", "completion": "ok", **PAIR, "label": 1}, row])
    error = data_error(path, kind)
    assert (error.source, error.location, error.field) == (str(path), "line 2", field)
    assert str(error).startswith(f"{path}, line 2, field '{field}': ")
    assert problem in str(error)


def test_data_error_reads_as_file_line_field_message():
    error = DataError("data/train.jsonl", "expected a string, got int", "line 12", "chosen")
    assert str(error) == "data/train.jsonl, line 12, field 'chosen': expected a string, got int"
    assert str(DataError("d.csv", "file not found")) == "d.csv: file not found"
    copy = pickle.loads(pickle.dumps(error))
    assert (str(copy), copy.field, copy.location) == (str(error), "chosen", "line 12")
    assert isinstance(error, ValueError)


def test_invalid_utf8_in_jsonl(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes(json.dumps(PAIR).encode() + b'\n{"prompt": "caf\xe9"}\n')
    error = data_error(path, "comparison")
    assert (error.location, error.field) == ("line 2", None)
    assert str(error).startswith(f"{path}, line 2: invalid UTF-8")


def test_invalid_utf8_in_csv(tmp_path):
    path = tmp_path / "d.csv"
    path.write_bytes(b"prompt,chosen,rejected\na,b,c\ncaf\xe9,b,c\n")
    assert str(data_error(path, "comparison")) == f"{path}, line 3: invalid UTF-8"


def test_invalid_json_lines(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(PAIR) + "\n" + '{"prompt": "p",\n' + "[1, 2]\n")
    error = data_error(path, "comparison")
    assert str(error).startswith(f"{path}, line 2: invalid JSON")
    result = load_records(path, "comparison", on_error="skip")
    assert [str(e) for e in result.errors][1] == f"{path}, line 3: expected a JSON object, got list"


def test_invalid_json_file(tmp_path):
    path = tmp_path / "d.json"
    path.write_text('[\n {"prompt": "p"},\n {oops}\n]')
    assert str(data_error(path, "comparison")).startswith(f"{path}, line 3: invalid JSON")


def test_file_not_found(tmp_path):
    for missing in (tmp_path / "nope.jsonl", tmp_path / "nope", "nope.csv", "./data/nope"):
        assert str(data_error(missing, "comparison")) == f"{missing}: file not found"


def test_unknown_extension_lists_supported_formats(tmp_path):
    path = tmp_path / "d.txt"
    path.write_text("hello")
    message = str(data_error(path, "comparison"))
    assert message.startswith(f"{path}: unsupported format '.txt'")
    assert all(name in message for name in (".jsonl", ".json", ".parquet", ".csv", "save_to_disk", "hub"))


def test_no_records(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    assert str(data_error(empty, "comparison")) == f"{empty}: no records"
    header_only = tmp_path / "empty.csv"
    header_only.write_text("prompt,chosen,rejected\n")
    assert str(data_error(header_only, "comparison")) == f"{header_only}: no records"
    all_bad = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "p"}])
    message = str(data_error(all_bad, "comparison", on_error="skip"))
    assert message.startswith(f"{all_bad}: no records: all 1 were bad; first: {all_bad}, line 1")


# --- on_error --------------------------------------------------------------------------------------


def test_skip_keeps_good_rows_counts_bad_ones_and_keeps_first_examples(tmp_path):
    rows = [{**PAIR, "chosen": f"c{i}"} if i % 3 else {"prompt": "p", "chosen": i} for i in range(1, 25)]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    result = load_records(path, "comparison", on_error="skip")
    assert isinstance(result, LoadResult)
    assert [r.chosen for r in result.records] == [f"c{i}" for i in range(1, 25) if i % 3]
    assert [r.index for r in result.records] == list(range(16))
    assert result.records[2].origin == f"{path}:4"
    assert result.skipped == 8
    assert [e.location for e in result.errors] == ["line 3", "line 6", "line 9", "line 12", "line 15"]
    assert all(type(e) is DataError and e.field == "chosen" for e in result.errors)
    assert result.summary() == f"kept 16 records, skipped 8 bad ones; first: {result.errors[0]}"


def test_raise_stops_at_the_first_bad_row(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [PAIR, {"prompt": "p"}, {"chosen": 1}])
    error = data_error(path, "comparison")
    assert (error.location, error.field) == ("line 2", "chosen")


def test_summary_without_skips(tmp_path):
    result = load_records(write_jsonl(tmp_path / "d.jsonl", [PAIR]), "comparison")
    assert result.summary() == "kept 1 record"


def test_bad_arguments_are_value_errors(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [PAIR])
    with pytest.raises(ValueError, match="'raise', 'skip'"):
        load_records(path, "comparison", on_error="ignore")
    with pytest.raises(ValueError, match="unknown record kind 'pairs'") as caught:
        load_records(path, "pairs")
    assert type(caught.value) is ValueError


WEIRD_VALUES = [None, 0, True, 1.5, float("nan"), "", " ", "x", [], [{}], [1], {"a": 1}, [{"role": 1}]]


@pytest.mark.parametrize("kind", RECORD_KINDS.names())
def test_parsers_raise_only_field_errors(kind):
    parse = RECORD_KINDS.get(kind).fn
    good = {"prompt": "p", "completion": "c", "chosen": "a", "rejected": "b", "label": True,
            "a": "x", "b": "y", "verdict": "A"}
    fields = [*good, "messages", "margin", "score_chosen", "score_rejected", "subset", "reference", "reasoning"]
    for field in fields:
        for value in WEIRD_VALUES:
            try:
                parse({**good, field: value})
            except FieldError as error:
                assert error.field in fields


def test_best_of_n_sets_need_lists_of_non_empty_strings(tmp_path):
    good = {"prompt": "q", "chosen": ["right"], "rejected": ["w1", "w2", "w3"], "subset": "Math"}
    bad = {"prompt": "q", "chosen": ["right"], "rejected": ["w1", ""]}
    path = write_jsonl(tmp_path / "d.jsonl", [good, bad])
    with pytest.raises(DataError, match="line 2, field 'rejected': item 1: expected a non-empty string"):
        load_records(path, "best_of_n")
    (record,) = load_records(path, "best_of_n", on_error="skip").records
    assert record.chosen == ("right",) and len(record.rejected) == 3 and record.subset == "Math"
