"""The dataset protocol and the row formats shared by the built-in datasets: `TaskDataSpec` (prompt
files), `RawDataset` (NeMo RL's current dataset protocol, with its validation carve-out and
sampling), OpenAI chat rows with tools (`OpenAIFormatRows`), OpenAssistant conversations, and the
row mappers that name each row's file and line in errors.

What the pipeline consumes is an object with

  * `formatted_ds`: `{"train": rows, "validation": rows}`, where `rows` supports `len()` and
    integer indexing and each row is a dict in Hugging Face chat format,
    `{"messages": [{"role": ..., "content": ...}, ...]}`, optionally with `"tools"` (a list of
    JSON schemas handed to the chat template);
  * `task_spec`: a `TaskDataSpec` applied to every row by the encoder, or None when the rows
    carry their own prompts already (mixed datasets: `jax_sft.data.sections.MixedRows`).
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import warnings
from pathlib import Path
from typing import Any, Protocol

import datasets as hf_datasets

from jax_sft.data.readers import (
    Place,
    PreservingDataset,
    format_rows,
    load_source,
    local_copy,
    naming_bad_bytes,
    read_json_records,
    record_place,
    require_column,
)
from jax_sft.errors import DataError, MissingFileError

__all__ = [
    "TaskDataSpec",
    "SFTDataset",
    "RawDataset",
    "OpenAIFormatRows",
    "NoneFilledToolsWarning",
    "OASST_SYSTEM_PROMPT",
    "oasst_conversations",
    "oasst_tree_conversations",
    "carve",
    "sample",
    "task_name_from_path",
    "import_class",
    "PROCESSORS",
]

PROCESSORS = ("sft_processor",)


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
        raise MissingFileError(f"{key}={path!r}: no such file")
    return p.read_text(encoding="utf-8")


class SFTDataset(Protocol):
    formatted_ds: dict[str, Any]
    task_spec: TaskDataSpec | None


def carve(rows, test_size: float, seed: int):
    """(train, validation) as NeMo RL's `split_train_validation`: `train_test_split(test_size, seed)`,
    test_size >= 1 a row count. Rows that are not an Arrow dataset are split by the same indices."""
    if test_size >= 1:
        test_size = int(test_size)
    if isinstance(rows, hf_datasets.Dataset):
        parts = rows.train_test_split(test_size=test_size, seed=seed)
        return parts["train"], parts["test"]
    index = hf_datasets.Dataset.from_dict({"i": list(range(len(rows)))}).train_test_split(
        test_size=test_size, seed=seed
    )
    if isinstance(rows, PreservingDataset):
        return tuple(rows.take(index[part]["i"]) for part in ("train", "test"))
    return tuple(PreservingDataset([rows[i] for i in index[part]["i"]]) for part in ("train", "test"))


def sample(rows: hf_datasets.Dataset, max_samples: int | None, seed: int) -> hf_datasets.Dataset:
    """NeMo RL's max_samples: a seeded shuffle, then the first max_samples rows (null or <= 0: all)."""
    if max_samples is None or max_samples <= 0:
        return rows
    return rows.shuffle(seed=seed).select(range(min(max_samples, len(rows))))


def task_name_from_path(path: str) -> str:
    """NeMo RL's task name of a file dataset: the last two path parts joined by "-", up to the first "."."""
    name = "-".join(path.split("/")[-2:]).split(".")[0]
    return name[1:] if name.startswith("-") else name


class RawDataset:
    """Base of jax_sft's built-ins and of user classes written for NeMo RL's current protocol."""

    task_name: str
    dataset: Any
    val_dataset: Any = None
    task_spec: TaskDataSpec | None = None
    data_config: dict | None = None
    HUB_ID: str | None = None  # for describe_data
    rows_are_records = True  # row n of `dataset` is record n of its source (for error places)

    def split_train_validation(self, test_size: float | None, seed: int | None) -> None:
        if test_size and test_size > 0:
            try:
                self.dataset, self.val_dataset = carve(self.dataset, test_size, 42 if seed is None else seed)
            except ValueError as e:  # datasets' message on sizes that leave a split empty
                raise ValueError(
                    f"{self.task_name}: split_validation_size={test_size} of {len(self.dataset)} rows: {e}"
                ) from None

    def set_task_spec(self, data_config: dict) -> None:
        self.data_config = data_config
        self.task_spec = TaskDataSpec(
            self.task_name, data_config.get("prompt_file"), data_config.get("system_prompt_file")
        )

    def set_processor(self) -> None:
        name = (self.data_config or {}).get("processor") or "sft_processor"
        if name not in PROCESSORS:
            raise ValueError(f"processor={name!r}: jax_sft's SFT takes {PROCESSORS[0]!r}")


def load_split(cls: type[RawDataset], data_path: str | None, split: str | None, hub_loader):
    """A built-in's rows: the local copy `data_path` when given, else the hub's (`hub_loader()`)."""
    if data_path is not None:
        return local_copy(data_path, split, f"{cls.__name__} data_path")
    return hub_loader()


def user_assistant(user: Any, assistant: Any) -> dict:
    return {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]}


def map_rows(ds, fn, where: str, columns: tuple[str, ...], path: str | None = None):
    """`ds` formatted by fn(row, place); `path`: the local file row i is record i of (None: rows
    are named "<where> row i"), so that errors name its 1-based line."""
    for col in columns:
        require_column(ds, col, where)
    place = functools.partial(_format_place, where, path)
    return format_rows(ds, lambda row, i: fn(row, Place(place, i)), where, path)


