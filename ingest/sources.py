"""Instruction sources: where the rows come from and how each source's native layout maps to a candidate.

A source is given as NAME=LOCATION. NAME is one of the five sources of the paper (`nectar`, `openhermes`,
`ultrafeedback`, `chatbot_arena`, `dsp`) or a name of the user's own, which becomes its `main_source`.
LOCATION is a local file (JSON lines, a JSON array, Parquet or CSV), a directory of such files (read in
sorted path order), or, for the paper's hub-hosted sources, a Hugging Face dataset id `owner/name[:split]`
streamed with `datasets.load_dataset(..., streaming=True)`; NAME alone means the source's default hub id.

Bad input policy
- The whole source fails (SourceError: one line naming the file, and the row where there is one) when a
  path does not exist, a name is unknown, a file type is unsupported, a hub dataset cannot be loaded, the
  layout does not fit (judged on the Parquet schema, the CSV header, the hub features, or for JSON on the
  first record that parses), a JSON array file does not parse, or a file has rows but not one usable row.
- Otherwise a bad row (a broken or non-UTF-8 JSON line, a record that is not an object, a missing field,
  non-string text) is a RowError: it goes to the `failures` table and the rest of the file is ingested.
Every check that can fail a source runs in `Source.check()`, before anything is written.

Row numbers are 1-based line numbers for JSON lines and CSV, record positions otherwise. A JSON array is
read whole; use JSON lines (or Parquet) for large files.

Large JSON-lines and Parquet files are cut into parts (`Origin.parts`): line-aligned byte ranges and runs
of row groups, so that the ingest stage can read them in several processes. A part numbers its rows from
1; the reader adds the rows of the parts before it, so row numbers are those of the whole file.
"""
from __future__ import annotations

import csv
import mmap
import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any, NamedTuple

import orjson
import pyarrow as pa
import pyarrow.parquet as pq

# Source name -> main_source, as the released Multifaceted Collection writes it.
MAIN_SOURCES: dict[str, str] = {
    "nectar": "Nectar",
    "openhermes": "OpenHermesPreferences",
    "ultrafeedback": "ultrafeedback_binarized_cleaned",
    "chatbot_arena": "chatbot_arena_conversations",
    "dsp": "domain_specific_preference",
}
# Dedup keeps a duplicate in the first of these (the paper's order); the user's own sources follow, by name.
SOURCE_PRIORITY: tuple[str, ...] = tuple(MAIN_SOURCES)
# Source name -> (hub id, split). DSP lives on GitHub only: it has no default.
HUB_DEFAULTS: dict[str, tuple[str, str]] = {
    "nectar": ("berkeley-nest/Nectar", "train"),
    "openhermes": ("argilla/OpenHermesPreferences", "train"),
    "ultrafeedback": ("allenai/ultrafeedback_binarized_cleaned", "train_prefs"),
    "chatbot_arena": ("lmsys/chatbot_arena_conversations", "train"),
}
DEFAULT_TEXT_COLUMNS: tuple[str, ...] = ("instruction", "prompt", "question", "text")
FILE_TYPES: dict[str, str] = {".jsonl": "jsonl", ".json": "json", ".parquet": "parquet", ".csv": "csv"}
RAW_CHARS = 500
# Editors on Windows open UTF-8 files with a byte order mark; it is not part of the first record.
BOM = b"\xef\xbb\xbf"

_NAME = re.compile(r"^[\w.-]+$")
_HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+(?::[\w.-]+)?$")


class SourceError(Exception):
    """A source cannot be ingested at all; the message is one line and names the file."""


