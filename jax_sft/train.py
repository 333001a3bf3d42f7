"""The SFT training loop.

    python -m jax_sft.train --config configs/sft.py [--config.a.b=v ...]
    python -m jax_sft.train --config nemo_rl/sft.yaml [a.b=v ...]

Order of a run: config (plain Python), distributed start-up (before any other JAX call), every
check that can fail on bad input (before anything compiles), model and data, then the loop: one
optimizer step per global batch, validation every `sft.val_period` steps, a checkpoint every
`checkpointing.save_period` steps and at the end. A rerun with the same checkpoint_dir resumes.
SIGTERM / SIGUSR1 stop the run after the current step with a checkpoint and exit code 75
(`distributed.PREEMPTED_EXIT_CODE`), also when they arrive during start-up (imports, config);
several processes: see distributed.py and launch/README.md. One run per checkpoint_dir
(`run_lock`); a step with a non-finite loss or gradient norm changes nothing and stops the run.
"""

from __future__ import annotations

if __name__ == "__main__":  # python -m jax_sft.train: note stop signals from the first instant
    import signal as _signal

    _EARLY_SIGNALS: list[int] = []  # imports take seconds; `main` then installs StopSignals
    for _s in (_signal.SIGTERM, _signal.SIGUSR1):
        _signal.signal(_s, lambda signum, frame: _EARLY_SIGNALS.append(signum))

import contextlib
import dataclasses
import datetime
import os
import re
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jax_sft import config as config_lib
from jax_sft import distributed
from jax_sft.errors import RUN_FAILURE_EXIT_CODE, RunFailure, exit_on_input_error

PRECISIONS = {"bfloat16": jnp.bfloat16, "float32": jnp.float32}
BATCH_KEYS = ("input_ids", "targets", "loss_mask", "segment_ids", "positions")


class TrainingDiverged(RunFailure):
    """A step's loss or gradient norm was NaN or infinite. The step changed nothing; the message
    names the last checkpoint whose weights gave a finite loss (see `_diverged`)."""


@dataclasses.dataclass
class RunResult:
    """What a finished run leaves behind (returned by `run`, printed by `main`)."""

    run_dir: Path | None  # None: nothing was trained (already at the last step)
    checkpoint_dir: Path | None
    export_dir: Path | None
    final_step: int
    train_losses: dict[int, float]
    val_losses: dict[int, float]
    compilations: dict[str, int]
    stopped_early: str | None = None
    exit_code: int = 0  # distributed.PREEMPTED_EXIT_CODE after stopping on SIGTERM / SIGUSR1


# ----------------------------------------------------------------------------- checks


def check_before_compile(cfg: Any, *, dp_size: int, max_positions: int | None) -> None:
    """Fails fast on inputs that would otherwise fail after minutes of compilation."""
    p, s = cfg.policy, cfg.sft
    errors = []
    for name, gbs, mbs in (
        ("policy.train_global_batch_size", p.train_global_batch_size, p.train_micro_batch_size),
        ("sft.val_global_batch_size", s.val_global_batch_size, s.val_micro_batch_size),
    ):
        if gbs % (mbs * dp_size):
            errors.append(
                f"{name}={gbs} is not divisible by micro batch {mbs} x data-parallel size "
                f"{dp_size} (mesh data*fsdp*expert); choose a multiple of {mbs * dp_size}"
            )
    if max_positions is not None and p.max_total_sequence_length > max_positions:
        errors.append(
            f"policy.max_total_sequence_length={p.max_total_sequence_length} exceeds the model's "
            f"max_position_embeddings={max_positions}; lower it"
        )
    if cfg.checkpointing.enabled:
        errors += _writable("checkpointing.checkpoint_dir", Path(cfg.checkpointing.checkpoint_dir))
    errors += _writable("logger.log_dir", Path(cfg.logger.log_dir))
    if cfg.checkpointing.get("hf_export_dir"):
        from jax_sft.models.hf_io import export_target_problem

        problem = export_target_problem(cfg.checkpointing.hf_export_dir, protected=_protected(cfg))
        if problem:
            errors.append(f"checkpointing.hf_export_dir: {problem}")
    if errors:
        raise config_lib.ConfigError(errors, "checks against the devices and model")


def _writable(key: str, path: Path) -> list[str]:
    existing = path
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir() or not os.access(existing, os.W_OK):
        return [f"{key}={path} is not writable ({existing} is not a writable folder)"]
    return []


def _protected(cfg: Any) -> tuple[Path, ...]:
    """Folders the final export must never replace (besides /, home and the working directory)."""
    return (Path(cfg.checkpointing.checkpoint_dir),) if cfg.checkpointing.enabled else ()


