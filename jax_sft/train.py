"""The SFT trainer's command line.

    python -m jax_sft.train --config configs/sft.py [--config.a.b=v ...]
    python -m jax_sft.train --config nemo_rl/sft.yaml [a.b=v ...]

Order of a run: config (plain Python), distributed start-up (before any other JAX call), then
`jax_sft.trainer.run`: every check that can fail on bad input (before anything compiles), model
and data, then the loop: one optimizer step per global batch, validation every `sft.val_period`
steps, a checkpoint every `checkpointing.save_period` steps and at the end. A rerun with the same
checkpoint_dir resumes. SIGTERM / SIGUSR1 stop the run after the current step with a checkpoint
and exit code 75 (`distributed.PREEMPTED_EXIT_CODE`), also when they arrive during start-up
(imports, config); several processes: see distributed.py and launch/README.md. One run per
checkpoint_dir (`run_lock`); a step with a non-finite loss or gradient norm changes nothing and
stops the run.
"""

from __future__ import annotations

if __name__ == "__main__":  # python -m jax_sft.train: note stop signals from the first instant
    import signal as _signal

    _EARLY_SIGNALS: list[int] = []  # imports take seconds; `main` then installs StopSignals
    for _s in (_signal.SIGTERM, _signal.SIGUSR1):
        _signal.signal(_s, lambda signum, frame: _EARLY_SIGNALS.append(signum))

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
    full, divergence) exits 1 the same way; a stop signal before training exits 75."""
    with distributed.StopSignals() as stop_signals:  # first thing: SIGTERM must never kill start-up
        stop_signals.signum = stop_signals.signum or next(iter(globals().get("_EARLY_SIGNALS", [])), 0)
        try:
            return exit_on_input_error(lambda: _main(argv, stop_signals))
        except RunFailure as e:
            print(f"error: {e}", file=sys.stderr)
            raise SystemExit(RUN_FAILURE_EXIT_CODE) from None


HELP = (
    __doc__
    + """
Main keys (all of NeMo RL's SFT keys apply; defaults in jax_sft/config/defaults.py):
  policy.model_name            HF model folder or hub id
  data.dataset_name            squad, openai_format, ... (with data.train_data_path, data.val_data_path)
  sft.max_num_steps / sft.max_num_epochs / sft.val_period
  policy.train_global_batch_size / policy.train_micro_batch_size / policy.max_total_sequence_length
  policy.optimizer.kwargs.lr   policy.precision (bfloat16 | float32)
  policy.jax_cfg.mesh.{data,fsdp,tensor}
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
        print(
            f"stopped:     {signal.Signals(stop_signals.signum).name} received {when}; nothing to save; "
            f"exit code {distributed.PREEMPTED_EXIT_CODE} (rerun to resume)",
            file=sys.stderr,
        )
        raise SystemExit(distributed.PREEMPTED_EXIT_CODE)


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
    main()
