"""The checks of a config's values, once its keys and types are (`loading.validate` fills the
`DERIVED` keys, then reports every problem `value_problems` finds at once, one line each naming the
full key). Checks against the devices and the model are the run plan's (`plan.py`)."""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from ml_collections import ConfigDict

from jax_sft import choices
from jax_sft.config.defaults import get_config as default_config
from jax_sft.config.keys import get, problem
from jax_sft.config.lora import lora_problems
from jax_sft.config.nemo_rl import OPEN
from jax_sft.data.sections import FLAT_KEYS, check_data, today_name


def value_problems(c: ConfigDict, derived: set[str]) -> list[str]:
    """Every problem with the values of `c` (keys in `derived` were filled from a source key, whose
    own problem is the one reported): ranges and choices, Megatron's and LoRA's sections, the
    data sections (`jax_sft.data.sections.check_data`; nothing is read)."""
    problems = _range_problems(c, derived) + _cross_problems(c)
    if c.policy.megatron_cfg.enabled:
        problems += _check_megatron(c, derived)
    return problems + lora_problems(c) + _flat_keys_with_train(c) + check_data(c.data)


def _flat_keys_with_train(c: ConfigDict) -> list[str]:
    """With today's layout (data.train set), the flat layout's keys must keep their defaults."""
    if c.data.get("train") is None:
        return []
    flat = default_config().data
    return [
        f"data.{key}={c.data.get(key)!r:.60}: a key of the flat layout; with data.train set, give it in the "
        f"dataset section (e.g. data.train.{today_name(key)}) or data.default"
        for key in FLAT_KEYS
        if c.data.get(key) != flat.get(key)
    ]


def is_deadline(value: str | None) -> bool:
    """None, or "DD:HH:MM:SS" with hours < 24 and minutes, seconds < 60."""
    m = re.fullmatch(r"(\d{2}):(\d{2}):(\d{2}):(\d{2})", value or "")
    return value is None or (bool(m) and int(m[2]) < 24 and int(m[3]) < 60 and int(m[4]) < 60)


_POSITIVE = (
    "sft.max_num_epochs",
    "sft.val_global_batch_size",
    "sft.val_micro_batch_size",
    "checkpointing.save_period",
    "policy.train_global_batch_size",
    "policy.train_micro_batch_size",
    "policy.max_total_sequence_length",
    "data.max_input_seq_length",
    "policy.make_sequence_length_divisible_by",
    "policy.dtensor_cfg.tensor_parallel_size",
    "policy.dtensor_cfg.context_parallel_size",
    "policy.dtensor_cfg.dp_replicate_size",
    "policy.sequence_packing.train_mb_tokens",
    "policy.sequence_packing.sequence_length_round",
    "policy.dynamic_batching.train_mb_tokens",
    "policy.dynamic_batching.sequence_length_round",
    "policy.jax_cfg.mesh.data",
    "policy.jax_cfg.mesh.tensor",
    "policy.jax_cfg.loss_chunk_size",
    "policy.jax_cfg.mesh.expert",
    "policy.dtensor_cfg.expert_parallel_size",
    "policy.jax_cfg.mesh.context",
    "policy.megatron_cfg.context_parallel_size",
    "policy.jax_cfg.max_segments_per_row",
    "policy.jax_cfg.fp8_amax_history",
    "policy.optimizer.kwargs.lr",
    "policy.optimizer.kwargs.eps",
    "cluster.gpus_per_node",
    "cluster.num_nodes",
    "logger.gpu_monitoring.collection_interval",
    "logger.gpu_monitoring.flush_interval",
)