def parse_deadline(value: str | None) -> float | None:
    """NeMo RL's checkpoint_must_save_by "DD:HH:MM:SS" -> seconds after the start of the run."""
    if not value:
        return None
    days, hours, minutes, seconds = (int(x) for x in value.split(":"))
    return datetime.timedelta(days=days, hours=hours, minutes=minutes, seconds=seconds).total_seconds()


# ----------------------------------------------------------------------------- helpers


def next_run_dir(log_dir: Path) -> Path:
    """log_dir/exp_NNN with NNN one above the highest present (NeMo RL's layout)."""
    taken = [int(m.group(1)) for p in log_dir.glob("exp_*") if (m := re.fullmatch(r"exp_(\d+)", p.name))]
    return log_dir / f"exp_{max(taken, default=0) + 1:03d}"


def to_global(batch: dict[str, np.ndarray], sharding: jax.sharding.NamedSharding) -> dict[str, jax.Array]:
    """Process-local rows [local_rows, seq] -> global arrays sharded over (data, fsdp)."""
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(batch[k])) for k in BATCH_KEYS}


def segment_lengths(batch: dict[str, np.ndarray]) -> np.ndarray:
    """Lengths of the real (segment id > 0) sequences in a [rows, seq] batch, row by row in
    segment order."""
    seg = np.asarray(batch["segment_ids"]).astype(np.int64)
    width = int(seg.max(initial=0)) + 1
    keys = (np.arange(seg.shape[0])[:, None] * width + seg)[seg > 0]
    counts = np.bincount(keys, minlength=seg.shape[0] * width)
    return counts[counts > 0].astype(np.int64)


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


def _abstract(tree: Any, shardings: Any) -> Any:
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


# ----------------------------------------------------------------------------- the run


def run(cfg: Any, stop_signals: distributed.StopSignals | None = None) -> RunResult:
    """Trains per `cfg` (validated ConfigDict); resumes from checkpoint_dir when it has a step.

    SIGTERM / SIGUSR1 during the run: the current step finishes, a checkpoint is saved and the
    result has `exit_code` = distributed.PREEMPTED_EXIT_CODE (before the first step: no save).
    stop_signals: an active StopSignals (`main` installs one first thing); None: one for the run.
    """
    with contextlib.ExitStack() as stack:  # the run lock, taken in _run, is released on leaving
        if stop_signals is None:
            stop_signals = stack.enter_context(distributed.StopSignals())
        if cfg.policy.precision == "float32":  # true fp32 matmuls (GPUs would otherwise use TF32)
            stack.enter_context(jax.default_matmul_precision("highest"))
        return _run(cfg, stop_signals, stack)


@contextlib.contextmanager
def hold_run_lock(directory: Path) -> Iterator[Any]:
    """Process 0 takes checkpoint_dir's run lock (`run_lock.RunLock`); every process learns
    whether it could, and all refuse together. Yields the lock (None on other processes)."""
    from jax_sft.run_lock import RunLock, RunLocked

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


@dataclasses.dataclass
class _Run:
    """Everything a run sets up before its first step (`_setup`) and the state the loop moves."""

    cfg: Any
    mesh: Any
    devices: list
    tokenizer: Any
    sft_data: Any
    model_cfg: Any
    lora: Any  # models.lora.LoraConfig, or None for full fine-tuning
    graphdef: Any
    params: Any  # trainable: every Param (full fine-tuning) or the LoRA adapters
    frozen: Any  # the frozen base (LoRA), empty otherwise
    rest: Any
    opt_state: Any
    fns: Any
    batch_sharding: Any
    total_steps: int
    packed: bool
    check_rows: bool  # cuDNN's packed layout: segments per row checked per micro-batch
    attention_line: str
    ckpt: Any = None
    lock: Any = None
    train_iter: Any = None
    resumed_from: int | None = None
    step: int = 0
    epoch: int = 0
    consumed: int = 0

    def model(self):
        return nnx.merge(self.graphdef, self.params, self.frozen, self.rest)


