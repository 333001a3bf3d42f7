"""Relative data and prompt paths of a config that lives in a NeMo RL checkout.

NeMo RL's recipes name files relative to the checkout (`prompt_file: examples/prompts/math.txt`)
and are run from its root. When such a config is loaded from elsewhere, a relative path that is
missing from the working folder is also looked up relative to the checkout that holds the config
(the folder above its `examples/configs/`): found there, it becomes that absolute path (logged);
found in neither place, it is an error naming both. A data path that does not look like a local
file (a hub id such as `nvidia/OpenMathInstruct-2`) is left as it is. Configs outside a checkout
are not touched: their relative paths stay relative to the working folder.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from jax_sft.data.describe import looks_local
from jax_sft.errors import ConfigError

log = logging.getLogger(__name__)

__all__ = ["checkout_of", "resolve_relative_paths"]

# Keys naming local files: in a dataset section (data.train, data.validation, data.default) and flat.
_SECTION_KEYS = ("prompt_file", "system_prompt_file", "data_path", "data_files")
_FLAT_KEYS = ("prompt_file", "system_prompt_file", "train_data_path", "val_data_path")
_PROMPTS = ("prompt_file", "system_prompt_file")  # always local files


def checkout_of(config_path: str | Path) -> Path | None:
    """The NeMo RL checkout holding the config file: the folder above the nearest `examples/configs`
    among its parents; None when there is none."""
    for parent in Path(config_path).resolve().parents:
        if parent.name == "configs" and parent.parent.name == "examples":
            return parent.parent.parent
    return None


def _places(data: Mapping[str, Any]) -> Iterator[tuple[str, dict, str]]:
    """(config key, the mapping holding it, its key there) of every file key of `data`."""
    for key in _FLAT_KEYS:
        if isinstance(data.get(key), str):
            yield f"data.{key}", data, key
    for name in ("train", "validation", "default"):
        value = data.get(name)
        sections = [(f"data.{name}", value)] if isinstance(value, Mapping) else []
        if isinstance(value, list):
            sections = [(f"data.{name}[{i}]", s) for i, s in enumerate(value) if isinstance(s, Mapping)]
        for where, section in sections:
            for key in _SECTION_KEYS:
                if isinstance(section.get(key), str):
                    yield f"{where}.{key}", section, key


def resolve_relative_paths(tree: dict, config_path: str | Path | None) -> dict:
    """`tree` (a resolved config tree) with the relative file paths that are missing from the
    working folder but present in the config's NeMo RL checkout made absolute; ConfigError naming
    both places for those found in neither."""
    checkout = checkout_of(config_path) if config_path is not None else None
    data = tree.get("data")
    if checkout is None or not isinstance(data, Mapping):
        return tree
    problems = []
    for key, holder, name in _places(data):
        value = holder[name]
        path = Path(value).expanduser()
        if path.is_absolute():
            continue
        if path.exists():
            log.info("%s=%r: found in the working folder", key, value)
            continue
        there = checkout / path
        if there.exists():
            holder[name] = str(there)
            log.warning(
                "%s=%r: not in the working folder; using %s (the NeMo RL checkout of the config)", key, value, there
            )
        elif name in _PROMPTS or looks_local(value):
            problems.append(
                f"{key}={value!r}: no such file in the working folder ({Path.cwd() / path}) nor in the NeMo RL "
                f"checkout that holds the config ({there})"
            )
    if problems:
        raise ConfigError(problems, str(config_path))
    return tree
