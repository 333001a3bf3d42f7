"""The two data layouts of NeMo RL configs, read into dataset sections, checked, built and described.

Today's layout (NeMo RL since 2026-01; what `data.train` set selects):

    data:
      train:      {dataset_name: OpenMathInstruct-2, split: train_1M, split_validation_size: 0.05}
      validation: null          # or a section, or a list of sections
      default:    {prompt_file: math.txt, processor: sft_processor}   # keys a section lacks

`data.train` / `data.validation` are one section or a list of them. As NeMo RL's run_sft.py does:
each section gets the `data.default` keys it lacks (a key set to null in the section stays null);
the train datasets are concatenated in order; the validation rows are, in order, the rows each
train dataset carved (`split_validation_size` > 0, with `seed`) followed by the `data.validation`
datasets; `validation: null` with nothing carved means no validation. Prompts bind by task name:
the rows of a dataset use the task spec (prompt_file, system_prompt_file) of the last train section
with the same task name (for validation: the last validation section, else the train one).

The guide's flat layout (`data.train` null): `data.dataset_name` with `train_data_path`,
`val_data_path`, `train_split`, `val_split`, `split`, `test_size`, `seed` and the keys of the
formats (`input_key`, `output_key`, `chat_key`, ...) is read into the same sections (a train and,
when `val_data_path`, `val_split` or squad's hub validation split gives one, a validation section),
so both layouts describing the same data build the same rows. A flat key the dataset does not take
is unused, as in NeMo RL. A dotted `data.dataset_name` that is not registered is a user class of
the guide's protocol, `Class(cfg.data)` with `formatted_ds` and `task_spec`.

In today's layout a key written in a section that its dataset does not take is an error naming it
and listing the keys it takes; `data.default` keys are checked against all datasets' keys.
"""

from __future__ import annotations

import bisect
import dataclasses
import inspect
import logging
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from jax_sft.data.builtin import ALIASES, NOT_SFT, REGISTRY, VISION_LANGUAGE
from jax_sft.data.chat import apply_task_spec
from jax_sft.data.formats import PROCESSORS, RawDataset, TaskDataSpec, import_class
from jax_sft.data.readers import FILE_TYPES, PreservingDataset, record_place, source_row
from jax_sft.errors import ConfigError

log = logging.getLogger(__name__)

__all__ = ["IgnoredDatasetKeyWarning", "Section", "MixedRows", "MixedDataset", "data_sections", "check_data",
           "build_dataset", "describe_data", "NO_VALIDATION", "FLAT_KEYS", "today_name"]

NO_VALIDATION = ("sft.val_period={}: expected 0 when there is no validation data (data.validation is null and no "
                 "train dataset carves a split with split_validation_size), as NeMo RL requires; or give validation "
                 "data")
# Keys every section may hold besides its dataset's constructor arguments.
COMMON = ("dataset_name", "prompt_file", "system_prompt_file", "processor")
# Flat keys handed to a dataset that takes them (the guide's keys of the formats).
_FLAT_BAG = ("input_key", "output_key", "chat_key", "system_key", "system_prompt", "tool_key",
             "use_preserving_dataset", "seed")
FLAT_KEYS = ("dataset_name", "train_data_path", "val_data_path", "train_split", "val_split", "split",
              "test_size", "prompt_file", "system_prompt_file", *_FLAT_BAG)
_LOCAL_ONLY = ("data_path",)  # built-ins' data_path: a local copy of the hub dataset


@dataclasses.dataclass
class Section:
    """One dataset of a run: `keys` (data.default filled in), where they come from (`origin`: key ->
    config path, for messages), `own` (the keys written in the section itself) and its `label`."""

    label: str
    where: str
    keys: dict[str, Any]
    origin: dict[str, str]
    own: set[str]


# ----------------------------------------------------------------------------- names and keys


# Keys of NeMo RL's dataset sections (ResponseDatasetConfig, PreferenceDatasetConfig, its behavioural
# keys): one that a dataset does not take is ignored with a warning, as NeMo RL does.
NEMO_RL_KEYS = ("dataset_name", "data_path", "input_key", "output_key", "subset", "split", "prompt_file",
                "system_prompt_file", "env_name", "processor", "download_dir", "split_validation_size", "seed",
                "num_frames", "video_sampling_style", "video_target_num_patches", "video_temporal_patch_size",
                "video_maintain_aspect_ratio", "min_generation_tokens", "prompt_key", "chosen_key", "rejected_key",
                "max_samples")


class IgnoredDatasetKeyWarning(UserWarning):
    """A NeMo RL dataset-section key that the section's dataset does not take (NeMo RL ignores it too)."""


