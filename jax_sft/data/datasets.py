"""SFT datasets: NeMo RL's dataset contract, its built-in datasets and a registry.

A dataset is any object with

  * `formatted_ds`: `{"train": rows, "validation": rows}`, where `rows` supports `len()` and
    integer indexing and each row is a dict in Hugging Face chat format,
    `{"messages": [{"role": ..., "content": ...}, ...]}`, optionally with `"tools"` (a list of
    JSON schemas handed to the chat template);
  * `task_spec`: a `TaskDataSpec`.

`data.dataset_name` picks one: a registered name (`DATASETS`) or a user class as a dotted path,
`"pkg.module:Class"` (or `"pkg.module.Class"`). Constructor contract, for built-ins and user
classes alike: `Class(data_cfg)`, where `data_cfg` is the run config's `data` section (an
ml-collections ConfigDict; read it with `data_cfg.get(key, default)` for keys of your own).

Hub datasets load with `datasets.load_dataset` (so `HF_DATASETS_CACHE` and `HF_HUB_OFFLINE` apply);
each built-in also reads local files of the hub dataset's schema from `data.train_data_path` /
`data.val_data_path` (`.jsonl`, `.json`, `.parquet`, or a dataset folder).
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import logging
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, Protocol

import datasets as hf_datasets

log = logging.getLogger(__name__)

__all__ = [
    "TaskDataSpec", "SFTDataset", "PreservingDataset", "DATASETS", "build_dataset", "load_rows",
    "read_json_records", "SquadDataset", "OasstDataset", "OpenMathInstruct2Dataset",
    "ResponseDataset", "OpenAIFormatDataset", "NoneFilledToolsWarning",
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
    task_spec: TaskDataSpec


class PreservingDataset(Sequence):
    """Rows kept as plain Python dicts, each exactly as read (no shared schema, no None-filled keys).

    NeMo RL's `PreservingDataset`: Arrow tables (Hugging Face `datasets`) give all rows one schema,
    and a schema built by unifying dicts adds every key seen anywhere, as None, to every row. For
    tool calls whose argument keys differ between tools, that changes the arguments the model is
    trained to emit. This list keeps each row as it was.
    """

    def __init__(self, rows: list[dict[str, Any]]):
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return PreservingDataset(self.rows[index])
        return self.rows[index]

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return iter(self.rows)


# ----------------------------------------------------------------------------- loading files


def read_json_records(path: str | Path) -> list[tuple[int, dict[str, Any]]]:
    """(line number, object) for each record of a `.jsonl` file (one JSON object per line; blank
    lines skipped) or a `.json` file holding a list of objects (line number of the list: 1).
    A malformed line is a ValueError naming the file and the line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    if path.suffix == ".json":
        try:
            records = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{e.lineno}:{e.colno}: malformed JSON: {e.msg}") from e
        if isinstance(records, dict):
            records = [records]
        out = list(enumerate(records, start=1))
    else:
        out = []
        with path.open(encoding="utf-8") as f:
            for lineno, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    out.append((lineno, json.loads(line)))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{lineno}: malformed JSON line: {e.msg} (column {e.colno})") from e
    for lineno, record in out:
        if not isinstance(record, dict):
            raise ValueError(f"{path}:{lineno}: expected a JSON object, got {type(record).__name__}")
    return out


def _raise_json_error(path: Path, error: Exception) -> None:
    """Re-raises a failed Arrow JSON load with the file and line of the first malformed line."""
    if path.suffix in (".json", ".jsonl"):
        read_json_records(path)  # raises ValueError naming the line when one is malformed
    raise error


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
        try:
            return hf_datasets.load_dataset(fmt, data_files=str(path), split="train")
        except (ValueError, hf_datasets.exceptions.DatasetGenerationError) as e:
            _raise_json_error(path, e)
    if path.suffix in _FILE_FORMATS:
        raise FileNotFoundError(f"{key}={path_or_id!r}: no such file")
    return hf_datasets.load_dataset(path_or_id, split=split or "train")


def _column(ds, name: str, where: str) -> None:
    cols = getattr(ds, "column_names", None)
    if cols is not None and name not in cols:
        raise KeyError(f"{where}: no column {name!r}; the columns are {cols}")


