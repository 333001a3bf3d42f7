"""Process start-up for multi-host runs, which devices a run uses, and stopping on a signal.

One process per host drives that host's accelerators (JAX's distributed runtime connects them).
`initialize` must run before any other JAX call (no jax_sft module touches a device at import):

- with `--coordinator_address HOST:PORT --num_processes N --process_id I` on the command line of
  `python -m jax_sft.train` (all three, e.g. from `python -m jax_sft.launch_local`);
- else inside a Slurm job step of several tasks (`srun`), where JAX reads the coordinator,
  process count and id from Slurm's environment. With one task per node, every task sees
  `cluster.gpus_per_node` GPUs (JAX's own Slurm default would give each task one GPU);
- else the run is a single process.

`--initialization_timeout`, `--heartbeat_timeout_seconds` and `--shutdown_timeout_seconds`
(seconds; JAX's defaults 300, 100, 300) tune how long processes wait for each other: a process
that stops sending heartbeats for `heartbeat_timeout_seconds` (killed, host lost) makes every
other process exit with an error instead of waiting forever in a collective.

Stopping: while `StopSignals` is active, SIGTERM and SIGUSR1 (Slurm's preemption and time-limit
notices) and the first SIGINT (Ctrl-C) only set a flag. The trainer asks every step whether any
process got one (`agree_to_stop`, one small all-gather), so that all processes save the same step;
it then exits with `PREEMPTED_EXIT_CODE` (75), which tells a launcher to requeue the job, or after
Ctrl-C with `INTERRUPTED_EXIT_CODE` (130). A second Ctrl-C stops at once, without saving.
"""

from __future__ import annotations

import os
import signal
import threading
import warnings
from collections.abc import Mapping, Sequence
from types import FrameType
from typing import Any

import jax
import numpy as np

from jax_sft.errors import UsageError

# Exit code of a run that stopped on SIGTERM/SIGUSR1 after saving a checkpoint: sysexits.h's
# EX_TEMPFAIL ("temporary failure; the user is invited to retry"). A rerun (a requeued Slurm
# job, see launch/sft.sbatch) resumes from checkpointing.checkpoint_dir.
PREEMPTED_EXIT_CODE = 75
# Exit code of a run stopped by Ctrl-C (SIGINT) after saving: the shells' 128 + SIGINT. Not 75: an
# interrupted run was stopped on purpose and is not requeued; a rerun resumes all the same.
INTERRUPTED_EXIT_CODE = 128 + signal.SIGINT
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)

_ADDRESS_FLAGS = ("coordinator_address", "num_processes", "process_id")
_TIMEOUT_FLAGS = ("initialization_timeout", "heartbeat_timeout_seconds", "shutdown_timeout_seconds")
FLAGS = _ADDRESS_FLAGS + _TIMEOUT_FLAGS  # the `--name=value` flags `initialize` takes


# ----------------------------------------------------------------------------- start-up


def parse_flags(extra: Mapping[str, str | bool]) -> dict[str, str | int]:
    """The trainer's extra command-line flags (strings from `config.parse_args`), checked and typed."""
    unknown = sorted(set(extra) - set(FLAGS))
    if unknown:
        raise UsageError(
            f"unknown command-line flag(s) {', '.join('--' + u for u in unknown)}; the trainer takes "
            f"--config PATH, overrides (a.b=v or --config.a.b=v) and {', '.join('--' + f for f in FLAGS)}"
        )
    out: dict[str, str | int] = {}
    for name, value in extra.items():
        if value is True or value == "":
            raise UsageError(f"--{name} needs a value (--{name}=...)")
        if name == "coordinator_address":
            host, _, port = str(value).rpartition(":")
            if not host or not port.isdigit():
                raise UsageError(f"--coordinator_address={value}: expected HOST:PORT, e.g. 10.0.0.1:3389")
            out[name] = str(value)
            continue
        try:
            out[name] = int(value)
        except ValueError:
            raise UsageError(f"--{name}={value}: expected an integer") from None
        if out[name] < (0 if name == "process_id" else 1):
            raise UsageError(f"--{name}={value}: expected {'>= 0' if name == 'process_id' else '>= 1'}")
    if "process_id" in out and "num_processes" in out and out["process_id"] >= out["num_processes"]:
        raise UsageError(f"--process_id={out['process_id']} must be below --num_processes={out['num_processes']}")
    return out


