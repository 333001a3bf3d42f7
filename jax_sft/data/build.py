"""Building the run's dataset from the dataset sections (`sections.data_sections`): each section's
dataset loaded, the train datasets concatenated in order, the validation rows gathered as NeMo RL's
run_sft.py does, task specs bound by task name; a user class of the guide's protocol as it is."""

from __future__ import annotations

import bisect
import dataclasses
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from jax_sft.data.builtin import REGISTRY
from jax_sft.data.chat import apply_task_spec
from jax_sft.data.formats import RawDataset, TaskDataSpec
from jax_sft.data.readers import PreservingDataset, record_place, source_row
from jax_sft.data.sections import (
    WEIGHT,
    Section,
    check_data,
    data_sections,
    is_guide_class,
    parameters,
    raise_problems,
    resolve_class,
)
from jax_sft.errors import DataError

log = logging.getLogger(__name__)

# jax_sft applies system_prompt_file; NeMo RL's SFT formatting (at 7ea279ab: get_formatted_message_log
# applies only the prompt) never reads it. Said at start-up whenever the key is set.
SYSTEM_PROMPT_NOTE = (
    "system_prompt_file={!r}: its text is put first, as a system message, in every conversation that has "
    "none; NeMo RL's SFT does not apply system_prompt_file, so these token ids differ from NeMo RL's "
    "(remove the key to train as NeMo RL does)"
)

__all__ = ["MixedRows", "MixedDataset", "build_dataset", "row_place"]


class MixedRows(Sequence):
    """The rows of several datasets, concatenated in order, each part with its TaskDataSpec applied
    to its rows as they are read (prompt on the first user message, system prompt first)."""

    def __init__(self, parts: Sequence[tuple[Any, TaskDataSpec | None]]):
        self.parts = list(parts)
        self.ends = []
        total = 0
        for rows, _ in self.parts:
            total += len(rows)
            self.ends.append(total)

    def __len__(self) -> int:
        return self.ends[-1] if self.ends else 0

    def __getitem__(self, index: int) -> dict:
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(f"row {index} of {len(self)}")
        k = bisect.bisect_right(self.ends, index)
        rows, spec = self.parts[k]
        row = rows[index - (self.ends[k - 1] if k else 0)]
        if (
            spec is None
            or not isinstance(row, dict)
            or not isinstance(row.get("messages"), list)
            or not row["messages"]
        ):
            return row
        return {**row, "messages": apply_task_spec(row["messages"], spec)}


def _mix(parts: list[tuple[Any, TaskDataSpec | None]]):
    if not parts:
        return PreservingDataset([])
    rows, spec = parts[0]
    if len(parts) == 1 and (spec is None or (spec.prompt is None and spec.system_prompt is None)):
        return rows
    return MixedRows(parts)


@dataclasses.dataclass
class MixedDataset:
    """What the pipeline consumes (see jax_sft.data.formats): formatted_ds with the task specs applied
    by the rows (task_spec None), and the datasets it was built from, train then validation."""

    formatted_ds: dict[str, Any]
    datasets: list[RawDataset]
    sections: list[Section]
    task_spec: TaskDataSpec | None = None
    # split -> [(section, dataset, rows)] in the order their rows are concatenated
    parts: dict[str, list[tuple[Section, RawDataset, Any]]] = dataclasses.field(default_factory=dict)

    def place(self, split: str, index: int) -> str:
        """Where row `index` of `split` comes from, for errors: "file:line (label)" for rows read one
        to one from a JSON-lines file, else the dataset, its source and the row (0-based, as `ds[n]`)."""
        parts = self.parts.get(split) or []
        for s, d, rows in parts:
            if index < len(rows):
                return row_place(s, d, rows, index)
            index -= len(rows)
        return f"{split} row {index}"


def row_place(s: Section, d: RawDataset, rows: Any, j: int) -> str:
    """The place of row j of `rows`, a split of dataset `d` built from section `s`."""
    places = getattr(rows, "places", None)
    if places is not None:
        return f"{places[j]} ({s.label})"
    n = source_row(rows, j)
    path = s.keys.get("data_path") or s.keys.get("data_files")
    if not getattr(d, "rows_are_records", True):  # rows built from several records, or sampled
        return f"{s.label} ({s.keys['dataset_name']} {path or ''}) row {n}".replace(" )", ")")
    if path and Path(path).is_file():
        return f"{record_place(path, n)} ({s.label})"
    source = path or getattr(d, "HUB_ID", None) or s.keys["dataset_name"]
    return f"{s.label} ({source}{' ' + s.keys['split'] if s.keys.get('split') else ''}) row {n}"


