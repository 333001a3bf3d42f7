"""Multi-process training on this machine: JAX's distributed runtime on 127.0.0.1 with CPU devices.

2 processes x 2 devices against 1 process x 4 devices, SIGTERM to one process (all save the same
step, exit 75, a rerun resumes), kill -9 of one process (the other fails within a bounded time,
a rerun resumes), the Slurm start-up path, the launchers and the sbatch script.
Run with -s to see the loss tables and timings.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file
from tiny_run import make_tiny_run_assets

from jax_sft import config as config_lib
from jax_sft import distributed, train

ROOT = Path(__file__).resolve().parents[1]
STEPS = 10
HEARTBEAT_S = 10  # --heartbeat_timeout_seconds of the kill -9 test


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> Path:
    """A tiny Llama with a BPE tokenizer, and 512/64 arithmetic conversations (as test_train)."""
    return make_tiny_run_assets(tmp_path_factory.mktemp("assets"))


def overrides(assets: Path, run: Path, **extra) -> list[str]:
    """Trainer overrides: 10 steps of 16 sequences (micro-batches of 4 rows per device), a save
    every 4 steps; no validation unless asked (it does not change the training losses)."""
    base = {
        "policy.model_name": assets / "model",
        "data.train_data_path": assets / "data" / "train.jsonl",
        "data.val_data_path": assets / "data" / "val.jsonl",
        "checkpointing.checkpoint_dir": run / "ckpt",
        "logger.log_dir": run / "logs",
        "logger.tensorboard_enabled": False,
        "sft.max_num_steps": STEPS,
        "sft.val_period": 0,
        "sft.val_at_start": False,
        "sft.val_at_end": False,
        "sft.val_batches": 1,
        "sft.val_global_batch_size": 32,
        "sft.val_micro_batch_size": 8,
        "policy.train_global_batch_size": 16,
        "policy.train_micro_batch_size": 4,
        "policy.max_total_sequence_length": 96,
        "policy.jax_cfg.loss_chunk_size": 32,
        "checkpointing.save_period": 4,
        "checkpointing.hf_export_dir": None,
        "policy.scheduler": None,
        "cluster.num_nodes": 2,
        "cluster.gpus_per_node": 2,
    }
    base.update({k.replace("__", "."): v for k, v in extra.items()})
    return [
        "--config",
        str(ROOT / "configs" / "quickstart.py"),
        *(f"{k}={'null' if v is None else v}" for k, v in base.items()),
    ]


def losses(run_dir: Path, key: str = "train/loss") -> dict[int, float]:
    return {r["step"]: r[key] for r in map(json.loads, open(run_dir / "metrics.jsonl")) if key in r}


def run_dirs(run: Path) -> list[Path]:
    return sorted((run / "logs").glob("exp_*"))


class Launch:
    """`python -m jax_sft.launch_local` in the background; its `[launch_local]` lines are
    recorded with the time they arrived (pids, exit codes)."""

    def __init__(
        self,
        args: list[str],
        log_dir: Path,
        *,
        processes: int = 2,
        devices: int = 2,
        module: str = "jax_sft.train",
        env: dict | None = None,
    ):
        cmd = [
            sys.executable,
            "-m",
            "jax_sft.launch_local",
            f"--num_processes={processes}",
            f"--devices_per_process={devices}",
            f"--log_dir={log_dir}",
            f"--module={module}",
            "--",
            *args,
        ]
        self.log_dir = log_dir
        self.lines: list[tuple[float, str]] = []
        self.proc = subprocess.Popen(
            cmd,
            cwd=ROOT,
            env={**os.environ, **(env or {})},
            stderr=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            text=True,
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self):
        for line in self.proc.stderr:
            self.lines.append((time.monotonic(), line.rstrip()))

    def _find(self, pattern: str, timeout: float = 60) -> tuple[float, re.Match]:
        deadline = time.monotonic() + timeout
        while True:
            for t, line in list(self.lines):
                if m := re.search(pattern, line):
                    return t, m
            if time.monotonic() > deadline:
                break
            time.sleep(0.02)
        raise AssertionError(f"no line matching {pattern!r} within {timeout} s:\n{self.output()}")

    def pid(self, i: int) -> int:
        return int(self._find(rf"process {i} started, pid (\d+)")[1].group(1))

    def exited(self, i: int) -> tuple[float, int]:
        """(monotonic time the launcher saw process i exit, its exit code)."""
        t, m = self._find(rf"process {i} exited with code (\d+)", timeout=0)
        return t, int(m.group(1))

    def wait(self, timeout: float = 240) -> int:
        rc = self.proc.wait(timeout=timeout)
        self._reader.join(timeout=5)
        return rc

    def log(self, i: int) -> str:
        return (self.log_dir / f"process_{i}.log").read_text(errors="replace")

    def output(self) -> str:
        tails = [
            f"--- process {i} ---\n{self.log(i)[-3000:]}"
            for i in range(2)
            if (self.log_dir / f"process_{i}.log").exists()
        ]
        return "\n".join([line for _, line in self.lines] + tails)


def wait_for(path: Path, launch: Launch, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert launch.proc.poll() is None, f"ended before {path} appeared:\n{launch.output()}"
        assert time.monotonic() < deadline, f"{path} did not appear in {timeout} s:\n{launch.output()}"
        time.sleep(0.02)


def saved_steps(ckpt: Path) -> list[int]:
    """Steps of the complete checkpoints (Orbax renames step_N.orbax-checkpoint-tmp-* when done)."""
    return sorted(int(p.name[5:]) for p in ckpt.glob("step_*") if p.name[5:].isdigit())


@pytest.fixture(scope="module")
def reference(assets, tmp_path_factory) -> Path:
    """An uninterrupted 2 processes x 2 devices run (with validation and the HF export)."""
    run = tmp_path_factory.mktemp("two_by_two")
    args = overrides(assets, run, sft__val_period=5, sft__val_at_start=True, checkpointing__hf_export_dir=run / "hf")
    launch = Launch(args, run / "processes")
    assert launch.wait() == 0, launch.output()
    return run


# ----------------------------------------------------------------------------- training


def test_two_processes_match_one_process_with_four_devices(assets, reference, tmp_path):
    cfg = config_lib.load_config(
        str(ROOT / "configs" / "quickstart.py"),
        overrides(
            assets,
            tmp_path,
            sft__val_period=5,
            sft__val_at_start=True,
            cluster__num_nodes=1,
            cluster__gpus_per_node=4,
            checkpointing__hf_export_dir=tmp_path / "hf",
        )[2:],
    )
    one = train.run(cfg)
    [two_dir] = run_dirs(reference)  # process 1 created no run folder of its own
    two = losses(two_dir)
    assert sorted(two) == list(range(1, STEPS + 1))  # one row per step: only process 0 writes
    print("\nstep  1 process x 4 devices   2 processes x 2 devices")
    for s in sorted(two):
        print(f"{s:>4}  {one.train_losses[s]:.7f}             {two[s]:.7f}")
    two_val = losses(two_dir, "validation/val_loss")
    for s in sorted(two_val):
        print(f"val {s:>2}  {one.val_losses[s]:.7f}             {two_val[s]:.7f}")
    np.testing.assert_allclose([two[s] for s in sorted(two)], [one.train_losses[s] for s in sorted(two)], rtol=1e-4)
    np.testing.assert_allclose(
        [two_val[s] for s in sorted(two_val)], [one.val_losses[s] for s in sorted(two_val)], rtol=1e-4
    )
    assert sorted(two_val) == [0, 5, 10]
    # Token counts are summed over processes, not extrapolated from process 0's share.
    one_toks = losses(one.run_dir, "train/global_valid_toks")
    assert losses(two_dir, "train/global_valid_toks") == one_toks
    # The HF export: gathered from both processes, written once by process 0.
    a, b = load_file(str(reference / "hf" / "model.safetensors")), load_file(str(tmp_path / "hf" / "model.safetensors"))
    assert sorted(a) == sorted(b)
    for name in a:
        np.testing.assert_allclose(a[name], b[name], rtol=1e-4, atol=1e-6, err_msg=name)
    assert (reference / "hf" / "config.json").is_file()
    assert not [p for p in reference.iterdir() if p.name.startswith(".hf.")]  # no temporary folders left
    # Each process stored its own data-iterator state in every checkpoint.
    assert saved_steps(reference / "ckpt")[-1] == STEPS
    assert sorted(p.name for p in (reference / "ckpt" / "step_10" / "data").glob("*.json")) == [
        "_FILES.process_0-of-2.json",  # each process lists the files it wrote (checkpoint_verify)
        "_FILES.process_1-of-2.json",
        "process_0-of-2.json",
        "process_1-of-2.json",
    ]


def test_sigterm_to_one_process_saves_the_same_step_on_both_and_resumes(assets, reference, tmp_path):
    args = overrides(assets, tmp_path)
    ckpt = tmp_path / "ckpt"
    launch = Launch(args, tmp_path / "first")
    wait_for(ckpt / "step_4", launch)
    sent = time.monotonic()
    os.kill(launch.pid(1), signal.SIGTERM)  # the other process only learns it from process 1
    assert launch.wait() == distributed.PREEMPTED_EXIT_CODE, launch.output()
    (t0, rc0), (t1, rc1) = launch.exited(0), launch.exited(1)
    assert rc0 == rc1 == distributed.PREEMPTED_EXIT_CODE
    stopped = saved_steps(ckpt)[-1]
    assert 4 <= stopped < STEPS
    assert max(losses(run_dirs(tmp_path)[0])) == stopped  # saved the step it stopped after
    assert f"SIGTERM received by process 1 of 2; saved step_{stopped}" in launch.log(0)
    assert sorted(p.name for p in (ckpt / f"step_{stopped}" / "data").glob("*.json")) == [
        "_FILES.process_0-of-2.json",  # each process lists the files it wrote (checkpoint_verify)
        "_FILES.process_1-of-2.json",
        "process_0-of-2.json",
        "process_1-of-2.json",
    ]

    again = Launch(args, tmp_path / "second")
    assert again.wait() == 0, again.output()
    assert f"resumed from {ckpt / f'step_{stopped}'}" in again.log(0)
    resumed, straight = losses(run_dirs(tmp_path)[-1]), losses(run_dirs(reference)[0])
    assert sorted(resumed) == list(range(stopped + 1, STEPS + 1))
    print(
        f"\nSIGTERM to process 1 after step_4 was saved: both stopped after step {stopped}, exit code "
        f"{rc0}, {max(t0, t1) - sent:.1f} s after the signal\nstep  uninterrupted  resumed"
    )
    for s in sorted(resumed):
        print(f"{s:>4}  {straight[s]:.7f}      {resumed[s]:.7f}")
    np.testing.assert_allclose([resumed[s] for s in sorted(resumed)], [straight[s] for s in sorted(resumed)], rtol=1e-6)


def test_kill_9_of_one_process_ends_the_other_and_a_rerun_resumes(assets, reference, tmp_path):
    args = overrides(assets, tmp_path) + [f"--heartbeat_timeout_seconds={HEARTBEAT_S}"]
    ckpt = tmp_path / "ckpt"
    launch = Launch(args, tmp_path / "first")
    wait_for(ckpt / "step_4", launch)
    killed = time.monotonic()
    os.kill(launch.pid(1), signal.SIGKILL)
    launch.wait(timeout=HEARTBEAT_S + 120)
    t0, rc0 = launch.exited(0)
    survivor = launch.log(0)
    assert rc0 != 0, launch.output()
    assert re.search(r"heartbeat timeout|detected fatal errors|another task died", survivor), survivor[-3000:]
    took = t0 - killed
    print(
        f"\nkill -9 of process 1: process 0 exited with code {rc0} {took:.1f} s later "
        f"(--heartbeat_timeout_seconds={HEARTBEAT_S})"
    )
    assert took < HEARTBEAT_S + 60
    last = saved_steps(ckpt)[-1]
    assert 4 <= last < STEPS

    again = Launch(args, tmp_path / "second")
    assert again.wait() == 0, again.output()
    assert f"resumed from {ckpt / f'step_{last}'}" in again.log(0)
    resumed, straight = losses(run_dirs(tmp_path)[-1]), losses(run_dirs(reference)[0])
    assert sorted(resumed) == list(range(last + 1, STEPS + 1))
    np.testing.assert_allclose([resumed[s] for s in sorted(resumed)], [straight[s] for s in sorted(resumed)], rtol=1e-6)


def test_sigusr1_in_a_single_process_saves_and_returns_the_exit_code(assets, tmp_path):
    cfg = config_lib.load_config(
        str(ROOT / "configs" / "quickstart.py"),
        overrides(assets, tmp_path, cluster__num_nodes=1, cluster__gpus_per_node=1, sft__max_num_steps=100)[2:],
    )  # 100: ample time for the signal

    def signal_after_step_4():
        while not (tmp_path / "ckpt" / "step_4").exists():
            time.sleep(0.01)
        os.kill(os.getpid(), signal.SIGUSR1)

    threading.Thread(target=signal_after_step_4, daemon=True).start()
    previous = signal.getsignal(signal.SIGUSR1)
    result = train.run(cfg)
    assert signal.getsignal(signal.SIGUSR1) is previous  # handlers restored
    assert result.exit_code == distributed.PREEMPTED_EXIT_CODE
    assert result.stopped_early == "SIGUSR1 received"
    assert 4 <= result.final_step < 100 and saved_steps(tmp_path / "ckpt")[-1] == result.final_step


# ----------------------------------------------------------------------------- start-up


def test_nothing_initialises_a_jax_backend_before_distributed_initialize():
    code = """