def _run(cfg: Any, stop_signals: distributed.StopSignals, stack: contextlib.ExitStack) -> RunResult:
    from jax_sft.metrics import MetricsLogger

    start_time = time.time()
    r = _setup(cfg, stack)
    if r.resumed_from is not None and r.resumed_from >= r.total_steps:
        return _finished_already(r.ckpt, r.resumed_from, r.total_steps)
    run_dir = next_run_dir(Path(cfg.logger.log_dir))
    logger = MetricsLogger(cfg.logger, run_dir, total_steps=r.total_steps, initial_step=r.step)
    config_yaml = config_lib.to_yaml(cfg)
    _log_start(r, logger, run_dir, config_yaml)
    loop = _Loop(r, logger, stop_signals, start_time, config_yaml)
    try:
        loop.train()
    finally:
        if r.ckpt:
            r.ckpt.close()
        logger.close()
    if loop.diverged:
        raise _diverged(*loop.diverged, r.ckpt.dir if r.ckpt else None)
    export_dir = None
    if cfg.checkpointing.get("hf_export_dir") and not loop.exit_code:  # a preempted run is unfinished
        from jax_sft import models

        export_dir = Path(cfg.checkpointing.hf_export_dir)
        # LoRA: the adapters are merged into the weights (jax_sft.export also writes PEFT folders).
        models.save_pretrained(r.model(), export_dir, tokenizer=r.tokenizer, protected=_protected(cfg))
    return RunResult(
        run_dir=run_dir,
        checkpoint_dir=r.ckpt.dir if r.ckpt else None,
        export_dir=export_dir,
        final_step=r.step,
        train_losses=loop.train_losses,
        val_losses=loop.val_losses,
        compilations={f.name: getattr(r.fns, f.name)._cache_size() for f in dataclasses.fields(r.fns)
                      if hasattr(getattr(r.fns, f.name), "_cache_size")},
        stopped_early=loop.stopped_early,
        exit_code=loop.exit_code,
    )


def _setup(cfg: Any, stack: contextlib.ExitStack) -> _Run:
    """Devices, checks, lock, data, model, optimizer, step functions, and the resumed state."""
    # Imports that touch JAX devices come after distributed.initialize (see main).
    from jax_sft import data as data_lib
    from jax_sft import models
    from jax_sft.models import sharding as sharding_lib
    from jax_sft.models.hf_io import resolve_model_dir
    from jax_sft.models.lora import LoRAParam
    from jax_sft.optim import optimizer_from_config
    from jax_sft.step import make_step_fns, opt_state_shardings

    p, jc, s = cfg.policy, cfg.policy.jax_cfg, cfg.sft
    if jc.compilation_cache_dir:
        jax.config.update("jax_compilation_cache_dir", str(jc.compilation_cache_dir))
    devices = distributed.select_devices(cfg.cluster)
    mesh = sharding_lib.make_mesh(jc.mesh.data, jc.mesh.fsdp, jc.mesh.tensor, devices=devices,
                                  expert=jc.mesh.expert)
    dp_size = sharding_lib.dp_size(mesh)
    model_dir = resolve_model_dir(p.model_name)
    hf_overrides = _plain(p.hf_config_overrides)
    model_cfg = models.read_config(model_dir, hf_overrides)
    check_before_compile(cfg, dp_size=dp_size, max_positions=model_cfg.context_length)
    lock = None  # one run per checkpoint_dir: refused here, before the model is loaded
    if cfg.checkpointing.enabled:
        lock = stack.enter_context(hold_run_lock(Path(cfg.checkpointing.checkpoint_dir)))

    tokenizer = data_lib.load_tokenizer(cfg)
    sft_data = data_lib.SFTData(cfg, tokenizer, dp_size=dp_size, dp_ranks=sharding_lib.local_dp_ranks(mesh))
    packed = bool(p.sequence_packing.enabled)
    lora = config_lib.lora_config(cfg)
    compute_dtype = PRECISIONS[p.precision]
    model = models.from_pretrained(
        model_dir, dtype=compute_dtype, param_dtype=PRECISIONS[jc.param_dtype], mesh=mesh,
        attention=jc.attention, remat=jc.remat, scan_layers=jc.scan_layers,
        max_segments=jc.max_segments_per_row, hf_config_overrides=hf_overrides, lora=lora,
    )
    model_cfg = model.config
    attention_line = model.describe_attention(packed)
    check_rows = packed and "cudnn" in model.attention_kernel(packed)
    graphdef, params, frozen, rest = nnx.split(model, LoRAParam if lora else nnx.Param, nnx.Param, ...)
    del model
    param_shardings = jax.tree.map(lambda x: x.sharding, params)
    total_steps = min(s.max_num_epochs * sft_data.steps_per_epoch, s.max_num_steps)
    tx, schedule, _ = optimizer_from_config(cfg, total_steps)
    opt_shardings = opt_state_shardings(tx, params, param_shardings, mesh)
    opt_state = jax.jit(tx.init, out_shardings=opt_shardings)(params)
    fns = make_step_fns(
        graphdef, rest, tx, schedule,
        mesh=mesh, param_shardings=param_shardings, opt_shardings=opt_shardings,
        chunk_size=jc.loss_chunk_size, packed=packed, compute_dtype=compute_dtype,
        moe=model_cfg.num_experts > 0,
        dropout_seed=s.seed if lora is not None and lora.dropout > 0 else None,
    )
    r = _Run(cfg=cfg, mesh=mesh, devices=devices, tokenizer=tokenizer, sft_data=sft_data,
             model_cfg=model_cfg, lora=lora, graphdef=graphdef, params=params, frozen=frozen, rest=rest,
             opt_state=opt_state, fns=fns, batch_sharding=sharding_lib.batch_sharding(mesh),
             total_steps=total_steps, packed=packed, check_rows=check_rows, attention_line=attention_line,
             lock=lock, train_iter=sft_data.train_iterator())
    if cfg.checkpointing.enabled:
        _resume(r, param_shardings, opt_shardings)
    return r


