"""The run plan: the validated config (and the model's config.json when it is local) turned once
into frozen, typed sections, every derived value computed and every cross-key check made here.

    plan = make_plan(cfg, devices=8, model_config=models.read_config(model_dir, overrides))
    plan.mesh.fsdp, plan.batch.seq_len, plan.batch.micro_batches, plan.model.options.remat
    plan.describe()        # the dry run's lines (mesh, batches, model, LoRA, steps, outputs)

`make_plan` raises one ConfigError listing every problem with the devices, batch sizes and model
(`output_problems` adds the folders and export target a training run writes). The trainer, the
data pipeline, `--dry_run`, `inspect_data` and `generate` read these sections instead of
re-deriving values from the config; `plan.config` is the validated ConfigDict itself (for logs,
checkpoints and the sections that pass keys through to their readers).
"""

from __future__ import annotations

import dataclasses
import datetime
import os
from functools import partial
from pathlib import Path
from typing import Any

from ml_collections import ConfigDict

from jax_sft.checkpoint import is_checkpoint_folder
from jax_sft.config.keys import plain
from jax_sft.config.lora import DTENSOR_LORA, MEGATRON_LORA, lora_config
from jax_sft.data.batches import BatchPlan
from jax_sft.data.pipeline import DataPlan
from jax_sft.errors import ConfigError, InputError
from jax_sft.loss import chunk_problem, loss_chunk
from jax_sft.models import context as context_lib
from jax_sft.models import counts
from jax_sft.models.config import LAYER_PATTERN, ModelConfig
from jax_sft.models.decoder import sharding_problems
from jax_sft.models.hf_write import export_target_problem
from jax_sft.models.options import Fp8Config, LoraConfig, ModelOptions
from jax_sft.models.sharding import mesh_shape, padded_vocab_size
from jax_sft.sinks import sink_folders, sink_problems

__all__ = [
    "RunPlan",
    "MeshPlan",
    "ModelPlan",
    "StepsPlan",
    "CheckpointSpec",
    "make_plan",
    "mesh_plan",
    "model_options",
    "output_problems",
    "deadline_seconds",
    "protected_folders",
    "model_notes",
]

CHECKS = "checks against the devices and model"  # the source of make_plan's ConfigError


@dataclasses.dataclass(frozen=True)
class MeshPlan:
    """The device mesh: data (replicas) x fsdp x expert x context x tensor over `devices` devices;
    the context axis splits every row's sequence (it does not add data-parallel ranks)."""

    data: int
    fsdp: int
    expert: int
    tensor: int
    context: int = 1

    @property
    def devices(self) -> int:
        return self.data * self.fsdp * self.expert * self.context * self.tensor

    @property
    def dp(self) -> int:
        """Data-parallel ranks: how many different row blocks a batch is split into."""
        return self.data * self.fsdp * self.expert

    def sizes(self) -> dict[str, int]:
        """{mesh axis: size} (`models.sharding.MESH_AXES`)."""
        return {
            "data": self.data,
            "fsdp": self.fsdp,
            "expert": self.expert,
            "context": self.context,
            "tensor": self.tensor,
        }


@dataclasses.dataclass(frozen=True)
class ModelPlan:
    """The model: its name (folder or hub id), the config.json overrides, how it is built and,
    when its config.json was read, its `ModelConfig`."""

    name: str
    directory: Path | None  # the local folder holding its config.json, when known
    hf_config_overrides: dict[str, Any] | None
    options: ModelOptions
    config: ModelConfig | None
    lora_key: str | None  # the config section LoRA comes from, None without LoRA


@dataclasses.dataclass(frozen=True)
class StepsPlan:
    max_steps: int
    max_epochs: int
    val_period: int
    val_batches: int
    val_at_start: bool
    val_at_end: bool
    seed: int


