"""Load training records from local files, saved datasets or the Hugging Face hub, with clear errors."""

from __future__ import annotations

import csv
import importlib
import io
import json
import re
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from alignkit.data.records import RECORD_KINDS, FieldError, from_text_cells, type_name
from alignkit.registry import Entry, Registry

ON_ERROR = ("raise", "skip")
MAX_EXAMPLES = 5
MAX_RECORD_CHARS = 1_000_000  # characters of all a record's texts together; more is a bad record
HUB_ID = re.compile(r"\w[\w.-]*/\w[\w.-]*")  # "owner/name", not "./name"


class DataError(ValueError):
    """A source or one of its rows cannot be used; says where (file, line or row, field) and why."""

    def __init__(self, source: str, message: str, location: str | None = None, field: str | None = None):
        super().__init__(str(source), message, location, field)
        self.source = str(source)
        self.message = message
        self.location = location
        self.field = field

    def __str__(self) -> str:
        where = [self.source, self.location, f"field {self.field!r}" if self.field else None]
        return f"{', '.join(part for part in where if part)}: {self.message}"


@dataclass
class LoadResult:
    records: list
    skipped: int = 0
    errors: list[DataError] = field(default_factory=list)
    source: str = ""

    def summary(self) -> str:
        text = f"kept {_count(len(self.records), 'record')}"
        if self.skipped:
            text += f", skipped {_count(self.skipped, 'bad one')}; first: {self.errors[0]}"
        return text


@dataclass(frozen=True)
class Unreadable:
    """A row a reader could not turn into a dict (bad JSON, bad UTF-8...), and why."""

    reason: str


Rows = Iterator[tuple[str, dict[str, Any] | Unreadable]]

DATA_FORMATS = Registry("data format")


def load_records(
    source,
    kind: str,
    *,
    columns: dict[str, str] | None = None,
    on_error: str = "raise",
    split: str = "train",
    max_record_chars: int = MAX_RECORD_CHARS,
) -> LoadResult:
    """Read `source` and parse each row into a record of `kind` (see RECORD_KINDS).

    `source` is a .jsonl/.json/.parquet/.csv file, a folder written by `save_to_disk` (`split` picks
    from a DatasetDict), a hub id "owner/name" (`split` is loaded), a list of dicts, or a
    `datasets.Dataset` (or DatasetDict: `split` picks). `columns` maps our field names to the file's
    column names. A row whose texts hold more than `max_record_chars` characters together is bad. With
    `on_error="raise"` the first bad row raises a DataError; with "skip" bad rows are dropped and counted
    (the first few kept in `errors`). A source that cannot be read at all, or that yields no records,
    always raises.

    Locations: lines count from 1 as in an editor (.jsonl, .csv, where the header is line 1), rows from 0
    as in `dataset[i]` (.json, .parquet, datasets, lists). CSV cells are strings, so for CSV only the fields
    margin, score_chosen, score_rejected (numbers) and label (true/false, yes/no, 1/0) are converted,
    and a blank cell in an optional field (margin, scores, subset, reference) counts as absent.
    """
    if on_error not in ON_ERROR:
        raise ValueError(f"on_error must be one of {', '.join(map(repr, ON_ERROR))}, got {on_error!r}")
    try:
        parse = RECORD_KINDS.get(kind).fn
    except KeyError as error:
        raise ValueError(error.args[0]) from None
    name, rows, text_cells = _rows_of(source, split)
    check = RowCheck(parse, name, columns or {}, text_cells, max_record_chars)
    result = LoadResult(records=[], source=name)
    for location, row in rows:
        outcome = check(row, location)
        if not isinstance(outcome, DataError):
            result.records.append(replace(outcome, index=len(result.records), origin=_origin(name, location)))
        elif on_error == "raise":
            raise outcome
        else:
            result.skipped += 1
            if len(result.errors) < MAX_EXAMPLES:
                result.errors.append(outcome)
    if not result.records:
        raise _no_records(result)
    return result