def _supported() -> str:
    return ", ".join(REGISTRY) + " (old names: " + ", ".join(ALIASES) + "), or a dotted class path"


def resolve_class(name: Any, where: str) -> type:
    """The class named by `dataset_name` at config path `where`; ValueError with one line otherwise."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"{where}={name!r}: expected a dataset name (supported: {_supported()})")
    name = ALIASES.get(name, name)
    if name in REGISTRY:
        return REGISTRY[name]
    if name in VISION_LANGUAGE:
        raise ValueError(f"{where}={name!r} is a vision-language dataset; jax_sft trains text-only causal LMs "
                         f"(supported: {_supported()})")
    if name in NOT_SFT:
        raise ValueError(f"{where}={name!r} is {NOT_SFT[name]}, not SFT data (supported: {_supported()})")
    try:
        cls = import_class(name)
    except (ImportError, AttributeError, ValueError) as e:
        raise ValueError(f"{where}={name!r} is neither a registered dataset nor an importable class "
                         f"'pkg.module.Class' ({e}) (supported: {_supported()})") from None
    if not isinstance(cls, type):
        raise ValueError(f"{where}={name!r} is a {type(cls).__name__}, not a dataset class")
    return cls


def _parameters(cls: type) -> tuple[dict[str, inspect.Parameter], bool]:
    """(keyword parameters of cls.__init__ over its MRO, whether it takes **kwargs)."""
    params: dict[str, inspect.Parameter] = {}
    var_kw = False
    for klass in cls.__mro__:
        init = klass.__dict__.get("__init__")
        if init is None or klass is object:
            continue
        for p in list(inspect.signature(init).parameters.values())[1:]:
            if p.kind == p.VAR_KEYWORD:
                var_kw = True
            elif p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY):
                params.setdefault(p.name, p)
    return params, var_kw


def _all_builtin_keys() -> set[str]:
    return set(COMMON).union(*(_parameters(cls)[0] for cls in REGISTRY.values()))


# ----------------------------------------------------------------------------- reading the layouts


def _mapping_list(value: Any, where: str, problems: list[str]) -> list[tuple[str, dict]]:
    """(label, section) of a section or a list of sections at config path `where`."""
    if value is None:
        return []
    if isinstance(value, Mapping):
        return [(where, dict(value))]
    if isinstance(value, (list, tuple)) and value and all(isinstance(v, Mapping) for v in value):
        return [(f"{where}[{i}]", dict(v)) for i, v in enumerate(value)]
    problems.append(f"{where}={value!r:.80}: expected a dataset section (a mapping with dataset_name, ...) or a "
                    "non-empty list of them")
    return []


def _today_sections(data, problems: list[str]) -> tuple[list[Section], list[Section]]:
    default = data.get("default")
    if default is not None and not isinstance(default, Mapping):
        problems.append(f"data.default={default!r:.60}: expected a mapping of keys for every dataset section, or null")
        default = None
    out = []
    for where in ("data.train", "data.validation"):
        sections = []
        for label, own in _mapping_list(data.get(where.split(".")[1]), where, problems):
            keys = dict(own)
            origin = {k: f"{label}.{k}" for k in own}
            for k, v in (default or {}).items():
                if k not in keys:  # NeMo RL's update_single_dataset_config: the section's own keys win
                    keys[k], origin[k] = v, f"data.default.{k}"
            sections.append(Section(label.removeprefix("data."), label, keys, origin, set(own)))
        out.append(sections)
    if not out[0] and not any("data.train=" in p for p in problems):
        problems.append("data.train: expected a dataset section or a list of them")
    return out[0], out[1]


def today_name(flat_key: str) -> str:
    return {"train_data_path": "data_path", "val_data_path": "data_path", "train_split": "split",
            "val_split": "split", "test_size": "split_validation_size"}.get(flat_key, flat_key)


def _flat_section(data, cls: type, name: str, split: str) -> Section:
    params, _ = _parameters(cls)
    keys, origin = {"dataset_name": name}, {"dataset_name": "data.dataset_name"}

    def put(key: str, flat_key: str, value: Any = None) -> None:
        value = data.get(flat_key) if value is None else value
        if value is not None and key not in keys:
            keys[key], origin[key] = value, f"data.{flat_key}"

    path_key = "data_files" if "data_files" in params else "data_path"
    put(path_key, "train_data_path" if split == "train" else "val_data_path")
    if split == "validation" and data.get("val_split") is not None:
        put(path_key, "train_data_path")  # the guide: val_split of the same hub dataset
    if "split" in params:
        put("split", "train_split" if split == "train" else "val_split")
        if split == "train":
            put("split", "split")
    for key in ("prompt_file", "system_prompt_file", *(k for k in _FLAT_BAG if k in params)):
        put(key, key)
    if name == "OpenMathInstruct-2" and keys.get("output_key", "output") == "output":
        keys["output_key"], origin["output_key"] = "generated_solution", "data.output_key"
    if "split_validation_size" in params:
        if split == "validation" or data.get("val_data_path") is not None:  # a validation file: no carve-out
            keys["split_validation_size"], origin["split_validation_size"] = 0, "data.val_data_path"
        else:
            put("split_validation_size", "test_size")
    return Section(split, "data", keys, origin, set())


def _flat_sections(data, problems: list[str]) -> tuple[list[Section], list[Section]]:
    for key in ("validation", "default"):
        if data.get(key) is not None:
            problems.append(f"data.{key}: a key of today's layout; it needs data.train (the flat layout reads "
                            "data.dataset_name, data.train_data_path, ...)")
    try:
        cls = resolve_class(data.dataset_name, "data.dataset_name")
    except ValueError as e:
        problems.append(str(e))
        return [], []
    name = ALIASES.get(data.dataset_name, data.dataset_name)
    if name not in REGISTRY:
        return [], []  # a user class of the guide's protocol
    train = [_flat_section(data, cls, name, "train")]
    has_val = data.get("val_data_path") is not None or data.get("val_split") is not None or name == "squad"
    validation = [_flat_section(data, cls, name, "validation")] if has_val else []
    if name == "squad" and data.get("val_data_path") is None:
        validation[0].keys.setdefault("split", "validation")
    return train, validation


def is_guide_class(data) -> bool:
    """Whether the flat data.dataset_name names a user class of the guide's protocol."""
    name = data.get("dataset_name")
    return (data.get("train") is None and isinstance(name, str) and ALIASES.get(name, name) not in REGISTRY
            and name not in VISION_LANGUAGE and name not in NOT_SFT)