@dataclasses.dataclass(frozen=True)
class CheckpointSpec:
    """What the checkpoints of the run are: where, how often, what is kept (`jax_sft.checkpoint`)."""

    enabled: bool
    directory: Path
    save_period: int
    keep_top_k: int | None
    metric_name: str | None  # "val:<name>" / "train:<name>" (NeMo RL's older "<name>" means "val:<name>")
    higher_is_better: bool
    save_optimizer: bool
    deadline_s: float | None  # checkpoint_must_save_by, in seconds after the start
    export_dir: Path | None  # checkpointing.hf_export_dir


@dataclasses.dataclass(frozen=True)
class RunPlan:
    config: ConfigDict  # the validated config
    precision: str
    mesh: MeshPlan
    batch: BatchPlan
    model: ModelPlan
    steps: StepsPlan
    checkpoint: CheckpointSpec
    data: DataPlan
    loss_chunk: int  # tokens per chunk of the loss: policy.jax_cfg.loss_chunk_size, or the largest divisor below it

    @property
    def lora(self) -> LoraConfig | None:
        return self.model.options.lora

    def describe(self, nodes: int, gpus_per_node: int) -> list[str]:
        """The dry run's lines of this plan (mesh, batches, model, LoRA, steps, checkpoints, logs)."""
        return _describe(self, nodes, gpus_per_node)


def deadline_seconds(value: str | None) -> float | None:
    """NeMo RL's checkpoint_must_save_by "DD:HH:MM:SS" -> seconds after the start of the run."""
    if not value:
        return None
    days, hours, minutes, seconds = (int(x) for x in value.split(":"))
    return datetime.timedelta(days=days, hours=hours, minutes=minutes, seconds=seconds).total_seconds()


def mesh_plan(cfg: ConfigDict, devices: int) -> MeshPlan:
    """The mesh of `policy.jax_cfg.mesh` over `devices` devices (UsageError when it does not fit)."""
    m = cfg.policy.jax_cfg.mesh
    data, fsdp, tensor = mesh_shape(m.data, m.fsdp, m.tensor, devices, m.expert, m.context)
    return MeshPlan(data, fsdp, m.expert, tensor, m.context)


def model_options(cfg: ConfigDict) -> ModelOptions:
    """How the run builds its model: policy.precision, policy.jax_cfg.*, LoRA."""
    jc = cfg.policy.jax_cfg
    return ModelOptions(
        dtype=cfg.policy.precision,
        param_dtype=jc.param_dtype,
        attention=jc.attention,
        remat=jc.remat,
        scan_layers=bool(jc.scan_layers),
        max_segments=jc.max_segments_per_row,
        lora=lora_config(cfg),
        fp8=None if jc.fp8 == "none" else Fp8Config(jc.fp8, jc.fp8_recipe, jc.fp8_amax_history),
        context_attention=jc.context_attention,
    )


