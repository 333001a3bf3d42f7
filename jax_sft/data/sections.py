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

import dataclasses
import inspect
import logging
import warnings
from collections.abc import Mapping
from typing import Any

from jax_sft.data.builtin import ALIASES, NOT_SFT, REGISTRY, VISION_LANGUAGE
from jax_sft.data.formats import PROCESSORS, import_class
from jax_sft.errors import ConfigError

log = logging.getLogger(__name__)

__all__ = [
    "IgnoredDatasetKeyWarning",
    "Section",
    "data_sections",
    "check_data",
    "resolve_class",
    "parameters",
    "is_guide_class",
    "raise_problems",
    "today_name",
    "NO_VALIDATION",
    "FLAT_KEYS",
    "COMMON",
    "WEIGHT",
]

NO_VALIDATION = (
    "sft.val_period={}: expected 0 when there is no validation data (data.validation is null and no "
    "train dataset carves a split with split_validation_size), as NeMo RL requires; or give validation "
    "data"
)
# Keys every section may hold besides its dataset's constructor arguments.
COMMON = ("dataset_name", "prompt_file", "system_prompt_file", "processor")
# jax_sft's own key of a data.train entry: its share of a weighted mixture (jax_sft.data.mixture).
WEIGHT = "weight"
# Flat keys handed to a dataset that takes them (the guide's keys of the formats).
_FLAT_BAG = (
    "input_key",
    "output_key",
    "chat_key",
    "system_key",
    "system_prompt",
    "tool_key",
    "use_preserving_dataset",
    "seed",
)
FLAT_KEYS = (
    "dataset_name",
    "train_data_path",
    "val_data_path",
    "train_split",
    "val_split",
    "split",
    "test_size",
    "prompt_file",
    "system_prompt_file",
    *_FLAT_BAG,
)
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
NEMO_RL_KEYS = (
    "dataset_name",
    "data_path",
    "input_key",
    "output_key",
    "subset",
    "split",
    "prompt_file",
    "system_prompt_file",
    "env_name",
    "processor",
    "download_dir",
    "split_validation_size",
    "seed",
    "num_frames",
    "video_sampling_style",
    "video_target_num_patches",
    "video_temporal_patch_size",
    "video_maintain_aspect_ratio",
    "min_generation_tokens",
    "prompt_key",
    "chosen_key",
    "rejected_key",
    "max_samples",
)


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
        raise ValueError(
            f"{where}={name!r} is a vision-language dataset; jax_sft trains text-only causal LMs "
            f"(supported: {_supported()})"
        )
    if name in NOT_SFT:
        raise ValueError(f"{where}={name!r} is {NOT_SFT[name]}, not SFT data (supported: {_supported()})")
    try:
        cls = import_class(name)
    except (ImportError, AttributeError, ValueError) as e:
        raise ValueError(
            f"{where}={name!r} is neither a registered dataset nor an importable class "
            f"'pkg.module.Class' ({e}) (supported: {_supported()})"
        ) from None
    if not isinstance(cls, type):
        raise ValueError(f"{where}={name!r} is a {type(cls).__name__}, not a dataset class")
    return cls


def parameters(cls: type) -> tuple[dict[str, inspect.Parameter], bool]:
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
    return set(COMMON).union(*(parameters(cls)[0] for cls in REGISTRY.values()))


# ----------------------------------------------------------------------------- reading the layouts


def _mapping_list(value: Any, where: str, problems: list[str]) -> list[tuple[str, dict]]:
    """(label, section) of a section or a list of sections at config path `where`."""
    if value is None:
        return []
    if isinstance(value, Mapping):
        return [(where, dict(value))]
    if isinstance(value, (list, tuple)) and value and all(isinstance(v, Mapping) for v in value):
        return [(f"{where}[{i}]", dict(v)) for i, v in enumerate(value)]
    problems.append(
        f"{where}={value!r:.80}: expected a dataset section (a mapping with dataset_name, ...) or a "
        "non-empty list of them"
    )
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
    return {
        "train_data_path": "data_path",
        "val_data_path": "data_path",
        "train_split": "split",
        "val_split": "split",
        "test_size": "split_validation_size",
    }.get(flat_key, flat_key)


