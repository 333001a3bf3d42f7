"""Reading rows from files, folders and the hub: the one file loader (`load_source`), the one
JSON-lines reader (`read_json_records`, plain or gzipped), and where a row came from (`Place`,
`record_place`) for error messages. Nothing here knows a dataset's columns.
"""

from __future__ import annotations

import contextlib
import functools
import gzip
import json
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import datasets as hf_datasets
import numpy as np

from jax_sft.errors import DataError, MissingFileError

__all__ = [
    "FILE_TYPES",
    "PreservingDataset",
    "Place",
    "read_json_records",
    "record_place",
    "source_row",
    "load_file",
    "load_source",
    "local_copy",
    "require_column",
    "format_rows",
    "is_saved_dataset",
    "naming_bad_bytes",
]

FILE_TYPES = {
    ".arrow": "arrow",
    ".csv": "csv",
    ".json": "json",
    ".jsonl": "json",
    ".parquet": "parquet",
    ".txt": "text",
}


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
        return PreservingDataset(
            [self.rows[i] for i in indices], None if self.places is None else [self.places[i] for i in indices]
        )

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return iter(self.rows)


def read_json_records(path: str | Path) -> list[tuple[int, dict[str, Any]]]:
    """(line number, object) for each record of a `.jsonl` file (one JSON object per line; blank
    lines skipped; `.jsonl.gz` gzipped) or a `.json` file holding a list of objects (line number of
    the list: 1).
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
        with gzip.open(path, "rb") if path.suffix == ".gz" else path.open("rb") as f:
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
            lineno += raw[: e.start].count(b"\n")
        raise DataError(
            f"{path}:{lineno}: bytes that are not UTF-8 ({raw[e.start : e.end]!r} at byte {e.start}); "
            "JSON data must be UTF-8"
        ) from None


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


@contextlib.contextmanager
def naming_bad_bytes(path: str | Path | None) -> Iterator[None]:
    """Runs the block; a UnicodeDecodeError in it (Arrow reads a JSON string with bytes that are not
    UTF-8 without complaint, and fails only when the row is read) becomes a DataError naming the
    file and, for JSON files, the 1-based line of the first bad byte."""
    try:
        yield
    except UnicodeDecodeError as e:
        if path is not None and Path(path).is_file() and Path(path).suffix in (".json", ".jsonl", ".gz"):
            read_json_records(path)  # raises the DataError naming the line
        where = path if path is not None else "a dataset row"
        raise DataError(
            f"{where}: bytes that are not UTF-8 ({e.object[e.start : e.end]!r}); text data must be UTF-8"
        ) from None


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


def require_column(ds, name: str, where: str) -> None:
    cols = getattr(ds, "column_names", None)
    if cols is not None and name not in cols:
        raise KeyError(f"{where}: no column {name!r}; the columns are {cols}")


def format_rows(
    ds: hf_datasets.Dataset, fn: Callable[[dict, int], dict], where: str, path: str | None = None
) -> hf_datasets.Dataset:
    """`ds` mapped by fn(row, index); bad bytes in the rows read (`path`: the file they came from)
    are a DataError naming the file and line."""
    with naming_bad_bytes(path):
        return ds.map(fn, with_indices=True, remove_columns=ds.column_names, desc=f"formatting {where}")


def is_saved_dataset(path: Path) -> bool:
    return path.is_dir() and any((path / f).is_file() for f in ("dataset_info.json", "dataset_dict.json", "state.json"))


def load_source(path: str, subset: str | None = None, split: str | None = "train", *, key: str):
    """Rows of `path` as NeMo RL's `load_dataset_from_path` reads them: a local file by its suffix
    (FILE_TYPES), a `save_to_disk` folder, or a hub id (`load_dataset(path[, subset])`); then the
    split `split` (null: "train" when there is one). `key` names the config key in errors."""
    p = Path(path)
    suffix = p.suffix
    if suffix in FILE_TYPES:
        if subset is not None:
            raise ValueError(f"{key}={path!r}: a subset applies to hub datasets, not to a local file; remove it")
        if not p.is_file():
            raise MissingFileError(f"{key}={path!r}: no such file")
        raw = load_file(FILE_TYPES[suffix], p, None)
    elif is_saved_dataset(p):
        raw = hf_datasets.load_from_disk(str(p))
    else:
        raw = hf_datasets.load_dataset(path, subset) if subset else hf_datasets.load_dataset(path)
    if not isinstance(raw, hf_datasets.DatasetDict):
        return raw
    if split:
        if split not in raw:
            raise KeyError(f"{key}={path!r}: no split {split!r}; the splits are {sorted(raw)}")
        return raw[split]
    return raw.get("train", raw)


def local_copy(path: str, split: str | None, key: str):
    """A local `data_path` in place of a hub split: a file is the split; a saved DatasetDict gives `split`."""
    p = Path(path)
    if p.suffix not in FILE_TYPES and not is_saved_dataset(p):
        raise MissingFileError(
            f"{key}={path!r}: not a local {'/'.join(sorted(FILE_TYPES))} file or a "
            "save_to_disk folder (this dataset's hub id is fixed; data_path is a local copy)"
        )
    return load_source(path, None, split if p.is_dir() else None, key=key)
