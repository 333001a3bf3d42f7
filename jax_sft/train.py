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


def agree_micro_batches(batch: Any, pad_id: int) -> list[dict[str, np.ndarray]]:
    """The step's micro-batches, padded to the most any process has (packing varies the count)."""
    from jax_sft.data import pad_micro_batches

    most = int(distributed.allgather_ints([batch.num_micro_batches]).max())
    return pad_micro_batches(batch, most, pad_id).micro_batches


def segment_lengths(batch: dict[str, np.ndarray]) -> np.ndarray:
    """Lengths of the real (segment id > 0) sequences in a [rows, seq] batch."""
    seg = np.asarray(batch["segment_ids"])
    lengths = []
    for row in seg:
        ids, counts = np.unique(row[row > 0], return_counts=True)
        lengths.extend(counts.tolist())
    return np.asarray(lengths, np.int64)


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


def _run(cfg: Any, stop_signals: distributed.StopSignals, stack: contextlib.ExitStack) -> RunResult:
    # Imports that touch JAX devices come after distributed.initialize (see main).
    from jax_sft import data as data_lib
    from jax_sft import models
    from jax_sft.checkpoint import Checkpointer
    from jax_sft.export import model_files
    from jax_sft.metrics import MetricsLogger, peak_flops_per_device, peak_memory_bytes, training_flops
    from jax_sft.models import attention as attention_lib
    from jax_sft.models import sharding as sharding_lib
    from jax_sft.models.hf_io import resolve_model_dir
    from jax_sft.optim import optimizer_from_config
    from jax_sft.step import make_step_fns, opt_state_shardings

    start_time = time.time()
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

    model = models.from_pretrained(
        model_dir,
        dtype=PRECISIONS[p.precision],
        param_dtype=jnp.float32 if p.precision == "bfloat16" else PRECISIONS[p.precision],
        mesh=mesh,
        attention=jc.attention,
        remat=jc.remat,
        scan_layers=jc.scan_layers,
        max_segments=jc.max_segments_per_row,
        hf_config_overrides=hf_overrides,
    )
    model_cfg = model.config
    attention_line = model.describe_attention(packed)
    # cuDNN's packed layout takes a static bound on segments per row: checked per micro-batch.
    check_rows = packed and "cudnn" in model.attention_kernel(packed)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    del model
    param_shardings = jax.tree.map(lambda x: x.sharding, params)
    total_steps = min(s.max_num_epochs * sft_data.steps_per_epoch, s.max_num_steps)
    tx, schedule, _ = optimizer_from_config(cfg, total_steps)
    opt_shardings = opt_state_shardings(tx, params, param_shardings, mesh)
    opt_state = jax.jit(tx.init, out_shardings=opt_shardings)(params)
    fns = make_step_fns(
        graphdef, rest, tx, schedule,
        mesh=mesh, param_shardings=param_shardings, opt_shardings=opt_shardings,
        chunk_size=jc.loss_chunk_size, packed=packed, moe=model_cfg.num_experts > 0,
    )
    batch_sharding = sharding_lib.batch_sharding(mesh)

    # Resume.
    ckpt = Checkpointer(cfg.checkpointing) if cfg.checkpointing.enabled else None
    train_iter = sft_data.train_iterator()
    step, epoch, consumed = 0, 0, 0
    resumed_from = ckpt.latest_step() if ckpt else None
    if resumed_from is not None and resumed_from >= total_steps:
        return _finished_already(ckpt, resumed_from, total_steps)
    if resumed_from is not None:
        params, restored_opt, info, data_state = ckpt.restore(
            resumed_from,
            abstract_params=_abstract(params, param_shardings),
            abstract_opt_state=_abstract(opt_state, opt_shardings),
        )
        if restored_opt is None:
            raise RuntimeError(
                f"{ckpt.step_dir(resumed_from)} has no optimizer state (save_optimizer was false); "
                "resuming would reset AdamW's moments. Point checkpointing.checkpoint_dir elsewhere "
                "to start a new run from exported weights instead"
            )
        opt_state = restored_opt
        train_iter.set_state(data_state)
        step, epoch, consumed = info["step"], info["epoch"], info["consumed_samples"]

    run_dir = next_run_dir(Path(cfg.logger.log_dir))
    logger = MetricsLogger(cfg.logger, run_dir, total_steps=total_steps, initial_step=step)
    config_yaml = config_lib.to_yaml(cfg)
    if jax.process_index() == 0:
        config_lib.save_config(cfg, run_dir / "config.yaml")
        logger.write(f"config:\n{config_yaml}")
        logger.write(f"mesh: {sharding_lib.describe_mesh(mesh)} over {len(devices)} {devices[0].platform} devices "
                     f"({jax.process_count()} processes)")
        logger.write(sharding_table(params))
        logger.write(attention_line)
        if resumed_from is not None:
            logger.write(f"resumed from {ckpt.step_dir(resumed_from)} (step {step}, epoch {epoch})")
        logger.write("data: " + ", ".join(f"{k.removeprefix('data/')}={v}" for k, v in sft_data.stats.items()))
    logger.log_config(cfg.to_dict())

    peak = peak_flops_per_device(devices[0], p.precision)
    deadline = parse_deadline(cfg.checkpointing.checkpoint_must_save_by)
    extra_files = {**_extra_files(config_yaml, tokenizer), **model_files(model_cfg)} if ckpt else {}
    train_losses: dict[int, float] = {}
    val_losses: dict[int, float] = {}
    last_val: dict[str, float] = {}

    def validate() -> float:
        if sft_data.num_val_examples == 0:  # no validation data: skipped, as NeMo RL does
            return float("nan")
        t0 = time.time()
        nll, tokens = 0.0, 0.0
        for mb in sft_data.val_batches():
            if check_rows:
                attention_lib.check_packed_rows(mb["segment_ids"], jc.max_segments_per_row)
            n, t = fns.eval_step(params, to_global(mb, batch_sharding))
            nll, tokens = nll + float(n), tokens + float(t)
        val_loss = nll / max(tokens, 1.0)
        metrics = {"validation/val_loss": val_loss, "timing/validation/total_validation_time": time.time() - t0}
        logger.log(metrics, step)
        logger.write(f"step {step}: val_loss {val_loss:.4f} over {int(tokens)} tokens")
        if cfg.logger.num_val_samples_to_print:
            _val_samples(cfg, nnx.merge(graphdef, params, rest), tokenizer, mesh, sft_data, logger, step)
        val_losses[step] = val_loss
        last_val.clear()
        last_val.update({"val:val_loss": val_loss})
        return val_loss

    def save() -> None:
        ckpt.save(
            step,
            params=params,
            opt_state=opt_state,
            train_info={"step": step, "epoch": epoch, "consumed_samples": consumed, **last_val},
            data_state=train_iter.get_state(),
            extra_files=extra_files,
            metrics=dict(last_val),
        )

    stopped_early, exit_code, diverged = None, 0, None
    try:
        if s.val_at_start and resumed_from is None:
            validate()
        iterator: Iterator = train_iter
        early_signal, _ = distributed.agree_to_stop(stop_signals.signum)
        if early_signal:  # nothing trained since the last checkpoint: nothing to save
            stopped_early, exit_code = early_signal, distributed.PREEMPTED_EXIT_CODE
            logger.write(f"{stopped_early} before the first step; stopping (exit code {exit_code})")
        while step < total_steps and not exit_code:
            t_step = time.time()
            batch = next(iterator)
            micro_batches = agree_micro_batches(batch, sft_data.layout.pad_id)
            t_data = time.time() - t_step
            acc = fns.init_accumulator(params)
            lengths = []
            for mb in micro_batches:
                if check_rows:
                    attention_lib.check_packed_rows(mb["segment_ids"], jc.max_segments_per_row)
                acc = fns.micro_step(params, acc, to_global(mb, batch_sharding))
                lengths.append(segment_lengths(mb))
            lengths = np.concatenate(lengths)
            valid = int(lengths.sum())  # this process's real (non-padding) tokens
            params, opt_state, metrics = fns.apply(params, opt_state, acc, jnp.asarray(step, jnp.int32))
            metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
            if not (np.isfinite(metrics["train/loss"]) and np.isfinite(metrics["train/grad_norm"])):
                diverged = (step + 1, metrics)  # `apply` left params and optimizer state as they were
                break
            step += 1
            epoch = batch.epoch
            consumed += p.train_global_batch_size
            elapsed = time.time() - t_step
            n_dev = len(devices)
            global_valid = int(distributed.allgather_ints([valid]).sum())
            metrics.update({
                "train/global_valid_seqs": float(p.train_global_batch_size),
                "train/global_valid_toks": float(global_valid),
                "timing/train/total_step_time": elapsed,
                "timing/train/data_processing": t_data,
                "timing/train/tokens_per_sec": global_valid / elapsed,
                "timing/train/valid_tokens_per_sec_per_gpu": global_valid / elapsed / n_dev,
            })
            if peak is not None:
                local_flops = training_flops(model_cfg, lengths)
                metrics["train/mfu"] = local_flops / elapsed / (peak * len(jax.local_devices()))
            peak_mem = peak_memory_bytes()
            if peak_mem is not None:
                metrics["memory/peak_bytes"] = float(peak_mem)
            train_losses[step] = metrics["train/loss"]
            last = step == total_steps
            if (s.val_period > 0 and step % s.val_period == 0) or (last and s.val_at_end):
                validate()
            logger.log(metrics, step)
            logger.progress(step, {**metrics, **{f"validation/{k[4:]}": v for k, v in last_val.items()}})
            past_deadline = deadline is not None and time.time() - start_time + elapsed >= deadline
            # Every process decides alike (a signal may reach only some; clocks differ).
            lock_lost = bool(lock is not None and lock.lost)
            stop_signal, (past_deadline, lock_lost) = distributed.agree_to_stop(
                stop_signals.signum, past_deadline, lock_lost)
            if lock_lost:
                from jax_sft.run_lock import RunLocked

                raise RunLocked(f"another run took over the lock of {cfg.checkpointing.checkpoint_dir} "
                                f"(this run's heartbeat looked stale); stopping at step {step} without "
                                "saving, so as not to overwrite its checkpoints")
            if ckpt and (step % cfg.checkpointing.save_period == 0 or last or past_deadline or stop_signal):
                save()
            if stop_signal and not last:
                stopped_early, exit_code = stop_signal, distributed.PREEMPTED_EXIT_CODE
                saved = f"saved step_{step}; a rerun resumes from it" if ckpt else "checkpointing is disabled"
                logger.write(f"step {step}: {stopped_early}; {saved}; stopping with exit code {exit_code}")
                break
            if past_deadline and not last:
                stopped_early = f"checkpoint_must_save_by={cfg.checkpointing.checkpoint_must_save_by} reached"
                logger.write(f"step {step}: {stopped_early}; saved and stopping")
                break
    finally:
        if ckpt:
            ckpt.close()
        logger.close()
    if diverged:
        raise _diverged(*diverged, ckpt.dir if ckpt else None)

    export_dir = None
    if cfg.checkpointing.get("hf_export_dir") and not exit_code:  # a preempted run is unfinished
        export_dir = Path(cfg.checkpointing.hf_export_dir)
        models.save_pretrained(nnx.merge(graphdef, params, rest), export_dir, tokenizer=tokenizer,
                               protected=_protected(cfg))
    result = RunResult(
        run_dir=run_dir,
        checkpoint_dir=ckpt.dir if ckpt else None,
        export_dir=export_dir,
        final_step=step,
        train_losses=train_losses,
        val_losses=val_losses,
        compilations={f.name: getattr(fns, f.name)._cache_size() for f in dataclasses.fields(fns)},
        stopped_early=stopped_early,
        exit_code=exit_code,
    )
    return result


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
