"""Orbax checkpoints laid out as NeMo RL's: `checkpoint_dir/step_N` after N optimizer steps.

Each checkpoint holds
  params/       the fp32 master weights (sharded arrays, written by every process)
  opt_state/    the optimizer state (if `checkpointing.save_optimizer`)
  train_info/   JSON: step, epoch, consumed samples, the metrics used for retention
  data/         one JSON per process: the data-iterator state (exact resume; the same on every
                process, so that a run resumes on another number of processes)
  extra/        config.yaml and the tokenizer files (written by process 0)
Saves are asynchronous; Orbax writes into a temporary folder and renames it to step_N only when
every item is complete, so a crash never leaves a half-written step_N. Retention follows NeMo RL:
the newest checkpoint is always kept; of the others, the `keep_top_k` best by `metric_name`
(`higher_is_better`), or the newest `keep_top_k` when no checkpoint carries that metric.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp
from etils import epath
from orbax.checkpoint import checkpoint_managers as policies


@dataclasses.dataclass
class FilesSave(ocp.args.CheckpointArgs):
    """Files (name -> bytes) this process writes into the item's folder."""

    files: Mapping[str, bytes]


@dataclasses.dataclass
class FilesRestore(ocp.args.CheckpointArgs):
    """Names of the files to read back; a missing name raises."""

    names: Sequence[str]


class FilesHandler(ocp.CheckpointHandler):
    """Writes small per-process files (data-iterator state, config, tokenizer) synchronously."""

    def save(self, directory: epath.Path, args: FilesSave):
        directory.mkdir(parents=True, exist_ok=True)
        for name, data in args.files.items():
            (directory / name).parent.mkdir(parents=True, exist_ok=True)
            (directory / name).write_bytes(data)

    def restore(self, directory: epath.Path, args: FilesRestore) -> dict[str, bytes]:
        missing = [n for n in args.names if not (directory / n).exists()]
        if missing:
            raise FileNotFoundError(f"checkpoint folder {directory} lacks {missing}")
        return {n: (directory / n).read_bytes() for n in args.names}

    def metadata(self, directory: epath.Path):
        return None

    def finalize(self, directory: epath.Path):
        pass

    def close(self):
        pass


ocp.args.register_with_handler(FilesHandler, for_save=True)(FilesSave)
ocp.args.register_with_handler(FilesHandler, for_restore=True)(FilesRestore)


def _data_file() -> str:
    return f"process_{jax.process_index()}-of-{jax.process_count()}.json"


@dataclasses.dataclass
class KeepLatestAndTopK(policies.PreservationPolicy):
    """NeMo RL's retention: the newest always; of the rest the k best by metric, else newest k."""

    metric_name: str | None
    higher_is_better: bool
    k: int | None

    def should_preserve(self, checkpoints, *, context) -> list[bool]:
        if self.k is None:
            return [True] * len(checkpoints)
        order = sorted(range(len(checkpoints)), key=lambda i: checkpoints[i].step)
        newest, rest = order[-1:], order[:-1]

        def score(i):
            metrics = checkpoints[i].metrics or {}
            value = metrics.get(self.metric_name) if self.metric_name else None
            if value is None:  # no metric: rank below every measured checkpoint, newer first
                return (0, checkpoints[i].step)
            return (1, value if self.higher_is_better else -value)

        keep = set(newest) | set(sorted(rest, key=score, reverse=True)[: self.k])
        return [i in keep for i in range(len(checkpoints))]


class Checkpointer:
    """Saves and restores training state under `checkpoint_dir` (see module docstring)."""

    def __init__(self, cfg: Any, *, enable_async: bool = True):
        self.dir = Path(cfg.checkpoint_dir).absolute()
        self.save_optimizer = bool(cfg.save_optimizer)
        self.metric_name = _metric_key(cfg.metric_name)
        options = ocp.CheckpointManagerOptions(
            step_prefix="step",
            enable_async_checkpointing=enable_async,
            preservation_policy=KeepLatestAndTopK(
                self.metric_name, bool(cfg.higher_is_better), cfg.keep_top_k
            ),
            create=True,
        )
        self._manager = ocp.CheckpointManager(
            epath.Path(self.dir),
            options=options,
            item_handlers={
                "params": ocp.StandardCheckpointHandler(),
                "opt_state": ocp.StandardCheckpointHandler(),
                "train_info": ocp.JsonCheckpointHandler(),
                "data": FilesHandler(),
                "extra": FilesHandler(),
            },
        )

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def step_dir(self, step: int) -> Path:
        return self.dir / f"step_{step}"

    def save(
        self,
        step: int,
        *,
        params: Any,
        opt_state: Any,
        train_info: Mapping[str, Any],
        data_state: Mapping[str, Any],
        extra_files: Mapping[str, bytes],
        metrics: Mapping[str, float] | None = None,
    ) -> None:
        """Starts an async save of step_`step`; every process must call it."""
        items = {
            "params": ocp.args.StandardSave(params),
            "train_info": ocp.args.JsonSave(dict(train_info)),
            "data": FilesSave({_data_file(): json.dumps(data_state).encode()}),
            "extra": FilesSave(dict(extra_files) if jax.process_index() == 0 else {}),
        }
        if self.save_optimizer:
            items["opt_state"] = ocp.args.StandardSave(opt_state)
        self._manager.save(
            step, args=ocp.args.Composite(**items), metrics=dict(metrics or {}), force=True
        )

    def restore(
        self, step: int, *, abstract_params: Any, abstract_opt_state: Any | None, with_data: bool = True
    ) -> tuple[Any, Any | None, dict[str, Any], dict[str, Any] | None]:
        """(params, opt_state or None, train_info, this process's data state) of step_`step`.

        `abstract_*` are pytrees of jax.ShapeDtypeStruct carrying the target shardings, so each
        process reads only the shards its devices hold.
        """
        items = {
            "params": ocp.args.StandardRestore(abstract_params),
            "train_info": ocp.args.JsonRestore(),
        }
        data_file = self._saved_data_file(step)
        if with_data:
            items["data"] = FilesRestore([data_file])
        has_opt = (self.step_dir(step) / "opt_state").exists()
        if abstract_opt_state is not None and has_opt:
            items["opt_state"] = ocp.args.StandardRestore(abstract_opt_state)
        restored = self._manager.restore(step, args=ocp.args.Composite(**items))
        data_state = json.loads(restored["data"][data_file]) if with_data else None
        opt_state = restored["opt_state"] if "opt_state" in items else None
        return restored["params"], opt_state, dict(restored["train_info"]), data_state

    def _saved_data_file(self, step: int) -> str:
        """This process's data-state file; when the checkpoint was saved by another number of
        processes, process 0's: the state is global (the next step of the layout-independent
        stream, jax_sft.data.pipeline.TrainIterator), so a run resumes on any layout."""
        own, folder = _data_file(), self.step_dir(step) / "data"
        if (folder / own).exists():
            return own
        saved = sorted(folder.glob("process_0-of-*.json"))
        return saved[0].name if saved else own

    def wait(self) -> None:
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()


def _metric_key(metric_name: str | None) -> str | None:
    """NeMo RL's "val:val_loss" (or older "val_loss") -> the key the trainer records."""
    if not metric_name:
        return None
    return metric_name if ":" in metric_name else f"val:{metric_name}"
