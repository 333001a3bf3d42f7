"""Where metrics go: one small interface, one class per sink, one table picking them from the
config (`logger.*_enabled`). Adding a sink is a class and a row of `SINKS`.

    sinks = open_sinks(cfg.logger, run_dir)       # metrics.jsonl always, then the enabled ones
    for sink in sinks: sink.scalars({"train/loss": 2.1}, step=10)

Names follow NeMo RL (train/loss, train/grad_norm, validation/val_loss, timing/train/...);
`metrics.jsonl` (one JSON object per line with "step" and the metric names) is the contract that
scripts read. Only process 0 opens sinks (`jax_sft.metrics.MetricsLogger`).
"""

from __future__ import annotations

import html
import json
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Protocol

__all__ = ["Sink", "JsonlSink", "TensorBoardSink", "WandbSink", "MlflowSink", "SINKS", "open_sinks"]


class Sink(Protocol):
    """A destination of the run's metrics. `scalars` gets finite floats only."""

    def scalars(self, metrics: Mapping[str, float], step: int) -> None: ...

    def text(self, name: str, text: str, step: int) -> None: ...

    def config(self, config: Mapping[str, Any]) -> None: ...

    def close(self) -> None: ...


class JsonlSink:
    """run_dir/metrics.jsonl, one line per `scalars` call (line-buffered: readable while training)."""

    def __init__(self, run_dir: Path):
        self._file = open(run_dir / "metrics.jsonl", "a", buffering=1)  # noqa: SIM115  (closed in close())

    def scalars(self, metrics: Mapping[str, float], step: int) -> None:
        self._file.write(json.dumps({"step": step, **metrics}) + "\n")

    def text(self, name: str, text: str, step: int) -> None:
        pass  # metrics.jsonl holds numbers only

    def config(self, config: Mapping[str, Any]) -> None:
        pass  # the run folder's config.yaml holds it

    def close(self) -> None:
        self._file.close()


class TensorBoardSink:
    """TensorBoard event files in logger.tensorboard.log_dir, else run_dir/tensorboard."""

    def __init__(self, cfg: Any, run_dir: Path):
        from tensorboardX import SummaryWriter  # noqa: PLC0415  (only when enabled)

        self.log_dir = Path(cfg.tensorboard.get("log_dir") or run_dir / "tensorboard")
        self._writer = SummaryWriter(str(self.log_dir))

    def scalars(self, metrics: Mapping[str, float], step: int) -> None:
        for k, v in metrics.items():
            self._writer.add_scalar(k, v, step)

    def text(self, name: str, text: str, step: int) -> None:
        self._writer.add_text(name, text, step)

    def config(self, config: Mapping[str, Any]) -> None:
        pass

    def close(self) -> None:
        self._writer.close()


class WandbSink:
    """Weights & Biases: project logger.wandb.project, run name logger.wandb.name, files in run_dir."""

    def __init__(self, cfg: Any, run_dir: Path):
        try:
            import wandb  # noqa: PLC0415  (an optional dependency)
        except ImportError:
            raise RuntimeError(
                "logger.wandb_enabled is true but wandb is not installed: "
                "pip install 'jax_sft[wandb]' or set logger.wandb_enabled=false"
            ) from None
        wandb.init(project=cfg.wandb.project, name=cfg.wandb.name, dir=str(run_dir))
        self._wandb = wandb

    def scalars(self, metrics: Mapping[str, float], step: int) -> None:
        self._wandb.log(dict(metrics), step=step)

    def text(self, name: str, text: str, step: int) -> None:
        self._wandb.log({name: self._wandb.Html(f"<pre>{html.escape(text)}</pre>")}, step=step)

    def config(self, config: Mapping[str, Any]) -> None:
        self._wandb.config.update(dict(config), allow_val_change=True)

    def close(self) -> None:
        self._wandb.finish()


class MlflowSink:
    """MLflow: logger.mlflow.tracking_uri, else a sqlite store and artifacts in the run folder
    (MLflow's default would be ./mlruns in the working directory)."""

    def __init__(self, cfg: Any, run_dir: Path):
        try:
            import mlflow  # noqa: PLC0415  (an optional dependency)
        except ImportError:
            raise RuntimeError(
                "logger.mlflow_enabled is true but mlflow is not installed: "
                "pip install 'jax_sft[mlflow]' or set logger.mlflow_enabled=false"
            ) from None
        m = cfg.mlflow
        if m.get("tracking_uri"):
            mlflow.set_tracking_uri(m.tracking_uri)
        else:
            mlflow.set_tracking_uri(f"sqlite:///{os.path.abspath(run_dir / 'mlflow.db')}")
            if mlflow.get_experiment_by_name(m.experiment_name) is None:
                mlflow.create_experiment(
                    m.experiment_name, artifact_location=(run_dir / "mlflow_artifacts").resolve().as_uri()
                )
        mlflow.set_experiment(m.experiment_name)
        mlflow.start_run(run_name=m.run_name)
        self._mlflow = mlflow

    def scalars(self, metrics: Mapping[str, float], step: int) -> None:
        self._mlflow.log_metrics({k.replace(":", "_"): v for k, v in metrics.items()}, step=step)

    def text(self, name: str, text: str, step: int) -> None:
        self._mlflow.log_text(text, f"{name.replace('/', '_')}_step_{step}.txt")

    def config(self, config: Mapping[str, Any]) -> None:
        self._mlflow.log_params({k: str(v)[:500] for k, v in _flatten(config).items()})

    def close(self) -> None:
        self._mlflow.end_run()


# logger.<key> -> the sink it enables, in the order they are opened (metrics.jsonl is always first).
SINKS: tuple[tuple[str, Callable[[Any, Path], Sink]], ...] = (
    ("tensorboard_enabled", TensorBoardSink),
    ("wandb_enabled", WandbSink),
    ("mlflow_enabled", MlflowSink),
)


def open_sinks(cfg: Any, run_dir: Path) -> list[Sink]:
    """metrics.jsonl and every sink `cfg` (the logger section) enables, writing under `run_dir`."""
    run_dir.mkdir(parents=True, exist_ok=True)
    sinks: list[Sink] = [JsonlSink(run_dir)]
    try:
        sinks += [sink(cfg, run_dir) for key, sink in SINKS if cfg.get(key)]
    except BaseException:
        for sink in sinks:
            sink.close()
        raise
    return sinks


def _flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in tree.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out