class RowError(Exception):
    """One row cannot be mapped; it goes to `failures` with its reason."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


class Candidate(NamedTuple):
    """A source row in the common shape the filters judge."""

    text: str
    original_source: str
    user_turns: int = 1
    language: str | None = None


class Row(NamedTuple):
    """One row read from an origin: a Candidate, or the RowError that stopped it, with its raw bytes.

    A blank line of a JSON-lines file is a Row with outcome None: it holds a row number and nothing else.
    """

    origin: str
    number: int
    outcome: Candidate | RowError | None
    raw: bytes | None


# What an origin yields per row: (row number, parsed record or RowError or None for a blank line, raw bytes).
Record = tuple[int, dict[str, Any] | RowError | None, bytes | None]


# -- layouts: one mapping per source ------------------------------------------------------------------
@dataclass(frozen=True)
class Layout:
    required: tuple[str, ...]
    optional: tuple[str, ...]
    to_candidate: Callable[[dict[str, Any]], Candidate]
    text_column: str

    @property
    def columns(self) -> tuple[str, ...]:
        return self.required + self.optional


def _text(value: Any, column: str) -> str:
    if not isinstance(value, str):
        raise RowError("non_string_text", f"{column} is {_kind(value)}, not text")
    return value


def _kind(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _tag(value: Any) -> str:
    """An upstream source tag: a string, or the first of a list of them (Nectar)."""
    if isinstance(value, list):
        value = value[0] if value else ""
    return value if isinstance(value, str) else ""


def _int(value: Any, column: str) -> int:
    if isinstance(value, str) and value.isascii() and value.strip().isdigit():
        return int(value)  # CSV has no types: its integers arrive as text
    if not isinstance(value, int) or isinstance(value, bool):
        raise RowError("bad_field", f"{column} is {_kind(value)}, not an integer")
    return value


def _user_turns(chat: Any) -> int:
    """User turns of an OpenAI-style chat; 1 when the row has none."""
    if not isinstance(chat, list):
        return 1
    return sum(1 for message in chat if isinstance(message, dict) and message.get("role") == "user") or 1


def _strip_hh(prompt: str) -> str:
    """Anthropic-HH framing to the bare instruction."""
    text = prompt.removeprefix("\n\nHuman: ").removeprefix("\n\nHuman:")
    for suffix in ("\n\nAssistant: ", "\n\nAssistant:"):
        if text.endswith(suffix):
            return text[: -len(suffix)]
    return text


def _nectar(row: dict[str, Any]) -> Candidate:
    text = _strip_hh(_text(row["prompt"], "prompt"))
    return Candidate(text, _tag(row.get("source")), _int(row["turns"], "turns"))


def _openhermes(row: dict[str, Any]) -> Candidate:
    return Candidate(_text(row["prompt"], "prompt"), _tag(row.get("source")), _user_turns(row.get("chosen")))


def _ultrafeedback(row: dict[str, Any]) -> Candidate:
    return Candidate(_text(row["prompt"], "prompt"), _tag(row.get("source")), _user_turns(row.get("chosen")))


def _chatbot_arena(row: dict[str, Any]) -> Candidate:
    conversation = row["conversation_a"]
    if not isinstance(conversation, list) or not conversation or not isinstance(conversation[0], dict):
        raise RowError("bad_field", "conversation_a is not a list of messages")
    text = _text(conversation[0].get("content"), "conversation_a[0].content")
    language = row["language"]
    return Candidate(text, "chatbot_arena", _int(row["turn"], "turn"), language if isinstance(language, str) else None)


def _dsp(row: dict[str, Any]) -> Candidate:
    return Candidate(_text(row["query"], "query"), "alpaca")


LAYOUTS: dict[str, Layout] = {
    "nectar": Layout(("prompt", "turns"), ("source",), _nectar, "prompt"),
    "openhermes": Layout(("prompt",), ("source", "chosen"), _openhermes, "prompt"),
    "ultrafeedback": Layout(("prompt",), ("source", "chosen"), _ultrafeedback, "prompt"),
    "chatbot_arena": Layout(("conversation_a", "turn", "language"), (), _chatbot_arena, "conversation_a"),
    "dsp": Layout(("query",), (), _dsp, "query"),
}


def own_layout(text_column: str) -> Layout:
    """A user's source: text from one column; a list there is a conversation of user turns."""
    return Layout((text_column,), ("source", "language"), partial(_own, text_column), text_column)


