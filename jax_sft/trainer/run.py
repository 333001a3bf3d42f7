"""A training run from a validated config: set up, train, export; the result it leaves behind.

Order of a run: distributed start-up has happened (train.main), then every check that can fail on
bad input (before anything compiles), model and data (`setup`), then the loop (`loop.Loop`): one
optimizer step per global batch, validation every `sft.val_period` steps, a checkpoint every
`checkpointing.save_period` steps and at the end; a rerun with the same checkpoint_dir resumes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import re
import time
from pathlib import Path

import jax

from jax_sft import distributed
from jax_sft.checkpoint import is_checkpoint_folder
from jax_sft.config import to_yaml
from jax_sft.config.loading import save_config
from jax_sft.config.plan import model_notes, protected_folders
from jax_sft.metrics import MetricsLogger
from jax_sft.models import save_pretrained
from jax_sft.models import sharding as sharding_lib
from jax_sft.sinks import tensorboard_dir
from jax_sft.trainer.loop import Loop, diverged
from jax_sft.trainer.setup import Run, memory_line, setup, sharding_table


@dataclasses.dataclass
class RunResult:
    """What a finished run leaves behind (returned by `run`, printed by `main`)."""

    run_dir: Path | None  # None: nothing was trained (already at the last step)
    tensorboard_dir: Path | None  # where the TensorBoard events went (None: logger.tensorboard_enabled=false)
    checkpoint_dir: Path | None
    export_dir: Path | None
    final_step: int
    train_losses: dict[int, float]
    val_losses: dict[int, float]
    compilations: dict[str, int]
    stopped_early: str | None = None
    exit_code: int = 0  # distributed.stop_exit_code after stopping on SIGTERM / SIGUSR1 (75), SIGINT (130)


def next_run_dir(log_dir: Path) -> Path:
    """log_dir/exp_NNN with NNN one above the highest present (NeMo RL's layout)."""
    taken = [int(m.group(1)) for p in log_dir.glob("exp_*") if (m := re.fullmatch(r"exp_(\d+)", p.name))]
    return log_dir / f"exp_{max(taken, default=0) + 1:03d}"


def run(cfg, stop_signals: distributed.StopSignals | None = None, *, validate_data: bool = False) -> RunResult:
    """Trains per `cfg` (validated ConfigDict); resumes from checkpoint_dir when it has a step.
    validate_data: encode every row of both splits before the model is loaded (`--validate_data`),
    reporting each that fails, and stop (DataError) if any did.

    SIGTERM / SIGUSR1 / a first SIGINT during the run: the current step finishes, a checkpoint is
    saved and the result has `exit_code` = distributed.stop_exit_code (75; 130 for SIGINT; before
    the first step: no save). A second SIGINT raises KeyboardInterrupt at once.
    stop_signals: an active StopSignals (`main` installs one first thing); None: one for the run.
    """
    with contextlib.ExitStack() as stack:  # the run lock, taken in setup, is released on leaving
        if stop_signals is None:
            stop_signals = stack.enter_context(distributed.StopSignals())
        if cfg.policy.precision == "float32":  # true fp32 matmuls (GPUs would otherwise use TF32)
            stack.enter_context(jax.default_matmul_precision("highest"))
        return _run(cfg, stop_signals, stack, validate_data)


def _run(cfg, stop_signals: distributed.StopSignals, stack: contextlib.ExitStack, validate_data: bool) -> RunResult:
    start_time = time.time()
    r = setup(cfg, stack, validate_data=validate_data)
    if r.resumed_from is not None and r.resumed_from >= r.total_steps:
        return _finished_already(r)
    run_dir = next_run_dir(Path(cfg.logger.log_dir))
    logger = MetricsLogger(cfg.logger, run_dir, total_steps=r.total_steps, initial_step=r.state.step)
    config_yaml = to_yaml(cfg)
    _log_start(r, logger, run_dir, config_yaml)
    loop = Loop(r, logger, stop_signals, start_time, config_yaml)
    try:
        loop.train()
    finally:
        if r.ckpt:
            r.ckpt.close()
        logger.close()
    if loop.diverged:
        raise diverged(*loop.diverged, r.ckpt.dir if r.ckpt else None)
    export_dir = r.plan.checkpoint.export_dir
    if export_dir is not None and not loop.exit_code:  # a preempted run is unfinished
        # LoRA: the adapters are merged into the weights (jax_sft.export also writes PEFT folders).
        save_pretrained(
            r.model(),
            export_dir,
            tokenizer=r.tokenizer,
            protected=protected_folders(r.plan),
            is_checkpoint=is_checkpoint_folder,
        )
    return RunResult(
        run_dir=run_dir,
        tensorboard_dir=tensorboard_dir(cfg.logger, run_dir) if cfg.logger.tensorboard_enabled else None,
        checkpoint_dir=r.ckpt.dir if r.ckpt else None,
        export_dir=export_dir if not loop.exit_code else None,
        final_step=r.state.step,
        train_losses=loop.train_losses,
        val_losses=loop.val_losses,
        compilations={
            f.name: getattr(r.fns, f.name)._cache_size()
            for f in dataclasses.fields(r.fns)
            if hasattr(getattr(r.fns, f.name), "_cache_size")
        },
        stopped_early=loop.stopped_early,
        exit_code=loop.exit_code,
    )


def _log_start(r: Run, logger: MetricsLogger, run_dir: Path, config_yaml: str) -> None:
    if jax.process_index() == 0:
        save_config(r.plan.config, run_dir / "config.yaml")
        logger.write(f"config:\n{config_yaml}")
        logger.write(
            f"mesh: {sharding_lib.describe_mesh(r.mesh)} over {len(r.devices)} {r.devices[0].platform} "
            f"devices ({jax.process_count()} processes)"
        )
        params = r.state.params
        logger.write(sharding_table({"trainable": params, "frozen": r.frozen} if r.plan.lora else params))
        logger.write(memory_line(params, r.frozen, r.state.opt_state, r.plan.precision))
        logger.write(r.attention_line)
        for note in model_notes(r.plan):
            logger.write(f"model: {note}")
        if r.resumed_from is not None:
            logger.write(f"resumed from {r.ckpt.step_dir(r.resumed_from)} (step {r.state.step}, epoch {r.state.epoch})")
        logger.write("data: " + ", ".join(f"{k.removeprefix('data/')}={v}" for k, v in r.data.stats.items()))
        for line in r.data.describe_mixture():
            logger.write(f"data: {line}")
    logger.log_config(r.plan.config.to_dict())


def _finished_already(r: Run) -> RunResult:
    """A rerun of a finished run: says so, trains and writes nothing (no new exp_NNN folder)."""
    r.ckpt.close()
    step = r.resumed_from
    if jax.process_index() == 0:
        print(f"{r.ckpt.step_dir(step)}: already at step {step} of {r.total_steps}; nothing to train", flush=True)
    return RunResult(
        run_dir=None,
        tensorboard_dir=None,
        checkpoint_dir=r.ckpt.dir,
        export_dir=None,
        final_step=step,
        train_losses={},
        val_losses={},
        compilations={},
    )
