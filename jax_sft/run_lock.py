"""One run per checkpoint_dir: a lock file that process 0 takes at start-up and drops at exit.

`checkpoint_dir/.jax_sft.lock` holds JSON {host, pid, slurm_job_id, started}; a thread refreshes
its mtime every `HEARTBEAT_S` seconds while the run lives. A second run on the same folder
refuses at once (`RunLocked`, naming the holder) unless the lock is stale:

- its host is this host and its pid is dead, or
- its mtime is older than `STALE_AFTER_S` (the holder stopped refreshing it: killed, host lost),

or it belongs to the same Slurm job (`SLURM_JOB_ID`: a requeued job resumes its own run). A
stale lock is taken over with a warning. Taking and taking over are atomic (O_EXCL create;
rename of the stale file aside), so of two runs started together exactly one gets the lock.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import warnings
from pathlib import Path

from jax_sft.errors import InputError

LOCK_NAME = ".jax_sft.lock"
HEARTBEAT_S = 30.0
STALE_AFTER_S = 600.0


class RunLocked(InputError, RuntimeError):
    """Another live run holds the checkpoint_dir's lock."""


class StaleLockWarning(UserWarning):
    """A dead run's lock was taken over."""


def _holder() -> dict:
    return {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def _describe(info: dict) -> str:
    job = f", Slurm job {info['slurm_job_id']}" if info.get("slurm_job_id") else ""
    return f"pid {info.get('pid')} on {info.get('host')}{job}, started {info.get('started')}"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    return True


def stale_reason(info: dict, age_s: float) -> str | None:
    """Why the lock described by `info` (mtime `age_s` seconds ago) may be taken, else None."""
    me = _holder()
    if info.get("host") == me["host"] and isinstance(info.get("pid"), int) and not _pid_alive(info["pid"]):
        return "its process is dead"
    if age_s > STALE_AFTER_S:
        return f"its heartbeat stopped {age_s:.0f} s ago (> {STALE_AFTER_S:.0f} s)"
    if me["slurm_job_id"] and info.get("slurm_job_id") == me["slurm_job_id"]:
        return f"it belongs to this Slurm job {me['slurm_job_id']} (requeued)"
    return None


class RunLock:
    """`with RunLock(checkpoint_dir):` holds the lock for the block (see module docstring)."""

    def __init__(self, directory: str | os.PathLike):
        self.path = Path(directory).absolute() / LOCK_NAME
        self.info = _holder()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.lost: str | None = None  # set by the heartbeat when another run replaced the lock

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(3):  # a lost race with another starter retries
            if self._create():
                break
            info, age = self._read()
            if info is None:  # vanished between our attempts
                continue
            reason = stale_reason(info, age)
            if reason is None:
                raise RunLocked(
                    f"{self.path.parent} is in use by another run ({_describe(info)}); two runs on one "
                    f"checkpointing.checkpoint_dir overwrite each other's checkpoints. Wait for it to "
                    f"end, or use another checkpoint_dir. If that run is dead, delete {self.path}"
                )
            if self._take_over(info):
                warnings.warn(
                    f"took over the lock {self.path} of {_describe(info)}: {reason}", StaleLockWarning, stacklevel=2
                )
                break
        else:
            raise RunLocked(f"{self.path}: could not take the lock (other runs keep taking it); retry")
        self._thread = threading.Thread(target=self._heartbeat, name="jax_sft-lock-heartbeat", daemon=True)
        self._thread.start()

    def _create(self) -> bool:
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:
            json.dump(self.info, f)
        return True

    def _read(self) -> tuple[dict | None, float]:
        try:
            text, age = self.path.read_text(), time.time() - self.path.stat().st_mtime
        except FileNotFoundError:
            return None, 0.0
        try:
            info = json.loads(text)
        except json.JSONDecodeError:  # a writer between create and dump, or garbage
            info = {"host": "?", "pid": None, "started": "?", "unreadable": text[:80]}
        return (info if isinstance(info, dict) else {"unreadable": text[:80]}), age

    def _take_over(self, stale: dict) -> bool:
        """Moves the stale lock aside (only one starter's rename succeeds) and creates ours."""
        aside = self.path.with_name(f"{LOCK_NAME}.stale-{os.getpid()}")
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return self._create()
        try:
            moved = json.loads(aside.read_text())
        except (OSError, json.JSONDecodeError):
            moved = None
        if moved is not None and moved != stale and not self.path.exists():
            os.rename(aside, self.path)  # it was a fresh lock of a faster starter: give it back
            return False
        aside.unlink(missing_ok=True)
        return self._create()

    def _heartbeat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            if not self.owned():
                self.lost = f"the lock {self.path} was taken by another run"
                return
            os.utime(self.path)

    def owned(self) -> bool:
        info, _ = self._read()
        return info == self.info

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if self.owned():
            self.path.unlink()

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
