"""A checkpoint save that runs out of space: recognising ENOSPC / EDQUOT however Orbax or
TensorStore wrap it (`is_disk_full`), and keeping the noise a failed asynchronous save makes out
of the user's terminal (`QuietFailedWrites`), so that the trainer says it once, in one line
(`jax_sft.checkpoint.CheckpointDiskFull`)."""

from __future__ import annotations

import errno
import logging
import re
import sys
import threading


def is_disk_full(error: BaseException) -> bool:
    """Whether `error` (or what it wraps) is ENOSPC / EDQUOT. TensorStore reports it inside a
    ValueError as "... No space left on device [os_error_code='28']"."""
    codes = (errno.ENOSPC, errno.EDQUOT)
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno in codes:
            return True
        if _DISK_FULL_TEXT.search(str(error)):
            return True
        error = error.__cause__ or error.__context__
    return False


_DISK_FULL_TEXT = re.compile(
    rf"No space left on device|Disk quota exceeded|os_error_code='({errno.ENOSPC}|{errno.EDQUOT})'"
)


def _closed_loop(error: BaseException | None) -> bool:
    return isinstance(error, RuntimeError) and str(error) == "Event loop is closed"


class QuietFailedWrites:
    """While installed: Orbax's ERROR logs of a disk-full write are dropped (the trainer says it
    once, in CheckpointDiskFull), and so is the noise its unfinished TensorStore writes make after
    a failed save: "Event loop is closed" tracebacks from TensorStore's callbacks (through
    sys.excepthook, threading.excepthook or sys.unraisablehook), asyncio's "Task exception was
    never retrieved" for disk-full tasks, and, once a disk-full error was seen, the complaints of
    never-finished write coroutines at exit (sys.unraisablehook).
    Everything else passes on unchanged."""

    def __init__(self):
        self.seen = False
        self._filter = logging.Filter()
        self._filter.filter = self._keep
        self._hooks = (sys.excepthook, sys.unraisablehook, threading.excepthook)

    def _keep(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        if _DISK_FULL_TEXT.search(record.getMessage()) or (error is not None and is_disk_full(error)):
            self.seen = True
            return False
        return True

    def _excepthook(self, kind, error, tb):
        if not _closed_loop(error):
            self._hooks[0](kind, error, tb)

    def _thread_excepthook(self, args):
        if not _closed_loop(args.exc_value):
            self._hooks[2](args)

    def _unraisablehook(self, info):
        if not (_closed_loop(info.exc_value) or (self.seen and type(info.object).__name__ == "coroutine")):
            self._hooks[1](info)

    def install(self) -> None:
        for name in ("absl", "asyncio"):
            logging.getLogger(name).addFilter(self._filter)
        sys.excepthook, sys.unraisablehook = self._excepthook, self._unraisablehook
        threading.excepthook = self._thread_excepthook

    def uninstall(self) -> None:
        """Restores logging and the hooks, unless a disk-full save failed: its leftovers are
        still to be collected (at exit)."""
        if self.seen:
            return
        for name in ("absl", "asyncio"):
            logging.getLogger(name).removeFilter(self._filter)
        sys.excepthook, sys.unraisablehook, threading.excepthook = self._hooks


def size_text(nbytes: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if nbytes < 1000 or unit == "TB":
            return f"{nbytes:.0f} {unit}" if unit == "B" else f"{nbytes:.1f} {unit}"
        nbytes /= 1000
    raise AssertionError("unreachable")