def _resume(r: _Run, param_shardings: Any, opt_shardings: Any) -> None:
    """Opens checkpoint_dir; when it has a step (below the last), restores params, optimizer and
    data state into `r`. A LoRA checkpoint must match the run's base model and LoRA settings."""
    from jax_sft.checkpoint import Checkpointer

    r.ckpt = Checkpointer(r.cfg.checkpointing)
    r.resumed_from = r.ckpt.latest_step()
    if r.resumed_from is None or r.resumed_from >= r.total_steps:
        return
    _check_lora_checkpoint(r, r.ckpt.step_dir(r.resumed_from))
    params, restored_opt, info, data_state = r.ckpt.restore(
        r.resumed_from,
        abstract_params=_abstract(r.params, param_shardings),
        abstract_opt_state=_abstract(r.opt_state, opt_shardings),
    )
    if restored_opt is None:
        raise RuntimeError(
            f"{r.ckpt.step_dir(r.resumed_from)} has no optimizer state (save_optimizer was false); "
            "resuming would reset AdamW's moments. Point checkpointing.checkpoint_dir elsewhere "
            "to start a new run from exported weights instead"
        )
    r.params, r.opt_state = params, restored_opt
    r.train_iter.set_state(data_state)
    r.step, r.epoch, r.consumed = info["step"], info["epoch"], info["consumed_samples"]


def _check_lora_checkpoint(r: _Run, step_dir: Path) -> None:
    """Refuses to resume LoRA adapters onto another base or with other LoRA settings, and to mix
    LoRA and full fine-tuning checkpoints."""
    import json

    from jax_sft.checkpoint import CheckpointMismatch
    from jax_sft.models.lora import LORA_FILE, base_problem

    saved = step_dir / "extra" / LORA_FILE
    if (r.lora is not None) != saved.is_file():
        kind = lambda lora: "LoRA adapters" if lora else "a full fine-tune"  # noqa: E731
        raise CheckpointMismatch(f"{step_dir} holds {kind(saved.is_file())} but this run trains {kind(r.lora)}; "
                              "point checkpointing.checkpoint_dir elsewhere or set the LoRA keys as that run had them")
    if r.lora is None:
        return
    reference = json.loads(saved.read_text())
    problem = base_problem(reference, r.cfg.policy.model_name, r.model_cfg.to_hf_dict())
    if problem:
        raise CheckpointMismatch(f"{step_dir}: {problem}; resume with that policy.model_name or point "
                              "checkpointing.checkpoint_dir elsewhere")
    if reference["lora"] != r.lora.to_dict():
        raise CheckpointMismatch(f"{step_dir}: its LoRA settings {reference['lora']} differ from this run's "
                              f"{r.lora.to_dict()}; resume with the same settings")


def _log_start(r: _Run, logger: Any, run_dir: Path, config_yaml: str) -> None:
    from jax_sft.models import sharding as sharding_lib

    if jax.process_index() == 0:
        config_lib.save_config(r.cfg, run_dir / "config.yaml")
        logger.write(f"config:\n{config_yaml}")
        logger.write(f"mesh: {sharding_lib.describe_mesh(r.mesh)} over {len(r.devices)} {r.devices[0].platform} "
                     f"devices ({jax.process_count()} processes)")
        logger.write(sharding_table({"trainable": r.params, "frozen": r.frozen} if r.lora else r.params))
        logger.write(memory_line(r.params, r.frozen, r.opt_state, r.cfg.policy.precision))
        logger.write(r.attention_line)
        if r.resumed_from is not None:
            logger.write(f"resumed from {r.ckpt.step_dir(r.resumed_from)} (step {r.step}, epoch {r.epoch})")
        logger.write("data: " + ", ".join(f"{k.removeprefix('data/')}={v}" for k, v in r.sft_data.stats.items()))
    logger.log_config(r.cfg.to_dict())