def _range_problems(c: ConfigDict, derived: set[str]) -> list[str]:
    """The keys' values one by one: ranges, choices, formats."""
    problems: list[str] = []

    def need(key: str, ok: Callable[[Any], Any], expected: str, fix: str = "") -> None:
        parent, _, leaf = key.rpartition(".")
        if parent in OPEN and leaf not in get(c, parent):
            return  # removed with `~`: the reader's default (torch's) applies
        if key not in derived and not ok(get(c, key)):
            problems.append(problem(key, get(c, key), expected, fix))

    def one_of(key: str, allowed: Sequence[str]) -> None:
        need(key, lambda v: v in allowed, choices.one_of(allowed))

    for key in _POSITIVE:
        need(key, lambda v: v > 0, "a positive number")
    need(
        "policy.jax_cfg.mesh.fsdp",
        lambda v: v > 0 or v == -1,
        "a positive number, or -1 for all devices left after data, expert, context and tensor",
    )
    need("sft.max_num_steps", lambda v: v >= 0, "a number >= 0 (0: only validate)")
    need("sft.val_period", lambda v: v >= 0, "a number >= 0 (0: no periodic validation)")
    need("data.num_workers", lambda v: v >= 0, "a number >= 0 (0: in-process)")
    need("policy.optimizer.kwargs.weight_decay", lambda v: v >= 0, "a number >= 0")
    need("policy.max_grad_norm", lambda v: v is None or v > 0, "a positive number, or null for no clipping")
    need(
        "checkpointing.keep_top_k", lambda v: v is None or v > 0, "a positive number, or null to keep every checkpoint"
    )
    for key in ("policy.model_name", "policy.tokenizer.name", "checkpointing.checkpoint_dir", "logger.log_dir"):
        need(key, bool, "a non-empty string")
    one_of("policy.precision", choices.PRECISIONS)
    one_of("policy.jax_cfg.param_dtype", choices.PARAM_DTYPES)
    one_of("policy.jax_cfg.attention", choices.ATTENTION)
    one_of("policy.jax_cfg.context_attention", choices.CONTEXT_ATTENTION)
    one_of("policy.jax_cfg.remat", choices.REMAT)
    one_of("policy.jax_cfg.fp8", choices.FP8)
    one_of("policy.jax_cfg.fp8_recipe", choices.FP8_RECIPES)
    one_of("policy.sequence_packing.algorithm", choices.PACKING)
    one_of("data.overlength", choices.OVERLENGTH)
    one_of("data.tokenize", choices.TOKENIZE)
    one_of("data.mixture_by", choices.MIXTURE_BY)
    need("policy.sequence_packing.max_sequences_per_bin", _null_or_positive, "a positive number, or null for no bound")
    need("checkpointing.checkpoint_must_save_by", is_deadline, '"DD:HH:MM:SS" (e.g. "00:03:45:00"), or null')
    need(
        "checkpointing.metric_name",
        lambda v: v is None or re.fullmatch(r"((val|train):)?[\w/.-]+", v),
        '"val:<metric>" or "train:<metric>" (e.g. "val:val_loss"), or null',
    )
    need(
        "policy.optimizer.kwargs.betas",
        lambda v: len(v) == 2 and all(isinstance(b, (int, float)) and 0 <= b < 1 for b in v),
        "two numbers in [0, 1)",
    )
    need(
        "policy.scheduler",
        lambda v: v is None or all(isinstance(e, Mapping) for e in v),
        "null (constant LR), or a list of {name, kwargs} entries and one {milestones: [...]}",
    )
    return problems


def _cross_problems(c: ConfigDict) -> list[str]:
    """The keys that must agree with each other (devices and models apart: the run plan's)."""
    problems: list[str] = []
    for prefix in ("policy.train", "sft.val"):
        gbs, mbs = get(c, f"{prefix}_global_batch_size"), get(c, f"{prefix}_micro_batch_size")
        if mbs > 0 and gbs % mbs:
            expected = f"a multiple of {prefix}_micro_batch_size={mbs}"
            problems.append(problem(f"{prefix}_global_batch_size", gbs, expected))
    packing, p = c.policy.sequence_packing, c.policy
    if packing.enabled and p.dynamic_batching.enabled:
        problems.append(
            problem(
                "policy.sequence_packing.enabled",
                True,
                "false when policy.dynamic_batching.enabled",
                "enable one of the two",
            )
        )
    if packing.enabled and 0 < packing.train_mb_tokens < p.max_total_sequence_length:
        problems.append(
            problem(
                "policy.sequence_packing.train_mb_tokens",
                packing.train_mb_tokens,
                f">= policy.max_total_sequence_length={p.max_total_sequence_length}",
                "a sequence of the longest length must fit in one packed micro-batch",
            )
        )
    return problems


def _null_or_positive(v: Any) -> bool:
    return v is None or v > 0


