"""launch/sft.sbatch on a real Slurm: a one-node cluster on this machine (launch/local_slurm.sh).

Needs Debian's slurm-wlm and munge and root (.ci/run installs them when it can); skipped
otherwise. A tiny Llama trains on the CPU (--gpus-per-node=0):

- time limit: Slurm's --signal=B:USR1 reaches the batch shell, which forwards it through srun;
  the trainer saves and exits 75, the script requeues the job, and restart 1 resumes from that
  checkpoint and ends with the losses of an uninterrupted run;
- scancel of a job of 2 tasks on the one node (the 2-process path in srun's own environment):
  both processes save the same step and exit 75, the job is not requeued, and a new job of 2
  tasks resumes from the checkpoint.

The tiny model trains 20 steps in a couple of seconds, while Slurm's clock is coarse (time limits
in minutes, checked every 30 s). So that a signal arrives mid-run, the test stops the trainer
processes (SIGSTOP) once a checkpoint exists and continues them (SIGCONT) once Slurm's signal is
pending in each of them: the signal then lands on a run in progress, as it does on a long job.
Run with -s to see the job log lines and the loss tables.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from tiny_run import make_tiny_run_assets

from jax_sft import distributed

ROOT = Path(__file__).resolve().parents[1]
SBATCH = ROOT / "launch" / "sft.sbatch"
LOCAL_SLURM = ROOT / "launch" / "local_slurm.sh"
STEPS = 20
SAVE_PERIOD = 4
EXIT = distributed.PREEMPTED_EXIT_CODE

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not all(shutil.which(c) for c in ("sbatch", "slurmctld", "slurmd", "munged")),
        reason="Slurm is not installed (apt-get install slurm-wlm munge; .ci/run does it as root)",
    ),
    pytest.mark.skipif(os.geteuid() != 0, reason="a local Slurm cluster needs root (slurmd)"),
]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory) -> dict[str, str]:
    """A one-node Slurm (launch/local_slurm.sh up); brought down whatever the tests did.
    Returns the environment of a job: SLURM_CONF, the interpreter and CPU-only JAX."""
    state = tmp_path_factory.mktemp("slurm")
    up = subprocess.run([str(LOCAL_SLURM), "up", str(state)], capture_output=True, text=True, timeout=180)
    try:
        assert up.returncode == 0, f"local_slurm.sh up failed:\n{up.stdout}{up.stderr}\n" + "".join(
            f"--- {p.name}\n{p.read_text()[-2000:]}" for p in sorted((state / "log").glob("*.log"))
        )
        env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}  # not a job of another Slurm
        env.update(
            SLURM_CONF=str(state / "slurm.conf"),
            PYTHON=sys.executable,
            JAX_PLATFORMS="cpu",
            XLA_FLAGS="",
            JAX_SFT_XLA_FLAGS="",
            HF_HUB_OFFLINE="1",
            PYTHONPATH=os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p),
        )
        yield env
    finally:
        down = subprocess.run([str(LOCAL_SLURM), "down", str(state)], capture_output=True, text=True, timeout=300)
        status = subprocess.run([str(LOCAL_SLURM), "status", str(state)], capture_output=True, text=True, timeout=30)
        assert down.returncode == 0 and "running" not in status.stdout.replace("not running", ""), (
            f"local_slurm.sh down:\n{down.stdout}{down.stderr}\n{status.stdout}"
        )


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> Path:
    return make_tiny_run_assets(tmp_path_factory.mktemp("assets"))


def trainer_args(assets: Path, run: Path, **extra) -> list[str]:
    """20 steps of 16 sequences, a checkpoint every 4 steps, validation at the end."""
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
        "sft.val_at_end": True,
        "sft.val_batches": 1,
        "sft.val_global_batch_size": 32,
        "sft.val_micro_batch_size": 8,
        "policy.train_global_batch_size": 16,
        "policy.train_micro_batch_size": 4,
        "policy.max_total_sequence_length": 96,
        "policy.jax_cfg.loss_chunk_size": 32,
        "checkpointing.save_period": SAVE_PERIOD,
        "checkpointing.hf_export_dir": None,
        "policy.scheduler": None,
        "cluster.num_nodes": 1,
        "cluster.gpus_per_node": 1,
    }
    base.update({k.replace("__", "."): v for k, v in extra.items()})
    return [
        "--config",
        str(ROOT / "configs" / "quickstart.py"),
        *(f"{k}={'null' if v is None else v}" for k, v in base.items()),
    ]


def metrics(run: Path) -> dict[int, dict[str, float]]:
    """Step -> metrics of every run folder of `run` (a resumed run adds exp_002, ...)."""
    out: dict[int, dict[str, float]] = {}
    for path in sorted((run / "logs").glob("exp_*/metrics.jsonl")):
        for row in map(json.loads, open(path)):
            out.setdefault(row["step"], {}).update(row)
    return out


@pytest.fixture(scope="module")
def reference(assets, cluster, tmp_path_factory) -> dict[int, dict[str, float]]:
    """An uninterrupted run: one process, as the time-limit job but without Slurm."""
    run = tmp_path_factory.mktemp("reference")
    out = subprocess.run(
        [sys.executable, "-m", "jax_sft.train", *trainer_args(assets, run)],
        cwd=ROOT,
        env=cluster,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return metrics(run)


# ----------------------------------------------------------------------------- Slurm helpers


def slurm(env: dict[str, str], *args: str) -> str:
    out = subprocess.run(list(args), cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, f"{' '.join(args)}: {out.stderr}"
    return out.stdout


def submit(env: dict[str, str], log_dir: Path, options: list[str], args: list[str]) -> tuple[int, Path]:
    """sbatch launch/sft.sbatch (from the repository root, as the script expects); (job id, its log)."""
    out = slurm(
        env,
        "sbatch",
        "--parsable",
        f"--output={log_dir}/job-%j.out",
        "--nodes=1",
        "--gpus-per-node=0",
        *options,
        str(SBATCH),
        *args,
    )
    job = int(out.strip().split(";")[0])
    log = log_dir / f"job-{job}.out"
    # The node is idle: a job that does not start at once never will (e.g. Reason=PartitionNodeLimit).
    wait_until(lambda: job_info(env, job)["JobState"] != "PENDING", 30, "the job to start", env, job, log)
    return job, log


def job_info(env: dict[str, str], job: int) -> dict[str, str]:
    """`scontrol show job` as a dict (JobState, Restarts, ExitCode, ...)."""
    text = slurm(env, "scontrol", "show", "job", "--oneliner", str(job))
    return dict(kv.split("=", 1) for kv in text.split() if "=" in kv)


def log_of(path: Path) -> str:
    return path.read_text(errors="replace") if path.exists() else f"({path} not written yet)"


def wait_until(condition, timeout: float, what: str, env: dict[str, str], job: int, log: Path) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(
                f"{what}: not within {timeout} s; job {job}: {job_info(env, job)}\n--- {log}\n{log_of(log)[-4000:]}"
            )
        time.sleep(0.1)


def job_ended(env: dict[str, str], job: int, state: str, timeout: float, log: Path) -> dict[str, str]:
    """Waits for the job to reach a final state; asserts it is `state`."""
    final = {"COMPLETED", "CANCELLED", "FAILED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED"}
    wait_until(lambda: job_info(env, job)["JobState"] in final, timeout, f"job {job} to end", env, job, log)
    info = job_info(env, job)
    assert info["JobState"] == state, f"job {job}: {info}\n--- {log}\n{log_of(log)[-4000:]}"
    return info


def task_pids(env: dict[str, str], job: int, tasks: int, log: Path) -> list[int]:
    """Pids of the trainer processes: the tasks of the job's step 0 (`scontrol listpids`)."""
    found: list[int] = []

    def listed() -> bool:
        rows = [r.split() for r in slurm(env, "scontrol", "listpids", str(job)).splitlines()[1:]]
        found[:] = [int(r[0]) for r in rows if len(r) == 5 and r[2] == "0" and r[3].isdigit()]
        return len(found) == tasks

    wait_until(listed, 30, f"{tasks} task(s) of step 0 in scontrol listpids", env, job, log)
    return found