def memory_line(params: Any, frozen: Any, opt_state: Any, precision: str) -> str:
    """One log line: trainable / total parameters and the bytes of weights, gradients (the fp32
    accumulator), optimizer state and the per-step compute copy, over all devices."""
    from jax_sft.step import needs_cast

    count = lambda tree: sum(x.size for x in jax.tree.leaves(tree))  # noqa: E731
    nbytes = lambda tree: sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))  # noqa: E731
    trainable, total = count(params), count(params) + count(frozen)
    dtype = PRECISIONS[precision]
    copy = sum(x.size * jnp.dtype(dtype).itemsize
               for tree in (params, frozen)
               for path, x in jax.tree_util.tree_flatten_with_path(tree)[0] if needs_cast(path, x, dtype))
    def gib(b: float) -> str:
        unit = next((u for u, k in (("GiB", 30), ("MiB", 20), ("KiB", 10)) if b >= 2**k), "B")
        return f"{b / 2 ** {'GiB': 30, 'MiB': 20, 'KiB': 10, 'B': 0}[unit]:.2f} {unit}"

    return (f"parameters: {trainable:,} trainable of {total:,} ({100 * trainable / max(total, 1):.2f}%); "
            f"memory (all devices): weights {gib(nbytes(params) + nbytes(frozen))}, gradients "
            f"{gib(4 * trainable)}, optimizer state {gib(nbytes(opt_state))}, {precision} compute copy {gib(copy)}")