def data_sections(data) -> tuple[list[Section], list[Section], list[str]]:
    """(train sections, validation sections, problems) of the `data` config section."""
    problems: list[str] = []
    if data.get("train") is not None:
        train, validation = _today_sections(data, problems)
    else:
        train, validation = _flat_sections(data, problems)
    return train, validation, problems


# ----------------------------------------------------------------------------- checking


def _section_problems(s: Section, cls: type) -> list[str]:
    params, var_kw = _parameters(cls)
    name = s.keys["dataset_name"]
    problems = []
    takes = sorted(set(COMMON) | set(params))
    for key in sorted(s.own):
        if key in takes or var_kw:
            continue
        if key in NEMO_RL_KEYS:
            warnings.warn(f"{s.where}.{key}={s.keys[key]!r:.60}: dataset {name!r} does not take this key; it is "
                          "ignored (as NeMo RL ignores it)", IgnoredDatasetKeyWarning, stacklevel=2)
        else:
            problems.append(f"{s.where}.{key}: unknown key for dataset {name!r}; it takes {', '.join(takes)}")
    for key, p in params.items():
        if p.default is inspect.Parameter.empty and s.keys.get(key) is None:
            flat = s.where == "data" and key in ("data_path", "data_files")
            where = f"data.{'train' if s.label == 'train' else 'val'}_data_path" if flat else f"{s.where}.{key}"
            problems.append(f"{where}: required by dataset {name!r} "
                            "(a local file, a save_to_disk folder or a hub id)")
    processor = s.keys.get("processor")
    if processor is not None and processor not in PROCESSORS:
        where = s.origin.get("processor", f"{s.where}.processor")
        problems.append(f"{where}={processor!r}: expected {PROCESSORS[0]!r} (the processor of SFT; NeMo RL's other "
                        "processors serve RL and distillation)")
    for key in ("data_path", "data_files", "split", "subset", "prompt_file", "system_prompt_file",
                "processor"):
        value = s.keys.get(key)
        if value is not None and not isinstance(value, str):
            problems.append(f"{s.origin.get(key, f'{s.where}.{key}')}={value!r:.60}: expected a string")
    for key, kind in (("split_validation_size", (int, float)), ("seed", int), ("max_samples", int)):
        value = s.keys.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, kind) or value < 0):
            where = s.origin.get(key, f"{s.where}.{key}")
            problems.append(f"{where}={value!r}: expected a number >= 0" + (" (an integer)" if kind is int else ""))
    return problems