def _own(text_column: str, row: dict[str, Any]) -> Candidate:
    # a module-level function under `partial`, not a closure: layouts travel to worker processes by pickle
    text, turns = _conversation(row[text_column], text_column)
    language = row.get("language")
    return Candidate(text, _tag(row.get("source")), turns, language if isinstance(language, str) else None)


def _conversation(value: Any, column: str) -> tuple[str, int]:
    if not isinstance(value, list):
        return _text(value, column), 1
    users = [m.get("content") if isinstance(m, dict) else m for m in value
             if not isinstance(m, dict) or m.get("role") == "user"]
    if not users:
        raise RowError("bad_field", f"{column} holds no user turn")
    return _text(users[0], f"{column}[0]"), len(users)


# -- origins: where rows are read from ------------------------------------------------------------------
class Origin:
    """One file or hub dataset; yields (row number, record dict or RowError, raw bytes or None)."""

    label: str

    def columns(self) -> list[str] | None:
        """The column names from a header, or None where only the records tell (JSON)."""
        return None

    def records(self, columns: tuple[str, ...]) -> Iterator[Record]:
        raise NotImplementedError

    def check_types(self, layout: Layout) -> None:
        """Header-level type checks; only Parquet has types to check."""

    def parts(self, part_bytes: int) -> list[Origin]:
        """Pieces of about `part_bytes` that can be read independently, in order; most origins are one piece."""
        return [self]


@dataclass
class JsonLinesFile(Origin):
    """The lines that start in bytes [start, end) of a JSON-lines file (the whole file by default).

    The file is memory-mapped and each line parsed in place, without a copy. A part touches only its own
    pages and unmaps them when done, so resident memory stays at about one part, whatever the file size.
    """

    path: Path
    start: int = 0
    end: int | None = None

    @property
    def label(self) -> str:
        return str(self.path)

    def parts(self, part_bytes: int) -> list[Origin]:
        size = self.path.stat().st_size
        bounds = [0]
        with open(self.path, "rb") as data:
            while bounds[-1] + part_bytes < size:
                data.seek(bounds[-1] + part_bytes)
                data.readline()  # to the start of the next line
                if data.tell() >= size:
                    break
                bounds.append(data.tell())
        return [replace(self, start=a, end=b) for a, b in zip(bounds, [*bounds[1:], None])]

    def records(self, columns):
        with open(self.path, "rb") as file:
            size = min(os.fstat(file.fileno()).st_size, self.end if self.end is not None else 1 << 62)
            if size <= self.start:
                return
            with mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ) as data:
                yield from _json_lines(data, self.start, size)


def _json_lines(data: mmap.mmap, start: int, end: int) -> Iterator[Record]:
    """The lines starting in [start, end); a blank line is a None record, so that row numbers stay true."""
    view = memoryview(data)
    try:
        position = start + 3 if start == 0 and data[:3] == BOM else start
        number = 0
        while position < end:
            stop = data.find(b"\n", position)
            stop = len(data) if stop < 0 else stop
            number += 1
            try:
                record = orjson.loads(view[position:stop])
            except orjson.JSONDecodeError as error:
                line = data[position:stop]
                yield number, _json_line_error(line, error) if line.strip() else None, line
            else:
                if type(record) is dict:
                    yield number, record, None
                else:
                    error = RowError("not_an_object", f"a JSON {_kind(record)}, not an object")
                    yield number, error, data[position:stop]
            position = stop + 1
    finally:
        view.release()


def _json_line_error(line: bytes, error: orjson.JSONDecodeError) -> RowError:
    try:
        line.decode("utf-8")
    except UnicodeDecodeError as bad:
        return RowError("not_utf8", f"not valid UTF-8 (byte {bad.start})")
    return RowError("broken_json", f"broken JSON ({error.msg} at column {error.colno})")


@dataclass
class JsonArrayFile(Origin):
    path: Path

    @property
    def label(self) -> str:
        return str(self.path)

    def records(self, columns):
        for number, record in enumerate(self._load(), 1):
            if type(record) is dict:
                yield number, record, None
            else:
                yield number, RowError("not_an_object", f"a JSON {_kind(record)}, not an object"), None

    def _load(self) -> list[Any]:
        try:
            return orjson.loads(self.path.read_bytes().removeprefix(BOM))
        except orjson.JSONDecodeError as error:
            reason = "not valid UTF-8" if "UTF-8" in error.msg else error.msg
            raise SourceError(f"{self.path}: broken JSON array ({reason} at line {error.lineno}, "
                              f"column {error.colno})") from None


