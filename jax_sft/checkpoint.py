"""Orbax checkpoints laid out as NeMo RL's: `checkpoint_dir/step_N` after N optimizer steps.

Each checkpoint holds
  params/       the fp32 master weights (sharded arrays, written by every process)
  opt_state/    the optimizer state (if `checkpointing.save_optimizer`)
  fp8/          the FP8 amax histories (delayed-scaling FP8 runs only)
  train_info/   JSON: step, epoch, consumed samples, the metrics used for retention
  data/         one JSON per process: the data-iterator state (exact resume; the same on every
                process, so that a run resumes on another number of processes)
  extra/        config.yaml and the tokenizer files (written by process 0)
Saves are asynchronous; Orbax writes into a temporary folder and renames it to step_N only when
every item is complete (each item and step_N itself then hold a `commit_success.txt`), so a crash
never leaves a half-written step_N. Retention follows NeMo RL: the newest checkpoint is always
kept; of the others, the `keep_top_k` best by `metric_name` (`higher_is_better`), or the newest
`keep_top_k` when no checkpoint carries that metric. A retired checkpoint is first renamed into
`checkpoint_dir/.deleted/` (atomic) and only then deleted, so a kill during a deletion never
leaves a half-deleted step_N. Only complete checkpoints (`incomplete_reason` is None: committed,
and every file each item's metadata lists is there, `checkpoint_verify`) are resumed, exported or
sampled from; at start-up a training run renames any other step_N to incomplete_step_N (kept for
inspection, out of the way of a new save of that step), with an `IncompleteCheckpointWarning`
naming what is missing, and resumes from the newest intact one.

This module owns the layout: `step_dir` / `parse_step` name and read `step_N` folders,
`complete_steps` lists the committed ones, `set_aside` renames a folder out of the way (kept, never
resumed), `restore_params` reads one step's parameters read-only, `is_checkpoint_folder` says what
an export must never touch, and `extra/`'s files (the model's HF config: `model_files` /
`saved_model_config` / `model_mismatch`, a LoRA run's base: `lora_reference`) are written and read
here. Callers pass explicit arguments, never the run config.

A save that fails for lack of space (ENOSPC / EDQUOT, however Orbax or TensorStore wrap it)
raises `CheckpointDiskFull` with a one-line message: the partial step is removed, the earlier
checkpoints are kept.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import shutil
import tempfile
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp
from etils import epath
from orbax.checkpoint import checkpoint_managers as policies

from jax_sft import checkpoint_verify
from jax_sft.checkpoint_shapes import restore_args, vocab_resized
from jax_sft.disk_full import QuietFailedWrites, is_disk_full, size_text
from jax_sft.errors import InputError, RunFailure
from jax_sft.models.config import ModelConfig

STEP_PREFIX = "step"  # step_N
TRASH = ".deleted"  # Orbax renames the checkpoints retention retires into this subfolder
COMMIT_FILE = "commit_success.txt"  # Orbax writes it last into each item and into step_N
ARRAY_HANDLER = "StandardCheckpointHandler"
JSON_HANDLER = "JsonCheckpointHandler"
REQUIRED_ITEMS = ("params", "train_info", "data", "extra")
MODEL_CONFIG = "model/config.json"  # extra/: the model's HF config (export and generate read it)
GENERATION_CONFIG = "model/generation_config.json"
LORA_FILE = "lora.json"  # extra/ of a LoRA run: its settings and base (`models.options.base_reference`)
CONFIG_FILE = "config.yaml"  # extra/: the run's config
TOKENIZER_DIR = "tokenizer"  # extra/: the tokenizer's files


class CheckpointDiskFull(RunFailure):
    """A checkpoint could not be written: no space left (or quota exceeded). Earlier checkpoints
    are kept and the partial one is removed; the message says which path and how much was needed."""


class IncompleteCheckpoint(InputError, ValueError):
    """A step_N folder asked for by name is not a complete, committed checkpoint."""


class CheckpointMismatch(InputError, ValueError):
    """checkpoint_dir holds a run that this config cannot continue (LoRA vs full fine-tuning,
    another base model, other LoRA settings)."""


class IncompleteCheckpointWarning(UserWarning):
    """A step_N folder under checkpoint_dir is incomplete and is skipped (never resumed)."""


def incomplete_reason(step_dir: Path) -> str | None:
    """None when `step_dir` is a complete committed checkpoint with every file it lists, else what
    is missing.

    Checks the markers Orbax writes last (step_N/commit_success.txt, and per item), the items
    named in _CHECKPOINT_METADATA, and each item's files against its own metadata
    (`checkpoint_verify`): for array items the OCDBT manifests and every data file their b-trees
    reference, for files items (data/, extra/) the files each process listed.
    """
    if not (step_dir / COMMIT_FILE).is_file():
        return f"no {COMMIT_FILE} (the save never finished or the folder was partly deleted)"
    try:
        handlers = json.loads((step_dir / "_CHECKPOINT_METADATA").read_text())["item_handlers"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"_CHECKPOINT_METADATA is missing or unreadable ({type(e).__name__})"
    missing = [name for name in REQUIRED_ITEMS if name not in handlers]
    if missing:
        return f"_CHECKPOINT_METADATA lacks the items {missing}"
    for name, handler in handlers.items():
        problem = _item_problem(step_dir / name, str(handler))
        if problem:
            return problem
    return None


def _item_problem(item: Path, handler: str) -> str | None:
    needed = [COMMIT_FILE]
    if handler.endswith(ARRAY_HANDLER):
        needed += ["_METADATA", "manifest.ocdbt"]
        needed += [f"{p.name}/manifest.ocdbt" for p in item.glob("ocdbt.process_*")]
    elif handler.endswith(JSON_HANDLER):
        needed.append("metadata")  # the handler's one file
    absent = [f for f in needed if not (item / f).is_file()]
    if absent:
        return f"{item.name}/ lacks {', '.join(absent)}"
    if handler.endswith(ARRAY_HANDLER):
        if not any(item.glob("ocdbt.process_*/d/*")):
            return f"{item.name}/ holds no array data (ocdbt.process_*/d/ is empty)"
        return checkpoint_verify.ocdbt_problem(item)
    if handler.endswith(FilesHandler.__name__):
        return checkpoint_verify.listed_files_problem(item)
    return None


# ----------------------------------------------------------------------------- the layout


def step_dir(directory: str | Path, step: int) -> Path:
    """directory/step_N."""
    return Path(directory) / f"{STEP_PREFIX}_{step}"


def parse_step(path: str | Path) -> int | None:
    """N of a `step_N` folder name, None for any other name."""
    name = Path(path).name
    number = name.removeprefix(f"{STEP_PREFIX}_")
    return int(number) if number != name and number.isdigit() else None


def step_folders(directory: str | Path) -> dict[int, Path]:
    """{N: directory/step_N} of the step_N folders under `directory`, complete or not, by step."""
    found = {parse_step(p): p for p in Path(directory).glob(f"{STEP_PREFIX}_*") if p.is_dir()}
    return {k: found[k] for k in sorted(k for k in found if k is not None)}


def complete_steps(directory: str | Path) -> list[int]:
    """The steps under `directory` whose folders are complete, committed checkpoints."""
    return [k for k, path in step_folders(directory).items() if incomplete_reason(path) is None]


def set_aside(path: Path, prefix: str, *, rename: bool = True) -> Path:
    """Renames `path` to `<prefix>_<name>` beside it (".1", ".2", ... when taken): kept, but never
    resumed or exported. Returns the new path; `rename` False only names it (the processes that
    are not process 0)."""
    aside = next(
        a for i in range(1000) if not (a := path.with_name(f"{prefix}_{path.name}{f'.{i}' if i else ''}")).exists()
    )
    if rename:
        path.rename(aside)
    return aside


def complete_step_dir(path: str | Path) -> Path:
    """The absolute step_N folder `path`; IncompleteCheckpoint when it is none or incomplete."""
    path = Path(path).absolute()
    if parse_step(path) is None or not path.is_dir():
        raise IncompleteCheckpoint(
            f"{path}: not a jax_sft checkpoint; pass a step_N folder under checkpointing.checkpoint_dir"
        )
    reason = incomplete_reason(path)
    if reason is not None:
        raise IncompleteCheckpoint(
            f"{path}: incomplete checkpoint ({reason}); use another, complete step_N of {path.parent}"
        )
    return path


def extra_path(path: Path, name: str) -> Path:
    """A file or folder of step_N/extra: `CONFIG_FILE`, `TOKENIZER_DIR`, `LORA_FILE`, `MODEL_CONFIG`."""
    return Path(path) / "extra" / name


def looks_like_checkpoint(path: Path) -> bool:
    """Whether `path` has a checkpoint's folders (params/, extra/); `complete_step_dir` says more."""
    return (Path(path) / "params").is_dir() and (Path(path) / "extra").is_dir()


