"""The step loop of a set-up run: one optimizer step per global batch, validation every
sft.val_period steps, checkpoints, and stopping (signals, deadline, a lost lock, divergence).

Each step needs one all-gather between processes (`distributed.agree_to_stop`): after the step it
carries the stop signals and flags, this process's real tokens, and the number of micro-batches of
the next batch (drawn before it; the data state saved with a checkpoint is taken before that
draw).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jax_sft import distributed
from jax_sft import metrics as metrics_lib
from jax_sft.checkpoint import complete_steps, set_aside, step_dir
from jax_sft.data import StepBatch, pad_micro_batches
from jax_sft.errors import RunFailure
from jax_sft.metrics import MetricsLogger
from jax_sft.models import attention as attention_lib
from jax_sft.run_lock import RunLocked
from jax_sft.trainer.setup import Run, extra_files, to_global
from jax_sft.trainer.validation import Validator


class TrainingDiverged(RunFailure):
    """A step's loss or gradient norm was NaN or infinite. The step changed nothing; the message
    names the last checkpoint whose weights gave a finite loss (see `diverged`)."""


def segment_lengths(batch: dict[str, np.ndarray]) -> np.ndarray:
    """Lengths of the real (segment id > 0) sequences in a [rows, seq] batch, row by row in
    segment order."""
    seg = np.asarray(batch["segment_ids"]).astype(np.int64)
    width = int(seg.max(initial=0)) + 1
    keys = (np.arange(seg.shape[0])[:, None] * width + seg)[seg > 0]
    counts = np.bincount(keys, minlength=seg.shape[0] * width)
    return counts[counts > 0].astype(np.int64)


class Loop:
    """Trains a set-up `Run` (see the module docstring); `train()` returns when the run stopped,
    with the losses, how it stopped and `diverged` (step, metrics) when a step was not finite."""

    def __init__(
        self,
        run: Run,
        logger: MetricsLogger,
        stop_signals: distributed.StopSignals,
        start_time: float,
        config_yaml: str,
    ):
        self.run, self.logger, self.stop_signals, self.start_time = run, logger, stop_signals, start_time
        self.peak = metrics_lib.peak_flops_per_device(run.devices[0], run.plan.precision)
        self.extra_files = extra_files(run, config_yaml) if run.ckpt else {}
        self.validator = Validator(run, logger)
        self.train_losses: dict[int, float] = {}
        self.stopped_early: str | None = None
        self.exit_code = 0
        self.diverged: tuple[int, dict[str, float]] | None = None

    @property
    def val_losses(self) -> dict[int, float]:
        return self.validator.losses

    def train(self) -> None:
        r, s = self.run, self.run.plan.steps
        if s.val_at_start and r.resumed_from is None:
            self.validator.validate(r.state.step)
        t0 = time.time()
        batch = next(r.train_iter) if r.state.step < r.total_steps else None
        t_data = time.time() - t0
        said, _, counts = distributed.agree_to_stop(
            self.stop_signals.signum, values=[batch.num_micro_batches if batch else 0]
        )
        if said:  # nothing trained since the last checkpoint: nothing to save
            self.stopped_early, self.exit_code = said, distributed.stop_exit_code(said)
            self.logger.write(f"{said} before the first step; stopping (exit code {self.exit_code})")
            return
        while r.state.step < r.total_steps:
            t_step = time.time()
            metrics, lengths = self.step(batch, int(counts[:, 0].max()))
            if metrics is None:
                return
            r.state.step, r.state.epoch = r.state.step + 1, batch.epoch
            r.state.consumed += r.plan.batch.global_batch
            elapsed = time.time() - t_step + t_data
            data_state = r.train_iter.get_state()  # before the next batch is drawn
            last = r.state.step == r.total_steps
            t0 = time.time()
            batch = None if last else next(r.train_iter)
            t_data = time.time() - t0
            past_deadline = self._past_deadline(elapsed)
            lock_lost = bool(r.lock is not None and r.lock.lost)
            # Every process decides alike (a signal may reach only some; clocks differ).
            said, (past_deadline, lock_lost), counts = distributed.agree_to_stop(
                self.stop_signals.signum,
                past_deadline,
                lock_lost,
                values=[int(lengths.sum()), batch.num_micro_batches if batch else 0],
            )
            # Processes that share data-parallel ranks (tensor or context axes across hosts) hold the same rows.
            copies = max(1, jax.process_count() // r.plan.batch.dp)
            self.log_step(metrics, lengths, int(counts[:, 0].sum()) // copies, elapsed, t_data, last)
            if self.stop_after_step(said, past_deadline, lock_lost, last, data_state):
                return
            counts = counts[:, 1:]

    def _past_deadline(self, elapsed: float) -> bool:
        deadline = self.run.plan.checkpoint.deadline_s
        return deadline is not None and time.time() - self.start_time + elapsed >= deadline

    def step(self, batch: StepBatch, micro_batches: int) -> tuple[dict[str, float] | None, np.ndarray]:
        """One optimizer step over `batch` padded to `micro_batches` micro-batches; -> (metrics,
        this process's sequence lengths); metrics None when the step was not finite."""
        r, state = self.run, self.run.state
        max_segments = r.plan.model.options.max_segments
        compute = r.fns.cast(state.params, r.frozen)  # the compute-dtype weights, once per step
        acc = r.fns.init_accumulator(state.params, state.fp8)
        lengths = []
        for i, mb in enumerate(pad_micro_batches(batch, micro_batches, r.data.layout.pad_id).micro_batches):
            if r.check_rows:
                attention_lib.check_packed_rows(mb["segment_ids"], max_segments)
            acc = r.fns.micro_step(
                compute, state.fp8, acc, to_global(mb, r.batch_sharding), r.fns.counter(state.step, i)
            )
            lengths.append(segment_lengths(mb))
        del compute
        state.params, state.opt_state, state.fp8, metrics = r.fns.apply(
            state.params, state.opt_state, state.fp8, acc, jnp.asarray(state.step, jnp.int32)
        )
        metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
        if not (np.isfinite(metrics["train/loss"]) and np.isfinite(metrics["train/grad_norm"])):
            self.diverged = (state.step + 1, metrics)  # `apply` left params and optimizer state as they were
            return None, np.zeros(0, np.int64)
        return metrics, np.concatenate(lengths)

    def log_step(
        self,
        metrics: dict[str, float],
        lengths: np.ndarray,
        global_valid: int,
        elapsed: float,
        t_data: float,
        last: bool,
    ) -> None:
        r, s = self.run, self.run.plan.steps
        metrics.update(
            {
                "train/global_valid_seqs": float(r.plan.batch.global_batch),
                "train/global_valid_toks": float(global_valid),
                "timing/train/total_step_time": elapsed,
                "timing/train/data_processing": t_data,
                "timing/train/tokens_per_sec": global_valid / elapsed,
                "timing/train/valid_tokens_per_sec_per_gpu": global_valid / elapsed / len(r.devices),
            }
        )
        if self.peak is not None:
            # This process's rows ran on every device of its data-parallel ranks (a rank: all
            # devices / dp, its context and tensor axes included), whichever process holds them.
            flops = r.model_config.training_flops(lengths)
            devices = len(r.data.layout.dp_ranks) * len(r.devices) // r.plan.batch.dp
            metrics["train/mfu"] = flops / elapsed / (self.peak * devices)
        peak_mem = metrics_lib.peak_memory_bytes()
        if peak_mem is not None:
            metrics["memory/peak_bytes"] = float(peak_mem)
        step = r.state.step
        self.train_losses[step] = metrics["train/loss"]
        if (s.val_period > 0 and step % s.val_period == 0) or (last and s.val_at_end):
            self.validator.validate(step)
        self.logger.log(metrics, step)
        last_val = {f"validation/{k[4:]}": v for k, v in self.validator.last.items()}
        self.logger.progress(step, {**metrics, **last_val})

    def stop_after_step(
        self, said: str | None, past_deadline: bool, lock_lost: bool, last: bool, data_state: Any
    ) -> bool:
        """Saves when due; -> whether the run stops here (besides having run its last step)."""
        r, spec = self.run, self.run.plan.checkpoint
        step = r.state.step
        if lock_lost:
            raise RunLocked(
                f"another run took over the lock of {spec.directory} (this run's heartbeat "
                f"looked stale); stopping at step {step} without saving, so as not to "
                "overwrite its checkpoints"
            )
        if r.ckpt and (step % spec.save_period == 0 or last or past_deadline or said):
            self.save(data_state)
        if said and not last:
            self.stopped_early, self.exit_code = said, distributed.stop_exit_code(said)
            saved = f"saved step_{step}; a rerun resumes from it" if r.ckpt else "checkpointing is disabled"
            self.logger.write(f"step {step}: {said}; {saved}; stopping with exit code {self.exit_code}")
            return True
        if past_deadline and not last:
            must = r.plan.config.checkpointing.checkpoint_must_save_by
            self.stopped_early = f"checkpoint_must_save_by={must} reached"
            self.logger.write(f"step {step}: {self.stopped_early}; saved and stopping")
            return True
        return False

    def save(self, data_state: Any) -> None:
        state, last_val = self.run.state, self.validator.last
        self.run.ckpt.save(
            state.step,
            params=state.params,  # LoRA: the adapters only (lora.json names the base)
            opt_state=state.opt_state,
            fp8=state.fp8,
            train_info={"step": state.step, "epoch": state.epoch, "consumed_samples": state.consumed, **last_val},
            data_state=data_state,
            extra_files=self.extra_files,
            metrics=dict(last_val),
        )


def diverged(step: int, metrics: dict[str, float], checkpoint_dir: Path | None) -> TrainingDiverged:
    """The error for a non-finite `step`. Its loss was computed on the weights after step - 1,
    so step_{step-1} is not good: process 0 sets it aside as diverged_step_{step-1} (kept, but never
    resumed); the message names the newest complete checkpoint before it."""
    what = (
        f"training diverged at step {step}: loss {metrics['train/loss']}, grad_norm "
        f"{metrics['train/grad_norm']} (computed on the weights after step {step - 1}); the step "
        "left parameters and optimizer state unchanged and nothing was saved"
    )
    if checkpoint_dir is None:
        return TrainingDiverged(f"{what}. Lower policy.optimizer.kwargs.lr")
    bad = step_dir(checkpoint_dir, step - 1)
    moved = ""
    if bad.is_dir():
        aside = set_aside(bad, "diverged", rename=jax.process_index() == 0)
        moved = f"; {bad.name} holds those weights and was renamed {aside.name}, so a rerun does not resume from it"
    good = max((k for k in complete_steps(checkpoint_dir) if k < step - 1), default=None)
    last = (
        f"The last checkpoint whose weights gave a finite loss is {step_dir(checkpoint_dir, good)}; a "
        "rerun resumes from it"
        if good is not None
        else "No checkpoint predates the divergence; a rerun starts from policy.model_name"
    )
    return TrainingDiverged(f"{what}{moved}. {last}. Lower policy.optimizer.kwargs.lr before rerunning")
