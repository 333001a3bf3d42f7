"""`python -m jax_sft.train --config X [overrides] --dry_run`: the plan of a run, checked without
devices or network, then exit.

It resolves and validates what a run would check at start-up before touching an accelerator: the
config and overrides, the run plan over `cluster.num_nodes * cluster.gpus_per_node` devices (mesh,
batch sizes, the model's `config.json` when it is local: a folder, or already in the Hugging Face
cache), the datasets (names, section keys, local files; no rows are read), the optimizer and
learning-rate schedule, and the writable folders. Every problem found is reported at once as a
ConfigError; `main` prints it and exits 2. JAX runs on the CPU here (the schedule is evaluated),
so a dry run works on a login node.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax

from jax_sft.checkpoint import CheckpointMismatch, model_mismatch, newest_complete_step
from jax_sft.config.keys import plain
from jax_sft.config.plan import RunPlan, make_plan, output_problems
from jax_sft.data import describe_data
from jax_sft.errors import ConfigError, InputError
from jax_sft.models import read_config
from jax_sft.models.config import ModelConfig
from jax_sft.models.hf_read import local_model_dir
from jax_sft.optim import optimizer_from_config
from jax_sft.sinks import SINKS

__all__ = ["plan"]


def plan(cfg: Any) -> list[str]:
    """Lines describing the run `cfg` (a validated config) would do; ConfigError listing every
    problem found otherwise."""
    problems: list[str] = []

    def attempt(fn: Callable, *args) -> Any:
        try:
            return fn(*args)
        except ConfigError as e:
            problems.extend(e.problems)
        except InputError as e:  # the readers' errors about the input (files, settings)
            problems.append(str(e))
        return None

    model_dir, model_config = attempt(_local_model, cfg) or (None, None)
    c = cfg.cluster
    run_plan = attempt(_plan, cfg, c.num_nodes * c.gpus_per_node, model_dir, model_config)
    lines = run_plan.describe(c.num_nodes, c.gpus_per_node) if run_plan else []
    for section in (_data, _optimizer):
        lines += attempt(section, cfg) or []
    lines += attempt(_steps_and_outputs, cfg, model_config) or []
    if problems:
        raise ConfigError(problems, "dry run")
    return lines


def _local_model(cfg: Any) -> tuple[Path | None, Any]:
    """(the folder holding the model's config.json, its ModelConfig), or (None, None) when the
    model is a hub id not in the local cache."""
    model_dir = local_model_dir(cfg.policy.model_name)
    if model_dir is None:
        return None, None
    return model_dir, read_config(model_dir, plain(cfg.policy.hf_config_overrides))


def _plan(cfg: Any, devices: int, model_dir: Path | None, model_config: Any) -> RunPlan:
    run_plan = make_plan(cfg, devices=devices, model_dir=model_dir, model_config=model_config)
    problems = output_problems(run_plan)
    if problems:
        raise ConfigError(problems, "checks against the devices and model")
    return run_plan


def _data(cfg: Any) -> list[str]:
    return [f"data: {line}" for line in describe_data(cfg)]


def _optimizer(cfg: Any) -> list[str]:
    jax.config.update("jax_platforms", "cpu")  # only the schedule is evaluated
    # The number of steps is max_num_steps here: an epoch's length needs the data (read at start).
    _, schedule, description = optimizer_from_config(cfg, cfg.sft.max_num_steps)
    last = max(cfg.sft.max_num_steps - 1, 0)
    points = sorted({0, 1, last // 2, last} & set(range(last + 1)))
    lrs = ", ".join(f"step {i}: {float(schedule(i)):.4g}" for i in points)
    return [f"optimizer: {description}", f"learning rate: {lrs}"]


def _steps_and_outputs(cfg: Any, model_config: ModelConfig | None) -> list[str]:
    """Steps, checkpoints (the step a run resumes from, whose model must be the run's when the
    model's config.json is local) and logs."""
    s, ck = cfg.sft, cfg.checkpointing
    lines = [
        f"steps: at most {s.max_num_steps} (sft.max_num_steps), or {s.max_num_epochs} "
        f"epoch(s) of the train split if fewer; validation every {s.val_period} steps"
    ]
    if ck.enabled:
        newest = newest_complete_step(ck.checkpoint_dir)
        mismatch = model_mismatch(newest, model_config) if newest and model_config else None
        if mismatch:
            raise CheckpointMismatch(mismatch)
        resume = f"; resumes from {newest.name}" if newest else ""
        lines.append(f"checkpoints: {ck.checkpoint_dir} every {ck.save_period} steps{resume}")
    lg = cfg.logger
    sinks = [sink.label for key, sink in SINKS if lg.get(key)]
    tensorboard = f"; TensorBoard events in {lg.tensorboard.log_dir or 'the run folder/tensorboard'}"
    lines.append(
        f"logs: {lg.log_dir}/exp_NNN (metrics.jsonl{''.join(', ' + n for n in sinks)})"
        + (tensorboard if lg.tensorboard_enabled else "")
    )
    return lines