class _Loop:
    """The step loop of a set-up run: one optimizer step per global batch, validation every
    sft.val_period steps, checkpoints, and stopping (signals, deadline, a lost lock, divergence).

    Each step needs one all-gather between processes (`distributed.agree_to_stop`): after the
    step it carries the stop signals and flags, this process's real tokens, and the number of
    micro-batches of the next batch (drawn before it; the data state saved with a checkpoint is
    taken before that draw)."""

    def __init__(self, r: _Run, logger: Any, stop_signals: distributed.StopSignals, start_time: float,
                 config_yaml: str):
        from jax_sft.export import model_files
        from jax_sft.metrics import peak_flops_per_device

        self.r, self.logger, self.stop_signals, self.start_time = r, logger, stop_signals, start_time
        cfg = r.cfg
        self.deadline = parse_deadline(cfg.checkpointing.checkpoint_must_save_by)
        self.peak = peak_flops_per_device(r.devices[0], cfg.policy.precision)
        self.extra_files = {}
        if r.ckpt:
            self.extra_files = {**_extra_files(config_yaml, r.tokenizer), **model_files(r.model_cfg)}
            if r.lora is not None:
                import json

                from jax_sft.models.lora import LORA_FILE, base_reference

                ref = base_reference(r.lora, cfg.policy.model_name, r.model_cfg.to_hf_dict(),
                                     _plain(cfg.policy.hf_config_overrides))
                self.extra_files[LORA_FILE] = json.dumps(ref, indent=2).encode()
        self.train_losses: dict[int, float] = {}
        self.val_losses: dict[int, float] = {}
        self.last_val: dict[str, float] = {}
        self.stopped_early: str | None = None
        self.exit_code = 0
        self.diverged: tuple[int, dict[str, float]] | None = None

    def train(self) -> None:
        r, s = self.r, self.r.cfg.sft
        if s.val_at_start and r.resumed_from is None:
            self.validate()
        t0 = time.time()
        batch = next(r.train_iter) if r.step < r.total_steps else None
        t_data = time.time() - t0
        said, _, counts = distributed.agree_to_stop(self.stop_signals.signum,
                                                    values=[batch.num_micro_batches if batch else 0])
        if said:  # nothing trained since the last checkpoint: nothing to save
            self.stopped_early, self.exit_code = said, distributed.PREEMPTED_EXIT_CODE
            self.logger.write(f"{said} before the first step; stopping (exit code {self.exit_code})")
            return
        while r.step < r.total_steps:
            t_step = time.time()
            metrics, lengths = self.step(batch, int(counts[:, 0].max()))
            if metrics is None:
                return
            r.step, r.epoch = r.step + 1, batch.epoch
            r.consumed += r.cfg.policy.train_global_batch_size
            elapsed = time.time() - t_step + t_data
            data_state = r.train_iter.get_state()  # before the next batch is drawn
            last = r.step == r.total_steps
            t0 = time.time()
            batch = None if last else next(r.train_iter)
            t_data = time.time() - t0
            past_deadline = self.deadline is not None and time.time() - self.start_time + elapsed >= self.deadline
            lock_lost = bool(r.lock is not None and r.lock.lost)
            # Every process decides alike (a signal may reach only some; clocks differ).
            said, (past_deadline, lock_lost), counts = distributed.agree_to_stop(
                self.stop_signals.signum, past_deadline, lock_lost,
                values=[int(lengths.sum()), batch.num_micro_batches if batch else 0])
            self.log_step(metrics, lengths, int(counts[:, 0].sum()), elapsed, t_data, last)
            if self.stop_after_step(said, past_deadline, lock_lost, last, data_state):
                return
            counts = counts[:, 1:]

    def step(self, batch: Any, micro_batches: int) -> tuple[dict[str, float] | None, np.ndarray]:
        """One optimizer step over `batch` padded to `micro_batches` micro-batches; -> (metrics,
        this process's sequence lengths); metrics None when the step was not finite."""
        from jax_sft.data import pad_micro_batches
        from jax_sft.models import attention as attention_lib

        r = self.r
        jc = r.cfg.policy.jax_cfg
        compute = r.fns.cast(r.params, r.frozen)  # the compute-dtype weights, once per step
        acc = r.fns.init_accumulator(r.params)
        lengths = []
        for i, mb in enumerate(pad_micro_batches(batch, micro_batches, r.sft_data.layout.pad_id).micro_batches):
            if r.check_rows:
                attention_lib.check_packed_rows(mb["segment_ids"], jc.max_segments_per_row)
            acc = r.fns.micro_step(compute, acc, to_global(mb, r.batch_sharding), jnp.asarray([r.step, i], jnp.int32))
            lengths.append(segment_lengths(mb))
        del compute
        r.params, r.opt_state, metrics = r.fns.apply(r.params, r.opt_state, acc, jnp.asarray(r.step, jnp.int32))
        metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
        if not (np.isfinite(metrics["train/loss"]) and np.isfinite(metrics["train/grad_norm"])):
            self.diverged = (r.step + 1, metrics)  # `apply` left params and optimizer state as they were
            return None, np.zeros(0, np.int64)
        return metrics, np.concatenate(lengths)

    def log_step(self, metrics: dict[str, float], lengths: np.ndarray, global_valid: int, elapsed: float,
                 t_data: float, last: bool) -> None:
        from jax_sft.metrics import peak_memory_bytes, training_flops

        r, s = self.r, self.r.cfg.sft
        n_dev = len(r.devices)
        metrics.update({
            "train/global_valid_seqs": float(r.cfg.policy.train_global_batch_size),
            "train/global_valid_toks": float(global_valid),
            "timing/train/total_step_time": elapsed,
            "timing/train/data_processing": t_data,
            "timing/train/tokens_per_sec": global_valid / elapsed,
            "timing/train/valid_tokens_per_sec_per_gpu": global_valid / elapsed / n_dev,
        })
        if self.peak is not None:
            metrics["train/mfu"] = training_flops(r.model_cfg, lengths) / elapsed / (self.peak * len(jax.local_devices()))
        peak_mem = peak_memory_bytes()
        if peak_mem is not None:
            metrics["memory/peak_bytes"] = float(peak_mem)
        self.train_losses[r.step] = metrics["train/loss"]
        if (s.val_period > 0 and r.step % s.val_period == 0) or (last and s.val_at_end):
            self.validate()
        self.logger.log(metrics, r.step)
        self.logger.progress(r.step, {**metrics, **{f"validation/{k[4:]}": v for k, v in self.last_val.items()}})

    def stop_after_step(self, said: str | None, past_deadline: bool, lock_lost: bool, last: bool,
                        data_state: Any) -> bool:
        """Saves when due; -> whether the run stops here (besides having run its last step)."""
        r, cc = self.r, self.r.cfg.checkpointing
        if lock_lost:
            from jax_sft.run_lock import RunLocked

            raise RunLocked(f"another run took over the lock of {cc.checkpoint_dir} (this run's heartbeat "
                            f"looked stale); stopping at step {r.step} without saving, so as not to "
                            "overwrite its checkpoints")
        if r.ckpt and (r.step % cc.save_period == 0 or last or past_deadline or said):
            self.save(data_state)
        if said and not last:
            self.stopped_early, self.exit_code = said, distributed.PREEMPTED_EXIT_CODE
            saved = f"saved step_{r.step}; a rerun resumes from it" if r.ckpt else "checkpointing is disabled"
            self.logger.write(f"step {r.step}: {said}; {saved}; stopping with exit code {self.exit_code}")
            return True
        if past_deadline and not last:
            self.stopped_early = f"checkpoint_must_save_by={cc.checkpoint_must_save_by} reached"
            self.logger.write(f"step {r.step}: {self.stopped_early}; saved and stopping")
            return True
        return False

    def save(self, data_state: Any) -> None:
        r = self.r
        r.ckpt.save(
            r.step,
            params=r.params,  # LoRA: the adapters only (lora.json names the base)
            opt_state=r.opt_state,
            train_info={"step": r.step, "epoch": r.epoch, "consumed_samples": r.consumed, **self.last_val},
            data_state=data_state,
            extra_files=self.extra_files,
            metrics=dict(self.last_val),
        )

    def validate(self) -> float:
        from jax_sft.models import attention as attention_lib

        r, jc = self.r, self.r.cfg.policy.jax_cfg
        if r.sft_data.num_val_examples == 0:  # no validation data: skipped, as NeMo RL does
            return float("nan")
        t0 = time.time()
        nll, tokens = 0.0, 0.0
        for mb in r.sft_data.val_batches():
            if r.check_rows:
                attention_lib.check_packed_rows(mb["segment_ids"], jc.max_segments_per_row)
            n, t = r.fns.eval_step(r.params, r.frozen, to_global(mb, r.batch_sharding))
            nll, tokens = nll + float(n), tokens + float(t)
        val_loss = nll / max(tokens, 1.0)
        metrics = {"validation/val_loss": val_loss, "timing/validation/total_validation_time": time.time() - t0}
        self.logger.log(metrics, r.step)
        self.logger.write(f"step {r.step}: val_loss {val_loss:.4f} over {int(tokens)} tokens")
        if r.cfg.logger.num_val_samples_to_print:
            _val_samples(r.cfg, r.model(), r.tokenizer, r.mesh, r.sft_data, self.logger, r.step)
        self.val_losses[r.step] = val_loss
        self.last_val.clear()
        self.last_val.update({"val:val_loss": val_loss})
        return val_loss