def is_checkpoint_folder(path: Path) -> bool:
    """Whether `path` is a training checkpoint or a part of one, complete or not, whatever else it
    holds: a step_N (or one set aside, or Orbax's temporary folder of a save) or one of its items;
    export never writes there (`models.hf_write.export_target_problem`)."""
    path = Path(path)
    markers = ("_CHECKPOINT_METADATA", COMMIT_FILE, "_METADATA", "manifest.ocdbt")
    return (
        any((path / m).exists() for m in markers)
        or looks_like_checkpoint(path)
        or ".orbax-checkpoint-tmp" in path.name
        or any(path.glob("ocdbt.process_*"))
    )


def run_files(config_yaml: str, tokenizer: Any) -> dict[str, bytes]:
    """The run's config and the tokenizer's files, as extra/ stores them."""
    files = {CONFIG_FILE: config_yaml.encode()}
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(tmp)
        for file in Path(tmp).iterdir():
            files[f"{TOKENIZER_DIR}/{file.name}"] = file.read_bytes()
    return files


def model_files(config: Any) -> dict[str, bytes]:
    """The extra files that give a checkpoint its model (a `ModelConfig`): its HF config.json and
    generation_config.json, stored beside config.yaml and the tokenizer."""
    files = {MODEL_CONFIG: json.dumps(config.to_hf_dict(), indent=2).encode()}
    if config.generation_config_json is not None:
        files[GENERATION_CONFIG] = config.generation_config_json.encode()
    return files


