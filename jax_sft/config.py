"""The run config: one validated ml-collections ConfigDict from a Python or a NeMo RL YAML file.

    cfg = load_config("configs/sft.py", ["--config.policy.model_name=/m"])  # ml-collections file
    cfg = load_config("examples/configs/sft.yaml", ["policy.model_name=/m"])  # NeMo RL YAML

Both kinds go the same way: the defaults (`jax_sft/defaults.py`, as a plain dict) <- the file (a
Python `get_config()`, or a YAML with NeMo RL's `defaults:` inheritance) <- the overrides (values
parsed as YAML) -> OmegaConf resolves `${...}` interpolations (resolvers mul, div, max, min, add,
sub) -> the values are written onto a fresh default ConfigDict, type-checked -> `validate` fills
the `DERIVED` keys and checks the values. All problems of a stage come in one `ConfigError`.

The keys are the defaults' keys: an unknown key is an error naming the nearest valid key. NeMo RL
keys that do not apply to this backend (`IGNORED`) are dropped with ONE `IgnoredKeysWarning` (a
`warnings.warn`; `warnings.simplefilter("error", IgnoredKeysWarning)` makes it fatal) per load,
listing them all. LoRA is `policy.dtensor_cfg.lora_cfg` or, with Megatron enabled,
`policy.megatron_cfg.peft` (`lora_config` turns either into a `LoraConfig`). `policy.megatron_cfg` with
`enabled: true` maps NeMo RL's Megatron recipes onto this backend: its tensor size, activation
checkpointing, optimizer, scheduler and peft are used (`_megatron`), its other keys are listed in the
warning, and a value that would change results but cannot be honoured (FP8, fp16) is an
error; `policy.optimizer: null` is then accepted. With `enabled: false` it is ignored and
unchecked. Strings of the defaults and of Python configs are literal (their `${` is escaped);
YAML files and override values may interpolate, as in NeMo RL.
"""

from __future__ import annotations

import difflib
import importlib.util
import math
import os
import re
import warnings
from collections.abc import Callable, Mapping, Sequence, Set
from pathlib import Path
from typing import TYPE_CHECKING, Any

import omegaconf
import yaml
from ml_collections import ConfigDict
from ml_collections.config_dict import FieldReference
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from jax_sft.defaults import get_config as _defaults
from jax_sft.errors import InputError

if TYPE_CHECKING:
    from jax_sft.models.lora import LoraConfig

__all__ = [
    "ConfigError", "IgnoredKeysWarning", "default_config", "load_config", "apply_overrides",
    "validate", "to_yaml", "save_config", "parse_args", "lora_config",
]


class ConfigError(InputError, ValueError):
    """A bad config. `problems`: one line each, "<dotted.key>=<value>: expected ...[; fix]"."""

    def __init__(self, problems: Sequence[str], source: str = "config"):
        self.problems, self.source = list(problems), source
        n = len(self.problems)
        if n == 1:  # one line
            super().__init__(f"{source}: {self.problems[0]}")
            return
        lines = "".join(f"\n  - {p}" for p in self.problems)
        super().__init__(f"{source}: {n} config problems:{lines}")


class IgnoredKeysWarning(UserWarning):
    """NeMo RL keys that this backend does not use (`IGNORED`) were found and dropped."""


# NeMo RL keys (with all below them) that do not apply to this backend: dropped with a warning.
IGNORED = (
    "policy.megatron_cfg",  # when disabled; enabled: true maps it (see _megatron)
    "policy.dtensor_cfg._v2",
    "policy.dtensor_cfg.env_vars",
    "policy.dtensor_cfg.clear_cache_every_n_steps",
    "policy.dtensor_cfg.automodel_kwargs",
    "policy.lora_cfg",  # not a NeMo RL place (lora_cfg is under dtensor_cfg): enabled is an error
    "policy.generation",
    "policy.offload_optimizer_for_logprob",
    "logger.swanlab_enabled",
    "logger.swanlab",
    "checkpointing.model_save_format",
    "checkpointing.save_consolidated",
    "cluster.segment_size",  # Ray placement by NVLink domain; the mesh follows jax.devices()
    "policy.sequence_packing.microbatch_order",  # packed micro-batches run in the packer's order
    "policy.dequantize_base_checkpoint",  # quantised (MXFP4) base checkpoints are not supported
    "policy.tokenizer.video",  # vision-language processing
)
_MUST_BE_DISABLED = {
    "policy.lora_cfg": "LoRA's keys go under policy.dtensor_cfg.lora_cfg (or policy.megatron_cfg.peft "
                       "with Megatron), as in NeMo RL; move them there",
}
# NeMo RL keys kept with their defaults (NeMo RL's sft.yaml has them) that change how NeMo RL lays
# out memory or work, not what is computed, and have no counterpart here: named in the warning when
# set to anything else. FSDP over the mesh (and jax_cfg.remat) takes the place of CPU offload,
# sequence and context parallelism and custom TP plans; dynamic batching (micro-batches by token
# budget) gives the same gradient as fixed micro-batches (policy.sequence_packing packs rows).
INERT = {
    "policy.dtensor_cfg.cpu_offload": False,
    "policy.dtensor_cfg.sequence_parallel": False,
    "policy.dtensor_cfg.context_parallel_size": 1,
    "policy.dtensor_cfg.custom_parallel_plan": None,
    "policy.dynamic_batching.enabled": False,
    "policy.megatron_cfg.peft.a2a_experimental": False,  # Megatron's all-to-all for LoRA
}
# Sections that take keys beyond the defaults' (their reader checks them): torch optimizer kwargs.
OPEN = ("policy.optimizer.kwargs",)