def _format_place(where: str, path: str | None, i: int) -> str:
    if path is None or not Path(path).is_file():
        return f"{where} row {i}"
    name = where.removesuffix(str(path)).strip()
    return record_place(path, i) + (f" ({name})" if name else "")


def last_is_assistant(messages: list, where: str) -> list:
    if not messages or messages[-1]["role"] != "assistant":
        role = messages[-1]["role"] if messages else None
        raise DataError(f"{where}: the last message must be the assistant's, got role {role!r}")
    return messages


OASST_SYSTEM_PROMPT = (
    "A chat between a curious user and an artificial intelligence assistant. The assistant gives "
    "helpful, detailed, and polite answers to the user's questions.\n\n"
)
_OASST_ROLES = {"prompter": "user", "assistant": "assistant"}


def oasst_conversations(ds, where: str) -> list[dict]:
    """Root-to-leaf conversations of the oasst message rows in `ds` (columns message_id,
    parent_id, role, text)."""
    for col in ("message_id", "parent_id", "role", "text"):
        require_column(ds, col, where)
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
            if not kids and len(path) >= 2:
                out.append({"messages": [{"role": "system", "content": OASST_SYSTEM_PROMPT}, *path]})
            stack.extend((k, path) for k in reversed(kids))
    return out


def _threads(node: dict, where: str) -> list[list[dict]]:
    """Every root-to-leaf path below `node` of an oasst message tree, replies in order."""
    message = node["prompt"] if "prompt" in node else node if {"text", "role"} <= set(node) else None
    if message is None:
        return [[]]
    role = _OASST_ROLES.get(message["role"])
    if role is None:
        raise DataError(f"{where}: unknown role {message['role']!r}; expected one of {sorted(_OASST_ROLES)}")
    turn = {"role": role, "content": message["text"]}
    below = [thread for reply in message.get("replies") or [] for thread in _threads(reply, where)]
    return [[turn, *thread] for thread in below] if below else [[turn]]


def oasst_tree_conversations(trees: list[tuple[int, dict]], where: str) -> list[dict]:
    """NeMo RL's oasst conversations: every path of every tree, opened by its system prompt; paths
    of one message are dropped."""
    out = []
    for lineno, tree in trees:
        for thread in _threads(tree, f"{where}:{lineno}"):
            if len(thread) >= 2:
                out.append({"messages": [{"role": "system", "content": OASST_SYSTEM_PROMPT}, *thread]})
    return out


class NoneFilledToolsWarning(UserWarning):
    """Tool schemas or tool-call arguments with null values: likely keys added by Arrow schema
    unification; `data.use_preserving_dataset=true` keeps each row's own keys."""


class OpenAIFormatRows:
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

    def __init__(
        self,
        chat_key: str | None = "messages",
        system_key: str | None = None,
        system_prompt: str | None = None,
        tool_key: str | None = "tools",
        use_preserving_dataset: bool | None = False,
    ):
        self.chat_key = chat_key or "messages"
        self.system_key, self.system_prompt, self.tool_key = system_key, system_prompt, tool_key
        self.preserving = bool(use_preserving_dataset)

    @classmethod
    def load(cls, path: str, keys: dict, key: str):
        """The formatted rows of the file `path` (`key`: its config key, for errors)."""
        self = cls(**keys)
        if self.preserving:
            if Path(path).suffix not in (".jsonl", ".json"):
                raise ValueError(
                    f"{key}={path!r}: use_preserving_dataset reads JSON lines; expected a .jsonl or .json file"
                )
            records = read_json_records(path)
            return PreservingDataset(
                [self.format(rec, f"{path}:{lineno}") for lineno, rec in records],
                [f"{path}:{lineno}" for lineno, _ in records],
            )
        ds = load_source(path, None, None, key=key)
        # Every row gets a "tools" value (None without): `map` takes its columns from the first rows
        # it writes, so an optional key would be dropped from all rows, or missing from some.
        with naming_bad_bytes(path):
            ds = ds.map(
                lambda rec, i: self.format(rec, Place(functools.partial(record_place, path), i), tools_column=True),
                with_indices=True,
                remove_columns=ds.column_names,
                desc=f"formatting {path}",
            )
        _warn_if_none_filled(ds, path)
        return ds

    def format(self, record: dict, where: Any, tools_column: bool = False) -> dict:
        if self.chat_key not in record or record[self.chat_key] is None:
            present = sorted(k for k, v in record.items() if v is not None)  # Arrow None-fills absent keys
            raise DataError(
                f"{where}: missing key {self.chat_key!r} (chat_key), or it is null; the row's keys are {present}"
            )
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
    elif any(
        _has_none(call.get("function", call).get("arguments"))
        for messages in ds["messages"]
        for m in messages
        if m.get("tool_calls")
        for call in m["tool_calls"]
    ):
        where = "tool-call arguments"
    else:
        return
    warnings.warn(
        f"{path}: null values in {where} after Arrow loading: likely keys None-filled by schema "
        "unification, which trains the model on arguments its tools do not take. Set "
        "data.use_preserving_dataset=true to keep each record's own keys.",
        NoneFilledToolsWarning,
        stacklevel=3,
    )


def import_class(name: str):
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
