"""The dataset contract shared by both config layouts, and the pieces the datasets are built from.

What the pipeline consumes is an object with

  * `formatted_ds`: `{"train": rows, "validation": rows}`, where `rows` supports `len()` and
    integer indexing and each row is a dict in Hugging Face chat format,
    `{"messages": [{"role": ..., "content": ...}, ...]}`, optionally with `"tools"` (a list of
    JSON schemas handed to the chat template);
  * `task_spec`: a `TaskDataSpec` applied to every row by the encoder, or None when the rows
    carry their own prompts already (mixed datasets: `jax_sft.data.layout.MixedRows`).

The datasets themselves are in `jax_sft.data.builtin` (NeMo RL's registered names) and the two
config layouts are read by `jax_sft.data.layout` (`build_dataset`, `describe_data`). A user class
in the guide's protocol, `Class(data_cfg)` giving `formatted_ds` and `task_spec`, is named by the
flat `data.dataset_name` as a dotted path `"pkg.module:Class"` (or `"pkg.module.Class"`).
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import json
import logging
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, Protocol

import datasets as hf_datasets
import numpy as np

from jax_sft.errors import DataError, MissingFileError

log = logging.getLogger(__name__)

__all__ = [
    "TaskDataSpec", "SFTDataset", "PreservingDataset", "build_dataset", "load_rows", "read_json_records",
    "oasst_conversations", "OpenAIFormatDataset", "NoneFilledToolsWarning", "OASST_SYSTEM_PROMPT",
    "Place", "record_place", "source_row", "load_file",
]

_FILE_FORMATS = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}


@dataclasses.dataclass
class TaskDataSpec:
    """What a dataset asks of the prompt side (NeMo RL's `TaskDataSpec`).

    `prompt_file`: a text file with one `{}`, formatted with the content of the first user message
    of every conversation. `system_prompt_file`: a text file whose text is put in front of every
    conversation that has no system message, as a system message. Their texts are read at
    construction (`prompt`, `system_prompt`); a missing file is an error.
    """

    task_name: str
    prompt_file: str | None = None
    system_prompt_file: str | None = None
    prompt: str | None = dataclasses.field(default=None, init=False)
    system_prompt: str | None = dataclasses.field(default=None, init=False)

    def __post_init__(self):
        if self.prompt_file is not None:
            self.prompt = _read_text(self.prompt_file, "data.prompt_file")
            if "{}" not in self.prompt:
                raise ValueError(
                    f"data.prompt_file={self.prompt_file!r}: the prompt must contain '{{}}' where the user "
                    "message goes (it is applied as prompt.format(first_user_message))"
                )
        if self.system_prompt_file is not None:
            self.system_prompt = _read_text(self.system_prompt_file, "data.system_prompt_file")


def _read_text(path: str, key: str) -> str:
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{key}={path!r}: no such file")
    return p.read_text(encoding="utf-8")


class SFTDataset(Protocol):
    formatted_ds: dict[str, Any]
    task_spec: TaskDataSpec | None


class PreservingDataset(Sequence):
    """Rows kept as plain Python dicts, each exactly as read (no shared schema, no None-filled keys).

    NeMo RL's `PreservingDataset`: Arrow tables (Hugging Face `datasets`) give all rows one schema,
    and a schema built by unifying dicts adds every key seen anywhere, as None, to every row. For
    tool calls whose argument keys differ between tools, that changes the arguments the model is
    trained to emit. This list keeps each row as it was.
    """

    def __init__(self, rows: list[dict[str, Any]], places: list[str] | None = None):
        self.rows = rows
        self.places = places  # where each row was read ("file:line"), for errors

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return PreservingDataset(self.rows[index], None if self.places is None else self.places[index])
        return self.rows[index]

    def take(self, indices: Sequence[int]) -> PreservingDataset:
        """The rows at `indices`, with their places."""
        return PreservingDataset([self.rows[i] for i in indices],
                                 None if self.places is None else [self.places[i] for i in indices])

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return iter(self.rows)


# ----------------------------------------------------------------------------- loading files


def read_json_records(path: str | Path) -> list[tuple[int, dict[str, Any]]]:
    """(line number, object) for each record of a `.jsonl` file (one JSON object per line; blank
    lines skipped) or a `.json` file holding a list of objects (line number of the list: 1).
    A malformed line, bytes that are not UTF-8 or a file without records is a DataError naming the
    file (and the 1-based line)."""
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"{path}: no such file")
    if path.suffix == ".json":
        text = _decode(path.read_bytes(), path, 1)
        try:
            records = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{e.lineno}:{e.colno}: malformed JSON: {e.msg}") from e
        if isinstance(records, dict):
            records = [records]
        out = list(enumerate(records, start=1))
    else:
        out = []
        with path.open("rb") as f:
            for lineno, raw in enumerate(f, start=1):
                line = _decode(raw, path, lineno)
                if not line.strip():
                    continue
                try:
                    out.append((lineno, json.loads(line)))
                except json.JSONDecodeError as e:
                    raise DataError(f"{path}:{lineno}: malformed JSON line: {e.msg} (column {e.colno})") from e
    if not out:
        raise DataError(f"{path}: no records (the file is empty or holds only blank lines)")
    for lineno, record in out:
        if not isinstance(record, dict):
            raise DataError(f"{path}:{lineno}: expected a JSON object, got {type(record).__name__}")
    return out


def _decode(raw: bytes, path: Path, lineno: int) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        if path.suffix == ".json":  # the whole file: find the line of the bad byte
            lineno += raw[:e.start].count(b"\n")
        raise DataError(f"{path}:{lineno}: bytes that are not UTF-8 ({raw[e.start:e.end]!r} at byte {e.start}); "
                        "JSON data must be UTF-8") from None


@functools.lru_cache(maxsize=8)
def _record_lines(path: str, mtime_ns: int) -> np.ndarray:
    """1-based line numbers of the non-blank lines of a JSON-lines file (record k is on line [k])."""
    lines = []
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            if raw.strip():
                lines.append(lineno)
    return np.asarray(lines, np.int64)


def record_place(path: str | Path, n: int) -> str:
    """Where record n (0-based, as loaded) of a local file is: "file:line" for JSON lines (blank
    lines are skipped by the loaders), "file, record n+1" for a JSON list, "file row n" otherwise."""
    path = Path(path)
    if path.suffix == ".jsonl" and path.is_file():
        lines = _record_lines(str(path), path.stat().st_mtime_ns)
        if 0 <= n < len(lines):
            return f"{path}:{lines[n]}"
    if path.suffix == ".json":
        return f"{path}, record {n + 1}"
    return f"{path} row {n}"


class Place:
    """The place of a row in error messages, computed only when the message is formatted
    (`fn(index)`), so that naming millions of rows costs nothing until one is wrong."""

    __slots__ = ("fn", "index")

    def __init__(self, fn: Callable[[int], str], index: int):
        self.fn, self.index = fn, index

    def __str__(self) -> str:
        return self.fn(self.index)

    def __format__(self, spec: str) -> str:
        return format(str(self), spec)

    def __repr__(self) -> str:
        return str(self)


def source_row(rows: Any, j: int) -> int:
    """The row of the dataset `rows` was selected from (carving, shuffling) that row j of `rows` is:
    an Arrow dataset that is a selection keeps the indices of the rows it selected."""
    indices = getattr(rows, "_indices", None) if isinstance(rows, hf_datasets.Dataset) else None
    return int(indices.column(0)[j].as_py()) if indices is not None else j


def _raise_json_error(path: Path, error: Exception) -> None:
    """Re-raises a failed Arrow JSON load with the file and line of the first malformed line."""
    if path.suffix in (".json", ".jsonl"):
        read_json_records(path)  # raises a DataError naming the line when one is malformed
    raise DataError(f"{path}: cannot be read as a {path.suffix} dataset: {error}") from error


def load_file(fmt: str, path: Path, split: str | None = "train"):
    """`load_dataset(fmt, data_files=path, split=split)`; bad bytes, malformed lines and an empty
    file (on which `datasets` raises a bare StopIteration) are DataErrors naming the file and line."""
    try:
        return hf_datasets.load_dataset(fmt, data_files=str(path), split=split)
    except (ValueError, StopIteration, hf_datasets.exceptions.DatasetGenerationError) as e:
        _raise_json_error(path, e)


def load_rows(path_or_id: str, split: str | None = None, *, key: str = "data path") -> hf_datasets.Dataset:
    """An Arrow dataset from a local file (`.jsonl`/`.json` -> `load_dataset("json")`, `.parquet` ->
    `load_dataset("parquet")`), a local dataset folder, or a hub id (`load_dataset(id, split=...)`,
    split default "train"). `key` names the config key in errors."""
    path = Path(path_or_id)
    if path.is_file():
        fmt = _FILE_FORMATS.get(path.suffix)
        if fmt is None:
            raise ValueError(f"{key}={path_or_id!r}: unsupported file type {path.suffix!r}; expected one of "
                             f"{sorted(_FILE_FORMATS)}")
        return load_file(fmt, path)
    if path.suffix in _FILE_FORMATS:
        raise FileNotFoundError(f"{key}={path_or_id!r}: no such file")
    return hf_datasets.load_dataset(path_or_id, split=split or "train")


def _column(ds, name: str, where: str) -> None:
    cols = getattr(ds, "column_names", None)
    if cols is not None and name not in cols:
        raise KeyError(f"{where}: no column {name!r}; the columns are {cols}")


def _format(ds: hf_datasets.Dataset, fn: Callable[[dict, int], dict], where: str) -> hf_datasets.Dataset:
    return ds.map(fn, with_indices=True, remove_columns=ds.column_names, desc=f"formatting {where}")


# ----------------------------------------------------------------------------- built-in datasets


OASST_SYSTEM_PROMPT = (
    "A chat between a curious user and an artificial intelligence assistant. The assistant gives "
    "helpful, detailed, and polite answers to the user's questions.\n\n"
)
_OASST_ROLES = {"prompter": "user", "assistant": "assistant"}


def oasst_conversations(ds, where: str) -> list[dict]:
    """Root-to-leaf conversations of the oasst message rows in `ds` (columns message_id,
    parent_id, role, text)."""
    for col in ("message_id", "parent_id", "role", "text"):
        _column(ds, col, where)
    ids, parents, roles, texts = ds["message_id"], ds["parent_id"], ds["role"], ds["text"]
    children: dict[str, list[int]] = {}
    known = set(ids)
    roots = []
    for i, (mid, parent, role) in enumerate(zip(ids, parents, roles)):
        if role not in _OASST_ROLES:
            raise DataError(f"{where}: message {mid}: unknown role {role!r}; expected one of {sorted(_OASST_ROLES)}")
        if parent is None:
            roots.append(i)
        elif parent not in known:
            raise DataError(f"{where}: message {mid}: parent_id {parent} is not a message of this split")
        else:
            children.setdefault(parent, []).append(i)
    out = []
    for root in roots:
        stack = [(root, [])]
        while stack:  # depth-first, children in row order
            i, path = stack.pop()
            path = path + [{"role": _OASST_ROLES[roles[i]], "content": texts[i]}]
            kids = children.get(ids[i], [])
            if not kids:
                if len(path) >= 2:
                    out.append({"messages": [{"role": "system", "content": OASST_SYSTEM_PROMPT}, *path]})
            stack.extend((k, path) for k in reversed(kids))
    return out


class NoneFilledToolsWarning(UserWarning):
    """Tool schemas or tool-call arguments with null values: likely keys added by Arrow schema
    unification; `data.use_preserving_dataset=true` keeps each row's own keys."""


class OpenAIFormatDataset:
    """Rows of conversations in OpenAI chat format, with tool calling (NeMo RL's `openai_format`).

    Each record: `{chat_key: [messages...], tool_key: [tool schemas...]?, system_key: "..."?}`. A
    system message is put first from the record's `system_key` or else `system_prompt`. The last
    message must be the assistant's.

    `use_preserving_dataset=true`: records are read line by line with `json` and kept as plain
    dicts (`PreservingDataset`), so heterogeneous tool schemas and arguments keep exactly their own
    keys. `false`: NeMo RL's Arrow path (`datasets.load_dataset("json")`). Arrow gives all rows one
    schema; where it builds that schema by unifying dicts it adds every key seen anywhere as None
    (datasets < 5 does this for the JSON loader, `Dataset.from_list` and Parquet files written from
    it always do), which corrupts tool calls. `datasets>=5` stores heterogeneous dicts from JSON
    files as `Json` values and keeps them intact. A `NoneFilledToolsWarning` is raised when null
    values are found in tool schemas or arguments on the Arrow path.
    """

    def __init__(self, chat_key: str | None = "messages", system_key: str | None = None,
                 system_prompt: str | None = None, tool_key: str | None = "tools",
                 use_preserving_dataset: bool | None = False):
        self.chat_key = chat_key or "messages"
        self.system_key, self.system_prompt, self.tool_key = system_key, system_prompt, tool_key
        self.preserving = bool(use_preserving_dataset)

    @classmethod
    def load(cls, path: str, keys: dict, key: str):
        """The formatted rows of the file `path` (`key`: its config key, for errors)."""
        self = cls(**keys)
        if self.preserving:
            if Path(path).suffix not in (".jsonl", ".json"):
                raise ValueError(f"{key}={path!r}: use_preserving_dataset reads JSON lines; expected a .jsonl "
                                 "or .json file")
            records = read_json_records(path)
            return PreservingDataset([self.format(rec, f"{path}:{lineno}") for lineno, rec in records],
                                     [f"{path}:{lineno}" for lineno, _ in records])
        ds = load_rows(path, key=key)
        # Every row gets a "tools" value (None without): `map` takes its columns from the first rows
        # it writes, so an optional key would be dropped from all rows, or missing from some.
        ds = ds.map(lambda rec, i: self.format(rec, Place(functools.partial(record_place, path), i),
                                               tools_column=True),
                    with_indices=True, remove_columns=ds.column_names, desc=f"formatting {path}")
        _warn_if_none_filled(ds, path)
        return ds

    def format(self, record: dict, where: Any, tools_column: bool = False) -> dict:
        if self.chat_key not in record or record[self.chat_key] is None:
            raise DataError(f"{where}: missing key {self.chat_key!r} (chat_key); the keys are {sorted(record)}")
        messages = list(record[self.chat_key])
        if not messages:
            raise DataError(f"{where}: {self.chat_key!r} is an empty conversation")
        if self.system_key is not None and record.get(self.system_key) is not None:
            messages = [{"role": "system", "content": record[self.system_key]}, *messages]
        elif self.system_prompt:
            messages = [{"role": "system", "content": self.system_prompt}, *messages]
        last = messages[-1]
        if not isinstance(last, dict) or last.get("role") != "assistant":
            role = last.get("role") if isinstance(last, dict) else type(last).__name__
            raise DataError(f"{where}: the last message must be the assistant's (openai_format), got role {role!r}")
        out = {"messages": messages}
        if self.tool_key and record.get(self.tool_key) is not None:
            out["tools"] = record[self.tool_key]
        elif tools_column:
            out["tools"] = None
        return out


def _has_none(value: Any) -> bool:
    if value is None:
        return True
    if isinstance(value, dict):
        return any(_has_none(v) for v in value.values())
    if isinstance(value, list):
        return any(_has_none(v) for v in value)
    return False


def _warn_if_none_filled(ds: hf_datasets.Dataset, path: str) -> None:
    if "tools" in ds.column_names and any(_has_none(t) for t in ds["tools"] if t is not None):
        where = "tool schemas"
    elif any(_has_none(call.get("function", call).get("arguments"))
             for messages in ds["messages"] for m in messages if m.get("tool_calls")
             for call in m["tool_calls"]):
        where = "tool-call arguments"
    else:
        return
    warnings.warn(f"{path}: null values in {where} after Arrow loading: likely keys None-filled by schema "
                  "unification, which trains the model on arguments its tools do not take. Set "
                  "data.use_preserving_dataset=true to keep each record's own keys.", NoneFilledToolsWarning,
                  stacklevel=3)


# ----------------------------------------------------------------------------- building


def _import_class(name: str):
    """The object at dotted path "pkg.module:Class" or "pkg.module.Class"."""
    module, sep, attr = name.partition(":")
    if not sep:
        module, _, attr = name.rpartition(".")
    if not module or not attr:
        raise ImportError(f"{name!r} is not a dotted path 'pkg.module:Class'")
    obj = importlib.import_module(module)
    for part in attr.split("."):
        obj = getattr(obj, part)
    return obj


def build_dataset(cfg):
    """`jax_sft.data.layout.build_dataset` (kept here for imports of the earlier layout)."""
    from jax_sft.data.layout import build_dataset as build  # noqa: PLC0415  (layout imports this module)

    return build(cfg)
