"""The SFT trainer's command line.

    python -m jax_sft.train --config configs/sft.py [--config.a.b=v ...]
    python -m jax_sft.train --config nemo_rl/sft.yaml [a.b=v ...]

Order of a run: config (plain Python), distributed start-up (before any other JAX call), then
`jax_sft.trainer.run`: every check that can fail on bad input (before anything compiles), model
and data, then the loop: one optimizer step per global batch, validation every `sft.val_period`
steps, a checkpoint every `checkpointing.save_period` steps and at the end. A rerun with the same
checkpoint_dir resumes. SIGTERM / SIGUSR1 stop the run after the current step with a checkpoint
and exit code 75 (`distributed.PREEMPTED_EXIT_CODE`: requeue), also when they arrive during
start-up (imports, config); Ctrl-C (SIGINT) does the same with exit code 130 (128 + SIGINT), and a
second Ctrl-C stops at once without saving the step in progress (exit code 130; a rerun resumes
from the last checkpoint). Several processes: see distributed.py and launch/README.md. One run per
checkpoint_dir (`run_lock`); a step with a non-finite loss or gradient norm changes nothing and
stops the run.
"""

from __future__ import annotations

if __name__ == "__main__":  # python -m jax_sft.train: note stop signals from the first instant
    import signal as _signal

    _EARLY_SIGNALS: list[int] = []  # imports take seconds; `main` then installs StopSignals

    def _early(signum, frame):
        if signum == _signal.SIGINT and signum in _EARLY_SIGNALS:  # Ctrl-C twice: stop now
            raise SystemExit(128 + _signal.SIGINT)
        _EARLY_SIGNALS.append(signum)

    for _s in (_signal.SIGTERM, _signal.SIGUSR1, _signal.SIGINT):
        _signal.signal(_s, _early)

import os
import signal
import sys
from collections.abc import Sequence

import jax

from jax_sft import config as config_lib
from jax_sft import distributed
from jax_sft.dry_run import plan as dry_run_plan
from jax_sft.errors import RUN_FAILURE_EXIT_CODE, ConfigError, RunFailure, exit_on_input_error
from jax_sft.metrics import quiet_library_progress_bars
from jax_sft.trainer.loop import TrainingDiverged, segment_lengths
from jax_sft.trainer.run import RunResult, run

__all__ = ["main", "run", "RunResult", "TrainingDiverged", "segment_lengths"]


def main(argv: Sequence[str] | None = None) -> RunResult | None:
    """The command line. Errors in the input print `error: ...` and exit 2, a RunFailure (disk
    full, divergence) exits 1 the same way; a stop signal before training exits 75 (SIGINT: 130)."""
    with distributed.StopSignals() as stop_signals:  # first thing: SIGTERM must never kill start-up
        for signum in globals().get("_EARLY_SIGNALS", []):
            stop_signals.note(signum)
        try:
            return exit_on_input_error(lambda: _main(argv, stop_signals))
        except RunFailure as e:
            print(f"error: {e}", file=sys.stderr)
            raise SystemExit(RUN_FAILURE_EXIT_CODE) from None
        except KeyboardInterrupt:
            print(
                "\nstopped:     SIGINT received twice; stopped at once without saving the step in progress; "
                f"exit code {distributed.INTERRUPTED_EXIT_CODE} (a rerun resumes from the last checkpoint)",
                file=sys.stderr,
            )
            raise StoppedAtOnce(distributed.INTERRUPTED_EXIT_CODE) from None


class StoppedAtOnce(SystemExit):
    """A second Ctrl-C: `python -m jax_sft.train` then ends the process without waiting for the
    background writers of a save in flight (the partial save is never resumed)."""


USAGE = "usage: python -m jax_sft.train --config PATH [overrides: a.b=v | --config.a.b=v ...] [--dry_run]"
HELP = (
    USAGE
    + "\n\n"
    + __doc__
    + """
Main keys (all of NeMo RL's SFT keys apply; defaults in jax_sft/config/defaults.py):
  policy.model_name            HF model folder or hub id
  data.dataset_name            squad, openai_format, ... (with data.train_data_path, data.val_data_path)
  sft.max_num_steps / sft.max_num_epochs / sft.val_period
  policy.train_global_batch_size / policy.train_micro_batch_size / policy.max_total_sequence_length
  policy.optimizer.kwargs.lr   policy.precision (bfloat16 | float32)
  policy.jax_cfg.mesh.{data,fsdp,tensor,context}
  checkpointing.checkpoint_dir (a rerun resumes) / checkpointing.hf_export_dir
  logger.log_dir / logger.tensorboard_enabled / logger.wandb_enabled / logger.num_val_samples_to_print
Flags: --dry_run (check the config and plan without devices), --validate_data (encode every row
before training; bad rows as error: lines), --coordinator_address,
--num_processes, --process_id (several hosts; see launch/README.md).

Example:
  python -m jax_sft.train --config configs/sft.py \\
      --config.policy.model_name=meta-llama/Llama-3.2-1B --config.sft.max_num_steps=100
"""
)


def _stop_if_signalled(stop_signals: distributed.StopSignals, when: str) -> None:
    if stop_signals.signum:
        said = f"{signal.Signals(stop_signals.signum).name} received"
        code = distributed.stop_exit_code(said)
        print(f"stopped:     {said} {when}; nothing to save; exit code {code} (rerun to resume)", file=sys.stderr)
        raise SystemExit(code)


def _main(argv: Sequence[str] | None, stop_signals: distributed.StopSignals) -> RunResult | None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if {"-h", "--help"} & set(argv):
        print(HELP)
        return None
    _stop_if_signalled(stop_signals, "while starting")
    config_path, overrides, extra = config_lib.parse_args(argv)
    dry_run, validate_data = extra.pop("dry_run", False), extra.pop("validate_data", False)
    for flag, value in (("dry_run", dry_run), ("validate_data", validate_data)):
        if value not in (False, True):
            raise ConfigError([f"--{flag}={value}: takes no value"], "command line")
    if dry_run and validate_data:
        raise ConfigError(
            [
                "--validate_data reads every row and --dry_run none: run one of them (or python -m "
                "jax_sft.inspect_data --validate_data)"
            ],
            "command line",
        )
    distributed.parse_flags(extra)  # bad flags fail before the config is read
    cfg = config_lib.load_config(config_path, overrides)  # plain Python: no JAX backend yet
    if dry_run:
        lines = dry_run_plan(cfg)
        print(f"config:\n{config_lib.to_yaml(cfg)}\nplan:\n" + "\n".join(f"  {x}" for x in lines))
        print("dry run: the config is valid; a real run would start")
        return None
    _stop_if_signalled(stop_signals, "while reading the config")
    distributed.initialize(extra, gpus_per_node=cfg.cluster.gpus_per_node)
    quiet_library_progress_bars()  # in log files: our whole lines only
    stop_signals.reinstall()  # jax.distributed.initialize installs its own SIGTERM handler
    result = run(cfg, stop_signals, validate_data=validate_data)
    if jax.process_index() == 0:
        if result.run_dir is not None:
            tensorboard = f" (TensorBoard: {result.tensorboard_dir})" if result.tensorboard_dir else ""
            print(f"\nmetrics:     {result.run_dir / 'metrics.jsonl'}{tensorboard}")
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
    try:
        main()
    except StoppedAtOnce as stopped:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(stopped.code)  # not the interpreter's shutdown: Orbax's writer threads would complain