def _rows_of(source, split: str) -> tuple[str, Rows, bool]:
    """How messages name `source`, its rows, and whether its cells are all text (CSV)."""
    if isinstance(source, str | Path):
        reader = _format_of(str(source))
        return str(source), reader.fn(str(source), split), reader.meta.get("text_cells", False)
    if isinstance(source, list):
        return "<list>", _list_rows(source), False
    datasets = sys.modules.get("datasets")  # an object can only be a Dataset once datasets is imported
    if datasets is not None and isinstance(source, datasets.DatasetDict):
        return "<DatasetDict>", _dataset_rows(_split_of(source, "<DatasetDict>", split)), False
    if datasets is not None and isinstance(source, datasets.Dataset):
        return "<Dataset>", _dataset_rows(source), False
    raise TypeError(f"a data source is a path, a hub id, a list of dicts or a datasets.Dataset, "
                    f"got {type(source).__name__}")


@dataclass(frozen=True)
class RowCheck:
    """Turns one row into its record, or into the DataError saying why it cannot be one."""

    parse: Callable[[dict[str, Any]], Any]
    source: str
    columns: dict[str, str]
    text_cells: bool
    max_chars: int

    def __call__(self, row: dict[str, Any] | Unreadable, location: str) -> Any:
        if isinstance(row, Unreadable):
            return DataError(self.source, row.reason, location)
        size = _chars(row)
        if size > self.max_chars:
            return DataError(self.source, f"a record of {size:,} characters, more than data.max_record_chars="
                             f"{self.max_chars:,}", location)
        fields = _rename(row, self.columns)
        try:
            return self.parse(from_text_cells(fields) if self.text_cells else fields)
        except FieldError as error:
            column = self.columns.get(error.field)
            note = f" (column {column!r})" if column else ""
            return DataError(self.source, error.message + note, location, error.field)


def _chars(value: Any) -> int:
    """Characters of every text in a row (nested chat messages too)."""
    if isinstance(value, str):
        return len(value)
    if isinstance(value, dict):
        return sum(map(_chars, value.values()))
    if isinstance(value, list | tuple):
        return sum(map(_chars, value))
    return 0


def _rename(row: dict[str, Any], columns: dict[str, str]) -> dict[str, Any]:
    """Our field names for the file's columns: columns={"prompt": "question"} reads "question" as prompt."""
    if not columns:
        return row
    renamed = {name: value for name, value in row.items() if name not in columns.values()}
    renamed.update({ours: row[theirs] for ours, theirs in columns.items() if theirs in row})
    return renamed


def _origin(source: str, location: str) -> str:
    """ "data.jsonl:12" for lines (as editors and tracebacks link them), "data.parquet:row 7" for rows."""
    return f"{source}:{location.removeprefix('line ')}"


def _no_records(result: LoadResult) -> DataError:
    if not result.skipped:
        return DataError(result.source, "no records")
    return DataError(result.source, f"no records: all {result.skipped} were bad; first: {result.errors[0]}")


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def _format_of(source: str) -> Entry:
    """The DATA_FORMATS entry for how `source` looks: a folder, a file extension, or a hub id."""
    path = Path(source)
    suffix = path.suffix.lower()
    if path.is_dir():
        return DATA_FORMATS.get("directory")
    if path.is_file() and suffix in DATA_FORMATS:
        return DATA_FORMATS.get(suffix)
    if path.exists():
        supported = "; ".join(f"{entry.name} ({entry.summary})" for entry in DATA_FORMATS)
        raise DataError(source, f"unsupported format {suffix or '(no extension)'!r}; supported: {supported}")
    if not suffix and HUB_ID.fullmatch(source):
        return DATA_FORMATS.get("hub")
    raise DataError(source, "file not found")


@DATA_FORMATS.register(".jsonl", summary="one JSON object per line")
def read_jsonl(source: str, split: str) -> Rows:
    # Bytes, one line at a time, so bad UTF-8 or JSON is reported with its line and the rest still read.
    with open(source, "rb") as lines:
        for number, line in enumerate(lines, start=1):
            if line.strip():
                yield f"line {number}", _json_object(line)


def _json_object(line: bytes) -> dict[str, Any] | Unreadable:
    try:
        value = json.loads(line.decode("utf-8-sig"))
    except UnicodeDecodeError as error:
        return Unreadable(f"invalid UTF-8 (byte {error.start + 1} of the line)")
    except json.JSONDecodeError as error:
        return Unreadable(f"invalid JSON: {error.msg} (column {error.colno})")
    return _as_object(value)