def check_data(data) -> list[str]:
    """Problems with the dataset names, section keys and processors of `data` (the config's data
    section), without loading anything: what config validation and `--dry_run` report."""
    train, validation, problems = data_sections(data)
    var_kw, bad_names = False, set()
    for s in train + validation:
        name = s.keys.get("dataset_name")
        try:
            cls = resolve_class(name, s.origin.get("dataset_name", f"{s.where}.dataset_name"))
        except ValueError as e:
            if not (isinstance(name, str) and name in bad_names):  # one line per bad name
                problems.append(str(e))
            bad_names.add(name if isinstance(name, str) else "")
            continue
        var_kw = var_kw or _parameters(cls)[1]
        problems += _section_problems(s, cls)
    default = data.get("default") if data.get("train") is not None else None
    if isinstance(default, Mapping) and not var_kw:
        known = _all_builtin_keys() | set(NEMO_RL_KEYS)
        for key in default:
            if key not in known:
                problems.append(f"data.default.{key}: unknown key; dataset sections take {', '.join(sorted(known))}")
    return list(dict.fromkeys(problems))


def _raise(problems: list[str]) -> None:
    if problems:
        raise ConfigError(problems, "data")


# ----------------------------------------------------------------------------- building


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
        if spec is None or not isinstance(row, dict) or not isinstance(row.get("messages"), list) or not row["messages"]:
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
    params, var_kw = _parameters(cls)
    kwargs = {k: v for k, v in s.keys.items() if var_kw or k in params}
    if cls in REGISTRY.values():  # jax_sft's built-ins read null as their default
        kwargs = {k: v for k, v in kwargs.items() if v is not None or params[k].default is None}
    data = cls(**kwargs)
    if hasattr(data, "set_task_spec"):
        data.set_task_spec(s.keys)
    else:
        data.task_spec = TaskDataSpec(data.task_name, s.keys.get("prompt_file"), s.keys.get("system_prompt_file"))
    if hasattr(data, "set_processor"):
        data.set_processor()
    for attr, kind in (("dataset", None), ("task_name", str), ("task_spec", TaskDataSpec)):
        value = getattr(data, attr, None)
        if value is None or (kind is not None and not isinstance(value, kind)):
            raise TypeError(f"{s.where}: {cls.__name__}.{attr} must be set"
                            + (f" to a {kind.__module__}.{kind.__name__}" if kind else "")
                            + " (today's dataset protocol: dataset, val_dataset, task_name, set_task_spec)")
    if getattr(data, "val_dataset", None) is None:
        data.val_dataset = None
    return data


def build_dataset(cfg):
    """The run's dataset (formatted_ds train/validation, task_spec) from either layout of cfg.data."""
    if is_guide_class(cfg.data):
        return _build_guide(cfg)
    train_sections, val_sections, problems = data_sections(cfg.data)
    _raise(problems + check_data(cfg.data))
    train = [_load_section(s) for s in train_sections]
    validation = [_load_section(s) for s in val_sections]
    train_specs = {d.task_name: d.task_spec for d in train}  # NeMo RL keys task specs by task name
    for s, d in zip(train_sections, train):
        if d.task_spec != train_specs[d.task_name]:
            log.warning("%s: task name %r is shared with a later train dataset whose prompt_file / "
                        "system_prompt_file apply to its rows too (NeMo RL binds them by task name)",
                        s.label, d.task_name)
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
    formatted = {"train": _mix([(d.dataset, train_specs[d.task_name]) for d in train]),
                 "validation": _mix([(rows, val_specs[name]) for rows, name in val_parts])}
    for s, d in zip(train_sections + val_sections, train + validation):
        carved = len(d.val_dataset) if d.val_dataset is not None and s in train_sections else 0
        log.info("%s: %s, %d rows%s", s.label, s.keys["dataset_name"], len(d.dataset),
                 f" (+{carved} carved for validation)" if carved else "")
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
        _raise([str(e)])
    dataset = cls(cfg.data)
    formatted = getattr(dataset, "formatted_ds", None)
    if not isinstance(formatted, dict) or not {"train", "validation"} <= set(formatted):
        raise TypeError(f"data.dataset_name={name!r}: {cls.__name__}.formatted_ds must be a dict with 'train' and "
                        f"'validation' splits, got {type(formatted).__name__}"
                        + (f" with keys {sorted(formatted)}" if isinstance(formatted, dict) else ""))
    if not isinstance(getattr(dataset, "task_spec", None), TaskDataSpec):
        raise TypeError(f"data.dataset_name={name!r}: {cls.__name__}.task_spec must be a jax_sft.data.TaskDataSpec")
    log.info("dataset %s: %d train, %d validation conversations", name, len(formatted["train"]),
             len(formatted["validation"]))
    return dataset


