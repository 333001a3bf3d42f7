"""Setting a run up, before its first step: devices and the plan, the checks that can fail on bad
input (before anything compiles), the run lock, data, model, optimizer, the compiled steps, and the
state a checkpoint resumes."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import re
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jax_sft import distributed
from jax_sft.checkpoint import (
    LORA_FILE,
    Checkpointer,
    CheckpointMismatch,
    extra_path,
    model_files,
    model_mismatch,
    newest_complete_step,
    run_files,
)
from jax_sft.config import plan as plan_lib
from jax_sft.config.keys import plain
from jax_sft.config.plan import RunPlan
from jax_sft.data import ConversationEncoder, SFTData, TrainIterator, build_dataset, load_tokenizer
from jax_sft.data.batches import ARRAY_KEYS
from jax_sft.data.pipeline import check_dataset
from jax_sft.errors import ConfigError, DataError
from jax_sft.models import from_pretrained, read_config
from jax_sft.models import sharding as sharding_lib
from jax_sft.models.config import ModelConfig
from jax_sft.models.hf_read import resolve_model_dir
from jax_sft.models.options import base_problem, base_reference
from jax_sft.optim import optimizer_from_config
from jax_sft.run_lock import RunLock, RunLocked
from jax_sft.step import StepFns, make_step_fns, needs_cast, opt_state_shardings, split_model


@dataclasses.dataclass
class TrainState:
    """What the steps move and a checkpoint saves: the trainable parameters (every Param, or the
    LoRA adapters), the optimizer state, the FP8 amax histories (empty without delayed-scaling
    FP8), and where the run is."""

    params: nnx.State
    opt_state: Any  # optax state of `params`
    fp8: nnx.State
    step: int = 0
    epoch: int = 0
    consumed: int = 0  # sequences trained on


@dataclasses.dataclass(frozen=True)
class Run:
    """Everything a run sets up before its first step; `state` is what the loop moves."""

    plan: RunPlan
    mesh: Mesh
    devices: list[jax.Device]
    tokenizer: Any  # transformers PreTrainedTokenizerBase
    data: SFTData
    model_config: ModelConfig
    graphdef: nnx.GraphDef
    frozen: nnx.State  # the LoRA base (empty for full fine-tuning)
    rest: nnx.State  # the model's non-Param state
    fns: StepFns
    batch_sharding: NamedSharding
    total_steps: int
    check_rows: bool  # cuDNN's packed layout: segments per row checked per micro-batch
    attention_line: str
    state: TrainState
    train_iter: TrainIterator
    ckpt: Checkpointer | None = None
    lock: RunLock | None = None
    resumed_from: int | None = None

    def model(self) -> nnx.Module:
        return nnx.merge(self.graphdef, self.state.params, self.state.fp8, self.frozen, self.rest)


@contextlib.contextmanager
def hold_run_lock(directory: Path) -> Iterator[RunLock | None]:
    """Process 0 takes checkpoint_dir's run lock (`run_lock.RunLock`); every process learns
    whether it could, and all refuse together. Yields the lock (None on other processes)."""
    lock, refused = None, None
    if jax.process_index() == 0:
        lock = RunLock(directory)
        try:
            lock.acquire()
        except RunLocked as e:
            refused = e
    if distributed.allgather_ints([refused is not None]).any():
        raise refused or RunLocked(f"{directory}: process 0 could not take the run lock (its log says why)")
    try:
        yield lock
    finally:
        if lock is not None:
            lock.release()


def plan_run(cfg: Any, devices: list[jax.Device]) -> tuple[RunPlan, Path]:
    """The run's plan and its model folder: the mesh is checked before the model is fetched, the
    plan (with the model's config), the outputs and the model of the checkpoint it would resume
    from before any data or model work."""
    plan_lib.mesh_plan(cfg, len(devices))  # a mesh that cannot fit fails before any download
    model_dir = resolve_model_dir(cfg.policy.model_name)
    model_config = read_config(model_dir, plain(cfg.policy.hf_config_overrides))
    plan = plan_lib.make_plan(cfg, devices=len(devices), model_dir=model_dir, model_config=model_config)
    problems = plan_lib.output_problems(plan)
    if problems:
        raise ConfigError(problems, plan_lib.CHECKS)
    newest = newest_complete_step(plan.checkpoint.directory) if plan.checkpoint.enabled else None
    mismatch = model_mismatch(newest, model_config) if newest is not None else None
    if mismatch:  # before any data work; restoring would fail on the first shape that differs
        raise CheckpointMismatch(mismatch)
    return plan, model_dir


def setup(cfg: Any, stack: contextlib.ExitStack, *, validate_data: bool = False) -> Run:
    """Devices, plan and checks, lock, data (every row encoded first with `validate_data`), model,
    optimizer, step functions, and the resumed state. Imports that touch JAX devices come after
    distributed.initialize (see train.main)."""
    if cfg.policy.jax_cfg.compilation_cache_dir:
        jax.config.update("jax_compilation_cache_dir", str(cfg.policy.jax_cfg.compilation_cache_dir))
    devices = distributed.select_devices(cfg.cluster)
    plan, model_dir = plan_run(cfg, devices)
    m = plan.mesh
    mesh = sharding_lib.make_mesh(m.data, m.fsdp, m.tensor, devices=devices, expert=m.expert, context=m.context)
    lock = None  # one run per checkpoint_dir: refused here, before the model is loaded
    if plan.checkpoint.enabled:
        lock = stack.enter_context(hold_run_lock(plan.checkpoint.directory))
    tokenizer = load_tokenizer(cfg)
    dataset = build_dataset(cfg)
    if validate_data:  # before an up-front cache would stop at the first bad row
        check_every_row(plan, tokenizer, dataset)
    data = SFTData(plan.data, tokenizer, dp_ranks=sharding_lib.local_dp_ranks(mesh), dataset=dataset)
    model = from_pretrained(
        model_dir, plan.model.options, mesh=mesh, hf_config_overrides=plan.model.hf_config_overrides
    )
    packed = plan.batch.packing
    graphdef, params, fp8, frozen, rest = split_model(model, lora=plan.lora is not None)
    total_steps = min(plan.steps.max_epochs * data.steps_per_epoch, plan.steps.max_steps)
    fns, opt_state, shardings = _compile_steps(
        cfg, plan, (graphdef, params, fp8, rest), mesh, total_steps, moe=model.config.num_experts > 0
    )
    run = Run(
        plan=plan,
        mesh=mesh,
        devices=devices,
        tokenizer=tokenizer,
        data=data,
        model_config=model.config,
        graphdef=graphdef,
        frozen=frozen,
        rest=rest,
        fns=fns,
        batch_sharding=sharding_lib.batch_sharding(mesh),
        total_steps=total_steps,
        check_rows=packed and "cudnn" in model.attention_kernel(packed),
        attention_line=model.describe_attention(packed, plan.batch.seq_len),
        state=TrainState(params, opt_state, fp8),
        train_iter=data.train_iterator(),
        lock=lock,
    )
    if plan.checkpoint.enabled:
        run = _resume(run, *shardings)
    return run


def check_every_row(plan: RunPlan, tokenizer: Any, dataset: Any) -> None:
    """`--validate_data`: every row of both splits encoded as training does (each process a share),
    an `error:` line for each that fails, then a DataError when any did (all processes agree)."""
    encoder = ConversationEncoder.from_config(plan.config, tokenizer, dataset.task_spec)
    failed = 0
    for message in check_dataset(plan.data, dataset, encoder, jax.process_index(), jax.process_count()):
        print(f"error: {message}", file=sys.stderr, flush=True)
        failed += 1
    total = int(distributed.allgather_ints([failed]).sum())
    rows = len(dataset.formatted_ds["train"]) + len(dataset.formatted_ds["validation"])
    if total:
        raise DataError(f"--validate_data: {total} of {rows} rows failed to encode (listed above); fix them")
    if jax.process_index() == 0:
        print(f"validate_data: all {rows} rows encode", flush=True)


def _compile_steps(
    cfg: Any, plan: RunPlan, split: tuple, mesh: Mesh, total_steps: int, *, moe: bool
) -> tuple[StepFns, Any, tuple[Any, Any]]:
    """(step functions, initial optimizer state, (parameter, optimizer-state, FP8 shardings)) of
    the split model (graphdef, trainable params, FP8 histories, rest) over `total_steps` steps."""
    graphdef, params, fp8, rest = split
    param_shardings = jax.tree.map(lambda x: x.sharding, params)
    fp8_shardings = jax.tree.map(lambda x: x.sharding, fp8)
    tx, schedule, _ = optimizer_from_config(cfg, total_steps)
    opt_shardings = opt_state_shardings(tx, params, param_shardings, mesh)
    opt_state = jax.jit(tx.init, out_shardings=opt_shardings)(params)
    lora = plan.lora
    fns = make_step_fns(
        graphdef,
        rest,
        tx,
        schedule,
        mesh=mesh,
        param_shardings=param_shardings,
        opt_shardings=opt_shardings,
        fp8_shardings=fp8_shardings,
        chunk_size=plan.loss_chunk,
        packed=plan.batch.packing,
        compute_dtype=jnp.dtype(plan.precision),
        moe=moe,
        dropout_seed=plan.steps.seed if lora is not None and lora.dropout > 0 else None,
    )
    return fns, opt_state, (param_shardings, opt_shardings, fp8_shardings)


def to_global(batch: dict[str, np.ndarray], sharding: NamedSharding) -> jax.Array:
    """Process-local rows [local_rows, seq] -> one global int32 array [len(ARRAY_KEYS), rows, seq]
    (`step.as_batch` reads it), its rows sharded like `sharding`'s batch dimension: one transfer
    per micro-batch, not one per array."""
    stacked = NamedSharding(sharding.mesh, PartitionSpec(None, *sharding.spec))
    return jax.make_array_from_process_local_data(stacked, np.stack([batch[k] for k in ARRAY_KEYS]))


def _abstract(tree: Any, shardings: Any) -> Any:
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def _resume(run: Run, param_shardings: Any, opt_shardings: Any, fp8_shardings: Any) -> Run:
    """Opens checkpoint_dir; when it has a step (below the last), restores params, optimizer, FP8
    and data state. A LoRA checkpoint must match the run's base model and LoRA settings."""
    spec = run.plan.checkpoint
    ckpt = Checkpointer(
        spec.directory,
        save_optimizer=spec.save_optimizer,
        metric_name=spec.metric_name,
        higher_is_better=spec.higher_is_better,
        keep_top_k=spec.keep_top_k,
    )
    run = dataclasses.replace(run, ckpt=ckpt, resumed_from=ckpt.latest_step())
    if run.resumed_from is None or run.resumed_from >= run.total_steps:
        return run
    _check_lora_checkpoint(run, ckpt.step_dir(run.resumed_from))
    restored = ckpt.restore(
        run.resumed_from,
        abstract_params=_abstract(run.state.params, param_shardings),
        abstract_opt_state=_abstract(run.state.opt_state, opt_shardings),
        abstract_fp8=_abstract(run.state.fp8, fp8_shardings),
        vocab_size=run.model_config.vocab_size,
    )
    if restored.opt_state is None:
        raise RuntimeError(
            f"{ckpt.step_dir(run.resumed_from)} has no optimizer state (save_optimizer was false); "
            "resuming would reset AdamW's moments. Point checkpointing.checkpoint_dir elsewhere "
            "to start a new run from exported weights instead"
        )
    run.train_iter.set_state(restored.data_state)
    run.state.params, run.state.opt_state = restored.params, restored.opt_state
    if restored.fp8 is not None:  # else a checkpoint saved without FP8: the histories start empty
        run.state.fp8 = restored.fp8
    info = restored.train_info
    run.state.step, run.state.epoch, run.state.consumed = info["step"], info["epoch"], info["consumed_samples"]
    return run


def _check_lora_checkpoint(run: Run, step_dir: Path) -> None:
    """Refuses to resume LoRA adapters onto another base or with other LoRA settings, and to mix
    LoRA and full fine-tuning checkpoints."""
    lora, saved = run.plan.lora, extra_path(step_dir, LORA_FILE)
    if (lora is not None) != saved.is_file():
        kind = lambda is_lora: "LoRA adapters" if is_lora else "a full fine-tune"  # noqa: E731
        raise CheckpointMismatch(
            f"{step_dir} holds {kind(saved.is_file())} but this run trains {kind(lora)}; "
            "point checkpointing.checkpoint_dir elsewhere or set the LoRA keys as that run had them"
        )
    if lora is None:
        return
    reference = json.loads(saved.read_text())
    problem = base_problem(reference, run.plan.model.name, run.model_config.to_hf_dict())
    if problem:
        raise CheckpointMismatch(
            f"{step_dir}: {problem}; resume with that policy.model_name or point checkpointing.checkpoint_dir elsewhere"
        )
    if reference["lora"] != lora.to_dict():
        raise CheckpointMismatch(
            f"{step_dir}: its LoRA settings {reference['lora']} differ from this run's "
            f"{lora.to_dict()}; resume with the same settings"
        )


def extra_files(run: Run, config_yaml: str) -> dict[str, bytes]:
    """What every checkpoint stores beside the arrays (process 0 writes): config.yaml, the
    tokenizer's files, the model's HF config and, for LoRA, its settings and base."""
    files = {**run_files(config_yaml, run.tokenizer), **model_files(run.model_config)}
    if run.plan.lora is not None:
        ref = base_reference(
            run.plan.lora, run.plan.model.name, run.model_config.to_hf_dict(), run.plan.model.hf_config_overrides
        )
        files[LORA_FILE] = json.dumps(ref, indent=2).encode()
    return files


def sharding_table(params: Any) -> str:
    """One line per distinct parameter (layer indices folded into '*'): shape, dtype, spec."""
    rows = {}
    for path, leaf in jax.tree_util.tree_leaves_with_path(params):
        name = jax.tree_util.keystr(path, simple=True, separator=".").removesuffix(".value")
        name = re.sub(r"\.\d+(?=\.|$)", ".*", name)
        spec = getattr(leaf.sharding, "spec", leaf.sharding)
        rows.setdefault(name, (tuple(leaf.shape), str(leaf.dtype), str(spec)))
    width = max(len(n) for n in rows)
    lines = [f"{'parameter':<{width}}  shape / dtype / sharding"]
    lines += [f"{n:<{width}}  {s} {d} {p}" for n, (s, d, p) in rows.items()]
    return "\n".join(lines)


def _size(nbytes: float) -> str:
    unit = next((u for u, k in (("GiB", 30), ("MiB", 20), ("KiB", 10)) if nbytes >= 2**k), "B")
    return f"{nbytes / 2 ** {'GiB': 30, 'MiB': 20, 'KiB': 10, 'B': 0}[unit]:.2f} {unit}"


def memory_line(params: Any, frozen: Any, opt_state: Any, precision: str) -> str:
    """One log line: trainable / total parameters and the bytes of weights, gradients (the fp32
    accumulator), optimizer state and the per-step compute copy, over all devices."""
    count = lambda tree: sum(x.size for x in jax.tree.leaves(tree))  # noqa: E731
    nbytes = lambda tree: sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))  # noqa: E731
    trainable, total = count(params), count(params) + count(frozen)
    dtype = jnp.dtype(precision)
    copy = sum(
        x.size * dtype.itemsize
        for tree in (params, frozen)
        for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]
        if needs_cast(path, x, dtype)
    )
    return (
        f"parameters: {trainable:,} trainable of {total:,} ({100 * trainable / max(total, 1):.2f}%); "
        f"memory (all devices): weights {_size(nbytes(params) + nbytes(frozen))}, gradients "
        f"{_size(4 * trainable)}, optimizer state {_size(nbytes(opt_state))}, {precision} compute copy "
        f"{_size(copy)}"
    )