def pending(pid: int, signum: int) -> bool:
    """Whether `signum` waits to be delivered to the (stopped) process."""
    if not Path(f"/proc/{pid}").exists():
        return False
    status = Path(f"/proc/{pid}/status").read_text()
    masks = [int(m, 16) for m in re.findall(r"^(?:SigPnd|ShdPnd):\s*([0-9a-f]+)$", status, re.M)]
    return any(m >> (signum - 1) & 1 for m in masks)


def stopped(pid: int) -> bool:
    """Whether the process is stopped (SIGSTOP); False once it has exited."""
    stat = Path(f"/proc/{pid}/stat")
    return stat.exists() and stat.read_text().rpartition(")")[2].split()[0] in "Tt"


def pause_until_signalled(env, job: int, pids: list[int], signum: int, log: Path, timeout: float, send=None) -> None:
    """SIGSTOP the trainers, call `send` (what makes Slurm signal them, if anything), wait until
    Slurm's `signum` is pending in each of them (or Slurm continued it: it sends SIGCONT before
    some signals; or a trainer got it just before it stopped), then SIGCONT."""
    name = signal.Signals(signum).name
    for pid in pids:
        os.kill(pid, signal.SIGSTOP)
    try:
        wait_until(lambda: all(stopped(p) for p in pids), 10, f"SIGSTOP to stop {pids}", env, job, log)
        if send is not None:
            send()
        wait_until(
            lambda: (
                all(pending(p, signum) or not stopped(p) for p in pids) or f"[jax_sft] {name} received" in log_of(log)
            ),
            timeout,
            f"{name} pending in the trainer processes {pids}",
            env,
            job,
            log,
        )
        print(
            f"\n{name} reached {pids}: "
            f"{['pending' if pending(p, signum) else 'running (continued by Slurm)' for p in pids]}"
        )
    finally:
        for pid in pids:
            if Path(f"/proc/{pid}").exists():
                os.kill(pid, signal.SIGCONT)


