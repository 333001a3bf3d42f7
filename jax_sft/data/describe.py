"""Describing the run's datasets from the config alone (`--dry_run`, `describe_data`): one line per
dataset, the local files checked, nothing read."""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

from jax_sft.data.builtin import REGISTRY
from jax_sft.data.mixture import describe_weights
from jax_sft.data.readers import FILE_TYPES
from jax_sft.data.sections import (
    COMMON,
    NO_VALIDATION,
    WEIGHT,
    Section,
    check_data,
    data_sections,
    is_guide_class,
    parameters,
    raise_problems,
    resolve_class,
)

__all__ = ["describe_data", "looks_local"]


def looks_local(path: str) -> bool:
    """Whether a data path names a local file or folder rather than a hub id."""
    return Path(path).suffix in FILE_TYPES or path.endswith(".gz") or path.startswith(("/", ".", "~"))


def _file_problems(s: Section, cls: type) -> list[str]:
    """Local files named by the section that do not exist (a hub id is not checked)."""
    problems = []
    for key in ("data_path", "data_files", "prompt_file", "system_prompt_file", "media_data_dir"):
        value = s.keys.get(key)
        if not isinstance(value, str):
            continue
        hub_ok = key in ("data_path", "data_files") and cls in (REGISTRY["ResponseDataset"], REGISTRY["arrow_text"])
        if Path(value).expanduser().exists() or (hub_ok and not looks_local(value)):
            continue
        if key in ("data_path", "data_files") and cls in REGISTRY.values() and not hub_ok:
            what = "a local copy of the hub dataset"
        else:
            what = "a local file" + (" or a hub id" if hub_ok else "")
        problems.append(f"{s.origin.get(key, s.where + '.' + key)}={value!r}: no such file or folder (expected {what})")
    return problems


def _describe(s: Section, cls: type) -> str:
    params, _ = parameters(cls)
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
        parts.append(f"{'local' if looks_local(path) or Path(path).exists() else 'hub'} {path}")
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
    if k.get("prompt_file"):
        parts.append(f"prompt_file {k['prompt_file']}")
    if k.get("system_prompt_file"):
        parts.append(f"system_prompt_file {k['system_prompt_file']} (a system message; NeMo RL's SFT ignores the key)")
    if s.keys.get("weight") is not None:
        parts.append(f"weight {s.keys['weight']}")
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
            raise_problems([str(e)])
        return [
            f"train, validation: {data.dataset_name} (class {cls.__module__}.{cls.__qualname__}, the guide's "
            "protocol: Class(cfg.data).formatted_ds)"
        ]
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
    raise_problems(list(dict.fromkeys(problems)))
    if any(s.keys.get(WEIGHT) is not None for s in train):
        lines.append(describe_weights([s.keys[WEIGHT] for s in train], [s.label for s in train], data.mixture_by))
    carves = any(s.keys.get("split_validation_size", _default(s, "split_validation_size")) for s in train)
    if not validation and not carves:
        if cfg.sft.val_period > 0:
            raise_problems([NO_VALIDATION.format(cfg.sft.val_period)])
        lines.append(
            "validation: none (data.validation is null and no train dataset carves a split; validation is skipped)"
        )
    return lines


def _default(s: Section, key: str) -> Any:
    try:
        p = parameters(resolve_class(s.keys.get("dataset_name"), s.where))[0].get(key)
    except ValueError:
        return None
    return None if p is None or p.default is inspect.Parameter.empty else p.default
