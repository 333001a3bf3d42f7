"""How NeMo RL's keys map onto jax_sft: keys that do not apply (IGNORED, INERT), keys derived from
others (DERIVED, NeMo RL's `${...}` interpolations of sft.yaml), and an enabled
`policy.megatron_cfg` (what of the Megatron recipes is used, listed as ignored, or an error)."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import yaml
from ml_collections import ConfigDict

from jax_sft.config.keys import problem

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
    "policy.tokenizer.video",  # vision-language processing
)
MUST_BE_DISABLED = {
    "policy.lora_cfg": "LoRA's keys go under policy.dtensor_cfg.lora_cfg (or policy.megatron_cfg.peft "
    "with Megatron), as in NeMo RL; move them there",
}
# NeMo RL keys kept with their defaults (NeMo RL's sft.yaml has them) that change how NeMo RL lays
# out memory or work, not what is computed, and have no counterpart here: named in the warning when
# set to anything else. FSDP over the mesh (and jax_cfg.remat) takes the place of CPU offload,
# sequence parallelism and custom TP plans (context parallelism is the mesh's context axis);
# dynamic batching (micro-batches by token budget) gives the same gradient as fixed micro-batches
# (policy.sequence_packing packs rows).
INERT = {
    "policy.dtensor_cfg.cpu_offload": False,
    "policy.dtensor_cfg.sequence_parallel": False,
    "policy.dtensor_cfg.custom_parallel_plan": None,
    "policy.dynamic_batching.enabled": False,
    "policy.megatron_cfg.peft.a2a_experimental": False,  # Megatron's all-to-all for LoRA
}
# Sections that take keys beyond the defaults' (their reader checks them): torch optimizer kwargs.
OPEN = ("policy.optimizer.kwargs",)

# An enabled policy.megatron_cfg: keys (below megatron_cfg) that must keep a value, with the reason;
# at that value they are listed as ignored.
MEGATRON_FIXED: dict[str, tuple[Any, str]] = {
    "optimizer.fp16": (False, "fp16 is not supported; policy.precision sets the compute dtype (bfloat16 or float32)"),
    "optimizer.decoupled_weight_decay": (True, "only decoupled (AdamW) weight decay is supported"),
    "optimizer.decoupled_lr": (None, "a separate LR for embedding/output layers is not supported"),
    "optimizer.decoupled_min_lr": (None, "a separate LR for embedding/output layers is not supported"),
    "optimizer.apply_wd_to_qk_layernorm": (False, "weight decay on q/k norm weights is not supported"),
    "scheduler.lr_decay_samples": (None, "NeMo RL schedules by iterations: use lr_decay_iters"),
    "scheduler.lr_warmup_samples": (0, "NeMo RL schedules by iterations: use lr_warmup_iters"),
    "scheduler.lr_wsd_decay_samples": (None, "NeMo RL schedules by iterations: use lr_wsd_decay_iters"),
    "scheduler.max_steps": (None, "set lr_decay_iters instead"),
    "scheduler.no_weight_decay_cond_type": (None, "only Megatron's default weight-decay groups are supported"),
}
# Keys of Megatron's OptimizerConfig / SchedulerConfig that do not change the maths on this backend
# (distributed-optimizer layout, offloading, loss scaling for fp16, storage dtypes of master
# weights and moments, which are float32 here; the compute dtype follows policy.precision).
MEGATRON_INERT = {
    "optimizer": {
        "bf16",
        "params_dtype",
        "use_distributed_optimizer",
        "use_precision_aware_optimizer",
        "optimizer_cpu_offload",
        "optimizer_offload_fraction",
        "overlap_cpu_optimizer_d2h_h2d",
        "overlap_param_gather",
        "overlap_param_gather_with_optimizer_step",
        "main_grads_dtype",
        "main_params_dtype",
        "exp_avg_dtype",
        "exp_avg_sq_dtype",
        "store_param_remainders",
        "loss_scale",
        "initial_loss_scale",
        "min_loss_scale",
        "loss_scale_window",
        "hysteresis",
        "log_num_zeros_in_grad",
        "barrier_with_L1_time",
        "optimizer_cuda_graph",
        "pin_cpu_grads",
        "pin_cpu_params",
        "use_torch_optimizer_for_cpu_offload",
        "config_logger_dir",
        "timers",
    },
    "scheduler": {"override_opt_param_scheduler", "use_checkpoint_opt_param_scheduler"},
}


def _mb_tokens(c: ConfigDict) -> int:
    return c.policy.max_total_sequence_length * c.policy.train_micro_batch_size


def _tensor_size(c: ConfigDict) -> int:
    m = c.policy.megatron_cfg
    return m.tensor_model_parallel_size if m.enabled else c.policy.dtensor_cfg.tensor_parallel_size


def _context_size(c: ConfigDict) -> int:
    """The mesh's context axis: jax_cfg.mesh.context, null meaning NeMo RL's context_parallel_size
    (megatron_cfg's with Megatron enabled, else dtensor_cfg's)."""
    m, given = c.policy.megatron_cfg, c.policy.jax_cfg.mesh.context
    if given is not None:
        return given
    return m.context_parallel_size if m.enabled else c.policy.dtensor_cfg.context_parallel_size


def _divisible_by(c: ConfigDict) -> int:
    """make_sequence_length_divisible_by's null: the tensor size (NeMo RL's sft.yaml), and with a
    context axis n > 1 a multiple of 2n too (its zig-zag layout cuts rows in 2n equal chunks)."""
    tensor, context = _tensor_size(c), _context_size(c)
    return tensor if context == 1 else math.lcm(tensor, 2 * context)


def _remat(c: ConfigDict) -> str:
    m, d = c.policy.megatron_cfg, c.policy.dtensor_cfg
    checkpointing = m.activation_checkpointing if m.enabled else d.activation_checkpointing
    return "full" if checkpointing else "none"


def _fp8_cfg(c: ConfigDict) -> ConfigDict | None:
    """An enabled policy.megatron_cfg.fp8_cfg of an enabled megatron_cfg (else None)."""
    m = c.policy.megatron_cfg
    return m.fp8_cfg if m.enabled and m.fp8_cfg.enabled else None


def _fp8(c: ConfigDict) -> str:
    fp8 = _fp8_cfg(c)
    return "none" if fp8 is None else fp8.fp8


def _fp8_recipe(c: ConfigDict) -> str:
    fp8 = _fp8_cfg(c)
    return "delayed" if fp8 is None else fp8.fp8_recipe


def _megatron_wd(c: ConfigDict) -> float:
    return c.policy.megatron_cfg.optimizer.weight_decay


# Keys whose null follows another key, as NeMo RL's sft.yaml interpolates them.
DERIVED: dict[str, Callable[[ConfigDict], Any]] = {
    "policy.tokenizer.name": lambda c: c.policy.model_name,
    "data.max_input_seq_length": lambda c: c.policy.max_total_sequence_length,
    "policy.sequence_packing.train_mb_tokens": _mb_tokens,
    "policy.dynamic_batching.train_mb_tokens": _mb_tokens,
    "policy.make_sequence_length_divisible_by": _divisible_by,
    "policy.jax_cfg.mesh.tensor": _tensor_size,
    "policy.jax_cfg.mesh.context": _context_size,
    "policy.jax_cfg.mesh.expert": lambda c: c.policy.dtensor_cfg.expert_parallel_size,
    "policy.jax_cfg.mesh.data": lambda c: c.policy.dtensor_cfg.dp_replicate_size,
    "policy.jax_cfg.remat": _remat,
    "policy.jax_cfg.fp8": _fp8,
    "policy.jax_cfg.fp8_recipe": _fp8_recipe,
    "policy.megatron_cfg.optimizer.clip_grad": lambda c: c.policy.max_grad_norm,
    "policy.megatron_cfg.scheduler.start_weight_decay": _megatron_wd,
    "policy.megatron_cfg.scheduler.end_weight_decay": _megatron_wd,
}


def within(section: ConfigDict, tree: Mapping) -> bool:
    """Whether every key of `tree` (recursively) is a key of `section`."""
    for key, value in tree.items():
        below = section.get(key) if key in section else None
        if key not in section or (
            isinstance(value, Mapping) and value and not (isinstance(below, ConfigDict) and within(below, value))
        ):
            return False
    return True


def fixed_problem(name: str, value: Any, want: Any, why: str) -> str:
    expected = yaml.safe_dump(want, default_flow_style=True).strip().removesuffix("...").strip()
    return problem(f"policy.megatron_cfg.{name}", value, expected, why)


def megatron_section(tree: Mapping, section: ConfigDict, ignored: list[str], problems: list[str]) -> Mapping | None:
    """The part of a `policy.megatron_cfg` tree to write onto `section` (None: all of it ignored).

    Enabled: the keys of `section` are kept (with any unknown optimizer / scheduler key, which
    `loading` reports); `MEGATRON_INERT` keys and every other top-level key (pipeline, sequence
    and expert parallelism, fusions, DDP, ...; FSDP takes their place) are recorded as
    ignored; `MEGATRON_FIXED` keys at another value are problems. Disabled: ignored as a whole,
    unless it has only jax_sft's keys (a saved config.yaml), which are written as they are.
    """
    prefix = "policy.megatron_cfg."
    if not tree.get("enabled"):
        if within(section, tree):
            return tree
        ignored.append(prefix[:-1])
        return None
    kept: dict[str, Any] = {}
    for key, value in tree.items():
        fixed = {n.partition(".")[2]: w for n, w in MEGATRON_FIXED.items() if n.startswith(key + ".")}
        if key in MEGATRON_INERT and isinstance(value, Mapping):
            kept[key] = {}
            for k, v in value.items():
                if k in fixed:
                    ignored.append(f"{prefix}{key}.{k}")
                    if v != fixed[k][0]:
                        problems.append(fixed_problem(f"{key}.{k}", v, *fixed[k]))
                elif k in MEGATRON_INERT[key]:
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
                    problems.append(fixed_problem(f"{key}.{k}", v, want, why))
    return kept
