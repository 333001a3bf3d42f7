"""Metrics: analytic FLOPs / MFU, and one logger that writes every sink users look at.

Names follow NeMo RL (train/loss, train/grad_norm, validation/val_loss, timing/train/...).
Sinks: a tqdm progress bar on a terminal (elsewhere: whole lines, at most one every
`PROGRESS_LINE_INTERVAL_S` and at the last step), `metrics.jsonl` in the run folder (one JSON object per line with
"step" and the metric names: the contract scripts read), TensorBoard event files, W&B and
MLflow. Only process 0 writes; other processes get a logger that drops everything.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np

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


def training_flops(model_cfg: Any, sequence_lengths: np.ndarray) -> float:
    """Analytic FLOPs of forward + backward (3x forward) for sequences of the given lengths.

    `model_cfg` is a `jax_sft.models.ModelConfig`. Matmul FLOPs are 2 per multiply-add per token
    over every projection and the LM head; causal attention counts QK^T and AV over the n(n+1)/2
    query-key pairs of a sequence (half of full attention), or fewer in a layer whose sliding
    window W caps the keys per query. Mixture-of-experts layers count their active parameters:
    the router and the top-k experts a token goes through.
    """
    d, hd = model_cfg.hidden_size, model_cfg.head_dim
    q, kv = model_cfg.num_heads * hd, model_cfg.num_kv_heads * hd
    attn = d * q + 2 * d * kv + q * d
    moe_layers = sum(model_cfg.moe_layers) if model_cfg.num_experts else 0
    dense_mlp = 3 * d * model_cfg.intermediate_size
    moe_mlp = d * model_cfg.num_experts + model_cfg.experts_per_token * 3 * d * model_cfg.moe_intermediate_size
    matmul_params = (model_cfg.num_layers * attn + (model_cfg.num_layers - moe_layers) * dense_mlp
                     + moe_layers * moe_mlp + d * model_cfg.vocab_size)
    n = np.asarray(sequence_lengths, np.float64)
    pairs = 0.0
    for window in model_cfg.sliding_windows:
        w = n if window is None else np.minimum(n, window)
        pairs += (n * w - w * (w - 1) / 2).sum()  # = n(n+1)/2 when w = n
    forward = 2 * matmul_params * n.sum() + 2 * 2 * q * pairs
    return 3.0 * forward


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
        self._bar = self._tb = self._wandb = self._mlflow = None
        self._jsonl = None
        if not self.enabled:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._jsonl = open(self.run_dir / "metrics.jsonl", "a", buffering=1)
        self._bar_range = (initial_step, total_steps)  # the bar starts with the first step
        self._terminal = sys.stderr.isatty()
        self._last_line = time.monotonic()  # off a terminal: when the last progress line went out
        if cfg.tensorboard_enabled:
            from tensorboardX import SummaryWriter

            tb_dir = cfg.tensorboard.get("log_dir") or str(self.run_dir / "tensorboard")
            self._tb = SummaryWriter(tb_dir)
        if cfg.wandb_enabled:
            self._wandb = _start_wandb(cfg.wandb, self.run_dir)
        if cfg.mlflow_enabled:
            self._mlflow = _start_mlflow(cfg.mlflow, self.run_dir)

    def log_config(self, config_dict: Mapping[str, Any]) -> None:
        if self._wandb is not None:
            self._wandb.config.update(dict(config_dict), allow_val_change=True)
        if self._mlflow is not None:
            flat = _flatten(config_dict)
            self._mlflow.log_params({k: str(v)[:500] for k, v in flat.items()})

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        if not self.enabled:
            return
        clean = {k: float(v) for k, v in metrics.items() if v is not None and math.isfinite(float(v))}
        self._jsonl.write(json.dumps({"step": step, **clean}) + "\n")
        if self._tb is not None:
            for k, v in clean.items():
                self._tb.add_scalar(k, v, step)
        if self._wandb is not None:
            self._wandb.log(clean, step=step)
        if self._mlflow is not None:
            self._mlflow.log_metrics({k.replace(":", "_"): v for k, v in clean.items()}, step=step)

    def log_text(self, name: str, text: str, step: int) -> None:
        """A block of text (e.g. validation samples) to TensorBoard, W&B and MLflow."""
        if not self.enabled:
            return
        if self._tb is not None:
            self._tb.add_text(name, text, step)
        if self._wandb is not None:
            self._wandb.log({name: self._wandb.Html(f"<pre>{_html_escape(text)}</pre>")}, step=step)
        if self._mlflow is not None:
            self._mlflow.log_text(text, f"{name.replace('/', '_')}_step_{step}.txt")

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
        if self._jsonl is not None:
            self._jsonl.close()
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()
        if self._mlflow is not None:
            self._mlflow.end_run()


def _start_wandb(cfg: Any, run_dir: Path):
    try:
        import wandb
    except ImportError:
        raise RuntimeError(
            "logger.wandb_enabled is true but wandb is not installed: "
            "pip install 'jax_sft[wandb]' or set logger.wandb_enabled=false"
        ) from None
    wandb.init(project=cfg.project, name=cfg.name, dir=str(run_dir))
    return wandb


def _start_mlflow(cfg: Any, run_dir: Path):
    try:
        import mlflow
    except ImportError:
        raise RuntimeError(
            "logger.mlflow_enabled is true but mlflow is not installed: "
            "pip install 'jax_sft[mlflow]' or set logger.mlflow_enabled=false"
        ) from None
    if cfg.get("tracking_uri"):
        mlflow.set_tracking_uri(cfg.tracking_uri)
    else:  # a store in the run folder, its artifacts too (MLflow's default: ./mlruns in the cwd)
        mlflow.set_tracking_uri(f"sqlite:///{os.path.abspath(run_dir / 'mlflow.db')}")
        if mlflow.get_experiment_by_name(cfg.experiment_name) is None:
            mlflow.create_experiment(cfg.experiment_name,
                                     artifact_location=(run_dir / "mlflow_artifacts").resolve().as_uri())
    mlflow.set_experiment(cfg.experiment_name)
    mlflow.start_run(run_name=cfg.run_name)
    return mlflow


def _html_escape(text: str) -> str:
    import html

    return html.escape(text)


def _flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in tree.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out
