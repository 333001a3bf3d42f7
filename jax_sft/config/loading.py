"""The run config: one validated ml-collections ConfigDict from a Python or a NeMo RL YAML file.

    cfg = load_config("configs/sft.py", ["--config.policy.model_name=/m"])  # ml-collections file
    cfg = load_config("examples/configs/sft.yaml", ["policy.model_name=/m"])  # NeMo RL YAML

Both kinds go the same way: the defaults (`jax_sft/config/defaults.py`, as a plain dict) <- the file (a
Python `get_config()`, or a YAML with NeMo RL's `defaults:` inheritance) <- the overrides (values
parsed as YAML) -> OmegaConf resolves `${...}` interpolations (resolvers mul, div, max, min, add,
sub) -> the values are written onto a fresh default ConfigDict, type-checked -> `validate` fills
the `DERIVED` keys and checks the values. All problems of a stage come in one `ConfigError`.

The keys are the defaults' keys (`jax_sft/config/defaults.py`): an unknown key is an error naming
the nearest valid key. NeMo RL keys that do not apply to this backend (`IGNORED`) are dropped with
ONE `IgnoredKeysWarning` (a `warnings.warn`; `warnings.simplefilter("error", IgnoredKeysWarning)`
makes it fatal) per load, listing them all. LoRA is `policy.dtensor_cfg.lora_cfg` or, with Megatron
enabled, `policy.megatron_cfg.peft` (`lora_config` turns either into a `LoraConfig`).
`policy.megatron_cfg` with `enabled: true` maps NeMo RL's Megatron recipes onto this backend: its
tensor size, activation checkpointing, optimizer, scheduler and peft are used
(`nemo_rl.megatron_section`), its other keys are listed in the warning, and a value that would
change results but cannot be honoured (FP8, fp16) is an error; `policy.optimizer: null` is then
accepted. With `enabled: false` it is ignored and unchecked. Strings of the defaults and of Python
configs are literal (their `${` is escaped); YAML files and override values may interpolate, as in
NeMo RL.
"""

from __future__ import annotations

import difflib
import importlib.util
import math
import os
import re
import warnings
from collections.abc import Mapping, Sequence, Set
from pathlib import Path
from typing import Any

import omegaconf
import yaml
from ml_collections import ConfigDict
from ml_collections.config_dict import FieldReference
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from jax_sft.config.checks import value_problems
from jax_sft.config.defaults import get_config as _defaults
from jax_sft.config.keys import escape, field, get, leaves, merge, paths, problem, show
from jax_sft.config.nemo_rl import DERIVED, IGNORED, INERT, MUST_BE_DISABLED, OPEN, megatron_section
from jax_sft.config.override_values import OverrideValueError, parse_value
from jax_sft.config.paths import resolve_relative_paths
from jax_sft.errors import ConfigError

__all__ = [
    "IgnoredKeysWarning",
    "default_config",
    "load_config",
    "apply_overrides",
    "validate",
    "to_yaml",
    "save_config",
    "parse_args",
]


class IgnoredKeysWarning(UserWarning):
    """NeMo RL keys that this backend does not use (`IGNORED`) were found and dropped."""


_RESOLVERS = {
    "mul": lambda *a: math.prod(a),
    "add": lambda *a: sum(a),
    "max": lambda *a: max(a),
    "min": lambda *a: min(a),
    "div": lambda a, b: a / b,
    "sub": lambda a, b: a - b,
}
_KEY = re.compile(r"[A-Za-z_][\w-]*(\.[A-Za-z_][\w-]*)*")


def default_config() -> ConfigDict:
    """A fresh default config (`jax_sft/config/defaults.py`, which `configs/sft.py` re-exports)."""
    return _defaults()


# ------------------------------------------------------------------------------ sources


