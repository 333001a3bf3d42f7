"""Metrics: peak FLOP/s for the MFU, device memory, and the run's logger: a tqdm progress bar on a
terminal (elsewhere: whole lines, at most one every `PROGRESS_LINE_INTERVAL_S` and at the last
step) in front of the sinks of `jax_sft.sinks` (metrics.jsonl, TensorBoard, W&B, MLflow). Only
process 0 writes; other processes get a logger that drops everything. The analytic FLOPs of a step
are the model family's (`ModelConfig.training_flops`).
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jax

from jax_sft.sinks import Sink, open_sinks

# Dense peak TFLOP/s per device by matmul dtype (bf16 tensor cores; fp32 = TF32 tensor cores,
# which XLA uses for fp32 matmuls on these GPUs at default precision). Matched by substring of
# `device.device_kind`, first match wins, so more specific names come first.
PEAK_TFLOPS: Sequence[tuple[str, dict[str, float]]] = (
    ("H100 PCIe", {"bfloat16": 756.0, "float32": 378.0}),
    ("H100", {"bfloat16": 989.0, "float32": 494.0}),
    ("H200", {"bfloat16": 989.0, "float32": 494.0}),
    ("GH200", {"bfloat16": 989.0, "float32": 494.0}),
    ("B200", {"bfloat16": 2250.0, "float32": 1100.0}),
    ("A100", {"bfloat16": 312.0, "float32": 156.0}),
    ("L40S", {"bfloat16": 362.0, "float32": 183.0}),
    ("A10G", {"bfloat16": 125.0, "float32": 62.5}),
)


def peak_flops_per_device(device: jax.Device, precision: str) -> float | None:
    """Dense peak FLOP/s of `device` for `precision`, or None where unknown (e.g. CPU)."""
    for name, peaks in PEAK_TFLOPS:
        if name in device.device_kind:
            return peaks[precision] * 1e12
    return None


def peak_memory_bytes() -> int | None:
    """Peak bytes in use on this process's first device, where the backend reports it."""
    stats = jax.local_devices()[0].memory_stats()
    return None if not stats else int(stats.get("peak_bytes_in_use", 0)) or None


PROGRESS_LINE_INTERVAL_S = 30.0  # off a terminal (log files: Slurm, CI), progress lines this far apart


def quiet_library_progress_bars() -> None:
    """Off a terminal, turns off the progress bars of `datasets` and `huggingface_hub` (their
    carriage-return updates clutter log files); on a terminal, leaves them."""
    if sys.stderr.isatty():
        return
    import datasets
    import huggingface_hub

    datasets.disable_progress_bars()
    huggingface_hub.utils.disable_progress_bars()


class MetricsLogger:
    """Writes metric dicts to every enabled sink. Use `log(metrics, step)`; call `close()`."""

    def __init__(self, cfg: Any, run_dir: Path, *, total_steps: int, initial_step: int = 0):
        self.enabled = jax.process_index() == 0
        self.run_dir = Path(run_dir)
        self._bar = None
        self.sinks: list[Sink] = []
        if not self.enabled:
            return
        self.sinks = open_sinks(cfg, self.run_dir)
        self._bar_range = (initial_step, total_steps)  # the bar starts with the first step
        self._terminal = sys.stderr.isatty()
        self._last_line = time.monotonic()  # off a terminal: when the last progress line went out

    def log_config(self, config_dict: Mapping[str, Any]) -> None:
        for sink in self.sinks:
            sink.config(config_dict)

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        clean = {k: float(v) for k, v in metrics.items() if v is not None and math.isfinite(float(v))}
        for sink in self.sinks:
            sink.scalars(clean, step)

    def log_text(self, name: str, text: str, step: int) -> None:
        """A block of text (e.g. validation samples) to the sinks that take text."""
        for sink in self.sinks:
            sink.text(name, text, step)

    def progress(self, step: int, metrics: Mapping[str, float]) -> None:
        """Advance the console bar to `step` and show loss, lr and throughput; off a terminal,
        print that as one line when PROGRESS_LINE_INTERVAL_S has passed, and at the last step."""
        if not self.enabled:
            return
        shown = {
            "loss": metrics.get("train/loss"),
            "lr": metrics.get("train/lr"),
            "tok/s": metrics.get("timing/train/tokens_per_sec"),
            "val": metrics.get("validation/val_loss"),
        }
        shown = {k: (f"{v:.3g}" if k != "tok/s" else f"{v:,.0f}") for k, v in shown.items() if v is not None}
        initial, total = self._bar_range
        if not self._terminal:
            now = time.monotonic()
            if now - self._last_line >= PROGRESS_LINE_INTERVAL_S or step >= total:
                self._last_line = now
                values = ", ".join(f"{k} {v}" for k, v in shown.items())
                print(f"step {step}/{total}: {values}", file=sys.stderr, flush=True)
            return
        if self._bar is None:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True, mininterval=0.1)
        self._bar.set_postfix(shown, refresh=False)
        self._bar.update(step - self._bar.n)

    def write(self, message: str) -> None:
        """Print a line without breaking the progress bar (process 0 only)."""
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.write(message)
        else:
            print(message, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        for sink in self.sinks:
            sink.close()