def saved_model_config(path: Path) -> tuple[dict[str, Any], str, str | None]:
    """(the model's HF config dict, the file it was read from, generation_config.json's text or
    None) of a complete step_N folder."""
    config_path = extra_path(path, MODEL_CONFIG)
    if not config_path.is_file():
        raise IncompleteCheckpoint(f"{config_path}: missing; {path} is not a complete jax_sft checkpoint")
    generation = extra_path(path, GENERATION_CONFIG)
    return (
        json.loads(config_path.read_text()),
        str(config_path),
        generation.read_text() if generation.is_file() else None,
    )


def model_mismatch(path: Path, config: ModelConfig) -> str | None:
    """None when the model recorded in the complete step_N folder `path` (extra/model/config.json)
    is `config` (up to what a run may change: `models.config.CHANGEABLE_FIELDS`), else
    one sentence naming the fields that differ (checkpoint's value vs the run's). Checkpoints saved
    before the model's config was recorded are not compared."""
    if not extra_path(path, MODEL_CONFIG).is_file():
        return None
    hf_config, source, _ = saved_model_config(path)
    differences = ModelConfig.from_hf_dict(hf_config, source=source).differences(config)
    if not differences:
        return None
    return (
        f"{path} was trained with another model than this run's policy.model_name (and "
        f"hf_config_overrides): {'; '.join(differences)} (checkpoint vs this run); resume with that "
        "model or point checkpointing.checkpoint_dir elsewhere"
    )


def newest_complete_step(directory: str | Path) -> Path | None:
    """The newest complete step_N under `directory` (the one a run resumes from), or None."""
    steps = complete_steps(directory)
    return step_dir(directory, steps[-1]) if steps else None


def lora_reference(path: Path) -> dict[str, Any] | None:
    """extra/lora.json of a LoRA checkpoint (settings and base), None for a full fine-tune."""
    file = extra_path(path, LORA_FILE)
    return json.loads(file.read_text()) if file.is_file() else None


def saved_scan_layers(path: Path) -> bool:
    """Whether the checkpoint's params were saved scan-stacked (`layers.<name>`, not
    `layers.<i>.<name>`), read from the tree structure Orbax stored."""
    with ocp.StandardCheckpointer() as reader:
        tree = reader.metadata(path / "params").item_metadata.tree
    layers = tree.get("layers", {})
    return bool(layers) and not any(str(k).isdigit() for k in layers)


def restore_params(path: Path, target: Any, vocab_size: int | None = None) -> Any:
    """The `params` item of the complete step_N folder `path`, read-only, in the structure, dtypes
    and shardings of `target` (a pytree of jax.ShapeDtypeStruct; other vocabulary padding: see
    `checkpoint_shapes`): each process reads only the shards its devices hold."""
    with ocp.StandardCheckpointer() as reader:
        return reader.restore(path / "params", target, strict=not vocab_resized(path / "params", target, vocab_size))