def _local_or_hub(data_cfg, hub_id: str, train_split: str, val_split: str) -> dict[str, hf_datasets.Dataset]:
    """train/validation Arrow datasets: from data.train_data_path / val_data_path when set (both),
    else the hub dataset's splits (data.train_split / val_split override the split names)."""
    train_path, val_path = data_cfg.get("train_data_path"), data_cfg.get("val_data_path")
    if (train_path is None) != (val_path is None):
        raise ValueError(f"{hub_id}: set both data.train_data_path and data.val_data_path (local files of the "
                         "hub schema), or neither (load from the hub)")
    if train_path is not None:
        return {"train": load_rows(train_path, data_cfg.get("train_split"), key="data.train_data_path"),
                "validation": load_rows(val_path, data_cfg.get("val_split"), key="data.val_data_path")}
    return {"train": hf_datasets.load_dataset(hub_id, split=data_cfg.get("train_split") or train_split),
            "validation": hf_datasets.load_dataset(hub_id, split=data_cfg.get("val_split") or val_split)}


def _format(ds: hf_datasets.Dataset, fn: Callable[[dict, int], dict], where: str) -> hf_datasets.Dataset:
    return ds.map(fn, with_indices=True, remove_columns=ds.column_names, desc=f"formatting {where}")


# ----------------------------------------------------------------------------- built-in datasets


class SquadDataset:
    """rajpurkar/squad: system = context, user = question, assistant = the first answer."""

    def __init__(self, data_cfg):
        raw = _local_or_hub(data_cfg, "rajpurkar/squad", "train", "validation")
        self.formatted_ds = {}
        for split, ds in raw.items():
            for col in ("context", "question", "answers"):
                _column(ds, col, f"squad {split}")
            self.formatted_ds[split] = _format(ds, _format_squad, f"squad {split}")
        self.task_spec = TaskDataSpec("SQuAD", data_cfg.get("prompt_file"), data_cfg.get("system_prompt_file"))


def _format_squad(row: dict, index: int) -> dict:
    answers = row["answers"]["text"]
    if not answers:
        raise ValueError(f"squad row {index}: 'answers.text' is empty")
    return {"messages": [
        {"role": "system", "content": row["context"]},
        {"role": "user", "content": row["question"]},
        {"role": "assistant", "content": answers[0]},
    ]}


OASST_SYSTEM_PROMPT = (
    "A chat between a curious user and an artificial intelligence assistant. The assistant gives "
    "helpful, detailed, and polite answers to the user's questions.\n\n"
)
_OASST_ROLES = {"prompter": "user", "assistant": "assistant"}


class OasstDataset:
    """OpenAssistant/oasst1: message trees (rows linked by message_id / parent_id) -> conversations.

    As NeMo RL's oasst.py: every path from a tree's root to a leaf is one conversation, opened by
    NeMo RL's system prompt; roles prompter -> user, assistant -> assistant; paths of fewer than
    two messages are dropped. The train/validation splits are the hub dataset's. (NeMo RL itself
    downloads the `*_oasst_all.trees.jsonl.gz` file and splits its trees 95/5 with seed 42.)
    """

    def __init__(self, data_cfg):
        raw = _local_or_hub(data_cfg, "OpenAssistant/oasst1", "train", "validation")
        self.formatted_ds = {split: PreservingDataset(oasst_conversations(ds, f"oasst {split}"))
                             for split, ds in raw.items()}
        self.task_spec = TaskDataSpec("OASST", data_cfg.get("prompt_file"), data_cfg.get("system_prompt_file"))


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
            raise ValueError(f"{where}: message {mid}: unknown role {role!r}; expected one of {sorted(_OASST_ROLES)}")
        if parent is None:
            roots.append(i)
        elif parent not in known:
            raise ValueError(f"{where}: message {mid}: parent_id {parent} is not a message of this split")
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


_OMI2_SPLITS = ("train", "train_1M", "train_2M", "train_5M")