def _val_samples(cfg: Any, model: Any, tokenizer: Any, mesh: Any, sft_data: Any, logger: Any, step: int) -> None:
    """logger.num_val_samples_to_print greedy completions of the first validation conversations,
    printed and logged as text (TensorBoard, W&B, MLflow)."""
    from jax_sft.generate import format_samples, sample_conversations

    rows = sft_data.dataset.formatted_ds["validation"]
    rows = [rows[i] for i in range(min(int(cfg.logger.num_val_samples_to_print), len(rows)))]
    if not rows:
        return
    samples = sample_conversations(model, tokenizer, rows, mesh=mesh,
                                   max_new_tokens=int(cfg.policy.max_total_sequence_length),
                                   add_bos=bool(cfg.data.add_bos),
                                   template_kwargs=cfg.policy.tokenizer.get("chat_template_kwargs"))
    text = format_samples([(s["prompt"], s["reference"]) for s in samples], [s["completion"] for s in samples])
    logger.write(f"step {step}: validation samples\n{text}")
    logger.log_text("validation/samples", text, step)


def _finished_already(ckpt: Any, step: int, total_steps: int) -> RunResult:
    """A rerun of a finished run: says so, trains and writes nothing (no new exp_NNN folder)."""
    ckpt.close()
    if jax.process_index() == 0:
        print(f"{ckpt.step_dir(step)}: already at step {step} of {total_steps}; nothing to train", flush=True)
    return RunResult(run_dir=None, checkpoint_dir=ckpt.dir, export_dir=None, final_step=step,
                     train_losses={}, val_losses={}, compilations={})


def _diverged(step: int, metrics: dict[str, float], checkpoint_dir: Path | None) -> TrainingDiverged:
    """The error for a non-finite `step`. Its loss was computed on the weights after step - 1,
    so step_{step-1} is not good: process 0 renames it to diverged_step_{step-1} (kept, but never
    resumed); the message names the newest complete checkpoint before it."""
    from jax_sft.checkpoint import incomplete_reason

    what = (f"training diverged at step {step}: loss {metrics['train/loss']}, grad_norm "
            f"{metrics['train/grad_norm']} (computed on the weights after step {step - 1}); the step "
            "left parameters and optimizer state unchanged and nothing was saved")
    if checkpoint_dir is None:
        return TrainingDiverged(f"{what}. Lower policy.optimizer.kwargs.lr")
    bad = checkpoint_dir / f"step_{step - 1}"
    moved = ""
    if bad.is_dir():
        aside = checkpoint_dir / f"diverged_{bad.name}"
        aside = next(a for i in range(1000) if not (a := aside.with_name(aside.name + (f".{i}" if i else ""))).exists())
        if jax.process_index() == 0:
            bad.rename(aside)
        moved = f"; {bad.name} holds those weights and was renamed {aside.name}, so a rerun does not resume from it"
    steps = [int(p.name[5:]) for p in checkpoint_dir.glob("step_*") if p.name[5:].isdigit()]
    good = max((k for k in steps if k < step - 1 and incomplete_reason(checkpoint_dir / f"step_{k}") is None),
               default=None)
    last = (f"The last checkpoint whose weights gave a finite loss is {checkpoint_dir / f'step_{good}'}; a "
            "rerun resumes from it" if good is not None else
            "No checkpoint predates the divergence; a rerun starts from policy.model_name")
    return TrainingDiverged(f"{what}{moved}. {last}. Lower policy.optimizer.kwargs.lr before rerunning")