def _batch_plan(cfg: ConfigDict, dp: int, problems: list[str]) -> BatchPlan:
    p, s = cfg.policy, cfg.sft
    divisible = p.make_sequence_length_divisible_by or 1
    seq_len = -(-p.max_total_sequence_length // divisible) * divisible
    max_input = cfg.data.max_input_seq_length
    if max_input > seq_len:
        problems.append(
            f"data.max_input_seq_length={max_input} exceeds the row length {seq_len} "
            "(policy.max_total_sequence_length rounded up to make_sequence_length_divisible_by)"
        )
    for name, gbs, mbs in (
        ("policy.train_global_batch_size", p.train_global_batch_size, p.train_micro_batch_size),
        ("sft.val_global_batch_size", s.val_global_batch_size, s.val_micro_batch_size),
    ):
        if gbs % (mbs * dp):
            problems.append(
                f"{name}={gbs} is not divisible by micro batch {mbs} x data-parallel size {dp} "
                f"(mesh data*fsdp*expert); choose a multiple of {mbs * dp}"
            )
    packing = bool(p.sequence_packing.enabled)
    rank_rows = p.train_micro_batch_size
    if packing:
        mb_tokens = p.sequence_packing.train_mb_tokens
        rank_rows = mb_tokens // seq_len
        if rank_rows < 1:
            problems.append(
                f"policy.sequence_packing.train_mb_tokens={mb_tokens} is less than one row of {seq_len} tokens"
            )
    return BatchPlan(
        seq_len,
        p.max_total_sequence_length,
        max_input,
        p.train_global_batch_size,
        p.train_micro_batch_size,
        dp,
        packing,
        p.sequence_packing.algorithm,
        rank_rows,
        s.val_global_batch_size,
        s.val_micro_batch_size,
        p.sequence_packing.max_sequences_per_bin,
    )


def _context_problems(cfg: ConfigDict, mesh: MeshPlan, batch: BatchPlan) -> list[str]:
    """Rows that the context axis cannot split, or whose parts the loss cannot cut into chunks."""
    n, seq = mesh.context, batch.seq_len
    if seq % (2 * n):
        return [
            f"policy.jax_cfg.mesh.context={n} splits rows into 2 x {n} equal chunks (the zig-zag layout), but rows "
            f"have {seq} tokens (policy.max_total_sequence_length rounded up to make_sequence_length_divisible_by="
            f"{cfg.policy.make_sequence_length_divisible_by}); set make_sequence_length_divisible_by to a multiple "
            f"of {2 * n}"
        ]
    problem = chunk_problem(seq, cfg.policy.jax_cfg.loss_chunk_size, n)
    return [problem] if problem else []


def _checkpoint_spec(c: ConfigDict) -> CheckpointSpec:
    metric = c.metric_name
    return CheckpointSpec(
        enabled=bool(c.enabled),
        directory=Path(c.checkpoint_dir),
        save_period=c.save_period,
        keep_top_k=c.keep_top_k,
        metric_name=None if not metric else metric if ":" in metric else f"val:{metric}",
        higher_is_better=bool(c.higher_is_better),
        save_optimizer=bool(c.save_optimizer),
        deadline_s=deadline_seconds(c.checkpoint_must_save_by),
        export_dir=Path(c.hf_export_dir) if c.hf_export_dir else None,
    )


def make_plan(
    cfg: ConfigDict, *, devices: int, model_dir: Path | None = None, model_config: ModelConfig | None = None
) -> RunPlan:
    """The plan of the validated config `cfg` over `devices` devices, with the model's folder and
    config when they were read (None: not local; its checks are left to the run). ConfigError
    (source `CHECKS`) listing every problem with the mesh, the batch sizes and the model."""
    problems: list[str] = []
    mesh_ok = True
    try:
        mesh, mesh_ok = mesh_plan(cfg, devices), True
    except InputError as e:
        problems.append(str(e))
        mesh, mesh_ok = MeshPlan(1, devices, 1, 1), False  # to check the rest against
    batch = _batch_plan(cfg, mesh.dp, problems)
    problems += _context_problems(cfg, mesh, batch)
    p = cfg.policy
    options = model_options(cfg)
    if model_config is not None:
        model_problems = _model_problems(cfg, model_config, options, mesh.context)
        if mesh_ok and not model_problems:  # the parameters against the mesh (vocabulary rows are padded to fit)
            model_problems = sharding_problems(model_config, options, mesh.sizes())
        problems += model_problems
    if problems:
        raise ConfigError(problems, CHECKS)
    lora_key = None if options.lora is None else MEGATRON_LORA if options.lora.naming == "megatron" else DTENSOR_LORA
    s, d = cfg.sft, cfg.data
    return RunPlan(
        config=cfg,
        precision=p.precision,
        mesh=mesh,
        batch=batch,
        model=ModelPlan(p.model_name, model_dir, plain(p.hf_config_overrides), options, model_config, lora_key),
        steps=StepsPlan(
            s.max_num_steps,
            s.max_num_epochs,
            s.val_period,
            s.val_batches,
            bool(s.val_at_start),
            bool(s.val_at_end),
            s.seed,
        ),
        checkpoint=_checkpoint_spec(cfg.checkpointing),
        data=DataPlan(
            config=cfg,
            batch=batch,
            tokenize=d.tokenize,
            overlength=d.overlength,
            num_workers=d.num_workers,
            shuffle=bool(d.shuffle),
            skip_without_loss=bool(d.skip_examples_without_loss),
            seed=s.seed,
            val_period=s.val_period,
            val_batches=s.val_batches,
            mixture_by=d.mixture_by,
        ),
        loss_chunk=loss_chunk(batch.seq_len, p.jax_cfg.loss_chunk_size, mesh.context),
    )


def _model_problems(cfg: ConfigDict, m: ModelConfig, options: ModelOptions, context: int) -> list[str]:
    """The model against the run: sequence length, quantized weights, LoRA targets, the context axis."""
    problems = []
    if context > 1 and "mamba" in m.layer_kinds:
        problems.append(
            f"policy.jax_cfg.mesh.context={context}: {m.architecture} has Mamba layers, whose scan runs over each "
            "whole row (context parallelism splits attention only); set policy.jax_cfg.mesh.context=1"
        )
    if m.quantization is not None and cfg.policy.dequantize_base_checkpoint is False:
        problems.append(
            f"policy.dequantize_base_checkpoint=false, but the model stores weights in {m.quantization.upper()} "
            "(config.json's quantization_config), which jax_sft reads only dequantized (it trains no "
            "quantized weights); set it to true, as NeMo RL's gpt-oss recipes do, or leave it unset"
        )
    length = cfg.policy.max_total_sequence_length
    if length > m.context_length:
        problems.append(
            f"policy.max_total_sequence_length={length} exceeds the model's "
            f"max_position_embeddings={m.context_length}; lower it"
        )
    if options.lora is not None:
        try:
            options.lora.by_layer(m, options.scan_layers)
        except InputError as e:
            problems.append(str(e))
    return problems


def _writable(key: str, path: Path) -> list[str]:
    existing = path
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir() or not os.access(existing, os.W_OK):
        return [f"{key}={path} is not writable ({existing} is not a writable folder)"]
    return []


def output_problems(plan: RunPlan) -> list[str]:
    """What keeps a training run from writing its outputs: checkpoint, log and sink folders that are
    not writable, a metric sink that cannot start (a package or the W&B login missing:
    `jax_sft.sinks.sink_problems`), an export target that the final export may not replace."""
    ck, logger = plan.checkpoint, plan.config.logger
    problems = _writable("checkpointing.checkpoint_dir", ck.directory) if ck.enabled else []
    problems += _writable("logger.log_dir", Path(logger.log_dir))
    for key, folder in sink_folders(logger).items():
        problems += _writable(key, folder)
    problems += sink_problems(logger)
    if ck.export_dir is not None:
        problem = export_target_problem(
            ck.export_dir, protected=protected_folders(plan), is_checkpoint=is_checkpoint_folder
        )
        if problem:
            problems.append(f"checkpointing.hf_export_dir: {problem}")
    return problems


def protected_folders(plan: RunPlan) -> tuple[Path, ...]:
    """Folders the final export must never replace, write into or hold (besides /, home and the
    working directory, and any training checkpoint): checkpoint_dir and the base model's folder."""
    folders = (plan.checkpoint.directory,) if plan.checkpoint.enabled else ()
    return folders + ((plan.model.directory,) if plan.model.directory is not None else ())


# ----------------------------------------------------------------------------- the dry run's lines


def _describe(plan: RunPlan, nodes: int, gpus_per_node: int) -> list[str]:
    m, b = plan.mesh, plan.batch
    micro = b.global_batch // b.dp // b.micro_batch
    context = f" x context={m.context}" if m.context > 1 else ""
    lines = [
        f"mesh: data={m.data} x fsdp={m.fsdp} x expert={m.expert}{context} x tensor={m.tensor} over {m.devices} "
        f"devices ({nodes} node(s) x {gpus_per_node}; one process per node)",
        f"batches: {b.global_batch} sequences per step = {b.dp} data-parallel ranks x {micro} micro-batch(es) of "
        f"{b.micro_batch}, rows of {b.max_total_length} tokens" + (" (packed)" if b.packing else ""),
    ]
    chunk_size = plan.config.policy.jax_cfg.loss_chunk_size
    if plan.loss_chunk != min(chunk_size, b.seq_len // m.context):
        lines.append(
            f"loss: chunks of {plan.loss_chunk} tokens (policy.jax_cfg.loss_chunk_size={chunk_size} does not divide "
            f"the {b.seq_len // m.context} tokens per row{' and device' if m.context > 1 else ''}; the largest "
            "divisor below it)"
        )
    return lines + _context_lines(plan) + _model_lines(plan) + _memory_lines(plan)


def _gib(nbytes: float) -> str:
    return f"{nbytes / 2**30:.2f} GiB"


def _context_lines(plan: RunPlan) -> list[str]:
    """The context split, when there is one: tokens per device, chunks, and (with the model's
    config) the attention strategy across the axis."""
    m, n, seq, o = plan.model.config, plan.mesh.context, plan.batch.seq_len, plan.model.options
    if n == 1:
        return []
    chunk = seq // (2 * n)
    how = "attention across it: decided when the model's config.json is read"
    if m is not None:
        strategy = context_lib.choose_strategy(o.context_attention, m.num_heads, m.num_kv_heads, n)
        how = (
            f"attention across it: {strategy} (policy.jax_cfg.context_attention={o.context_attention!r}; kv heads "
            f"{m.num_kv_heads} x context {n} vs {m.num_heads} q heads)"
        )
    return [
        f"context: rows of {seq} tokens split over context={n}: {seq // n} tokens per device, zig-zag chunks of "
        f"{chunk} (device r holds chunks r and {2 * n - 1}-r); {how}, xla blocks of {chunk} x "
        f"{context_lib.block_size(chunk)}"
    ]


def _memory_lines(plan: RunPlan) -> list[str]:
    """With the model's config: the memory per device, estimated (`counts.state_bytes_per_device`,
    `counts.activation_bytes_per_device`), with a context axis against the activations without."""
    m, mesh, b, o = plan.model.config, plan.mesh, plan.batch, plan.model.options
    if m is None:
        return []
    n, seq = mesh.context, b.seq_len
    rows = b.rank_rows if b.packing else b.micro_batch  # per data-parallel rank and micro-batch
    flash = o.attention == "cudnn" or (o.attention == "auto" and plan.precision == "bfloat16")
    estimate = partial(
        counts.activation_bytes_per_device,
        m,
        rows=rows,
        seq=seq,
        precision=plan.precision,
        remat=o.remat,
        loss_chunk=plan.loss_chunk,
        flash=flash,
    )
    acts = estimate(context=n, key_block=context_lib.block_size(seq // (2 * n)) if n > 1 else 0)
    shards = mesh.fsdp * mesh.context * mesh.tensor
    state = counts.state_bytes_per_device(
        m, plan.lora, param_dtype=o.param_dtype, precision=plan.precision, devices=shards
    )
    kernel = "context blocks" if n > 1 else "flash (cuDNN)" if flash else "xla"
    line = (
        f"memory per device (estimate): training state {_gib(sum(state.values()))} (over fsdp x context x tensor = "
        f"{shards}) + activations {_gib(sum(acts.values()))} for a micro-batch of {rows} row(s) of {seq} tokens "
        f"(layers {_gib(acts['layers'])} with remat={o.remat!r}, attention {_gib(acts['attention'])} ({kernel}), "
        f"loss {_gib(acts['loss'])})"
    )
    if n > 1:
        line += f"; with context=1 the activations would be {_gib(sum(estimate(context=1, key_block=0).values()))}"
    return [line]


def _model_lines(plan: RunPlan) -> list[str]:
    m, name = plan.model.config, plan.model.name
    if m is None:
        lines = [
            f"model: {name} is a hub id not in the local Hugging Face cache; its config.json is read (and its "
            "architecture checked) when the run downloads it"
        ]
        return lines + _lora_lines(plan)
    lines = [
        f"model: {m.architecture} ({m.family} family) from {plan.model.directory}: {m.num_layers} layers, "
        f"hidden {m.hidden_size}, {m.num_heads} heads ({m.num_kv_heads} kv), vocab {m.vocab_size}, "
        f"rope {m.rope.rope_type if m.use_rope else 'none'}, max positions {m.max_position_embeddings}"
    ]
    if m.layer_kinds:
        kinds = ", ".join(f"{m.layer_kinds.count(k)} {k}" for k in dict.fromkeys(m.layer_kinds))
        pattern = "".join(LAYER_PATTERN[k] for k in m.layer_kinds)
        lines.append(f"model: hybrid layers: {kinds} ({pattern})")
    if m.num_experts:
        sigmoid = m.moe_router == "sigmoid"
        routing = (
            f"sigmoid routing over {m.topk_groups} of {m.expert_groups} groups, scaled by {m.routed_scaling_factor:g}, "
            f"a shared expert of {m.shared_expert_intermediate_size}; "
            if sigmoid
            else ""
        )
        lines.append(
            f"model: mixture of experts: {m.num_experts} experts, top {m.experts_per_token}, "
            f"{sum(m.moe_layers)} of {m.num_layers} layers sparse; {routing}router aux loss coef "
            f"{m.router_aux_loss_coef}; experts over mesh expert={plan.mesh.expert}"
        )
    return lines + [f"model: {note}" for note in model_notes(plan)] + _lora_lines(plan)


def model_notes(plan: RunPlan) -> list[str]:
    """What the run does to the model's weights as stored (the dry run's and the run log's
    lines): dequantizing them, padding the vocabulary rows for the tensor axis."""
    m, notes = plan.model.config, []
    if m.quantization is not None:
        notes.append(f"{m.quantization.upper()} weights, dequantized on load to {plan.model.options.param_dtype}")
    vocab_rows = padded_vocab_size(m.vocab_size, plan.mesh.tensor)
    if vocab_rows != m.vocab_size:
        notes.append(
            f"vocabulary {m.vocab_size} padded to {vocab_rows} rows (a multiple of tensor={plan.mesh.tensor}); "
            "the padding is outside the softmax and never exported"
        )
    return notes


def _lora_lines(plan: RunPlan) -> list[str]:
    """The LoRA line (none for full fine-tuning); with the model's config, the adapted projections
    and parameter counts."""
    lora, m = plan.lora, plan.model.config
    if lora is None:
        return []
    if lora.match_all_linear:
        which = "every linear layer (match_all_linear)"
    elif lora.target_modules:
        which = f"targets {list(lora.target_modules)}"
    elif lora.naming == "megatron":
        which = "targets linear_qkv, linear_proj, linear_fc1, linear_fc2 (no target_modules)"
    elif lora.exclude_modules:
        which = "every linear layer, lm_head included (exclude_modules without target_modules)"
    else:
        which = "every *_proj (no target_modules)"
    which += f" minus {list(lora.exclude_modules)}" if lora.exclude_modules else ""
    line = (
        f"LoRA ({plan.model.lora_key}, {lora.naming} module names): rank {lora.dim}, alpha {lora.alpha:g}, "
        f"scale {lora.scale:g}, {which}; dropout {lora.dropout:g} ({lora.dropout_position}); "
        "float32 adapters, frozen base"
    )
    if m is None:
        return [line + "; adapted projections are counted when the model's config.json is local"]
    sites = counts.lora_sites(m, lora)
    trainable, total = counts.lora_param_count(m, lora)
    head = " (lm_head included)" if (None, "lm_head") in sites else ""
    return [
        f"{line}; {len(sites)} adapted projections{head}, {trainable:,} trainable parameters of "
        f"{total:,} ({100 * trainable / total:.3g}%)"
    ]