class OpenMathInstruct2Dataset:
    """nvidia/OpenMathInstruct-2: user = `problem`, assistant = `data.output_key`.

    As NeMo RL: the hub split `data.split` (default "train_1M"), of which a validation split of
    `data.test_size` (default 0.05) is carved with `train_test_split(seed=data.seed)` (default 42).
    `data.output_key` left at the ResponseDataset default "output" (not an OpenMathInstruct-2 column)
    means "generated_solution", the SFT target of NeMo RL's sft_openmathinstruct2.yaml. With
    data.train_data_path (a local file of this schema) the file replaces the hub split; with
    data.val_data_path too, no validation split is carved.
    """

    def __init__(self, data_cfg):
        output_key = data_cfg.get("output_key") or "output"
        self.output_key = "generated_solution" if output_key == "output" else output_key
        split = data_cfg.split
        train_path, val_path = data_cfg.get("train_data_path"), data_cfg.get("val_data_path")
        if train_path is not None:
            source = load_rows(train_path, key="data.train_data_path")
        else:
            if split not in _OMI2_SPLITS:
                raise ValueError(f"data.split={split!r}: expected one of {_OMI2_SPLITS}")
            source = hf_datasets.load_dataset("nvidia/OpenMathInstruct-2", split=split)
        if val_path is not None:
            raw = {"train": source, "validation": load_rows(val_path, key="data.val_data_path")}
        else:
            parts = source.train_test_split(test_size=data_cfg.test_size, seed=data_cfg.seed)
            raw = {"train": parts["train"], "validation": parts["test"]}
        self.formatted_ds = {}
        for name, ds in raw.items():
            for col in ("problem", self.output_key):
                _column(ds, col, f"openmathinstruct2 {name}")
            self.formatted_ds[name] = _format(ds, self._format, f"openmathinstruct2 {name}")
        self.task_spec = TaskDataSpec("OpenMathInstruct-2", data_cfg.get("prompt_file"),
                                      data_cfg.get("system_prompt_file"))

    def _format(self, row: dict, index: int) -> dict:
        return {"messages": [{"role": "user", "content": row["problem"]},
                             {"role": "assistant", "content": row[self.output_key]}]}


class ResponseDataset:
    """Input/output pairs from local files or a hub dataset: user = row[data.input_key],
    assistant = row[data.output_key]. Rows that already have a `messages` column are taken as
    chat rows. `data.train_split` / `data.val_split` pick hub splits."""

    def __init__(self, data_cfg):
        self.input_key = data_cfg.get("input_key") or "input"
        self.output_key = data_cfg.get("output_key") or "output"
        self.formatted_ds = {}
        for split, key, split_key in (("train", "train_data_path", "train_split"),
                                      ("validation", "val_data_path", "val_split")):
            path = data_cfg.get(key)
            if path is None:
                raise ValueError(f"ResponseDataset: data.{key} is required (a .jsonl/.json/.parquet file or a hub id)")
            ds = load_rows(path, data_cfg.get(split_key), key=f"data.{key}")
            if "messages" in ds.column_names:
                self.formatted_ds[split] = ds.select_columns(
                    ["messages"] + (["tools"] if "tools" in ds.column_names else []))
                continue
            for col in (self.input_key, self.output_key):
                _column(ds, col, f"data.{key}={path!r}")
            self.formatted_ds[split] = _format(ds, lambda row, i, p=path: self._format(row, f"{p} row {i}"),
                                               f"{path} ({split})")
        self.task_spec = TaskDataSpec("ResponseDataset", data_cfg.get("prompt_file"),
                                      data_cfg.get("system_prompt_file"))

    def _format(self, row: dict, where: str) -> dict:
        for key in (self.input_key, self.output_key):
            if row[key] is None:  # Arrow gives a row without the key None
                raise KeyError(f"{where}: missing key {key!r}")
        return {"messages": [{"role": "user", "content": row[self.input_key]},
                             {"role": "assistant", "content": row[self.output_key]}]}


class NoneFilledToolsWarning(UserWarning):
    """Tool schemas or tool-call arguments with null values: likely keys added by Arrow schema
    unification; `data.use_preserving_dataset=true` keeps each row's own keys."""