def under_slurm() -> bool:
    """True inside a Slurm job step with more than one task (srun -n >1)."""
    env = os.environ
    needed = ("SLURM_JOB_ID", "SLURM_PROCID", "SLURM_LOCALID", "SLURM_STEP_NODELIST")
    return all(k in env for k in needed) and _slurm_int("SLURM_STEP_NUM_TASKS", "SLURM_NTASKS") > 1


def _slurm_int(*names: str) -> int:
    for name in names:
        if os.environ.get(name):
            return int(os.environ[name])
    return 1


def slurm_local_device_ids(gpus_per_node: int | None) -> list[int] | None:
    """GPUs this Slurm task drives: all `gpus_per_node` with one task per node; else None
    (JAX's Slurm default: one GPU per task, by SLURM_LOCALID). JAX_LOCAL_DEVICE_IDS wins."""
    if os.environ.get("JAX_LOCAL_DEVICE_IDS") or gpus_per_node is None:
        return None
    tasks = _slurm_int("SLURM_STEP_NUM_TASKS", "SLURM_NTASKS")
    nodes = _slurm_int("SLURM_STEP_NUM_NODES", "SLURM_NNODES")
    return list(range(int(gpus_per_node))) if tasks == nodes else None


def initialize(extra: Mapping[str, str | bool], *, gpus_per_node: int | None = None) -> None:
    """Starts jax.distributed from command-line flags or Slurm; a single process otherwise.

    extra: the flags `config.parse_args` did not consume (`FLAGS`; anything else raises).
    gpus_per_node: `cluster.gpus_per_node`, the GPUs each Slurm task drives with one task per node.
    """
    flags = parse_flags(extra)
    timeouts = {k: flags[k] for k in _TIMEOUT_FLAGS if k in flags}
    given = [k for k in _ADDRESS_FLAGS if k in flags]
    if given:
        missing = [f"--{k}" for k in _ADDRESS_FLAGS if k not in flags]
        if missing:
            raise ValueError(
                f"multi-process launch needs all of --coordinator_address, --num_processes and "
                f"--process_id; missing {', '.join(missing)}"
            )
        jax.distributed.initialize(
            coordinator_address=flags["coordinator_address"],
            num_processes=flags["num_processes"],
            process_id=flags["process_id"],
            **timeouts,
        )
    elif under_slurm():
        jax.distributed.initialize(local_device_ids=slurm_local_device_ids(gpus_per_node), **timeouts)
    elif timeouts:
        raise ValueError(
            f"{', '.join('--' + k for k in timeouts)} only apply to a multi-process run; add "
            "--coordinator_address, --num_processes and --process_id, or run under srun"
        )


def select_devices(cluster: Any) -> list[jax.Device]:
    """The devices of the run: `cluster.num_nodes * cluster.gpus_per_node` of them.

    Across several processes the product must equal the devices present. In a single process
    it may be smaller (the first N devices are used, as NeMo RL uses `gpus_per_node` of a node).
    """
    wanted = int(cluster.num_nodes) * int(cluster.gpus_per_node)
    present = jax.device_count()
    if jax.process_count() > 1 and wanted != present:
        raise UsageError(
            f"cluster.num_nodes * cluster.gpus_per_node = {cluster.num_nodes} * "
            f"{cluster.gpus_per_node} = {wanted}, but the {jax.process_count()} processes have "
            f"{present} devices ({jax.local_device_count()} on this one); set cluster.* to match "
            "the launch"
        )
    if wanted > present:
        raise UsageError(
            f"cluster.num_nodes * cluster.gpus_per_node = {wanted} devices requested, but only "
            f"{present} are present ({jax.devices()[0].platform}); lower cluster.gpus_per_node"
        )
    return jax.devices()[:wanted]


# ----------------------------------------------------------------------------- agreement


def allgather_ints(values: Sequence[int]) -> np.ndarray:
    """[process_count, len(values)] int64: every process's `values` (a collective: all call it).

    The values travel as int32 (JAX's default integer width): each must be below 2**31.
    """
    local = np.asarray([int(v) for v in values], np.int32)
    if jax.process_count() == 1:
        return local[None].astype(np.int64)
    from jax.experimental import multihost_utils

    gathered = multihost_utils.process_allgather(local)
    return np.asarray(gathered, np.int64).reshape(jax.process_count(), -1)