# An enabled policy.megatron_cfg: keys (below megatron_cfg) that must keep a value, with the reason;
# at that value they are listed as ignored.
_MEGATRON_FIXED: dict[str, tuple[Any, str]] = {
    "fp8_cfg.enabled": (False, "FP8 training is not supported by jax_sft"),
    "optimizer.fp16": (False, "fp16 is not supported; policy.precision sets the compute dtype "
                              "(bfloat16 or float32)"),
    "optimizer.decoupled_weight_decay": (True, "only decoupled (AdamW) weight decay is supported"),
    "optimizer.decoupled_lr": (None, "a separate LR for embedding/output layers is not supported"),
    "optimizer.decoupled_min_lr": (None, "a separate LR for embedding/output layers is not "
                                         "supported"),
    "optimizer.apply_wd_to_qk_layernorm": (False, "weight decay on q/k norm weights is not "
                                                  "supported"),
    "scheduler.lr_decay_samples": (None, "NeMo RL schedules by iterations: use lr_decay_iters"),
    "scheduler.lr_warmup_samples": (0, "NeMo RL schedules by iterations: use lr_warmup_iters"),
    "scheduler.lr_wsd_decay_samples": (None, "NeMo RL schedules by iterations: use "
                                             "lr_wsd_decay_iters"),
    "scheduler.max_steps": (None, "set lr_decay_iters instead"),
    "scheduler.no_weight_decay_cond_type": (None, "only Megatron's default weight-decay groups "
                                                  "are supported"),
}
# Keys of Megatron's OptimizerConfig / SchedulerConfig that do not change the maths on this backend
# (distributed-optimizer layout, offloading, loss scaling for fp16, storage dtypes of master
# weights and moments, which are float32 here; the compute dtype follows policy.precision).
_MEGATRON_INERT = {
    "optimizer": {
        "bf16", "params_dtype", "use_distributed_optimizer", "use_precision_aware_optimizer",
        "optimizer_cpu_offload", "optimizer_offload_fraction", "overlap_cpu_optimizer_d2h_h2d",
        "overlap_param_gather", "overlap_param_gather_with_optimizer_step", "main_grads_dtype",
        "main_params_dtype", "exp_avg_dtype", "exp_avg_sq_dtype", "store_param_remainders",
        "loss_scale", "initial_loss_scale", "min_loss_scale", "loss_scale_window", "hysteresis",
        "log_num_zeros_in_grad", "barrier_with_L1_time", "optimizer_cuda_graph", "pin_cpu_grads",
        "pin_cpu_params", "use_torch_optimizer_for_cpu_offload", "config_logger_dir", "timers",
    },
    "scheduler": {"override_opt_param_scheduler", "use_checkpoint_opt_param_scheduler"},
}


def _mb_tokens(c: ConfigDict) -> int:
    return c.policy.max_total_sequence_length * c.policy.train_micro_batch_size


def _tensor_size(c: ConfigDict) -> int:
    m = c.policy.megatron_cfg
    return m.tensor_model_parallel_size if m.enabled else c.policy.dtensor_cfg.tensor_parallel_size


def _remat(c: ConfigDict) -> str:
    m, d = c.policy.megatron_cfg, c.policy.dtensor_cfg
    checkpointing = m.activation_checkpointing if m.enabled else d.activation_checkpointing
    return "full" if checkpointing else "none"


def _megatron_wd(c: ConfigDict) -> float:
    return c.policy.megatron_cfg.optimizer.weight_decay