class OpenAIFormatDataset:
    """Conversations in OpenAI chat format, with tool calling (NeMo RL's `openai_format`).

    Each record: `{data.chat_key: [messages...], data.tool_key: [tool schemas...]?,
    data.system_key: "..."?}`. A system message is put first from the record's `data.system_key`
    or else `data.system_prompt`. The last message must be the assistant's.

    `data.use_preserving_dataset=true`: records are read line by line with `json` and kept as plain
    dicts (`PreservingDataset`), so heterogeneous tool schemas and arguments keep exactly their own
    keys. `false`: NeMo RL's Arrow path (`datasets.load_dataset("json")`). Arrow gives all rows one
    schema; where it builds that schema by unifying dicts it adds every key seen anywhere as None
    (datasets < 5 does this for the JSON loader, `Dataset.from_list` and Parquet files written from
    it always do), which corrupts tool calls. `datasets>=5` stores heterogeneous dicts from JSON
    files as `Json` values and keeps them intact. A `NoneFilledToolsWarning` is raised when null
    values are found in tool schemas or arguments on the Arrow path.
    """

    def __init__(self, data_cfg):
        self.chat_key = data_cfg.get("chat_key") or "messages"
        self.system_key = data_cfg.get("system_key")
        self.system_prompt = data_cfg.get("system_prompt")
        self.tool_key = data_cfg.get("tool_key")
        if data_cfg.get("system_prompt_file") is not None:
            raise ValueError("openai_format: data.system_prompt_file is not supported (as in NeMo RL); "
                             "use data.system_prompt or data.system_key")
        preserving = bool(data_cfg.get("use_preserving_dataset", False))
        self.formatted_ds = {}
        for split, key in (("train", "train_data_path"), ("validation", "val_data_path")):
            path = data_cfg.get(key)
            if path is None:
                raise ValueError(f"openai_format: data.{key} is required")
            if preserving:
                if Path(path).suffix not in (".jsonl", ".json"):
                    raise ValueError(f"data.{key}={path!r}: data.use_preserving_dataset reads JSON lines; "
                                     "expected a .jsonl or .json file")
                rows = [self.format(rec, f"{path}:{lineno}") for lineno, rec in read_json_records(path)]
                self.formatted_ds[split] = PreservingDataset(rows)
            else:
                ds = load_rows(path, key=f"data.{key}")
                ds = ds.map(lambda rec, i, p=path: self.format(rec, f"{p} row {i}"), with_indices=True,
                            remove_columns=ds.column_names, desc=f"formatting {path}")
                _warn_if_none_filled(ds, path)
                self.formatted_ds[split] = ds
        self.task_spec = TaskDataSpec("openai_format", data_cfg.get("prompt_file"))

    def format(self, record: dict, where: str) -> dict:
        if self.chat_key not in record or record[self.chat_key] is None:
            raise KeyError(f"{where}: missing key {self.chat_key!r} (data.chat_key); the keys are {sorted(record)}")
        messages = list(record[self.chat_key])
        if not messages:
            raise ValueError(f"{where}: {self.chat_key!r} is an empty conversation")
        if self.system_key is not None and record.get(self.system_key) is not None:
            messages = [{"role": "system", "content": record[self.system_key]}, *messages]
        elif self.system_prompt:
            messages = [{"role": "system", "content": self.system_prompt}, *messages]
        last = messages[-1]
        if not isinstance(last, dict) or last.get("role") != "assistant":
            role = last.get("role") if isinstance(last, dict) else type(last).__name__
            raise ValueError(f"{where}: the last message must be the assistant's (openai_format), got role {role!r}")
        out = {"messages": messages}
        if self.tool_key and record.get(self.tool_key) is not None:
            out["tools"] = record[self.tool_key]
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


# ----------------------------------------------------------------------------- registry

DATASETS: dict[str, type] = {
    "squad": SquadDataset,
    "open_assistant": OasstDataset,
    "openmathinstruct2": OpenMathInstruct2Dataset,
    "ResponseDataset": ResponseDataset,
    "prompt_response_dataset": ResponseDataset,  # NeMo RL's older name
    "openai_format": OpenAIFormatDataset,
}


def _import_class(name: str):
    module, sep, attr = name.partition(":")
    if not sep:
        module, _, attr = name.rpartition(".")
    if not module or not attr:
        raise ImportError(f"{name!r} is not a dotted path 'pkg.module:Class'")
    obj = importlib.import_module(module)
    for part in attr.split("."):
        obj = getattr(obj, part)
    return obj


def build_dataset(cfg) -> SFTDataset:
    """The dataset named by `cfg.data.dataset_name`, constructed as `Class(cfg.data)` and checked
    for `formatted_ds` ({"train", "validation"}) and `task_spec`."""
    name = cfg.data.dataset_name
    if name in DATASETS:
        cls = DATASETS[name]
    else:
        try:
            cls = _import_class(name)
        except (ImportError, AttributeError) as e:
            raise ValueError(f"data.dataset_name={name!r} is neither a registered dataset ({', '.join(DATASETS)}) "
                             f"nor an importable class 'pkg.module:Class' ({e})") from e
    dataset = cls(cfg.data)
    formatted = getattr(dataset, "formatted_ds", None)
    if not isinstance(formatted, dict) or not {"train", "validation"} <= set(formatted):
        raise TypeError(f"data.dataset_name={name!r}: {cls.__name__}.formatted_ds must be a dict with 'train' and "
                        f"'validation' splits, got {type(formatted).__name__}"
                        + (f" with keys {sorted(formatted)}" if isinstance(formatted, dict) else ""))
    if not isinstance(getattr(dataset, "task_spec", None), TaskDataSpec):
        raise TypeError(f"data.dataset_name={name!r}: {cls.__name__}.task_spec must be a "
                        "jax_sft.data.TaskDataSpec")
    log.info("dataset %s: %d train, %d validation conversations", name, len(formatted["train"]),
             len(formatted["validation"]))
    return dataset