@dataclass
class ParquetFile(Origin):
    path: Path
    batch_rows: int = 8192
    row_groups: tuple[int, ...] | None = None  # a part: these row groups only

    @property
    def label(self) -> str:
        return str(self.path)

    def _schema(self) -> pa.Schema:
        try:
            return pq.read_schema(self.path)
        except (pa.ArrowException, OSError) as error:
            raise SourceError(f"{self.path}: not a readable Parquet file ({_one_line(error)})") from None

    def columns(self):
        return self._schema().names

    def check_types(self, layout: Layout) -> None:
        text_type = self._schema().field(layout.text_column).type
        if not (pa.types.is_string(text_type) or pa.types.is_large_string(text_type)
                or pa.types.is_list(text_type) or pa.types.is_large_list(text_type)):
            raise SourceError(f"{self.path}: column {layout.text_column} is {text_type}, not text")

    def parts(self, part_bytes: int) -> list[Origin]:
        try:
            metadata = pq.read_metadata(self.path)
        except (pa.ArrowException, OSError):
            return [self]  # check() names the problem
        groups: list[list[int]] = [[]]
        size = 0
        for index in range(metadata.num_row_groups):
            if size >= part_bytes:
                groups.append([])
                size = 0
            groups[-1].append(index)
            size += metadata.row_group(index).total_byte_size
        return [self] if len(groups) == 1 else [replace(self, row_groups=tuple(g)) for g in groups]

    def records(self, columns):
        present = [c for c in columns if c in self._schema().names]
        number = 0
        try:
            batches = pq.ParquetFile(self.path).iter_batches(batch_size=self.batch_rows, columns=present,
                                                             row_groups=self.row_groups)
            for batch in batches:
                for record in batch.to_pylist():
                    number += 1
                    yield number, record, None
        except (pa.ArrowException, OSError) as error:  # a damaged page: the footer read fine, the data did not
            raise SourceError(f"{self.path}: row {number + 1}: unreadable Parquet data ({_one_line(error)})") from None


@dataclass
class CsvFile(Origin):
    path: Path

    @property
    def label(self) -> str:
        return str(self.path)

    def columns(self):
        bad_lines: set[int] = set()
        with open(self.path, "rb") as raw:
            header = next(csv.reader(_decoded(raw, bad_lines)), None)
        if header is None:
            raise SourceError(f"{self.path}: empty CSV file, no header")
        if bad_lines:
            raise SourceError(f"{self.path}: row 1: the CSV header is not valid UTF-8")
        return header

    def records(self, columns):
        csv.field_size_limit(2**31 - 1)  # instructions can exceed the 128 KiB default
        bad_lines: set[int] = set()
        with open(self.path, "rb") as raw:
            reader = csv.DictReader(_decoded(raw, bad_lines))
            first_line = 2
            for record in reader:
                if bad_lines.intersection(range(first_line, reader.line_num + 1)):
                    yield first_line, RowError("not_utf8", "not valid UTF-8"), None
                else:
                    yield first_line, record, None
                first_line = reader.line_num + 1


def _decoded(raw, bad_lines: set[int]) -> Iterator[str]:
    """Lines decoded one at a time, so one bad line fails its row, not the file."""
    for number, line in enumerate(raw, 1):
        if number == 1:
            line = line.removeprefix(BOM)
        try:
            yield line.decode("utf-8")
        except UnicodeDecodeError:
            bad_lines.add(number)
            yield line.decode("utf-8", errors="replace")