# ----------------------------------------------------------------------------- stopping


class StopSignals:
    """While active (`with StopSignals() as stop:`), SIGTERM / SIGUSR1 / SIGINT set `stop.signum`
    instead of ending the process; leaving restores the previous handlers. Repeated SIGTERM /
    SIGUSR1 are harmless (Slurm may deliver one directly and one through srun); a second SIGINT
    (Ctrl-C pressed again) raises KeyboardInterrupt at once, without waiting for the step or the
    save. Handlers can only be installed from the main thread; elsewhere a warning says signals
    keep their default effect. (This replaces the SIGTERM hook of JAX's own preemption service,
    `multihost_utils.reached_preemption_sync_point`, which only knows SIGTERM and needs
    jax.distributed.)"""

    def __init__(self, signals: Sequence[signal.Signals] = STOP_SIGNALS):
        self.signals = tuple(signals)
        self.signum = 0  # the first stop signal this process received, 0 if none
        self.interrupted = False  # a SIGINT was received: the next one stops at once
        self._previous: dict[signal.Signals, Any] = {}

    def note(self, signum: int) -> bool:
        """Records a stop signal; True when it is the first one."""
        if signum == signal.SIGINT:
            self.interrupted = True
        first = not self.signum
        self.signum = self.signum or signum
        return first

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if signum == signal.SIGINT and self.interrupted:
            raise KeyboardInterrupt  # Ctrl-C twice: stop now
        if self.note(signum):
            name = signal.Signals(signum).name
            again = " (Ctrl-C again stops at once, without saving)" if signum == signal.SIGINT else ""
            # os.write: print() is not safe inside a signal handler.
            os.write(
                2,
                f"\n[jax_sft] {name} received: finishing the current step, then saving "
                f"a checkpoint and exiting with code {stop_exit_code(name)}{again}\n".encode(),
            )

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._handle) for s in self.signals}
        else:
            warnings.warn(
                "jax_sft.train runs outside the main thread: SIGTERM/SIGUSR1/SIGINT will end it without a checkpoint",
                RuntimeWarning,
                stacklevel=2,
            )
        return self

    def reinstall(self) -> None:
        """Installs the handlers again: `jax.distributed.initialize` replaces SIGTERM's with its
        own preemption notifier (the handlers that were there before stay those restored)."""
        if self._previous:
            for s in self.signals:
                signal.signal(s, self._handle)

    def __exit__(self, *exc: object) -> None:
        for s, handler in self._previous.items():  # None: a handler set outside Python
            signal.signal(s, signal.SIG_DFL if handler is None else handler)
        self._previous = {}


def stop_exit_code(said: str) -> int:
    """The exit code of a run stopped by the signal `said` names ("SIGINT received ..."):
    INTERRUPTED_EXIT_CODE for Ctrl-C, else PREEMPTED_EXIT_CODE."""
    return INTERRUPTED_EXIT_CODE if said.startswith(signal.SIGINT.name) else PREEMPTED_EXIT_CODE


def agree_to_stop(signum: int, *flags: bool, values: Sequence[int] = ()) -> tuple[str | None, list[bool], np.ndarray]:
    """Whether any process received a stop signal, for each flag whether any process set it, and
    every process's `values` ([process_count, len(values)] int64: e.g. its token count and its
    next step's micro-batches, so that a step needs no second all-gather).

    One all-gather across processes (every process must call it at the same point of every
    step); in a single process it only reads its arguments. Returns (what was received, e.g.
    "SIGTERM received" or "SIGUSR1 received by process 1 of 2", or None; [flag set on some
    process, ...]; values).
    """
    gathered = allgather_ints([signum, *flags, *values])
    by = [i for i, s in enumerate(gathered[:, 0]) if s]
    said = None
    if by:
        said = f"{signal.Signals(int(gathered[by[0], 0])).name} received"
        if len(gathered) > 1:
            said += f" by process{'es' if len(by) > 1 else ''} {', '.join(map(str, by))} of {len(gathered)}"
    return said, [bool(gathered[:, i + 1].any()) for i in range(len(flags))], gathered[:, 1 + len(flags) :]