def _flat_section(data, cls: type, name: str, split: str) -> Section:
    params, _ = parameters(cls)
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
            problems.append(
                f"data.{key}: a key of today's layout; it needs data.train (the flat layout reads "
                "data.dataset_name, data.train_data_path, ...)"
            )
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
    return (
        data.get("train") is None
        and isinstance(name, str)
        and ALIASES.get(name, name) not in REGISTRY
        and name not in VISION_LANGUAGE
        and name not in NOT_SFT
    )


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
    params, var_kw = parameters(cls)
    name = s.keys["dataset_name"]
    problems = []
    takes = sorted(set(COMMON) | set(params) | ({WEIGHT} if s.where.startswith("data.train") else set()))
    for key in sorted(s.own):
        if key in takes or var_kw:
            continue
        if key in NEMO_RL_KEYS:
            warnings.warn(
                f"{s.where}.{key}={s.keys[key]!r:.60}: dataset {name!r} does not take this key; it is "
                "ignored (as NeMo RL ignores it)",
                IgnoredDatasetKeyWarning,
                stacklevel=2,
            )
        else:
            problems.append(f"{s.where}.{key}: unknown key for dataset {name!r}; it takes {', '.join(takes)}")
    for key, p in params.items():
        if p.default is inspect.Parameter.empty and s.keys.get(key) is None:
            flat = s.where == "data" and key in ("data_path", "data_files")
            where = f"data.{'train' if s.label == 'train' else 'val'}_data_path" if flat else f"{s.where}.{key}"
            problems.append(f"{where}: required by dataset {name!r} (a local file, a save_to_disk folder or a hub id)")
    processor = s.keys.get("processor")
    if processor is not None and processor not in PROCESSORS:
        where = s.origin.get("processor", f"{s.where}.processor")
        problems.append(
            f"{where}={processor!r}: expected {PROCESSORS[0]!r} (the processor of SFT; NeMo RL's other "
            "processors serve RL and distillation)"
        )
    for key in ("data_path", "data_files", "split", "subset", "prompt_file", "system_prompt_file", "processor"):
        value = s.keys.get(key)
        if value is not None and not isinstance(value, str):
            problems.append(f"{s.origin.get(key, f'{s.where}.{key}')}={value!r:.60}: expected a string")
    for key, kind in (("split_validation_size", (int, float)), ("seed", int), ("max_samples", int)):
        value = s.keys.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, kind) or value < 0):
            where = s.origin.get(key, f"{s.where}.{key}")
            problems.append(f"{where}={value!r}: expected a number >= 0" + (" (an integer)" if kind is int else ""))
    return problems


def _weight_problems(train: list[Section], validation: list[Section], default: Any) -> list[str]:
    """`weight` on data.train entries: a positive number on every entry, or on none; nowhere else."""
    problems = []
    weighted = [s for s in train if WEIGHT in s.own]
    for s in weighted:
        w = s.keys[WEIGHT]
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not w > 0:
            problems.append(f"{s.where}.{WEIGHT}={w!r}: expected a positive number (the entry's share of the mixture)")
    if weighted and len(weighted) < len(train):
        missing = ", ".join(s.where for s in train if WEIGHT not in s.own)
        problems.append(f"{missing}: no {WEIGHT}; when one data.train entry has a weight, every entry needs one")
    for s in validation:
        if WEIGHT in s.own:
            problems.append(f"{s.where}.{WEIGHT}: weights apply to data.train entries only (validation uses every row)")
    if isinstance(default, Mapping) and WEIGHT in default:
        problems.append(f"data.default.{WEIGHT}: give each data.train entry its own weight")
    return problems


def check_data(data) -> list[str]:
    """Problems with the dataset names, section keys and processors of `data` (the config's data
    section), without loading anything: what config validation and `--dry_run` report."""
    train, validation, problems = data_sections(data)
    default = data.get("default") if data.get("train") is not None else None
    problems += _weight_problems(train, validation, default)
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
        var_kw = var_kw or parameters(cls)[1]
        problems += _section_problems(s, cls)
    if isinstance(default, Mapping) and not var_kw:
        known = _all_builtin_keys() | set(NEMO_RL_KEYS)
        for key in default:
            if key not in known and key != WEIGHT:
                problems.append(f"data.default.{key}: unknown key; dataset sections take {', '.join(sorted(known))}")
    return list(dict.fromkeys(problems))


def raise_problems(problems: list[str]) -> None:
    if problems:
        raise ConfigError(problems, "data")