def _load_section(s: Section) -> RawDataset:
    cls = resolve_class(s.keys["dataset_name"], s.origin.get("dataset_name", f"{s.where}.dataset_name"))
    params, var_kw = parameters(cls)
    kwargs = {k: v for k, v in s.keys.items() if (var_kw or k in params) and k != WEIGHT}
    if cls in REGISTRY.values():  # jax_sft's built-ins read null as their default
        kwargs = {k: v for k, v in kwargs.items() if v is not None or params[k].default is None}
    try:
        data = cls(**kwargs)
    except ConnectionError as e:  # what `datasets` raises for a hub it cannot reach (or offline mode)
        raise DataError(
            f"{s.where}: dataset_name={s.keys['dataset_name']!r} is read from the Hugging Face hub, which "
            f"cannot be reached here ({e}); set {s.where}.data_path to a local copy (a jsonl or parquet file, "
            "or a save_to_disk folder, with the hub dataset's columns)"
        ) from None
    if hasattr(data, "set_task_spec"):
        data.set_task_spec(s.keys)
    else:
        data.task_spec = TaskDataSpec(data.task_name, s.keys.get("prompt_file"), s.keys.get("system_prompt_file"))
    if hasattr(data, "set_processor"):
        data.set_processor()
    for attr, kind in (("dataset", None), ("task_name", str), ("task_spec", TaskDataSpec)):
        value = getattr(data, attr, None)
        if value is None or (kind is not None and not isinstance(value, kind)):
            raise TypeError(
                f"{s.where}: {cls.__name__}.{attr} must be set"
                + (f" to a {kind.__module__}.{kind.__name__}" if kind else "")
                + " (today's dataset protocol: dataset, val_dataset, task_name, set_task_spec)"
            )
    if getattr(data, "val_dataset", None) is None:
        data.val_dataset = None
    return data


def build_dataset(cfg):
    """The run's dataset (formatted_ds train/validation, task_spec) from either layout of cfg.data."""
    if is_guide_class(cfg.data):
        return _build_guide(cfg)
    train_sections, val_sections, problems = data_sections(cfg.data)
    raise_problems(problems + check_data(cfg.data))
    train = [_load_section(s) for s in train_sections]
    validation = [_load_section(s) for s in val_sections]
    train_specs = {d.task_name: d.task_spec for d in train}  # NeMo RL keys task specs by task name
    for s, d in zip(train_sections, train):
        if d.task_spec != train_specs[d.task_name]:
            log.warning(
                "%s: task name %r is shared with a later train dataset whose prompt_file / "
                "system_prompt_file apply to its rows too (NeMo RL binds them by task name)",
                s.label,
                d.task_name,
            )
    val_specs, val_parts, val_places = {}, [], []
    for s, d in zip(train_sections, train):
        if d.val_dataset is not None:
            val_parts.append((d.val_dataset, d.task_name))
            val_places.append((s, d, d.val_dataset))
            val_specs[d.task_name] = train_specs[d.task_name]
    for s, d in zip(val_sections, validation):
        val_parts.append((d.dataset, d.task_name))
        val_places.append((s, d, d.dataset))
        val_specs[d.task_name] = d.task_spec
    formatted = {
        "train": _mix([(d.dataset, train_specs[d.task_name]) for d in train]),
        "validation": _mix([(rows, val_specs[name]) for rows, name in val_parts]),
    }
    for s, d in zip(train_sections + val_sections, train + validation):
        if s.keys.get("system_prompt_file"):
            log.warning("%s: %s", s.label, SYSTEM_PROMPT_NOTE.format(s.keys["system_prompt_file"]))
        carved = len(d.val_dataset) if d.val_dataset is not None and s in train_sections else 0
        log.info(
            "%s: %s, %d rows%s",
            s.label,
            s.keys["dataset_name"],
            len(d.dataset),
            f" (+{carved} carved for validation)" if carved else "",
        )
    if not len(formatted["validation"]):
        log.warning("no validation data: data.validation is null and no train dataset carves a split")
    parts = {"train": [(s, d, d.dataset) for s, d in zip(train_sections, train)], "validation": val_places}
    return MixedDataset(formatted, train + validation, train_sections + val_sections, parts=parts)


def _build_guide(cfg):
    """A user class of the guide's protocol: Class(cfg.data) with formatted_ds and task_spec."""
    name = cfg.data.dataset_name
    try:
        cls = resolve_class(name, "data.dataset_name")
    except ValueError as e:
        raise_problems([str(e)])
    dataset = cls(cfg.data)
    formatted = getattr(dataset, "formatted_ds", None)
    if not isinstance(formatted, dict) or not {"train", "validation"} <= set(formatted):
        raise TypeError(
            f"data.dataset_name={name!r}: {cls.__name__}.formatted_ds must be a dict with 'train' and "
            f"'validation' splits, got {type(formatted).__name__}"
            + (f" with keys {sorted(formatted)}" if isinstance(formatted, dict) else "")
        )
    if not isinstance(getattr(dataset, "task_spec", None), TaskDataSpec):
        raise TypeError(f"data.dataset_name={name!r}: {cls.__name__}.task_spec must be a jax_sft.data.TaskDataSpec")
    log.info(
        "dataset %s: %d train, %d validation conversations", name, len(formatted["train"]), len(formatted["validation"])
    )
    return dataset