@dataclass
class HubDataset(Origin):
    hub_id: str
    split: str
    _dataset: Any = None

    @property
    def label(self) -> str:
        return f"{self.hub_id}:{self.split}"

    def _load(self):
        if self._dataset is None:
            try:
                import datasets

                self._dataset = datasets.load_dataset(self.hub_id, split=self.split, streaming=True)
            except Exception as error:  # network, auth, not found and bad split all surface here
                raise SourceError(f"{self.label}: not a local path, and loading it from the Hugging Face hub "
                                  f"failed ({type(error).__name__}: {_one_line(error)})") from None
        return self._dataset

    def columns(self):
        features = self._load().features
        return list(features) if features is not None else None

    def records(self, columns):
        dataset = self._load()
        if dataset.features is not None:
            dataset = dataset.select_columns([c for c in columns if c in dataset.features])
        try:
            for number, record in enumerate(dataset, 1):
                yield number, record, None
        except Exception as error:  # a stream cut mid-way by the network
            raise SourceError(f"{self.label}: reading from the hub failed ({_one_line(error)})") from None


def _one_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return text[0] if text else type(error).__name__


# -- sources ----------------------------------------------------------------------------------------------
@dataclass
class Source:
    name: str
    main_source: str
    origins: list[Origin]
    text_column: str | None = None
    _layouts: dict[str, Layout] = field(default_factory=dict)

    def check(self) -> None:
        """Every whole-source failure, before anything is written (see the module's policy)."""
        for origin in self.origins:
            layout = self.layout(origin)
            if origin.columns() is not None:
                origin.check_types(layout)
            if not isinstance(origin, HubDataset):
                self._first_usable_row(origin, layout)

    def rows(self) -> Iterator[Row]:
        for origin in self.origins:
            yield from map_rows(origin, self.layout(origin))

    def layout(self, origin: Origin) -> Layout:
        """The layout `origin` is read with, fitted (and checked) once per origin."""
        if origin.label not in self._layouts:
            self._layouts[origin.label] = self._fit_layout(origin)
        return self._layouts[origin.label]

    def _fit_layout(self, origin: Origin) -> Layout:
        columns = origin.columns()
        if columns is None:
            columns = self._first_record_columns(origin)
        if self.name in LAYOUTS:
            layout = LAYOUTS[self.name]
        else:
            layout = own_layout(self.text_column or _default_text_column(origin, columns))
        missing = [c for c in layout.required if c not in columns]
        if missing:
            raise SourceError(f"{origin.label}: the {self.name} layout needs column(s) {', '.join(missing)}; "
                              f"found {', '.join(columns) or 'none'}")
        return layout

    def _first_record_columns(self, origin: Origin) -> list[str]:
        """JSON has no header: the first record that parses stands for the file's layout."""
        first_error = None
        for number, record, _ in origin.records(()):
            if isinstance(record, dict):
                return list(record)
            if record is not None:
                first_error = first_error or f"row {number}: {record}"
        if first_error:
            raise SourceError(f"{origin.label}: no usable row ({first_error})")
        return []

    def _first_usable_row(self, origin: Origin, layout: Layout) -> None:
        first_error = None
        for row in map_rows(origin, layout):
            if isinstance(row.outcome, Candidate):
                return
            if row.outcome is not None:
                first_error = first_error or f"row {row.number}: {row.outcome}"
        if first_error:
            raise SourceError(f"{origin.label}: no usable row ({first_error})")


def _default_text_column(origin: Origin, columns: list[str]) -> str:
    for column in (*DEFAULT_TEXT_COLUMNS, "turns"):
        if column in columns:
            return column
    raise SourceError(f"{origin.label}: no text column: found {', '.join(columns) or 'none'}; "
                      f"expected one of {', '.join(DEFAULT_TEXT_COLUMNS)} or turns, or give --text-column")


def map_rows(origin: Origin, layout: Layout) -> Iterator[Row]:
    """Every row of `origin` (a whole origin or one of its parts) mapped to a Candidate or a RowError."""
    label = origin.label
    for number, record, raw in origin.records(layout.columns):
        if record is None or isinstance(record, RowError):
            yield Row(label, number, record, raw)
            continue
        outcome = map_record(layout, record)
        yield Row(label, number, outcome, None if isinstance(outcome, Candidate) else raw or dump(record))