import importlib, pkgutil, jax_sft
for m in pkgutil.walk_packages(jax_sft.__path__, "jax_sft."):
    importlib.import_module(m.name)
from jax_sft import config, distributed
path, overrides, extra = config.parse_args(["--config", "configs/sft.py", "sft.max_num_steps=3"])
config.load_config(path, overrides)
distributed.parse_flags(extra)
from jax._src import xla_bridge
print("initialised:", xla_bridge.backends_are_initialized())
"""
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "initialised: False" in out.stdout


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_slurm_one_task_per_node_sees_all_its_devices_and_a_mismatch_names_both_numbers():
    code = """
import jax
from ml_collections import ConfigDict
from jax_sft import distributed
distributed.initialize({}, gpus_per_node=2)
print("process", jax.process_index(), "of", jax.process_count(), "devices", jax.device_count(),
      "local", jax.local_device_count(), "cuda_visible", jax.config.values["jax_cuda_visible_devices"])
try:
    distributed.select_devices(ConfigDict(dict(num_nodes=2, gpus_per_node=4)))
except ValueError as e:
    print("error:", e)
"""
    port = free_port()
    procs = []
    for i in range(2):
        env = {
            **os.environ,
            "JAX_PLATFORMS": "cpu",
            "XLA_FLAGS": "--xla_force_host_platform_device_count=2",
            "SLURM_JOB_ID": "4242",
            "SLURM_PROCID": str(i),
            "SLURM_LOCALID": "0",
            "SLURM_NODEID": str(i),
            "SLURM_STEP_NODELIST": "localhost",
            "SLURM_NTASKS": "2",
            "SLURM_STEP_NUM_TASKS": "2",
            "SLURM_STEP_NUM_NODES": "2",
            "SLURM_NNODES": "2",
            "JAX_COORDINATOR_PORT": str(port),
        }
        procs.append(
            subprocess.Popen(
                [sys.executable, "-c", code],
                cwd=ROOT,
                env=env,
                text=True,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
            )
        )
    outs = [p.communicate(timeout=120) for p in procs]
    for i, (out, err) in enumerate(outs):
        assert procs[i].returncode == 0, err[-3000:]
        # JAX's Slurm default would restrict each task to one GPU (cuda_visible 0).
        assert f"process {i} of 2 devices 4 local 2 cuda_visible 0,1" in out, out + err[-2000:]
        assert (
            "error: cluster.num_nodes * cluster.gpus_per_node = 2 * 4 = 8, but the 2 processes have "
            "4 devices (2 on this one)"
        ) in out


def test_slurm_detection_and_local_device_ids(monkeypatch):
    for k in [k for k in os.environ if k.startswith("SLURM_") or k == "JAX_LOCAL_DEVICE_IDS"]:
        monkeypatch.delenv(k)
    assert not distributed.under_slurm()
    step = {"SLURM_JOB_ID": "1", "SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_STEP_NODELIST": "n[1-2]"}
    for k, v in {**step, "SLURM_NTASKS": "1"}.items():
        monkeypatch.setenv(k, v)
    assert not distributed.under_slurm()  # a single task: a single process
    monkeypatch.setenv("SLURM_STEP_NUM_TASKS", "2")
    monkeypatch.setenv("SLURM_STEP_NUM_NODES", "2")
    assert distributed.under_slurm()
    assert distributed.slurm_local_device_ids(8) == list(range(8))
    monkeypatch.setenv("SLURM_STEP_NUM_TASKS", "16")  # a task per GPU: JAX's default (SLURM_LOCALID)
    assert distributed.slurm_local_device_ids(8) is None
    monkeypatch.setenv("SLURM_STEP_NUM_TASKS", "2")
    monkeypatch.setenv("JAX_LOCAL_DEVICE_IDS", "0,1")
    assert distributed.slurm_local_device_ids(8) is None  # the user's choice wins


@pytest.mark.parametrize(
    "extra, message",
    [
        ({"num_processes": "2"}, "missing --coordinator_address, --process_id"),
        ({"coordinator_adress": "h:1"}, "unknown command-line flag(s) --coordinator_adress"),
        ({"coordinator_address": "host"}, "--coordinator_address=host: expected HOST:PORT"),
        (
            {"coordinator_address": "h:1", "num_processes": "two", "process_id": "0"},
            "--num_processes=two: expected an integer",
        ),
        (
            {"coordinator_address": "h:1", "num_processes": "2", "process_id": "2"},
            "--process_id=2 must be below --num_processes=2",
        ),
        ({"process_id": True}, "--process_id needs a value"),
        ({"heartbeat_timeout_seconds": "10"}, "only apply to a multi-process run"),
    ],
)
def test_bad_distributed_flags_fail_with_the_flag(extra, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        distributed.initialize(extra)


def test_train_main_rejects_an_unknown_flag_before_reading_the_config(capsys):
    with pytest.raises(SystemExit) as exit_info:  # an input error: one line, exit 2
        train.main(["--config", "does/not/exist.py", "--num_process=2"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.startswith("error: unknown command-line flag(s) --num_process;")


# ----------------------------------------------------------------------------- launchers


def test_launch_local_forwards_sigterm_and_exits_with_the_preempted_code(tmp_path):
    launch = Launch(
        ["--config", "unused.py"],
        tmp_path,
        module="signal_probe",
        env={"PYTHONPATH": os.pathsep.join([str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")])},
    )
    deadline = time.monotonic() + 60
    while not all((tmp_path / f"process_{i}.log").exists() and "ready" in launch.log(i) for i in range(2)):
        assert launch.proc.poll() is None and time.monotonic() < deadline, launch.output()
        time.sleep(0.02)
    launch.proc.send_signal(signal.SIGTERM)
    assert launch.wait(timeout=60) == distributed.PREEMPTED_EXIT_CODE, launch.output()
    for i in range(2):
        assert f"ready process {i} of 2" in launch.log(i)
        assert f"stopping on signal {int(signal.SIGTERM)}" in launch.log(i)
        assert launch.exited(i)[1] == distributed.PREEMPTED_EXIT_CODE


SBATCH = ROOT / "launch" / "sft.sbatch"


def test_sbatch_parses_and_its_dry_run_prints_the_srun_command():
    assert subprocess.run(["bash", "-n", str(SBATCH)]).returncode == 0
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update(DRY_RUN="1", NODES="2", GPUS_PER_NODE="8", XLA_FLAGS="--xla_dump_to=/tmp/x")
    out = subprocess.run(
        ["bash", str(SBATCH), "--config", "configs/sft.py", "policy.model_name=org/My Model"],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.returncode == 0, out.stderr
    srun = next(line for line in out.stdout.splitlines() if line.startswith("srun "))
    assert srun.split() == [
        "srun",
        "--nodes=2",
        "--ntasks-per-node=1",
        "--kill-on-bad-exit=1",
        "python",
        "-m",
        "jax_sft.train",
        "cluster.num_nodes=2",
        "cluster.gpus_per_node=8",
        "--config",
        "configs/sft.py",
        "policy.model_name=org/My\\",
        "Model",  # printed shell-quoted
    ]
    xla = next(line for line in out.stdout.splitlines() if line.startswith("XLA_FLAGS="))
    assert "--xla_gpu_enable_latency_hiding_scheduler=true" in xla and xla.endswith(" --xla_dump_to=/tmp/x")
    # Every flag of the tuned set exists in this jaxlib (an unknown flag aborts the backend).
    flags = xla.removeprefix("XLA_FLAGS=").replace("--xla_dump_to=/tmp/x", "")
    check = subprocess.run(
        [sys.executable, "-c", "import jax; jax.numpy.zeros(1).block_until_ready()"],
        env={**os.environ, "XLA_FLAGS": flags, "JAX_PLATFORMS": "cpu"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert check.returncode == 0, check.stderr[-2000:]

    # T tasks per node (sbatch --ntasks-per-node) share the node's CPUs.
    out = subprocess.run(
        ["bash", str(SBATCH)],
        env={**env, "TASKS_PER_NODE": "2", "SLURM_CPUS_ON_NODE": "96"},
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert "srun --nodes=2 --ntasks-per-node=2 --kill-on-bad-exit=1 --cpus-per-task=48 python " in out.stdout, out

    env.update(CONTAINER_IMAGE="nvcr.io/nvidia/jax:25.10-py3", CPUS_PER_TASK="64", PYTHON="python3")
    out = subprocess.run(["bash", str(SBATCH), "x.y=1"], env=env, capture_output=True, text=True, timeout=30)
    srun = next(line for line in out.stdout.splitlines() if line.startswith("srun "))
    assert (
        f"--cpus-per-task=64 --container-image=nvcr.io/nvidia/jax:25.10-py3 --container-mounts={ROOT}:{ROOT} "
        f"--container-workdir={ROOT} python3 -m jax_sft.train"
    ) in srun


FAKE_SRUN = """#!/bin/bash
echo "$@" > "$FAKE/srun_args"
trap 'echo USR1 >> "$FAKE/signals"; exit 75' USR1
touch "$FAKE/started"
for _ in $(seq "$FAKE_TENTHS"); do sleep 0.1; done
exit 0
"""


@pytest.mark.parametrize("signalled", [True, False])
def test_sbatch_forwards_usr1_to_srun_and_requeues(tmp_path, signalled):
    """Slurm's time-limit signal reaches the batch shell (--signal=B:USR1): it must reach the
    trainer through srun, and the job must be requeued only then (srun and scontrol are fakes)."""
    (tmp_path / "srun").write_text(FAKE_SRUN)
    (tmp_path / "scontrol").write_text('#!/bin/bash\necho "$@" >> "$FAKE/scontrol_args"\n')
    for name in ("srun", "scontrol"):
        (tmp_path / name).chmod(0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update(
        PATH=f"{tmp_path}{os.pathsep}{env['PATH']}",
        FAKE=str(tmp_path),
        SLURM_JOB_ID="77",
        SLURM_JOB_NUM_NODES="2",
        SLURM_GPUS_PER_NODE="h100:8",
        SLURM_SUBMIT_DIR=str(ROOT),
        FAKE_TENTHS="300" if signalled else "5",
    )
    job = subprocess.Popen(
        ["bash", str(SBATCH), "--config", "c.py"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    deadline = time.monotonic() + 30
    while not (tmp_path / "started").exists():
        assert job.poll() is None and time.monotonic() < deadline, job.communicate()[0]
        time.sleep(0.02)
    if signalled:
        job.send_signal(signal.SIGUSR1)
    out, _ = job.communicate(timeout=60)
    srun_args = (tmp_path / "srun_args").read_text().split()
    assert srun_args[:3] == ["--nodes=2", "--ntasks-per-node=1", "--kill-on-bad-exit=1"]
    assert "cluster.gpus_per_node=8" in srun_args  # "h100:8" from the allocation
    if signalled:
        assert job.returncode == distributed.PREEMPTED_EXIT_CODE, out
        assert (tmp_path / "signals").read_text() == "USR1\n"
        assert (tmp_path / "scontrol_args").read_text() == "requeue 77\n", out
    else:
        assert job.returncode == 0, out
        assert not (tmp_path / "scontrol_args").exists()


def test_saved_on_two_processes_resumes_on_one_with_four_devices(assets, reference, tmp_path):
    """The data position is global: a run saved on 2 processes x 2 devices continues on 1 x 4 with
    the losses of the uninterrupted 2 x 2 run (to the cross-layout tolerance of the test above)."""
    first = Launch(overrides(assets, tmp_path, sft__max_num_steps=4), tmp_path / "first")
    assert first.wait() == 0, first.output()
    assert saved_steps(tmp_path / "ckpt")[-1] == 4
    cfg = config_lib.load_config(
        str(ROOT / "configs" / "quickstart.py"),
        overrides(assets, tmp_path, cluster__num_nodes=1, cluster__gpus_per_node=4)[2:],
    )
    resumed = train.run(cfg).train_losses
    straight = losses(run_dirs(reference)[0])
    assert sorted(resumed) == list(range(5, STEPS + 1))
    print("\nstep  uninterrupted 2x2  resumed on 1x4 from step_4 of a 2x2 run")
    for s in sorted(resumed):
        print(f"{s:>4}  {straight[s]:.7f}          {resumed[s]:.7f}")
    np.testing.assert_allclose([resumed[s] for s in sorted(resumed)], [straight[s] for s in sorted(resumed)], rtol=1e-4)


def test_lora_on_two_processes_matches_one_process_and_exports_peft(assets, tmp_path):
    """LoRA (every linear layer, packed rows) on 2 processes x 2 devices: the losses of 1 process
    x 4 devices, one lora.json in the checkpoint, and a PEFT export gathered from both processes
    equal to the single-process one."""
    lora = dict(
        sft__max_num_steps=4,
        policy__sequence_packing__enabled=True,
        policy__dtensor_cfg__lora_cfg__enabled=True,
        policy__dtensor_cfg__lora_cfg__dim=4,
        policy__dtensor_cfg__lora_cfg__alpha=8,
    )
    launch = Launch(overrides(assets, tmp_path / "two", **lora), tmp_path / "two" / "processes")
    assert launch.wait() == 0, launch.output()
    cfg = config_lib.load_config(
        str(ROOT / "configs" / "quickstart.py"),
        overrides(assets, tmp_path / "one", cluster__num_nodes=1, cluster__gpus_per_node=4, **lora)[2:],
    )
    one = train.run(cfg)
    [two_dir] = run_dirs(tmp_path / "two")
    two = losses(two_dir)
    print("\nLoRA step  1 process x 4 devices   2 processes x 2 devices")
    for s in sorted(two):
        print(f"{s:>9}  {one.train_losses[s]:.7f}             {two[s]:.7f}")
    np.testing.assert_allclose([two[s] for s in sorted(two)], [one.train_losses[s] for s in sorted(two)], rtol=1e-4)
    assert (tmp_path / "two" / "ckpt" / "step_4" / "extra" / "lora.json").is_file()
    export = [sys.executable, "-m", "jax_sft.export", "--checkpoint"]
    for run in ("one", "two"):
        proc = subprocess.run(
            [*export, str(tmp_path / run / "ckpt" / "step_4"), "--peft_out", str(tmp_path / run / "peft")],
            capture_output=True,
            text=True,
            env={**os.environ, "XLA_FLAGS": ""},
            timeout=300,
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
    a = load_file(str(tmp_path / "one" / "peft" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "two" / "peft" / "adapter_model.safetensors"))
    assert sorted(a) == sorted(b) and any(k.endswith("lm_head.lora_B.weight") for k in a)
    for name in a:
        np.testing.assert_allclose(b[name], a[name], rtol=1e-4, atol=1e-6, err_msg=name)
