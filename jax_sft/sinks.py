"""Where metrics go: one small interface, one class per sink, one table picking them from the
config (`logger.*_enabled`). Adding a sink is a class and a row of `SINKS`.

    problems = sink_problems(cfg.logger)          # before any data or model work (and --dry_run)
    sinks = open_sinks(cfg.logger, run_dir)       # metrics.jsonl always, then the enabled ones
    for sink in sinks: sink.scalars({"train/loss": 2.1}, step=10)

Each sink class has a `check(cfg)` (what keeps it from starting: a missing package, a missing
W&B login) and `folders(cfg)` (config key -> folder it writes outside the run folder), so that a
run refuses in its first seconds, with one line, what it would otherwise fail on after loading
the data and the model.

Names follow NeMo RL (train/loss, train/grad_norm, validation/val_loss, timing/train/...);
`metrics.jsonl` (one JSON object per line with "step" and the metric names) is the contract that
scripts read. Only process 0 opens sinks (`jax_sft.metrics.MetricsLogger`).
"""

from __future__ import annotations

import html
import importlib.util
import json
import netrc
import os
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlsplit

__all__ = [
    "Sink",
    "JsonlSink",
    "TensorBoardSink",
    "WandbSink",
    "MlflowSink",
    "SINKS",
    "open_sinks",
    "sink_problems",
    "sink_folders",
    "tensorboard_dir",
]


def _installed(module: str) -> bool:
    if module in sys.modules:  # imported, or blocked (None)
        return sys.modules[module] is not None
    return importlib.util.find_spec(module) is not None


def _not_installed(module: str, key: str, package: str) -> list[str]:
    if _installed(module):
        return []
    return [f"logger.{key}=true but {module} is not installed: pip install '{package}' or set logger.{key}=false"]


class Sink(Protocol):
    """A destination of the run's metrics. `scalars` gets finite floats only."""

    label: str  # its name in messages

    def scalars(self, metrics: Mapping[str, float], step: int) -> None: ...

    def text(self, name: str, text: str, step: int) -> None: ...

    def config(self, config: Mapping[str, Any]) -> None: ...

    def close(self) -> None: ...

    @staticmethod
    def check(cfg: Any) -> list[str]:
        """Problems that keep the sink from starting with the logger section `cfg` (none: [])."""
        ...

    @staticmethod
    def folders(cfg: Any) -> dict[str, Path]:
        """Config key -> folder the sink writes besides the run folder."""
        ...


class JsonlSink:
    """run_dir/metrics.jsonl, one line per `scalars` call (line-buffered: readable while training)."""

    label = "metrics.jsonl"

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


def tensorboard_dir(cfg: Any, run_dir: Path) -> Path:
    """Where the TensorBoard events of a run go: logger.tensorboard.log_dir, else run_dir/tensorboard."""
    return Path(cfg.tensorboard.get("log_dir") or run_dir / "tensorboard")


class TensorBoardSink:
    """TensorBoard event files in `tensorboard_dir` (logger.tensorboard.log_dir, else run_dir/tensorboard)."""

    label = "TensorBoard"

    def __init__(self, cfg: Any, run_dir: Path):
        from tensorboardX import SummaryWriter  # noqa: PLC0415  (only when enabled)

        self.log_dir = tensorboard_dir(cfg, run_dir)
        self._writer = SummaryWriter(str(self.log_dir))

    @staticmethod
    def check(cfg: Any) -> list[str]:
        return _not_installed("tensorboardX", "tensorboard_enabled", "tensorboardX")

    @staticmethod
    def folders(cfg: Any) -> dict[str, Path]:
        given = cfg.tensorboard.get("log_dir")
        return {"logger.tensorboard.log_dir": Path(given)} if given else {}

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

    label = "W&B"

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

    @staticmethod
    def check(cfg: Any) -> list[str]:
        return _not_installed("wandb", "wandb_enabled", "jax_sft[wandb]") or _wandb_login_problems()

    @staticmethod
    def folders(cfg: Any) -> dict[str, Path]:
        return {}  # the run folder

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

    label = "MLflow"

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

    @staticmethod
    def check(cfg: Any) -> list[str]:
        return _not_installed("mlflow", "mlflow_enabled", "jax_sft[mlflow]")

    @staticmethod
    def folders(cfg: Any) -> dict[str, Path]:
        uri = cfg.mlflow.get("tracking_uri") or ""
        local = uri.startswith("file:") or (uri and "://" not in uri)
        return {"logger.mlflow.tracking_uri": Path(uri.removeprefix("file://").removeprefix("file:"))} if local else {}

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


def sink_problems(cfg: Any) -> list[str]:
    """What keeps the sinks that `cfg` (the logger section) enables from starting, one line each."""
    return [p for key, sink in SINKS if cfg.get(key) for p in sink.check(cfg)]


def sink_folders(cfg: Any) -> dict[str, Path]:
    """Config key -> folder, of what the enabled sinks write besides the run folder."""
    return {k: v for key, sink in SINKS if cfg.get(key) for k, v in sink.folders(cfg).items()}


_WANDB_OFF = ("offline", "dryrun", "disabled")


def _wandb_login_problems() -> list[str]:
    """A W&B run needs a login (what `wandb login` writes to ~/.netrc, or WANDB_API_KEY /
    WANDB_IDENTITY_TOKEN_FILE), unless WANDB_MODE is offline or disabled."""
    if os.environ.get("WANDB_MODE", "").lower() in _WANDB_OFF:
        return []
    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return []
    host = urlsplit(os.environ.get("WANDB_BASE_URL") or "https://api.wandb.ai").netloc
    path = Path(os.environ.get("NETRC") or "~/.netrc").expanduser()
    try:
        entry = netrc.netrc(str(path)).authenticators(host)
    except (OSError, netrc.NetrcParseError):
        entry = None
    if entry and entry[2]:
        return []
    return [
        f"logger.wandb_enabled=true but no W&B login was found (no WANDB_API_KEY, no {host} entry in {path}): "
        "run `wandb login` or set WANDB_API_KEY, set WANDB_MODE=offline to log locally, or set "
        "logger.wandb_enabled=false"
    ]


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