def show(log: str, patterns: list[str]) -> None:
    """Prints the job log lines that match any of the patterns."""
    print("\n".join(line for line in log.splitlines() if any(re.search(p, line) for p in patterns)))


def loss_table(title: str, ref: dict[int, dict[str, float]], got: dict[int, dict[str, float]], steps) -> None:
    print(f"\n{title}\nstep  uninterrupted  on Slurm")
    for s in steps:
        print(f"{s:>4}  {ref[s]['train/loss']:.7f}      {got[s]['train/loss']:.7f}")
    print(f"val {STEPS}  {ref[STEPS]['validation/val_loss']:.7f}  {got[STEPS]['validation/val_loss']:.7f}")


# ----------------------------------------------------------------------------- tests


def test_time_limit_signal_saves_requeues_and_resumes_to_the_uninterrupted_losses(cluster, assets, reference, tmp_path):
    """--time=2 --signal=B:USR1@30: Slurm signals the batch shell 30 s before the limit (up to 30 s
    earlier: slurmctld checks every 30 s), i.e. 60 to 90 s into the job. The script forwards it,
    the trainer saves and exits 75, the script runs `scontrol requeue`, and the job's restart 1
    resumes and completes (within 60 s, before its own warning)."""
    run = tmp_path / "run"
    job, log = submit(
        cluster, tmp_path, ["--job-name=time-limit", "--time=2", "--signal=B:USR1@30"], trainer_args(assets, run)
    )
    warned = "SIGUSR1: time limit near"  # the batch shell's line
    wait_until(
        lambda: (run / "ckpt" / f"step_{SAVE_PERIOD}").is_dir() or warned in log_of(log),
        100,
        f"step_{SAVE_PERIOD} saved",
        cluster,
        job,
        log,
    )
    if warned not in log_of(log):  # else a slow machine: the signal came first, mid-run or not
        [pid] = task_pids(cluster, job, 1, log)
        pause_until_signalled(cluster, job, [pid], signal.SIGUSR1, log, timeout=100)
    info = job_ended(cluster, job, "COMPLETED", 150, log)
    text = log_of(log)

    assert "SIGUSR1 received before the first step" not in text, (
        f"the job had not started training 60-90 s after it started (an overloaded machine?):\n{text[-4000:]}"
    )
    stopped = re.search(r"step (\d+): SIGUSR1 received; saved step_(\d+)", text)
    assert stopped and stopped[1] == stopped[2], text[-4000:]
    step = int(stopped[1])
    assert 1 <= step < STEPS
    assert "SIGUSR1: time limit near" in text
    assert f"srun exited with code {EXIT}" in text
    assert f"requeueing job {job}" in text
    assert f"job {job} (restart 1)" in text
    assert f"resumed from {run / 'ckpt' / f'step_{step}'} (step {step}," in text
    assert info["Restarts"] == "1" and info["ExitCode"] == "0:0", info
    print(f"\njob {job}: {info['JobState']}, Restarts={info['Restarts']}, ExitCode={info['ExitCode']}")
    show(
        text,
        [r"^\[.*\] (job|SIGUSR1|srun exited|requeueing)", r"SIGUSR1 received", r"resumed from", r"step \d+: val_loss"],
    )

    got = metrics(run)
    assert sorted(got) == list(range(1, STEPS + 1))  # every step once: run 1 to `step`, restart 1 after
    loss_table(f"time limit at step {step}, requeued, resumed", reference, got, range(max(step - 1, 1), STEPS + 1))
    # Same process layout, same arithmetic: resuming (weights, AdamW moments, data position) gives
    # the same losses; rtol 1e-6 as test_train's kill -9 test, since XLA's CPU reductions are not
    # guaranteed to be bitwise the same in a new process (seen there: 1e-7 relative).
    np.testing.assert_allclose(
        [got[s]["train/loss"] for s in range(1, STEPS + 1)],
        [reference[s]["train/loss"] for s in range(1, STEPS + 1)],
        rtol=1e-6,
    )
    np.testing.assert_allclose(got[STEPS]["validation/val_loss"], reference[STEPS]["validation/val_loss"], rtol=1e-6)


