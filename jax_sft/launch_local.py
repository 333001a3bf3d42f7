"""Several trainer processes on one machine, connected like the hosts of a multi-host job.

    python -m jax_sft.launch_local --num_processes 2 --devices_per_process 2 -- \\
        --config configs/quickstart.py cluster.num_nodes=2 cluster.gpus_per_node=2

For development and tests: process i runs `python -m jax_sft.train --coordinator_address
127.0.0.1:PORT --num_processes N --process_id i <trainer args>` with its own devices:
`--platform cpu` (default) gives each process `devices_per_process` virtual CPU devices
(XLA_FLAGS=--xla_force_host_platform_device_count, JAX_PLATFORMS=cpu); `--platform gpu` gives
process i the GPUs i*D .. i*D+D-1 (CUDA_VISIBLE_DEVICES). Set `cluster.num_nodes` to N and
`cluster.gpus_per_node` to D in the trainer args.

Like srun: SIGTERM and SIGUSR1 sent to the launcher are forwarded to every process; the exit
code is the highest of the processes' (a process killed by signal S counts as 128+S), so a run
that stopped on a signal after saving exits with `distributed.PREEMPTED_EXIT_CODE`. Each
process's start and end (pid, exit code, seconds since launch) go to stderr as
`[launch_local] ...` lines; `--log_dir` sends each process's output to log_dir/process_I.log.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

FORWARDED = (signal.SIGTERM, signal.SIGUSR1)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def process_env(index: int, devices: int, platform: str, base: dict[str, str]) -> dict[str, str]:
    """The environment of process `index` driving `devices` devices of `platform`."""
    env = dict(base)
    if platform == "cpu":
        flags = re.sub(r"--xla_force_host_platform_device_count=\S*", "", env.get("XLA_FLAGS", "")).split()
        env["XLA_FLAGS"] = " ".join([*flags, f"--xla_force_host_platform_device_count={devices}"])
        env["JAX_PLATFORMS"] = "cpu"
    else:
        env["CUDA_VISIBLE_DEVICES"] = ",".join(str(index * devices + d) for d in range(devices))
    return env


def _wait(procs: list[subprocess.Popen], note) -> int:
    """Waits for every process; -> the highest exit code (128 + N for a process killed by signal N)."""
    codes: dict[int, int] = {}
    while len(codes) < len(procs):
        for i, p in enumerate(procs):
            if i not in codes and p.poll() is not None:
                codes[i] = p.returncode if p.returncode >= 0 else 128 - p.returncode
                how = f"killed by {signal.Signals(-p.returncode).name}" if p.returncode < 0 else ""
                note(f"process {i} exited with code {codes[i]} {how}".rstrip())
        time.sleep(0.05)
    return max(codes.values())


def launch(
    num_processes: int,
    devices_per_process: int,
    train_args: Sequence[str],
    *,
    platform: str = "cpu",
    port: int | None = None,
    log_dir: Path | None = None,
    module: str = "jax_sft.train",
) -> int:
    """Runs the processes to completion (forwarding SIGTERM/SIGUSR1); returns the job's exit code."""
    port = port or free_port()
    start = time.time()
    procs: list[subprocess.Popen] = []
    logs = []
    if log_dir is not None:
        log_dir.mkdir(parents=True, exist_ok=True)

    def note(message: str) -> None:
        print(f"[launch_local] {message} ({time.time() - start:.1f} s)", file=sys.stderr, flush=True)

    def forward(signum: int, frame) -> None:
        note(f"{signal.Signals(signum).name} received: forwarding to every process")
        for p in procs:
            if p.poll() is None:
                p.send_signal(signum)

    previous = {s: signal.signal(s, forward) for s in FORWARDED}
    try:
        for i in range(num_processes):
            args = [f"--coordinator_address=127.0.0.1:{port}", f"--num_processes={num_processes}", f"--process_id={i}"]
            out = None
            if log_dir is not None:
                out = open(log_dir / f"process_{i}.log", "w")  # noqa: SIM115  (closed when the processes end)
                logs.append(out)
            env = process_env(i, devices_per_process, platform, dict(os.environ))
            procs.append(
                subprocess.Popen(
                    [sys.executable, "-m", module, *args, *train_args],
                    env=env,
                    stdout=out,
                    stderr=subprocess.STDOUT if out else None,
                )
            )
            note(f"process {i} started, pid {procs[-1].pid}")
        return _wait(procs, note)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        for p in procs:  # only after an exception in the launcher itself (e.g. Ctrl-C)
            if p.poll() is None:
                p.kill()
                p.wait()
        for f in logs:
            f.close()


USAGE = (
    "usage: python -m jax_sft.launch_local --num_processes N --devices_per_process D "
    "[--platform cpu|gpu] [--port P] [--log_dir DIR] [--module M] -- TRAINER ARGS"
)


def main(argv: Sequence[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if {"-h", "--help"} & set(argv[: argv.index("--")] if "--" in argv else argv):
        print(f"{USAGE}\n\n{__doc__}")
        return
    if "--" not in argv:
        raise SystemExit(USAGE)
    split = argv.index("--")
    parser = argparse.ArgumentParser(
        prog="python -m jax_sft.launch_local", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--num_processes", type=int, required=True)
    parser.add_argument("--devices_per_process", type=int, required=True)
    parser.add_argument("--platform", choices=["cpu", "gpu"], default="cpu")
    parser.add_argument("--port", type=int, default=None, help="coordinator port (default: a free one)")
    parser.add_argument("--log_dir", type=Path, default=None, help="write process_I.log files there")
    parser.add_argument("--module", default="jax_sft.train", help="the module each process runs")
    args = parser.parse_args(argv[:split])
    if args.num_processes < 1 or args.devices_per_process < 1:
        parser.error("--num_processes and --devices_per_process must be >= 1")
    sys.exit(
        launch(
            args.num_processes,
            args.devices_per_process,
            argv[split + 1 :],
            platform=args.platform,
            port=args.port,
            log_dir=args.log_dir,
            module=args.module,
        )
    )


if __name__ == "__main__":
    main()
