"""The run lock of checkpoint_dir: refuse a live holder, take over a dead or silent one."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import pytest

from jax_sft import run_lock
from jax_sft.run_lock import LOCK_NAME, RunLock, RunLocked, StaleLockWarning


def write_lock(directory, **info):
    holder = {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "slurm_job_id": None,
        "started": "2026-01-01T00:00:00+0000",
        **info,
    }
    (directory / LOCK_NAME).write_text(json.dumps(holder))
    return holder


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_a_live_holder_is_refused_with_its_description(tmp_path, monkeypatch):
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    write_lock(tmp_path, slurm_job_id="777")
    with pytest.raises(
        RunLocked,
        match=rf"in use by another run \(pid {os.getpid()} on {socket.gethostname()}, "
        r"Slurm job 777, started 2026-01-01",
    ):
        RunLock(tmp_path).acquire()
    assert json.loads((tmp_path / LOCK_NAME).read_text())["slurm_job_id"] == "777"  # untouched


@pytest.mark.parametrize("case", ["dead pid", "old heartbeat", "same slurm job"])
def test_a_stale_lock_is_taken_over_with_a_warning(tmp_path, monkeypatch, case):
    monkeypatch.setenv("SLURM_JOB_ID", "42")
    if case == "dead pid":
        write_lock(tmp_path, pid=dead_pid())
        reason = "its process is dead"
    elif case == "old heartbeat":
        write_lock(tmp_path, host="another-host")
        old = time.time() - run_lock.STALE_AFTER_S - 5
        os.utime(tmp_path / LOCK_NAME, (old, old))
        reason = "its heartbeat stopped"
    else:
        write_lock(tmp_path, host="another-host", slurm_job_id="42")
        reason = "this Slurm job 42"
    with pytest.warns(StaleLockWarning, match=reason), RunLock(tmp_path) as lock:
        assert json.loads((tmp_path / LOCK_NAME).read_text()) == lock.info
        assert lock.info["pid"] == os.getpid() and lock.info["slurm_job_id"] == "42"
    assert not (tmp_path / LOCK_NAME).exists()  # released
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # the stale file moved aside is gone too


def test_a_live_lock_on_another_host_is_refused(tmp_path, monkeypatch):
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    write_lock(tmp_path, host="another-host", pid=dead_pid())  # a pid we cannot check there
    with pytest.raises(RunLocked, match="on another-host"):
        RunLock(tmp_path).acquire()


def test_heartbeat_refreshes_and_notices_a_takeover(tmp_path, monkeypatch):
    monkeypatch.setattr(run_lock, "HEARTBEAT_S", 0.05)
    lock = RunLock(tmp_path)
    lock.acquire()
    try:
        old = time.time() - 1000
        os.utime(lock.path, (old, old))
        deadline = time.time() + 10
        while lock.path.stat().st_mtime < time.time() - 100 and time.time() < deadline:
            time.sleep(0.01)
        assert lock.path.stat().st_mtime > time.time() - 100  # refreshed
        write_lock(tmp_path, pid=12345678)  # another run took it over
        while lock.lost is None and time.time() < deadline:
            time.sleep(0.01)
        assert lock.lost and "taken by another run" in lock.lost
    finally:
        lock.release()
    assert json.loads(lock.path.read_text())["pid"] == 12345678  # not ours: left alone


def test_two_starters_at_once_get_one_lock(tmp_path):
    code = (
        "import sys, time; from jax_sft.run_lock import RunLock, RunLocked\n"
        "try:\n    l = RunLock(sys.argv[1]); l.acquire(); print('got', flush=True); time.sleep(2); l.release()\n"
        "except RunLocked as e:\n    print('refused', flush=True)\n"
    )
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code, str(tmp_path)],
            stdout=subprocess.PIPE,
            text=True,
            env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
        )
        for _ in range(4)
    ]
    outputs = sorted(p.communicate(timeout=60)[0].strip() for p in procs)
    assert outputs == ["got", "refused", "refused", "refused"]