# Keys whose null follows another key, as NeMo RL's sft.yaml interpolates them.
DERIVED: dict[str, Callable[[ConfigDict], Any]] = {
    "policy.tokenizer.name": lambda c: c.policy.model_name,
    "data.max_input_seq_length": lambda c: c.policy.max_total_sequence_length,
    "policy.sequence_packing.train_mb_tokens": _mb_tokens,
    "policy.dynamic_batching.train_mb_tokens": _mb_tokens,
    "policy.make_sequence_length_divisible_by": _tensor_size,
    "policy.jax_cfg.mesh.tensor": _tensor_size,
    "policy.jax_cfg.mesh.expert": lambda c: c.policy.dtensor_cfg.expert_parallel_size,
    "policy.jax_cfg.mesh.data": lambda c: c.policy.dtensor_cfg.dp_replicate_size,
    "policy.jax_cfg.remat": _remat,
    "policy.megatron_cfg.optimizer.clip_grad": lambda c: c.policy.max_grad_norm,
    "policy.megatron_cfg.scheduler.start_weight_decay": _megatron_wd,
    "policy.megatron_cfg.scheduler.end_weight_decay": _megatron_wd,
}

PRECISIONS = ("bfloat16", "float32")
PARAM_DTYPES = ("float32", "bfloat16")
OVERLENGTH = ("truncate", "drop", "mask")
TOKENIZE = ("upfront", "lazy")
ATTENTION = ("auto", "xla", "cudnn")
REMAT = ("none", "full", "dots_saveable", "dots_with_no_batch_dims_saveable")
PACKING = ("modified_first_fit_decreasing", "first_fit", "best_fit", "first_fit_decreasing")

_RESOLVERS = {
    "mul": lambda *a: math.prod(a), "add": lambda *a: sum(a), "max": lambda *a: max(a),
    "min": lambda *a: min(a), "div": lambda a, b: a / b, "sub": lambda a, b: a - b,
}
_KEY = re.compile(r"[A-Za-z_][\w-]*(\.[A-Za-z_][\w-]*)*")


def default_config() -> ConfigDict:
    """A fresh default config (`jax_sft/defaults.py`, which `configs/sft.py` re-exports)."""
    return _defaults()


# ------------------------------------------------------------------------------ helpers


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _problem(key: str, value: Any, expected: str, fix: str = "") -> str:
    return f"{key}={_show(value)}: expected {expected}" + (f"; {fix}" if fix else "")


def _escape(x: Any) -> Any:
    """Literal strings for OmegaConf: `${` -> `\\${`, recursively."""
    if isinstance(x, str):
        return x.replace("${", "\\${")
    if isinstance(x, Mapping):
        return {k: _escape(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_escape(v) for v in x]
    return x


def _merge(base: Mapping, over: Mapping) -> dict:
    """`over` onto `base`, as a new dict: mappings merge key by key, anything else replaces; a
    mapping marked `_override_: true` replaces instead of merging (NeMo RL's marker)."""
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, Mapping):
            below = out.get(key)
            below = below if isinstance(below, Mapping) and not value.get("_override_") else {}
            value = _merge(below, {k: v for k, v in value.items() if k != "_override_"})
        out[key] = value
    return out


def _leaves(tree: Mapping, prefix: str = "") -> list[tuple[str, Any]]:
    out = []
    for key, value in tree.items():
        if isinstance(value, Mapping) and value:
            out += _leaves(value, f"{prefix}{key}.")
        else:
            out.append((f"{prefix}{key}", value))
    return out


def _paths(cfg: ConfigDict, prefix: str = "") -> list[str]:
    out = []
    for key, value in cfg.items():
        out.append(prefix + key)
        if isinstance(value, ConfigDict):
            out += _paths(value, f"{prefix}{key}.")
    return out


def _get(cfg: ConfigDict, key: str) -> Any:
    for part in key.split("."):
        cfg = cfg[part]
    return cfg


def _field(cfg: ConfigDict, key: str) -> tuple[type, bool] | None:
    """(type, nullable) of a leaf of `cfg`; None for a section or an unknown key."""
    *parents, leaf = key.split(".")
    node: Any = cfg
    for part in parents:
        node = node.get(part) if isinstance(node, ConfigDict) else None
    if not isinstance(node, ConfigDict) or leaf not in node:
        return None
    field = dict(node.items(preserve_field_references=True))[leaf]
    if isinstance(field, ConfigDict):
        return None
    if isinstance(field, FieldReference):  # a placeholder: the only kind of field that takes null
        return field.get_type(), True
    return type(field), False


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
        raise ConfigError([_problem("defaults", parents, expected)], str(path))
    base: dict = {}
    for parent in parents:
        base = _merge(base, _load_yaml(path.parent / parent, (*seen, path.resolve())))
    return _merge(base, tree)


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
    return _escape(cfg.to_dict() if isinstance(cfg, ConfigDict) else cfg)


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
    """A command-line value as YAML (null, 1e-5, true, [1, 2], {a: 1}, 'quoted'); a str field
    keeps the text as given unless it is null or quoted."""
    try:
        value = yaml.safe_load(raw) if raw else ""
    except yaml.YAMLError:
        value = raw
    if field is not None and field[0] is str and value is not None and not isinstance(value, str):
        return raw
    return value