# ----------------------------------------------------------------------------- describing


def _looks_local(path: str) -> bool:
    return Path(path).suffix in FILE_TYPES or path.endswith(".gz") or path.startswith(("/", ".", "~"))


def _file_problems(s: Section, cls: type) -> list[str]:
    """Local files named by the section that do not exist (a hub id is not checked)."""
    problems = []
    for key in ("data_path", "data_files", "prompt_file", "system_prompt_file", "media_data_dir"):
        value = s.keys.get(key)
        if not isinstance(value, str):
            continue
        hub_ok = key in ("data_path", "data_files") and cls in (REGISTRY["ResponseDataset"], REGISTRY["arrow_text"])
        if Path(value).expanduser().exists() or (hub_ok and not _looks_local(value)):
            continue
        if key in ("data_path", "data_files") and cls in REGISTRY.values() and not hub_ok:
            what = "a local copy of the hub dataset"
        else:
            what = "a local file" + (" or a hub id" if hub_ok else "")
        problems.append(f"{s.origin.get(key, s.where + '.' + key)}={value!r}: no such file or folder (expected {what})")
    return problems


def _describe(s: Section, cls: type) -> str:
    params, _ = _parameters(cls)
    k = {n: p.default for n, p in params.items() if p.default is not inspect.Parameter.empty}
    k.update({n: v for n, v in s.keys.items() if (n in params or n in COMMON) and (v is not None or n not in k)})
    parts = []
    path = k.get("data_path") or k.get("data_files")
    hub = getattr(cls, "HUB_ID", None)
    if cls not in REGISTRY.values():
        parts.append(f"class {cls.__module__}.{cls.__qualname__}")
    if path and hub:
        parts.append(f"local {path} in place of hub {hub}")
    elif path:
        parts.append(f"{'local' if _looks_local(path) or Path(path).exists() else 'hub'} {path}")
    elif hub:
        parts.append(f"hub {hub}")
    if k.get("subset"):
        parts.append(f"subset {k['subset']}")
    if k.get("split") and not (path and Path(path).is_file()):
        parts.append(f"split {k['split']}")
    size = k.get("split_validation_size") or 0
    if size > 0:
        share = f"{int(size)} rows" if size >= 1 else f"{size * 100:g}%"
        parts.append(f"{share} carved for validation, seed {k.get('seed', 42)}")
    if k.get("max_samples"):
        parts.append(f"max_samples {k['max_samples']}")
    for key in ("input_key", "output_key", "chat_key", "text_key"):
        if key in s.keys and s.keys[key] is not None:
            parts.append(f"{key} {s.keys[key]}")
    for key in ("prompt_file", "system_prompt_file"):
        if k.get(key):
            parts.append(f"{key} {k[key]}")
    return f"{s.label}: {s.keys['dataset_name']} ({', '.join(parts)})"


def describe_data(cfg) -> list[str]:
    """One line per dataset of the run, from the config alone: names, section keys, processor and
    the local files named (data_path, data_files, prompt_file, system_prompt_file) are checked, no
    rows, tokenizer or network are touched. Raises jax_sft.config.ConfigError listing problems."""
    data = cfg.data
    if is_guide_class(data):
        try:
            cls = resolve_class(data.dataset_name, "data.dataset_name")
        except ValueError as e:
            _raise([str(e)])
        return [f"train, validation: {data.dataset_name} (class {cls.__module__}.{cls.__qualname__}, the guide's "
                "protocol: Class(cfg.data).formatted_ds)"]
    train, validation, problems = data_sections(data)
    problems += check_data(data)
    lines = []
    for s in train + validation:
        try:
            cls = resolve_class(s.keys.get("dataset_name"), s.where)
        except ValueError:
            continue  # reported by check_data
        problems += _file_problems(s, cls)
        lines.append(_describe(s, cls))
    _raise(list(dict.fromkeys(problems)))
    carves = any(s.keys.get("split_validation_size", _default(s, "split_validation_size")) for s in train)
    if not validation and not carves:
        if cfg.sft.val_period > 0:
            _raise([NO_VALIDATION.format(cfg.sft.val_period)])
        lines.append("validation: none (data.validation is null and no train dataset carves a split; "
                     "validation is skipped)")
    return lines


def _default(s: Section, key: str) -> Any:
    try:
        p = _parameters(resolve_class(s.keys.get("dataset_name"), s.where))[0].get(key)
    except ValueError:
        return None
    return None if p is None or p.default is inspect.Parameter.empty else p.default