def _plain(value: Any) -> Any:
    """ConfigDict / FrozenConfigDict values -> plain Python containers."""
    if hasattr(value, "to_dict"):
        return value.to_dict()
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _extra_files(config_yaml: str, tokenizer: Any) -> dict[str, bytes]:
    """config.yaml and the tokenizer's files, stored in every checkpoint (process 0 writes)."""
    import tempfile

    files = {"config.yaml": config_yaml.encode()}
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(tmp)
        for path in Path(tmp).iterdir():
            files[f"tokenizer/{path.name}"] = path.read_bytes()
    return files


def main(argv: Sequence[str] | None = None) -> RunResult | None:
    """The command line. Errors in the input print `error: ...` and exit 2, a RunFailure (disk
    full, divergence) exits 1 the same way; a stop signal before training exits 75."""
    with distributed.StopSignals() as stop_signals:  # first thing: SIGTERM must never kill start-up
        stop_signals.signum = stop_signals.signum or next(iter(globals().get("_EARLY_SIGNALS", [])), 0)
        try:
            return exit_on_input_error(lambda: _main(argv, stop_signals))
        except RunFailure as e:
            print(f"error: {e}", file=sys.stderr)
            raise SystemExit(RUN_FAILURE_EXIT_CODE) from None


HELP = __doc__ + """
Main keys (all of NeMo RL's SFT keys apply; defaults in jax_sft/defaults.py):
  policy.model_name            HF model folder or hub id
  data.dataset_name            squad, openai_format, ... (with data.train_data_path, data.val_data_path)
  sft.max_num_steps / sft.max_num_epochs / sft.val_period
  policy.train_global_batch_size / policy.train_micro_batch_size / policy.max_total_sequence_length
  policy.optimizer.kwargs.lr   policy.precision (bfloat16 | float32)
  policy.jax_cfg.mesh.{data,fsdp,tensor}
  checkpointing.checkpoint_dir (a rerun resumes) / checkpointing.hf_export_dir
  logger.log_dir / logger.tensorboard_enabled / logger.wandb_enabled / logger.num_val_samples_to_print
Flags: --dry_run (check the config and plan without devices), --coordinator_address,
--num_processes, --process_id (several hosts; see launch/README.md).

Example:
  python -m jax_sft.train --config configs/sft.py \\
      --config.policy.model_name=meta-llama/Llama-3.2-1B --config.sft.max_num_steps=100
"""


def _stop_if_signalled(stop_signals: distributed.StopSignals, when: str) -> None:
    if stop_signals.signum:
        import signal

        print(f"stopped:     {signal.Signals(stop_signals.signum).name} received {when}; nothing to save; "
              f"exit code {distributed.PREEMPTED_EXIT_CODE} (rerun to resume)", file=sys.stderr)
        raise SystemExit(distributed.PREEMPTED_EXIT_CODE)


def _main(argv: Sequence[str] | None, stop_signals: distributed.StopSignals) -> RunResult | None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if {"-h", "--help"} & set(argv):
        print(HELP)
        return None
    _stop_if_signalled(stop_signals, "while starting")
    config_path, overrides, extra = config_lib.parse_args(argv)
    dry_run = extra.pop("dry_run", False)
    if dry_run not in (False, True):
        raise config_lib.ConfigError([f"--dry_run={dry_run}: takes no value"], "command line")
    distributed.parse_flags(extra)  # bad flags fail before the config is read
    cfg = config_lib.load_config(config_path, overrides)  # plain Python: no JAX backend yet
    if dry_run:
        from jax_sft.dry_run import plan

        lines = plan(cfg)
        print(f"config:\n{config_lib.to_yaml(cfg)}\nplan:\n" + "\n".join(f"  {x}" for x in lines))
        print("dry run: the config is valid; a real run would start")
        return None
    _stop_if_signalled(stop_signals, "while reading the config")
    distributed.initialize(extra, gpus_per_node=cfg.cluster.gpus_per_node)
    from jax_sft.metrics import quiet_library_progress_bars

    quiet_library_progress_bars()  # in log files: our whole lines only
    stop_signals.reinstall()  # jax.distributed.initialize installs its own SIGTERM handler
    result = run(cfg, stop_signals)
    if jax.process_index() == 0:
        if result.run_dir is not None:
            print(f"\nmetrics:     {result.run_dir / 'metrics.jsonl'} (TensorBoard: {result.run_dir})")
        if result.checkpoint_dir:
            print(f"checkpoints: {result.checkpoint_dir}")
        if result.export_dir:
            print(f"export:      {result.export_dir} (transformers.AutoModelForCausalLM.from_pretrained)")
        if result.exit_code:
            print(f"stopped:     {result.stopped_early}; exit code {result.exit_code} (rerun to resume)")
    if result.exit_code:
        raise SystemExit(result.exit_code)
    return result


if __name__ == "__main__":
    main()