def test_scancel_of_two_tasks_on_one_node_leaves_a_checkpoint_a_new_job_resumes(cluster, assets, reference, tmp_path):
    """--ntasks-per-node=2: two trainer processes connected through JAX's Slurm detection (srun's
    environment: SLURM_PROCID, SLURM_STEP_NODELIST, ...), one CPU device each. scancel sends
    SIGTERM to both; they save the same step and exit 75; a scancel is not requeued."""
    run = tmp_path / "run"
    args = trainer_args(assets, run, cluster__gpus_per_node=2)
    options = ["--job-name=two-tasks", "--ntasks-per-node=2", "--time=5"]
    job, log = submit(cluster, tmp_path, options, args)
    wait_until(
        lambda: (run / "ckpt" / f"step_{SAVE_PERIOD}").is_dir(), 120, f"step_{SAVE_PERIOD} saved", cluster, job, log
    )
    pids = task_pids(cluster, job, 2, log)
    pause_until_signalled(
        cluster, job, pids, signal.SIGTERM, log, timeout=30, send=lambda: slurm(cluster, "scancel", str(job))
    )
    info = job_ended(cluster, job, "CANCELLED", 90, log)
    text = log_of(log)
    assert "over 2 cpu devices (2 processes)" in text, text[-4000:]
    stopped = re.search(r"step (\d+): SIGTERM received by process(?:es)? [0-9, ]+ of 2; saved step_(\d+)", text)
    assert stopped and stopped[1] == stopped[2], text[-4000:]
    step = int(stopped[1])
    assert SAVE_PERIOD <= step < STEPS
    assert info["Restarts"] == "0", info  # scancel: not requeued
    ckpt = run / "ckpt" / f"step_{step}"
    assert sorted(p.name for p in (ckpt / "data").glob("process_*.json")) == [
        "process_0-of-2.json",
        "process_1-of-2.json",
    ]
    print(f"\njob {job}: {info['JobState']}, Restarts={info['Restarts']}")
    show(text, [r"^\[.*\] (job|SIGTERM|srun exited)", r"SIGTERM received", r"error: \*\*\*"])

    again, log2 = submit(cluster, tmp_path, options, args)
    info = job_ended(cluster, again, "COMPLETED", 150, log2)
    text = log_of(log2)
    assert f"resumed from {ckpt} (step {step}," in text, text[-4000:]
    assert info["ExitCode"] == "0:0", info
    print(f"job {again}: {info['JobState']}")
    show(text, [r"^\[.*\] (job|srun exited)", r"resumed from", r"step \d+: val_loss"])
    got = metrics(run)
    assert sorted(got) == list(range(1, STEPS + 1))
    loss_table(f"2 tasks: scancel at step {step}, new job resumed", reference, got, range(max(step - 1, 1), STEPS + 1))
    # Two processes of one device each against one process: the same batches, summed in another
    # order (fp32 over ~1,000 tokens per step): agreement to a few ulps of the loss, compounded
    # over 20 AdamW steps, as in test_distributed.
    np.testing.assert_allclose(
        [got[s]["train/loss"] for s in range(1, STEPS + 1)],
        [reference[s]["train/loss"] for s in range(1, STEPS + 1)],
        rtol=1e-4,
    )
    np.testing.assert_allclose(got[STEPS]["validation/val_loss"], reference[STEPS]["validation/val_loss"], rtol=1e-4)