def _set(tree: dict, key: str, value: Any) -> None:
    """tree[a][b][c] = value for key "a.b.c" (a null section becomes one; a mapping merges)."""
    node, parts = tree, key.split(".")
    for i, part in enumerate(parts[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        elif not isinstance(child, dict):
            section = ".".join(parts[: i + 1])
            raise ConfigError([_problem(section, child, f"a section to set {key} in")])
        node = child
    below = node.get(parts[-1])
    both_maps = isinstance(value, Mapping) and isinstance(below, Mapping)
    node[parts[-1]] = _merge(below, value) if both_maps else value


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
            _set(tree, key, _parse_value(raw, _field(defaults, key)))
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
        problem = f"cannot resolve an interpolation or a ??? value: {e}"
        raise ConfigError([problem], source) from None


# ------------------------------------------------------------------------------ build and check


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


def _within(section: ConfigDict, tree: Mapping) -> bool:
    """Whether every key of `tree` (recursively) is a key of `section`."""
    for key, value in tree.items():
        below = section.get(key) if key in section else None
        if key not in section or (isinstance(value, Mapping) and value and not (
                isinstance(below, ConfigDict) and _within(below, value))):
            return False
    return True


def _fixed_problem(name: str, value: Any, want: Any, why: str) -> str:
    expected = yaml.safe_dump(want, default_flow_style=True).strip().removesuffix("...").strip()
    return _problem(f"policy.megatron_cfg.{name}", value, expected, why)


def _megatron(tree: Mapping, section: ConfigDict, ignored: list[str],
              problems: list[str]) -> Mapping | None:
    """The part of a `policy.megatron_cfg` tree to write onto `section` (None: all of it ignored).

    Enabled: the keys of `section` are kept (with any unknown optimizer / scheduler key, which
    `_write` reports); `_MEGATRON_INERT` keys and every other top-level key (pipeline, context,
    sequence and expert parallelism, fusions, DDP, ...; FSDP takes their place) are recorded as
    ignored; `_MEGATRON_FIXED` keys at another value are problems. Disabled: ignored as a whole,
    unless it has only jax_sft's keys (a saved config.yaml), which are written as they are.
    """
    prefix = "policy.megatron_cfg."
    if not tree.get("enabled"):
        if _within(section, tree):
            return tree
        ignored.append(prefix[:-1])
        return None
    kept: dict[str, Any] = {}
    for key, value in tree.items():
        fixed = {n.partition(".")[2]: w for n, w in _MEGATRON_FIXED.items()
                 if n.startswith(key + ".")}
        if key in _MEGATRON_INERT and isinstance(value, Mapping):
            kept[key] = {}
            for k, v in value.items():
                if k in fixed:
                    ignored.append(f"{prefix}{key}.{k}")
                    if v != fixed[k][0]:
                        problems.append(_fixed_problem(f"{key}.{k}", v, *fixed[k]))
                elif k in _MEGATRON_INERT[key]:
                    ignored.append(f"{prefix}{key}.{k}")
                else:
                    kept[key][k] = v
        elif key in section:
            kept[key] = value
        else:
            ignored.append(prefix + key)
            for k, (want, why) in fixed.items():
                v = value.get(k, want) if isinstance(value, Mapping) else want
                if v != want:
                    problems.append(_fixed_problem(f"{key}.{k}", v, want, why))
    return kept


def _write(node: ConfigDict, tree: Mapping, prefix: str, known: list[str],
           problems: list[str], ignored: list[str], added: Set[str] = frozenset()) -> None:
    """Writes `tree` onto `node` (whose keys are at `prefix`), appending to problems / ignored;
    unknown keys in `added` (or below one) are ignored rather than problems."""
    fields = dict(node.items(preserve_field_references=True))
    for key, value in tree.items():
        path = f"{prefix}{key}"
        field = fields.get(key)
        if path == "policy.megatron_cfg" and isinstance(value, Mapping):
            value = _megatron(value, field, ignored, problems)
            if value is not None:
                _write(field, value, f"{path}.", known, problems, ignored, added)
        elif path in IGNORED:
            ignored.append(path)
            if path in _MUST_BE_DISABLED and isinstance(value, Mapping) and value.get("enabled"):
                why = _MUST_BE_DISABLED[path]
                problems.append(_problem(f"{path}.enabled", value["enabled"], "false", why))
        elif key not in fields and prefix[:-1] in OPEN:
            node[key] = value
        elif key not in fields and _is_added(path, added):
            near = difflib.get_close_matches(path, known, n=1, cutoff=0.8)
            ignored.append(f"{path} (added with +{f'; did you mean {near[0]}?' if near else ''})")
        elif key not in fields:
            for leaf, leaf_value in _leaves({key: value}, prefix):
                candidates = [k for k in known if not leaf.startswith(k + ".")]  # not its sections
                near = difflib.get_close_matches(leaf, candidates, n=1, cutoff=0.8)
                hint = f"did you mean {near[0]}?" if near else "keys here: " + ", ".join(fields)
                problems.append(f"{leaf}={_show(leaf_value)}: unknown key; {hint}")
        elif isinstance(field, ConfigDict):
            if isinstance(value, Mapping):
                _write(field, value, f"{path}.", known, problems, ignored, added)
            else:
                problems.append(_problem(path, value, "a section with keys " + ", ".join(field)))
        else:
            nullable = isinstance(field, FieldReference)
            try:
                node[key] = _coerce(value, field.get_type() if nullable else type(field), nullable)
            except TypeError as e:
                problems.append(f"{path}={_show(value)}: {e}")


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
            problems.append(_problem("policy.optimizer", None, "a section {name, kwargs}",
                                     "null only with policy.megatron_cfg.enabled=true"))
        tree = {**tree, "policy": {k: v for k, v in policy.items() if k != "optimizer"}}
    _write(cfg, tree, "", _paths(cfg), problems, ignored, added)
    ignored += [f"{key}={_get(cfg, key)!r}" for key, default in INERT.items()
                if _get(cfg, key) != default]
    if ignored:
        listed = ", ".join(sorted(ignored))
        message = f"{source}: these NeMo RL keys do not apply to jax_sft and are ignored: {listed}"
        warnings.warn(message, IgnoredKeysWarning, stacklevel=4)  # at the caller of load_config
    if problems:
        raise ConfigError(problems, source)
    return cfg


def _is_deadline(value: str | None) -> bool:
    """None, or "DD:HH:MM:SS" with hours < 24 and minutes, seconds < 60."""
    m = re.fullmatch(r"(\d{2}):(\d{2}):(\d{2}):(\d{2})", value or "")
    return value is None or (bool(m) and int(m[2]) < 24 and int(m[3]) < 60 and int(m[4]) < 60)


_POSITIVE = (
    "sft.max_num_epochs", "sft.val_global_batch_size",
    "sft.val_micro_batch_size", "checkpointing.save_period", "policy.train_global_batch_size",
    "policy.train_micro_batch_size", "policy.max_total_sequence_length",
    "data.max_input_seq_length", "policy.make_sequence_length_divisible_by",
    "policy.dtensor_cfg.tensor_parallel_size", "policy.dtensor_cfg.context_parallel_size",
    "policy.dtensor_cfg.dp_replicate_size",
    "policy.sequence_packing.train_mb_tokens", "policy.sequence_packing.sequence_length_round",
    "policy.dynamic_batching.train_mb_tokens", "policy.dynamic_batching.sequence_length_round",
    "policy.jax_cfg.mesh.data", "policy.jax_cfg.mesh.tensor", "policy.jax_cfg.loss_chunk_size",
    "policy.jax_cfg.mesh.expert", "policy.dtensor_cfg.expert_parallel_size",
    "policy.jax_cfg.max_segments_per_row",
    "policy.optimizer.kwargs.lr", "policy.optimizer.kwargs.eps", "cluster.gpus_per_node",
    "cluster.num_nodes", "logger.gpu_monitoring.collection_interval",
    "logger.gpu_monitoring.flush_interval",
)


def _check(c: ConfigDict, derived: set[str]) -> list[str]:
    """Every problem with the values of `c`. Keys in `derived` were filled from a source key,
    whose own problem is the one reported."""
    problems: list[str] = []

    def need(key: str, ok: Callable[[Any], Any], expected: str, fix: str = "") -> None:
        if key not in derived and not ok(_get(c, key)):
            problems.append(_problem(key, _get(c, key), expected, fix))

    def one_of(key: str, choices: Sequence[str]) -> None:
        need(key, lambda v: v in choices, "one of " + ", ".join(choices))

    for key in _POSITIVE:
        need(key, lambda v: v > 0, "a positive number")
    need("policy.jax_cfg.mesh.fsdp", lambda v: v > 0 or v == -1,
         "a positive number, or -1 for all devices left after data and tensor")
    need("sft.max_num_steps", lambda v: v >= 0, "a number >= 0 (0: only validate)")
    need("sft.val_period", lambda v: v >= 0, "a number >= 0 (0: no periodic validation)")
    need("data.num_workers", lambda v: v >= 0, "a number >= 0 (0: in-process)")
    need("policy.optimizer.kwargs.weight_decay", lambda v: v >= 0, "a number >= 0")
    need("policy.max_grad_norm", lambda v: v is None or v > 0,
         "a positive number, or null for no clipping")
    need("checkpointing.keep_top_k", lambda v: v is None or v > 0,
         "a positive number, or null to keep every checkpoint")
    for key in ("policy.model_name", "policy.tokenizer.name", "checkpointing.checkpoint_dir",
                "logger.log_dir"):
        need(key, bool, "a non-empty string")
    one_of("policy.precision", PRECISIONS)
    one_of("policy.jax_cfg.param_dtype", PARAM_DTYPES)
    one_of("policy.jax_cfg.attention", ATTENTION)
    one_of("policy.jax_cfg.remat", REMAT)
    one_of("policy.sequence_packing.algorithm", PACKING)
    one_of("data.overlength", OVERLENGTH)
    one_of("data.tokenize", TOKENIZE)
    need("checkpointing.checkpoint_must_save_by", _is_deadline,
         '"DD:HH:MM:SS" (e.g. "00:03:45:00"), or null')
    need("checkpointing.metric_name",
         lambda v: v is None or re.fullmatch(r"((val|train):)?[\w/.-]+", v),
         '"val:<metric>" or "train:<metric>" (e.g. "val:val_loss"), or null')
    need("policy.optimizer.kwargs.betas",
         lambda v: len(v) == 2 and all(isinstance(b, (int, float)) and 0 <= b < 1 for b in v),
         "two numbers in [0, 1)")
    need("policy.scheduler", lambda v: v is None or all(isinstance(e, Mapping) for e in v),
         "null (constant LR), or a list of {name, kwargs} entries and one {milestones: [...]}")
    for prefix in ("policy.train", "sft.val"):
        gbs, mbs = _get(c, f"{prefix}_global_batch_size"), _get(c, f"{prefix}_micro_batch_size")
        if mbs > 0 and gbs % mbs:
            expected = f"a multiple of {prefix}_micro_batch_size={mbs}"
            problems.append(_problem(f"{prefix}_global_batch_size", gbs, expected))
    if c.policy.megatron_cfg.enabled:
        problems += _check_megatron(c, derived)
    problems += _lora_problems(c)
    packing, p = c.policy.sequence_packing, c.policy
    if packing.enabled and p.dynamic_batching.enabled:
        problems.append(_problem("policy.sequence_packing.enabled", True, "false when "
                                 "policy.dynamic_batching.enabled", "enable one of the two"))
    if packing.enabled and 0 < packing.train_mb_tokens < p.max_total_sequence_length:
        problems.append(_problem(
            "policy.sequence_packing.train_mb_tokens", packing.train_mb_tokens,
            f">= policy.max_total_sequence_length={p.max_total_sequence_length}",
            "a sequence of the longest length must fit in one packed micro-batch"))
    return problems


MEGATRON_OPTIMIZERS = ("adam", "sgd")
MEGATRON_DECAY_STYLES = ("constant", "linear", "cosine", "inverse-square-root", "WSD")
MEGATRON_WSD_STYLES = ("exponential", "linear", "cosine", "minus_sqrt")
MEGATRON_WD_STYLES = ("constant", "linear", "cosine")


def _check_megatron(c: ConfigDict, derived: set[str]) -> list[str]:
    """The problems of an enabled policy.megatron_cfg (what Megatron asserts)."""
    m = c.policy.megatron_cfg
    o, s = m.optimizer, m.scheduler
    at = "policy.megatron_cfg."
    checks = [
        ("tensor_model_parallel_size", m.tensor_model_parallel_size,
         m.tensor_model_parallel_size > 0, "a positive number"),
        ("optimizer.lr", o.lr, o.lr > 0, "a positive number"),
        ("optimizer.adam_eps", o.adam_eps, o.adam_eps > 0, "a positive number"),
        ("optimizer.optimizer", o.optimizer, o.optimizer in MEGATRON_OPTIMIZERS,
         "one of " + ", ".join(MEGATRON_OPTIMIZERS)),
        ("optimizer.min_lr", o.min_lr, 0 <= o.min_lr <= o.lr, f"in [0, optimizer.lr={o.lr}]"),
        ("optimizer.weight_decay", o.weight_decay, o.weight_decay >= 0, "a number >= 0"),
        ("optimizer.adam_beta1", o.adam_beta1, 0 <= o.adam_beta1 < 1, "a number in [0, 1)"),
        ("optimizer.adam_beta2", o.adam_beta2, 0 <= o.adam_beta2 < 1, "a number in [0, 1)"),
        ("optimizer.sgd_momentum", o.sgd_momentum, o.sgd_momentum >= 0, "a number >= 0"),
        ("optimizer.clip_grad", o.clip_grad, o.clip_grad is None or o.clip_grad >= 0,
         "a number >= 0 (0: no clipping), or null for policy.max_grad_norm"),
        ("scheduler.lr_decay_style", s.lr_decay_style, s.lr_decay_style in MEGATRON_DECAY_STYLES,
         "one of " + ", ".join(MEGATRON_DECAY_STYLES)),
        ("scheduler.lr_wsd_decay_style", s.lr_wsd_decay_style,
         s.lr_wsd_decay_style in MEGATRON_WSD_STYLES, "one of " + ", ".join(MEGATRON_WSD_STYLES)),
        ("scheduler.weight_decay_incr_style", s.weight_decay_incr_style,
         s.weight_decay_incr_style in MEGATRON_WD_STYLES, "one of " + ", ".join(MEGATRON_WD_STYLES)),
        ("scheduler.lr_decay_iters", s.lr_decay_iters,
         s.lr_decay_iters is None or s.lr_decay_iters > 0,
         "a positive number, or null for the run's number of steps"),
        ("scheduler.lr_wsd_decay_iters", s.lr_wsd_decay_iters,
         s.lr_wsd_decay_iters is None or s.lr_wsd_decay_iters > 0,
         "a positive number, or null for lr_decay_iters"),
        ("scheduler.lr_warmup_iters", s.lr_warmup_iters, s.lr_warmup_iters >= 0, "a number >= 0"),
        ("scheduler.lr_warmup_fraction", s.lr_warmup_fraction,
         s.lr_warmup_fraction is None or (0 <= s.lr_warmup_fraction <= 1 and not s.lr_warmup_iters),
         "null, or a number in [0, 1] with lr_warmup_iters=0"),
        ("scheduler.lr_warmup_init", s.lr_warmup_init, 0 <= s.lr_warmup_init <= o.lr,
         f"in [0, optimizer.lr={o.lr}]"),
    ]
    problems = [_problem(at + key, value, expected) for key, value, ok, expected in checks if not ok]
    start, end = s.start_weight_decay, s.end_weight_decay
    if not 0 <= start <= end:
        given = f"{at}scheduler.start_weight_decay" not in derived
        key = "start_weight_decay" if given else "end_weight_decay"
        problems.append(_problem(f"{at}scheduler.{key}", s[key],
                                 "0 <= scheduler.start_weight_decay <= scheduler.end_weight_decay"))
    elif s.weight_decay_incr_style == "constant" and start != end:
        problems.append(_problem(f"{at}scheduler.end_weight_decay", end,
                                 f"start_weight_decay={start} (weight_decay_incr_style constant)"))
    return problems


DTENSOR_LORA = "policy.dtensor_cfg.lora_cfg"
MEGATRON_LORA = "policy.megatron_cfg.peft"
# lora_dtype values that mean float32 adapters ("None": NeMo RL's sft.yaml writes `lora_dtype: None`,
# which YAML reads as that string).
LORA_DTYPES = (None, "None", "float32", "torch.float32")


def _lora_section(c: ConfigDict) -> str | None:
    """The key of the section that enables LoRA (Megatron's peft when megatron_cfg is enabled, as
    NeMo RL picks its backend), or None for full fine-tuning."""
    if c.policy.megatron_cfg.enabled:
        return MEGATRON_LORA if c.policy.megatron_cfg.peft.enabled else None
    return DTENSOR_LORA if c.policy.dtensor_cfg.lora_cfg.enabled else None


def _lora_of(c: ConfigDict, key: str) -> LoraConfig:
    from jax_sft.models.lora import LoraConfig  # noqa: PLC0415  (jax only when LoRA is on)

    s, megatron = _get(c, key), key == MEGATRON_LORA
    return LoraConfig(
        dim=s.dim, alpha=s.alpha, dropout=s.dropout, dropout_position=s.dropout_position,
        a_init=s.lora_A_init_method if megatron else s.lora_A_init,
        target_modules=tuple(s.target_modules), exclude_modules=tuple(s.exclude_modules),
        match_all_linear=False if megatron else s.match_all_linear,
        naming="megatron" if megatron else "hf", seed=c.sft.seed)


def lora_config(cfg: ConfigDict) -> LoraConfig | None:
    """The run's `jax_sft.models.lora.LoraConfig` (cfg: a validated config), or None when LoRA is
    off: from policy.dtensor_cfg.lora_cfg (HF module names), or with policy.megatron_cfg.enabled
    from policy.megatron_cfg.peft (Megatron module names); the adapters' seed is sft.seed."""
    key = _lora_section(cfg)
    return None if key is None else _lora_of(cfg, key)


def _lora_problems(c: ConfigDict) -> list[str]:
    """The problems of the enabled LoRA section (each naming its full key)."""
    problems = []
    if c.policy.megatron_cfg.enabled and c.policy.dtensor_cfg.lora_cfg.enabled:
        problems.append(_problem(f"{DTENSOR_LORA}.enabled", True, "false with policy.megatron_cfg.enabled=true",
                                 f"NeMo RL's Megatron backend takes LoRA from {MEGATRON_LORA}"))
    key = _lora_section(c)
    if key is None:
        return problems
    s = _get(c, key)
    for name in ("target_modules", "exclude_modules"):
        if not all(isinstance(m, str) and m for m in s[name]):
            problems.append(_problem(f"{key}.{name}", list(s[name]),
                                     "a list of module names or wildcard patterns (strings)"))
    rename = {"lora_A_init": "lora_A_init_method"} if key == MEGATRON_LORA else {}
    for line in _lora_of(c, key).problems():
        name, eq, rest = line.partition("=")
        problems.append(f"{key}.{rename.get(name, name)}{eq}{rest}")
    if key == MEGATRON_LORA:
        if s.lora_B_init_method != "zero":
            problems.append(_problem(f"{key}.lora_B_init_method", s.lora_B_init_method, '"zero"',
                                     "B starts at zero, so training starts from the base model"))
        if s.lora_dtype not in LORA_DTYPES:
            problems.append(_problem(f"{key}.lora_dtype", s.lora_dtype, 'null, "float32" or "torch.float32"',
                                     "LoRA adapters are always float32 here (the frozen base follows "
                                     "policy.jax_cfg.param_dtype)"))
    return problems


def validate(cfg: ConfigDict | Mapping, source: str = "config",
             added: Set[str] = frozenset()) -> ConfigDict:
    """A new, locked ConfigDict: `cfg` written onto the defaults (keys and types checked), its null
    `DERIVED` keys filled from their source, every value checked. Raises ConfigError listing all
    problems found. Unknown keys in `added` (overrides given with '+') are dropped with the
    warning, as NeMo RL accepts new keys that way."""
    c = _build(cfg.to_dict() if isinstance(cfg, ConfigDict) else cfg, source, added)
    derived = {key for key in DERIVED if _get(c, key) is None}
    for key in derived:
        parent, _, leaf = key.rpartition(".")
        _get(c, parent)[leaf] = DERIVED[key](c)
    problems = _check(c, derived) + _data_problems(c)
    if problems:
        raise ConfigError(problems, source)
    return c.lock()


def _data_problems(c: ConfigDict) -> list[str]:
    """Dataset names, dataset-section keys and processors (jax_sft.data.layout; no data is read)."""
    from jax_sft.data.layout import check_data  # noqa: PLC0415  (the data package imports this module)

    return check_data(c.data)


# ------------------------------------------------------------------------------ public entry points


def load_config(path: str | os.PathLike | None = None, overrides: Sequence[str] = ()) -> ConfigDict:
    """The validated config of a run: the defaults, then `path` (a `.py[:arg]` with `get_config()`
    or a NeMo RL `.yaml`; None: the defaults alone), then `overrides` ("a.b=v", "+a.b=v",
    "++a.b=v", "~a.b" or "--config.a.b=v"; values parsed as YAML). Interpolations see the
    overrides, as in NeMo RL."""
    source = ("defaults" if path is None else str(path)) + (" + overrides" if overrides else "")
    tree = _escape(default_config().to_dict())
    if path is not None:
        tree = _merge(tree, _read(str(path)))
    tree, added = _apply(tree, overrides, source)
    return validate(_resolve(tree, source), source, added)


def apply_overrides(cfg: ConfigDict, overrides: Sequence[str]) -> ConfigDict:
    """A new ConfigDict: `cfg` with `overrides` applied, keys and types checked, not validated.
    Apply overrides before `validate`, so that the derived keys follow their source."""
    tree, added = _apply(_escape(cfg.to_dict()), overrides, "overrides")
    return _build(_resolve(tree, "overrides"), "overrides", added)


def to_yaml(cfg: ConfigDict) -> str:
    """The config as YAML (to print and save); `load_config` reads it back to an equal config."""
    return yaml.safe_dump(_escape(cfg.to_dict()), sort_keys=False, allow_unicode=True, width=100)


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
            config, i = (arg[len("--config="):], i) if "=" in arg else (args[i], i + 1)
        elif arg.startswith("--config.") and "=" not in arg and has_value:
            overrides.append(_join_override(*_split_override(f"{arg}={args[i]}")))
            i += 1
        elif arg.startswith("--config.") or (not arg.startswith("--") and "=" in arg):
            overrides.append(_join_override(*_split_override(arg)))
        elif arg.startswith("~"):
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