def _load_yaml(path: Path, seen: tuple[Path, ...] = ()) -> dict:
    """A YAML file with its `defaults:` parents (one or a list, relative to it) merged under it, in
    order, as NeMo RL's load_config_with_inheritance does; interpolations are kept for later."""
    if path.resolve() in seen:
        raise ConfigError([f"defaults: cycle through {path}"], str(seen[0]))
    if not path.is_file():
        raise ConfigError(["no such file"], str(path))
    try:
        tree = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
    except yaml.YAMLError as e:
        raise ConfigError([f"invalid YAML: {e}"], str(path)) from None
    if not isinstance(tree, dict):
        raise ConfigError(["expected a mapping at the top level"], str(path))
    parents = tree.pop("defaults", None)
    if parents is None:
        return tree
    parents = [parents] if isinstance(parents, str) else parents
    if not isinstance(parents, list) or not all(isinstance(p, str) for p in parents):
        expected = "a file name or a list of them, relative to this file"
        raise ConfigError([problem("defaults", parents, expected)], str(path))
    base: dict = {}
    for parent in parents:
        base = merge(base, _load_yaml(path.parent / parent, (*seen, path.resolve())))
    return merge(base, tree)


def _load_python(spec: str) -> dict:
    """`file.py` or `file.py:arg`, as ml-collections' config_flags: the file's get_config([arg])."""
    file, arg = re.fullmatch(r"(.+?\.py)(?::(.*))?", spec, flags=re.S).groups()
    path = Path(file)
    if not path.is_file():
        raise ConfigError(["no such file"], file)
    module_spec = importlib.util.spec_from_file_location(f"_jax_sft_config_{path.stem}", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    if not callable(getattr(module, "get_config", None)):
        raise ConfigError(["defines no get_config() returning an ml_collections.ConfigDict"], file)
    cfg = module.get_config(arg) if arg else module.get_config()
    if not isinstance(cfg, (ConfigDict, Mapping)):
        raise ConfigError([f"get_config() returned a {type(cfg).__name__}, not a ConfigDict"], file)
    return escape(cfg.to_dict() if isinstance(cfg, ConfigDict) else cfg)


def _read(path: str) -> dict:
    if re.fullmatch(r".+?\.py(:.*)?", path, flags=re.S):
        return _load_python(path)
    if path.endswith((".yaml", ".yml")):
        return _load_yaml(Path(path))
    raise ConfigError(["expected a .py (ml-collections get_config) or .yaml (NeMo RL) file"], path)


# ------------------------------------------------------------------------------ overrides


def _split_override(text: str) -> tuple[str, str, str]:
    """An override -> (op, key, raw value), as NeMo RL's (Hydra's) syntax reads it:
    'a.b=v' and '--config.a.b=v' set ('', 'a.b', 'v'); '+a.b=v' and '++a.b=v' add or set
    ('+', ...): a key unknown here is then dropped with the IgnoredKeysWarning instead of failing;
    '~a.b' (or '~a.b=v') removes the key, back to its default ('~', 'a.b', '')."""
    if text.startswith("--config."):
        op, body = "", text.removeprefix("--config.")
    elif text.startswith("~"):
        op, body = "~", text[1:] if "=" in text else text[1:] + "="
    else:
        op, body = "+" * text.startswith("+"), text.lstrip("+")
    key, eq, raw = body.partition("=")
    if not eq or not _KEY.fullmatch(key):
        expected = "key.path=value, e.g. policy.train_micro_batch_size=2"
        raise ConfigError([f"override {text!r}: expected {expected}"], "command line")
    return op, key, "" if op == "~" else raw


def _join_override(op: str, key: str, raw: str) -> str:
    return f"~{key}" if op == "~" else f"{op}{key}={raw}"


def _parse_value(raw: str, field: tuple[type, bool] | None) -> Any:
    """A command-line value as Hydra's override grammar reads it (NeMo RL's parser: `null`, `1e-5`,
    `true`, `[1,2]`, `{rope_theta:1000}`, `'quoted'`; see `override_values`). A str field keeps
    the text as given (a Jinja template, a path) unless it is null or quoted."""
    if field is not None and field[0] is str:
        text = raw.strip()
        if text.lower() == "null":
            return None
        if len(text) >= 2 and text[0] == text[-1] and text[0] in "'\"":
            return parse_value(text)
        return raw
    try:
        return parse_value(raw)
    except OverrideValueError as e:
        raise ConfigError([f"cannot read the value: {e} (Hydra's override grammar)"]) from None


def _set(tree: dict, key: str, value: Any) -> None:
    """tree[a][b][c] = value for key "a.b.c" (a null section becomes one; a mapping merges)."""
    node, parts = tree, key.split(".")
    for i, part in enumerate(parts[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        elif not isinstance(child, dict):
            section = ".".join(parts[: i + 1])
            raise ConfigError([problem(section, child, f"a section to set {key} in")])
        node = child
    below = node.get(parts[-1])
    both_maps = isinstance(value, Mapping) and isinstance(below, Mapping)
    node[parts[-1]] = merge(below, value) if both_maps else value


def _delete(tree: dict, key: str) -> None:
    """Removes tree[a][b][c] for key "a.b.c"; a key that is not there is an error naming it."""
    *parents, leaf = key.split(".")
    node = tree
    for part in parents:
        node = node.get(part) if isinstance(node, dict) else None
    if not isinstance(node, dict) or leaf not in node:
        raise ConfigError([f"override ~{key}: there is no key {key} to remove"])
    del node[leaf]


def _apply(tree: dict, overrides: Sequence[str], source: str) -> tuple[dict, set[str]]:
    """`tree` with the overrides applied, and the keys added with '+' (see _split_override)."""
    defaults, problems, added = default_config(), [], set()
    for text in overrides:
        try:
            op, key, raw = _split_override(text)
            if op == "~":
                _delete(tree, key)
                continue
            try:
                value = _parse_value(raw, field(defaults, key))
            except ConfigError as e:
                raise ConfigError([f"override {text!r}: {p}" for p in e.problems]) from None
            _set(tree, key, value)
            if op == "+":
                added.add(key)
        except ConfigError as e:
            problems += e.problems
    if problems:
        raise ConfigError(problems, source)
    return tree, added


def _resolve(tree: dict, source: str) -> dict:
    # omegaconf 2.4 renamed 2.3's register_new_resolver to register_resolver (2.3's is legacy).
    new_api = tuple(int(v) for v in omegaconf.__version__.split(".")[:2]) >= (2, 4)
    register = OmegaConf.register_resolver if new_api else OmegaConf.register_new_resolver
    for name, fn in _RESOLVERS.items():
        if not OmegaConf.has_resolver(name):
            register(name, fn)
    try:
        return OmegaConf.to_container(OmegaConf.create(tree), resolve=True, throw_on_missing=True)
    except OmegaConfBaseException as e:
        key, why = getattr(e, "full_key", None), str(e).splitlines()[0]
        problem = f"cannot resolve an interpolation or a ??? value: {why}"
        if key:  # the key whose value holds the interpolation, e.g. logger.wandb.name
            problem = f"{key}: {problem}; set {key} to a plain value or fix what it refers to"
        raise ConfigError([problem], source) from None


# ------------------------------------------------------------------------------ build


def _coerce(value: Any, kind: type, nullable: bool) -> Any:
    """`value` for a field of type `kind` (int -> float, "1e-5" -> float, 2.0 -> int); TypeError."""
    expected = kind.__name__ + (" or null" if nullable else "")
    if value is None:
        if nullable:
            return None
        raise TypeError(f"expected {expected}; null is not allowed for this key")
    if not isinstance(value, bool):
        if kind is float and isinstance(value, (int, float, str)):
            try:
                return float(value)
            except ValueError:
                raise TypeError(f"expected {expected}") from None
        if kind is int and isinstance(value, float) and value.is_integer():
            return int(value)
    if kind is list and isinstance(value, tuple):
        return list(value)
    if isinstance(value, kind) and (kind is bool or not isinstance(value, bool)):
        return value
    quote = " (quote it)" if kind is str else ""
    raise TypeError(f"expected {expected}, got {type(value).__name__}{quote}")


def _write(
    node: ConfigDict,
    tree: Mapping,
    prefix: str,
    known: list[str],
    problems: list[str],
    ignored: list[str],
    added: Set[str] = frozenset(),
) -> None:
    """Writes `tree` onto `node` (whose keys are at `prefix`), appending to problems / ignored;
    unknown keys in `added` (or below one) are ignored rather than problems."""
    fields = dict(node.items(preserve_field_references=True))
    for key, value in tree.items():
        path = f"{prefix}{key}"
        field = fields.get(key)
        if path == "policy.megatron_cfg" and isinstance(value, Mapping):
            value = megatron_section(value, field, ignored, problems)
            if value is not None:
                _write(field, value, f"{path}.", known, problems, ignored, added)
        elif path in IGNORED:
            ignored.append(path)
            if path in MUST_BE_DISABLED and isinstance(value, Mapping) and value.get("enabled"):
                why = MUST_BE_DISABLED[path]
                problems.append(problem(f"{path}.enabled", value["enabled"], "false", why))
        elif key not in fields and prefix[:-1] in OPEN:
            node[key] = value
        elif key not in fields and _is_added(path, added):
            near = difflib.get_close_matches(path, known, n=1, cutoff=0.8)
            ignored.append(f"{path} (added with +{f'; did you mean {near[0]}?' if near else ''})")
        elif key not in fields:
            for leaf, leaf_value in leaves({key: value}, prefix):
                candidates = [k for k in known if not leaf.startswith(k + ".")]  # not its sections
                near = difflib.get_close_matches(leaf, candidates, n=1, cutoff=0.8)
                hint = f"did you mean {near[0]}?" if near else "keys here: " + ", ".join(fields)
                problems.append(f"{leaf}={show(leaf_value)}: unknown key; {hint}")
        elif isinstance(field, ConfigDict):
            if isinstance(value, Mapping):
                if path in OPEN:  # a key removed (`~`, `_override_`) is absent: its reader's default applies
                    for gone in set(field) - set(value):
                        del field[gone]
                _write(field, value, f"{path}.", known, problems, ignored, added)
            else:
                problems.append(problem(path, value, "a section with keys " + ", ".join(field)))
        else:
            nullable = isinstance(field, FieldReference)
            try:
                node[key] = _coerce(value, field.get_type() if nullable else type(field), nullable)
            except TypeError as e:
                problems.append(f"{path}={show(value)}: {e}")


def _is_added(path: str, added: Set[str]) -> bool:
    return any(path == key or key.startswith(path + ".") for key in added)


def _build(tree: Mapping, source: str, added: Set[str] = frozenset()) -> ConfigDict:
    """A fresh default ConfigDict with `tree` written onto it: types coerced or rejected, unknown
    keys reported with a suggestion (those `added` with '+' dropped instead), IGNORED keys dropped;
    one warning lists every dropped key."""
    cfg = default_config()
    problems: list[str] = []
    ignored: list[str] = []
    policy = tree.get("policy")
    if isinstance(policy, Mapping) and "optimizer" in policy and policy["optimizer"] is None:
        # NeMo RL's Megatron recipes: the torch optimizer is replaced by megatron_cfg.optimizer.
        megatron = policy.get("megatron_cfg")
        if not (isinstance(megatron, Mapping) and megatron.get("enabled")):
            problems.append(
                problem(
                    "policy.optimizer",
                    None,
                    "a section {name, kwargs}",
                    "null only with policy.megatron_cfg.enabled=true",
                )
            )
        tree = {**tree, "policy": {k: v for k, v in policy.items() if k != "optimizer"}}
    _write(cfg, tree, "", paths(cfg), problems, ignored, added)
    ignored += [f"{key}={get(cfg, key)!r}" for key, default in INERT.items() if get(cfg, key) != default]
    if ignored:
        listed = ", ".join(sorted(ignored))
        message = f"{source}: these NeMo RL keys do not apply to jax_sft and are ignored: {listed}"
        warnings.warn(message, IgnoredKeysWarning, stacklevel=4)  # at the caller of load_config
    if problems:
        raise ConfigError(problems, source)
    return cfg


def validate(cfg: ConfigDict | Mapping, source: str = "config", added: Set[str] = frozenset()) -> ConfigDict:
    """A new, locked ConfigDict: `cfg` written onto the defaults (keys and types checked), its null
    `DERIVED` keys filled from their source, every value checked. Raises ConfigError listing all
    problems found. Unknown keys in `added` (overrides given with '+') are dropped with the
    warning, as NeMo RL accepts new keys that way. An `OPEN` section (`policy.optimizer.kwargs`)
    is taken as written: a default key it lacks is absent, so its reader's (torch's) default
    applies, as in NeMo RL."""
    c = _build(cfg.to_dict() if isinstance(cfg, ConfigDict) else cfg, source, added)
    derived = {key for key in DERIVED if get(c, key) is None}
    for key in derived:
        parent, _, leaf = key.rpartition(".")
        get(c, parent)[leaf] = DERIVED[key](c)
    problems = value_problems(c, derived)
    if problems:
        raise ConfigError(problems, source)
    return c.lock()


# ------------------------------------------------------------------------------ public entry points


def load_config(path: str | os.PathLike | None = None, overrides: Sequence[str] = ()) -> ConfigDict:
    """The validated config of a run: the defaults, then `path` (a `.py[:arg]` with `get_config()`
    or a NeMo RL `.yaml`; None: the defaults alone), then `overrides` ("a.b=v", "+a.b=v",
    "++a.b=v", "~a.b" or "--config.a.b=v"; values parsed as YAML). Interpolations see the
    overrides, as in NeMo RL."""
    source = ("defaults" if path is None else str(path)) + (" + overrides" if overrides else "")
    tree = escape(default_config().to_dict())
    if path is not None:
        tree = merge(tree, _read(str(path)))
    tree, added = _apply(tree, overrides, source)
    tree = _resolve(tree, source)
    if path is not None and str(path).endswith((".yaml", ".yml")):
        tree = resolve_relative_paths(tree, path)  # a NeMo RL recipe run from outside its checkout
    return validate(tree, source, added)


def apply_overrides(cfg: ConfigDict, overrides: Sequence[str]) -> ConfigDict:
    """A new ConfigDict: `cfg` with `overrides` applied, keys and types checked, not validated.
    Apply overrides before `validate`, so that the derived keys follow their source."""
    tree, added = _apply(escape(cfg.to_dict()), overrides, "overrides")
    return _build(_resolve(tree, "overrides"), "overrides", added)


def to_yaml(cfg: ConfigDict) -> str:
    """The config as YAML (to print and save); `load_config` reads it back to an equal config (an
    `OPEN` section that lost a default key is marked `_override_: true`, so the key stays absent)."""
    tree, defaults = cfg.to_dict(), default_config()
    for key in OPEN:
        *parents, leaf = key.split(".")
        node = tree
        for part in parents:
            node = node[part]
        if set(get(defaults, key)) - set(node[leaf]):
            node[leaf] = {"_override_": True, **node[leaf]}
    return yaml.safe_dump(escape(tree), sort_keys=False, allow_unicode=True, width=100)


def save_config(cfg: ConfigDict, path: str | os.PathLike) -> Path:
    """Writes `to_yaml(cfg)` to `path` atomically: a temporary file beside it, then os.replace."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(to_yaml(cfg), encoding="utf-8")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def parse_args(argv: Sequence[str]) -> tuple[str | None, list[str], dict[str, str | bool]]:
    """A trainer's argv -> (config_path, overrides, extra).

    `--config PATH` or `--config=PATH` names the file; `--config.a.b=v` (or `--config.a.b v`),
    `a.b=v`, `+a.b=v` and `++a.b=v` are overrides, returned as "a.b=v"; any other `--name=value`,
    `--name value` or bare `--name` (True) goes to `extra`, as text for the caller to check.
    """
    config, overrides, extra = None, [], {}
    args, i = list(argv), 0
    while i < len(args):
        arg, i = args[i], i + 1
        has_value = i < len(args) and not args[i].startswith(("-", "+")) and "=" not in args[i]
        if arg == "--config" or arg.startswith("--config="):
            if config is not None:
                raise ConfigError([f"--config given twice: {config!r} and {arg!r}"], "command line")
            if arg == "--config" and i == len(args):
                raise ConfigError(["--config: expected a file after it"], "command line")
            config, i = (arg[len("--config=") :], i) if "=" in arg else (args[i], i + 1)
        elif arg.startswith("--config.") and "=" not in arg and has_value:
            overrides.append(_join_override(*_split_override(f"{arg}={args[i]}")))
            i += 1
        elif arg.startswith("--config.") or (not arg.startswith("--") and "=" in arg) or arg.startswith("~"):
            overrides.append(_join_override(*_split_override(arg)))
        elif arg.startswith("--"):
            name, eq, value = arg[2:].partition("=")
            if not eq and has_value:
                value, i = args[i], i + 1
            extra[name] = value if eq or value else True
        else:
            expected = "--config PATH, key.path=value or --flag=value"
            raise ConfigError([f"unexpected argument {arg!r}: expected {expected}"], "command line")
    return config, overrides, extra