# An enabled policy.megatron_cfg's checks (what Megatron asserts): key below megatron_cfg, whether the
# value is fine (given the optimizer section `o` and scheduler section `s`), what is expected.
MEGATRON_CHECKS: tuple[tuple[str, Callable[[Any, Any, Any], bool], Callable[[Any], str] | str], ...] = (
    ("tensor_model_parallel_size", lambda v, o, s: v > 0, "a positive number"),
    ("optimizer.lr", lambda v, o, s: v > 0, "a positive number"),
    ("optimizer.adam_eps", lambda v, o, s: v > 0, "a positive number"),
    (
        "optimizer.optimizer",
        lambda v, o, s: v in choices.MEGATRON_OPTIMIZERS,
        choices.one_of(choices.MEGATRON_OPTIMIZERS),
    ),
    ("optimizer.min_lr", lambda v, o, s: 0 <= v <= o.lr, lambda o: f"in [0, optimizer.lr={o.lr}]"),
    ("optimizer.weight_decay", lambda v, o, s: v >= 0, "a number >= 0"),
    ("optimizer.adam_beta1", lambda v, o, s: 0 <= v < 1, "a number in [0, 1)"),
    ("optimizer.adam_beta2", lambda v, o, s: 0 <= v < 1, "a number in [0, 1)"),
    ("optimizer.sgd_momentum", lambda v, o, s: v >= 0, "a number >= 0"),
    (
        "optimizer.clip_grad",
        lambda v, o, s: v is None or v >= 0,
        "a number >= 0 (0: no clipping), or null for policy.max_grad_norm",
    ),
    (
        "scheduler.lr_decay_style",
        lambda v, o, s: v in choices.MEGATRON_DECAY_STYLES,
        choices.one_of(choices.MEGATRON_DECAY_STYLES),
    ),
    (
        "scheduler.lr_wsd_decay_style",
        lambda v, o, s: v in choices.MEGATRON_WSD_STYLES,
        choices.one_of(choices.MEGATRON_WSD_STYLES),
    ),
    (
        "scheduler.weight_decay_incr_style",
        lambda v, o, s: v in choices.MEGATRON_WD_STYLES,
        choices.one_of(choices.MEGATRON_WD_STYLES),
    ),
    (
        "scheduler.lr_decay_iters",
        lambda v, o, s: _null_or_positive(v),
        "a positive number, or null for the run's number of steps",
    ),
    (
        "scheduler.lr_wsd_decay_iters",
        lambda v, o, s: _null_or_positive(v),
        "a positive number, or null for lr_decay_iters",
    ),
    ("scheduler.lr_warmup_iters", lambda v, o, s: v >= 0, "a number >= 0"),
    (
        "scheduler.lr_warmup_fraction",
        lambda v, o, s: v is None or (0 <= v <= 1 and not s.lr_warmup_iters),
        "null, or a number in [0, 1] with lr_warmup_iters=0",
    ),
    ("scheduler.lr_warmup_init", lambda v, o, s: 0 <= v <= o.lr, lambda o: f"in [0, optimizer.lr={o.lr}]"),
)


def _check_fp8_cfg(fp8: ConfigDict) -> list[str]:
    """An enabled megatron_cfg.fp8_cfg's format and recipe (jax_cfg.fp8 / fp8_recipe follow them)."""
    at, problems = "policy.megatron_cfg.fp8_cfg.", []
    if fp8.fp8 not in choices.FP8[1:]:
        problems.append(problem(at + "fp8", fp8.fp8, choices.one_of(choices.FP8[1:])))
    if fp8.fp8_recipe not in choices.FP8_RECIPES:
        problems.append(
            problem(
                at + "fp8_recipe",
                fp8.fp8_recipe,
                choices.one_of(choices.FP8_RECIPES),
                "jax_sft scales per tensor (blockwise and mxfp8 scale per block, which XLA's FP8 matmuls do not take)",
            )
        )
    if fp8.fp8_param:
        problems.append(
            problem(at + "fp8_param", True, "false", "FP8 weight storage is not supported: master weights stay float32")
        )
    return problems


def _check_megatron(c: ConfigDict, derived: set[str]) -> list[str]:
    """The problems of an enabled policy.megatron_cfg (`MEGATRON_CHECKS`, and the weight decay
    ramp)."""
    m = c.policy.megatron_cfg
    o, s = m.optimizer, m.scheduler
    at = "policy.megatron_cfg."
    problems = []
    for key, ok, expected in MEGATRON_CHECKS:
        value = get(m, key)
        if not ok(value, o, s):
            problems.append(problem(at + key, value, expected if isinstance(expected, str) else expected(o)))
    if m.fp8_cfg.enabled:
        problems += _check_fp8_cfg(m.fp8_cfg)
    start, end = s.start_weight_decay, s.end_weight_decay
    if not 0 <= start <= end:
        given = f"{at}scheduler.start_weight_decay" not in derived
        key = "start_weight_decay" if given else "end_weight_decay"
        problems.append(
            problem(f"{at}scheduler.{key}", s[key], "0 <= scheduler.start_weight_decay <= scheduler.end_weight_decay")
        )
    elif s.weight_decay_incr_style == "constant" and start != end:
        problems.append(
            problem(
                f"{at}scheduler.end_weight_decay", end, f"start_weight_decay={start} (weight_decay_incr_style constant)"
            )
        )
    return problems