def map_record(layout: Layout, record: dict[str, Any]) -> Candidate | RowError:
    """One parsed record through its layout; whatever a malformed record raises becomes its RowError."""
    try:
        return layout.to_candidate(record)
    except RowError as error:
        return error
    except KeyError as error:
        return RowError("missing_field", f"no {error.args[0]} field")
    except (TypeError, AttributeError, IndexError) as error:
        return RowError("bad_field", _one_line(error))


def dump(record: dict[str, Any]) -> bytes:
    """A parsed record as JSON, for `failures`: the raw line is not kept for rows that parsed."""
    return orjson.dumps(record, default=str)[: RAW_CHARS * 4]


# -- resolving NAME=LOCATION ------------------------------------------------------------------------------
def parse_source(spec: str, text_column: str | None = None) -> Source:
    """NAME=LOCATION (or a paper source's NAME alone, for its hub default) to a Source; nothing is read."""
    name, _, location = spec.partition("=")
    name, location = name.strip(), location.strip()
    if not _NAME.match(name):
        raise SourceError(f"bad source {spec!r}: expected NAME=PATH_OR_HUB_ID")
    main_source = MAIN_SOURCES.get(name, name)
    column = None if name in LAYOUTS else text_column
    if not location:
        if name not in HUB_DEFAULTS:
            raise SourceError(f"source {name} needs a location: {name}=PATH" + _known_hint(name))
        return Source(name, main_source, [HubDataset(*HUB_DEFAULTS[name])], column)
    path = Path(location).expanduser()
    if path.exists():
        return Source(name, main_source, _local_origins(path), column)
    if _HUB_ID.match(location) and path.suffix.lower() not in FILE_TYPES:
        if name in MAIN_SOURCES and name not in HUB_DEFAULTS:
            raise SourceError(f"{location}: no such file or directory, and source {name} has no Hugging Face "
                              f"hub copy to load instead: pass {name}=PATH")
        if name not in HUB_DEFAULTS:
            raise SourceError(f"unknown source {name!r}: {location!r} is not a local path, and only "
                              f"{', '.join(HUB_DEFAULTS)} load from the Hugging Face hub")
        hub_id, _, split = location.partition(":")
        return Source(name, main_source, [HubDataset(hub_id, split or HUB_DEFAULTS[name][1])], column)
    raise SourceError(f"{location}: no such file or directory (source {name})")


def _known_hint(name: str) -> str:
    return "" if name in MAIN_SOURCES else f" (known sources: {', '.join(MAIN_SOURCES)})"


def _local_origins(path: Path) -> list[Origin]:
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in FILE_TYPES
                       and not any(part.startswith(".") for part in p.relative_to(path).parts))
        if not files:
            raise SourceError(f"{path}: no {', '.join(FILE_TYPES)} files in this directory")
        return [_origin(p) for p in files]
    return [_origin(path)]


def _origin(path: Path) -> Origin:
    kind = FILE_TYPES.get(path.suffix.lower())
    if kind == "jsonl":
        return JsonLinesFile(path)
    if kind == "json":
        return JsonArrayFile(path) if _starts_with_bracket(path) else JsonLinesFile(path)
    if kind == "parquet":
        return ParquetFile(path)
    if kind == "csv":
        return CsvFile(path)
    raise SourceError(f"{path}: unsupported file type; expected {', '.join(FILE_TYPES)}")


def _starts_with_bracket(path: Path) -> bool:
    """A .json file holds an array or JSON lines; the first non-blank byte tells which."""
    with open(path, "rb") as data:
        head = data.read(4096).lstrip(b" \t\r\n\xef\xbb\xbf")
    return head.startswith(b"[")


def ordered(sources: list[Source]) -> list[Source]:
    """Dedup order: the paper's sources first, in its order, then the user's own by name."""
    names = [s.name for s in sources]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise SourceError(f"source {repeated[0]} is given twice; pass a directory to read several files")
    rank = {name: i for i, name in enumerate(SOURCE_PRIORITY)}
    return sorted(sources, key=lambda s: (rank.get(s.name, len(rank)), s.name))