@dataclasses.dataclass(frozen=True)
class Restored:
    """A step's state as `Checkpointer.restore` reads it: opt_state None when it was not saved (or
    not asked for), fp8 None when the step has no FP8 histories, data_state None unless asked for."""

    params: Any
    opt_state: Any | None
    fp8: Any | None
    train_info: dict[str, Any]
    data_state: dict[str, Any] | None


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
        listing = checkpoint_verify.listing(args.files, jax.process_index(), jax.process_count())
        for name, data in {**args.files, listing[0]: listing[1]}.items():
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

    def __init__(
        self,
        directory: str | Path,
        *,
        save_optimizer: bool = True,
        metric_name: str | None = None,
        higher_is_better: bool = False,
        keep_top_k: int | None = None,
        enable_async: bool = True,
    ):
        """`directory`: checkpoint_dir; `metric_name` ("val:<name>" / "train:<name>"),
        `higher_is_better`, `keep_top_k`: retention (see the module docstring)."""
        self.dir = Path(directory).absolute()
        self.save_optimizer = bool(save_optimizer)
        self.metric_name = metric_name
        self._set_aside_incomplete()
        options = ocp.CheckpointManagerOptions(
            step_prefix=STEP_PREFIX,
            enable_async_checkpointing=enable_async,
            preservation_policy=KeepLatestAndTopK(metric_name, bool(higher_is_better), keep_top_k),
            todelete_subdir=TRASH,
        )
        self._manager = ocp.CheckpointManager(
            epath.Path(self.dir),
            options=options,
            item_handlers={
                "params": ocp.StandardCheckpointHandler(),
                "opt_state": ocp.StandardCheckpointHandler(),
                "fp8": ocp.StandardCheckpointHandler(),
                "train_info": ocp.JsonCheckpointHandler(),
                "data": FilesHandler(),
                "extra": FilesHandler(),
            },
        )
        self._quiet = QuietFailedWrites()
        self._quiet.install()
        self._warned: set[int] = set()
        self._empty_trash()

    def _set_aside_incomplete(self) -> None:
        """Process 0 renames incomplete step_N folders to incomplete_step_N (before Orbax lists
        the folder); every process waits for it."""
        from jax_sft import distributed

        if jax.process_index() == 0 and self.dir.is_dir():
            for path in step_folders(self.dir).values():
                reason = incomplete_reason(path)
                if reason is None:
                    continue
                aside = set_aside(path, "incomplete")
                warnings.warn(
                    f"skipping {path}: incomplete checkpoint ({reason}); it is never resumed or "
                    f"exported, and was renamed {aside.name}. Delete it once you no longer need "
                    "its files",
                    IncompleteCheckpointWarning,
                    stacklevel=3,
                )
        distributed.allgather_ints([0])  # the others wait until the folder is tidy

    def latest_step(self) -> int | None:
        """The newest complete checkpoint (incomplete ones are skipped with a warning)."""
        return max(self.all_steps(), default=None)

    def all_steps(self) -> list[int]:
        """The steps of the complete checkpoints; each incomplete step_N is warned about once."""
        steps = []
        for step in sorted(self._manager.all_steps()):
            reason = incomplete_reason(self.step_dir(step))
            if reason is None:
                steps.append(step)
            elif step not in self._warned:
                self._warned.add(step)
                warnings.warn(
                    f"skipping {self.step_dir(step)}: incomplete checkpoint ({reason}); it is never "
                    "resumed or exported. Delete it once you no longer need its files",
                    IncompleteCheckpointWarning,
                    stacklevel=2,
                )
        return steps

    def step_dir(self, step: int) -> Path:
        return step_dir(self.dir, step)

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
        fp8: Any = None,
    ) -> None:
        """Starts an async save of step_`step`; every process must call it. `fp8`: the FP8 amax
        histories (None or empty: none)."""
        items = {
            "params": ocp.args.StandardSave(params),
            "train_info": ocp.args.JsonSave(dict(train_info)),
            "data": FilesSave({_data_file(): json.dumps(data_state).encode()}),
            "extra": FilesSave(dict(extra_files) if jax.process_index() == 0 else {}),
        }
        if self.save_optimizer:
            items["opt_state"] = ocp.args.StandardSave(opt_state)
        if jax.tree.leaves(fp8):
            items["fp8"] = ocp.args.StandardSave(fp8)
        self.wait()  # Orbax would wait for the previous save here; this names its failure
        needed = sum(x.nbytes for x in jax.tree.leaves(items_state(params, opt_state, self.save_optimizer)))
        self._pending = (step, needed)
        with self._disk_full_guard():
            self._manager.save(step, args=ocp.args.Composite(**items), metrics=dict(metrics or {}), force=True)

    def restore(
        self,
        step: int,
        *,
        abstract_params: Any,
        abstract_opt_state: Any | None,
        abstract_fp8: Any = None,
        with_data: bool = True,
        vocab_size: int | None = None,
    ) -> Restored:
        """Step_`step`'s state (see `Restored`).

        `abstract_*` are pytrees of jax.ShapeDtypeStruct carrying the target shardings, so each
        process reads only the shards its devices hold (`vocab_size`: see `restore_params`).
        """
        items = {
            "params": restore_args(self.step_dir(step) / "params", abstract_params, vocab_size),
            "train_info": ocp.args.JsonRestore(),
        }
        data_file = self._saved_data_file(step)
        if with_data:
            items["data"] = FilesRestore([data_file])
        has_opt = (self.step_dir(step) / "opt_state").exists()
        if abstract_opt_state is not None and has_opt:
            items["opt_state"] = restore_args(self.step_dir(step) / "opt_state", abstract_opt_state, vocab_size)
        if jax.tree.leaves(abstract_fp8) and (self.step_dir(step) / "fp8").exists():
            items["fp8"] = ocp.args.StandardRestore(abstract_fp8)
        restored = self._manager.restore(step, args=ocp.args.Composite(**items))
        return Restored(
            params=restored["params"],
            opt_state=restored["opt_state"] if "opt_state" in items else None,
            fp8=restored["fp8"] if "fp8" in items else None,
            train_info=dict(restored["train_info"]),
            data_state=json.loads(restored["data"][data_file]) if with_data else None,
        )

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
        """Blocks until the save in flight is written; CheckpointDiskFull if it ran out of space."""
        with self._disk_full_guard():
            self._manager.wait_until_finished()
        self._pending = (None, 0)
        self._empty_trash()  # the deletions the finished save triggered are done

    def close(self) -> None:
        try:
            self.wait()
        finally:
            self._manager.close()
            self._quiet.uninstall()

    _pending: tuple[int | None, int] = (None, 0)  # the step being written, its array bytes

    @contextlib.contextmanager
    def _disk_full_guard(self):
        """Turns a disk-full error of the save in flight into CheckpointDiskFull (one line) after
        removing that save's partial folder. Any other error passes unchanged."""
        try:
            yield
        except Exception as e:
            if not is_disk_full(e):
                raise
            step, needed = self._pending
            self._pending = (None, 0)
            self._quiet.seen = True
            self._settle()
            raise CheckpointDiskFull(self._disk_full_message(step, needed)) from None

    def _settle(self) -> None:
        """Lets Orbax's background writers of a failed save finish (their disk-full errors are
        what is being reported)."""
        try:
            self._manager.wait_until_finished()
        except Exception as e:
            if not is_disk_full(e):
                raise

    def _disk_full_message(self, step: int | None, needed: int) -> str:
        partial = sorted(self.dir.glob(f"step_{step}.orbax-checkpoint-tmp*"))
        if jax.process_index() == 0:
            for path in partial:
                shutil.rmtree(path)
        kept = ", ".join(f"step_{k}" for k in sorted(self._manager.all_steps())) or "no earlier checkpoint"
        free = shutil.disk_usage(self.dir).free
        removed = f"removed the partial step_{step}; " if partial else ""
        return (
            f"no space left on the device of {self.dir} while saving step_{step}: it needs about "
            f"{size_text(needed)} of arrays, {size_text(free)} are free; {removed}kept {kept}. Free space or "
            "point checkpointing.checkpoint_dir elsewhere, then rerun to resume"
        )

    def _empty_trash(self) -> None:
        """Deletes the checkpoints retention retired (renamed into .deleted/); process 0 only."""
        trash = self.dir / TRASH
        if jax.process_index() == 0 and trash.is_dir():
            shutil.rmtree(trash)


def items_state(params: Any, opt_state: Any, save_optimizer: bool) -> list[Any]:
    return [params, opt_state] if save_optimizer else [params]