def _as_object(value: Any) -> dict[str, Any] | Unreadable:
    return value if isinstance(value, dict) else Unreadable(f"expected a JSON object, got {type_name(value)}")


@DATA_FORMATS.register(".json", summary='a JSON list of objects, or an object with a "data" list')
def read_json(source: str, split: str) -> Rows:
    text = _decode(source)
    try:
        document = json.loads(text)
    except json.JSONDecodeError as error:
        message, location = f"invalid JSON: {error.msg} (column {error.colno})", f"line {error.lineno}"
        raise DataError(source, message, location) from None
    rows = document.get("data") if isinstance(document, dict) else document
    if not isinstance(rows, list):
        raise DataError(source, f'expected a list of objects or {{"data": [...]}}, got {type_name(document)}')
    for number, row in enumerate(rows):
        yield f"row {number}", _as_object(row)


@DATA_FORMATS.register(".csv", summary="comma-separated values with a header line", text_cells=True)
def read_csv(source: str, split: str) -> Rows:
    cells = csv.reader(io.StringIO(_decode(source), newline=""))
    try:
        header = [name.strip() for name in next(cells, [])]
        next_line = cells.line_num + 1
        for row in cells:
            line, next_line = next_line, cells.line_num + 1  # a quoted cell may span several lines
            if not row:
                continue
            if len(row) != len(header):
                yield f"line {line}", Unreadable(f"has {len(row)} cells, the header has {len(header)}")
            else:
                yield f"line {line}", dict(zip(header, row, strict=True))
    except csv.Error as error:
        raise DataError(source, f"invalid CSV: {error}", f"line {cells.line_num}") from None


def _decode(source: str) -> str:
    data = Path(source).read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        line = data.count(b"\n", 0, error.start) + 1
        raise DataError(source, "invalid UTF-8", f"line {line}") from None


@DATA_FORMATS.register(".parquet", summary="an Apache Parquet table")
def read_parquet(source: str, split: str) -> Rows:
    parquet = _require("pyarrow.parquet", source)
    try:
        batches = parquet.ParquetFile(source).iter_batches()
        number = 0
        for batch in batches:
            for row in batch.to_pylist():
                yield f"row {number}", row
                number += 1
    except (OSError, ValueError) as error:  # pyarrow's ArrowIOError and ArrowInvalid
        raise DataError(source, f"not a readable Parquet file: {error}") from None


@DATA_FORMATS.register("directory", summary="a folder written by datasets' save_to_disk")
def read_saved_dataset(source: str, split: str) -> Rows:
    datasets = _require("datasets", source)
    try:
        saved = datasets.load_from_disk(source)
    except (OSError, ValueError) as error:
        raise DataError(source, f"not a folder written by save_to_disk ({error})") from None
    yield from _dataset_rows(_split_of(saved, source, split) if isinstance(saved, datasets.DatasetDict) else saved)


def _split_of(splits, source: str, split: str):
    if split not in splits:
        raise DataError(source, f"no split {split!r}; it has {', '.join(splits)}")
    return splits[split]


@DATA_FORMATS.register("hub", summary='a Hugging Face hub dataset id "owner/name"')
def read_hub(source: str, split: str) -> Rows:
    datasets = _require("datasets", source)
    try:
        dataset = datasets.load_dataset(source, split=split)
    except Exception as error:  # network, auth, missing repo or split: all mean "cannot load this"
        raise DataError(source, f"could not load split {split!r} from the hub: {error}") from error
    yield from _dataset_rows(dataset)


def _list_rows(rows: list) -> Rows:
    for number, row in enumerate(rows):
        yield f"row {number}", row if isinstance(row, dict) else Unreadable(f"expected a dict, got {type_name(row)}")


def _dataset_rows(dataset) -> Rows:
    for number, row in enumerate(dataset):
        yield f"row {number}", row


def _require(module: str, source: str):
    try:
        return importlib.import_module(module)
    except ImportError:
        raise DataError(source, f"reading this needs {module}: pip install 'alignkit[datasets]'") from None
