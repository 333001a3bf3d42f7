"""Helpers over config trees (plain dicts and ml-collections ConfigDicts) and the one wording of a
problem line: "<dotted.key>=<value>: expected <what>[; <fix>]"."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ml_collections import ConfigDict
from ml_collections.config_dict import FieldReference


def show(value: Any) -> str:
    """A value as a problem line shows it: its repr, cut to 80 characters."""
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def problem(key: str, value: Any, expected: str, fix: str = "") -> str:
    """One problem line: "<key>=<value>: expected <expected>[; <fix>]"."""
    return f"{key}={show(value)}: expected {expected}" + (f"; {fix}" if fix else "")


def escape(x: Any) -> Any:
    """Literal strings for OmegaConf: `${` -> `\\${`, recursively."""
    if isinstance(x, str):
        return x.replace("${", "\\${")
    if isinstance(x, Mapping):
        return {k: escape(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [escape(v) for v in x]
    return x


def merge(base: Mapping, over: Mapping) -> dict:
    """`over` onto `base`, as a new dict: mappings merge key by key, anything else replaces; a
    mapping marked `_override_: true` replaces instead of merging (NeMo RL's marker)."""
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, Mapping):
            below = out.get(key)
            below = below if isinstance(below, Mapping) and not value.get("_override_") else {}
            value = merge(below, {k: v for k, v in value.items() if k != "_override_"})
        out[key] = value
    return out


def leaves(tree: Mapping, prefix: str = "") -> list[tuple[str, Any]]:
    """(dotted key, value) of every leaf of a nested mapping (an empty mapping is a leaf)."""
    out = []
    for key, value in tree.items():
        if isinstance(value, Mapping) and value:
            out += leaves(value, f"{prefix}{key}.")
        else:
            out.append((f"{prefix}{key}", value))
    return out


def paths(cfg: ConfigDict, prefix: str = "") -> list[str]:
    """Every dotted key of `cfg`, sections included."""
    out = []
    for key, value in cfg.items():
        out.append(prefix + key)
        if isinstance(value, ConfigDict):
            out += paths(value, f"{prefix}{key}.")
    return out


def get(cfg: ConfigDict, key: str) -> Any:
    """cfg[a][b][c] for key "a.b.c"."""
    for part in key.split("."):
        cfg = cfg[part]
    return cfg


def field(cfg: ConfigDict, key: str) -> tuple[type, bool] | None:
    """(type, nullable) of a leaf of `cfg`; None for a section or an unknown key."""
    *parents, leaf = key.split(".")
    node: Any = cfg
    for part in parents:
        node = node.get(part) if isinstance(node, ConfigDict) else None
    if not isinstance(node, ConfigDict) or leaf not in node:
        return None
    value = dict(node.items(preserve_field_references=True))[leaf]
    if isinstance(value, ConfigDict):
        return None
    if isinstance(value, FieldReference):  # a placeholder: the only kind of field that takes null
        return value.get_type(), True
    return type(value), False


def plain(value: Any) -> Any:
    """ConfigDict / FrozenConfigDict values -> plain Python containers."""
    if hasattr(value, "to_dict"):
        return value.to_dict()
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    return value
