"""`python -m jax_sft.train --config X [overrides] --dry_run`: the plan of a run, checked without
devices or network, then exit.

It resolves and validates what a run would check at start-up before touching an accelerator: the
config and overrides, the datasets (names, section keys, local files; no rows are read), the
optimizer and learning-rate schedule, the mesh over `cluster.num_nodes * cluster.gpus_per_node`
devices and the batch sizes against it, the model's `config.json` when it is local (a folder, or
already in the Hugging Face cache) and the writable folders. Every problem found is reported at
once as a ConfigError; `main` prints it and exits 2. JAX runs on the CPU here (the schedule is
evaluated), so a dry run works on a login node.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from jax_sft import config as config_lib
from jax_sft.errors import InputError, MissingFileError

__all__ = ["plan"]


def plan(cfg: Any) -> list[str]:
    """Lines describing the run `cfg` (a validated config) would do; ConfigError listing every
    problem found otherwise."""
    problems: list[str] = []

    def attempt(fn, *args) -> Any:
        try:
            return fn(*args)
        except config_lib.ConfigError as e:
            problems.extend(e.problems)
        except InputError as e:  # the readers' errors about the input (files, settings)
            problems.append(str(e))
        return None

    model = attempt(_model, cfg)
    lines = model[0] if model else []
    for section in (_data, _optimizer, _steps_and_outputs):
        lines += attempt(section, cfg) or []
    mesh = attempt(_mesh_and_batches, cfg, model[1] if model else None)
    if problems:
        raise config_lib.ConfigError(problems, "dry run")
    return mesh + lines


def _mesh_and_batches(cfg: Any, max_positions: int | None) -> list[str]:
    from jax_sft.models.sharding import mesh_shape
    from jax_sft.train import check_before_compile

    c, jc = cfg.cluster, cfg.policy.jax_cfg
    n = c.num_nodes * c.gpus_per_node
    expert = jc.mesh.expert
    data, fsdp, tensor = mesh_shape(jc.mesh.data, jc.mesh.fsdp, jc.mesh.tensor, n, expert)
    dp = data * fsdp * expert
    check_before_compile(cfg, dp_size=dp, max_positions=max_positions)
    micro = cfg.policy.train_global_batch_size // dp // cfg.policy.train_micro_batch_size
    return [
        f"mesh: data={data} x fsdp={fsdp} x expert={expert} x tensor={tensor} over {n} devices "
        f"({c.num_nodes} node(s) x {c.gpus_per_node}; one process per node)",
        f"batches: {cfg.policy.train_global_batch_size} sequences per step = {dp} "
        f"data-parallel ranks x {micro} micro-batch(es) of {cfg.policy.train_micro_batch_size}, "
        f"rows of {cfg.policy.max_total_sequence_length} tokens"
        + (" (packed)" if cfg.policy.sequence_packing.enabled else ""),
    ]


def _local_model_dir(name: str) -> Path | None:
    """The folder holding `name`'s config.json: `name` itself, or its snapshot in the HF cache."""
    path = Path(name).expanduser()
    if path.is_dir():
        return path
    if name.count("/") != 1 or name.startswith(("/", ".", "~")):
        raise MissingFileError(f"policy.model_name={name!r}: not a model folder (and not a hub id "
                                "of the form org/name)")
    from huggingface_hub import try_to_load_from_cache

    cached = try_to_load_from_cache(name, "config.json")
    return Path(cached).parent if isinstance(cached, str) else None


def _model(cfg: Any) -> tuple[list[str], int | None]:
    """(lines, the longest sequence the model takes, or None when its config is not local)."""
    from jax_sft import models

    name = cfg.policy.model_name
    model_dir = _local_model_dir(name)
    lora = config_lib.lora_config(cfg)
    if model_dir is None:
        return [f"model: {name} is a hub id not in the local Hugging Face cache; its config.json "
                "is read (and its architecture checked) when the run downloads it",
                *_lora(cfg, lora, None)], None
    overrides = cfg.policy.hf_config_overrides
    m = models.read_config(model_dir, overrides.to_dict() if hasattr(overrides, "to_dict") else overrides)
    lines = [f"model: {m.architecture} ({m.family} family) from {model_dir}: {m.num_layers} layers, "
             f"hidden {m.hidden_size}, {m.num_heads} heads ({m.num_kv_heads} kv), vocab {m.vocab_size}, "
             f"rope {m.rope.rope_type}, max positions {m.max_position_embeddings}"]
    if m.num_experts:
        lines.append(f"model: mixture of experts: {m.num_experts} experts, top {m.experts_per_token}, "
                     f"{sum(m.moe_layers)} of {m.num_layers} layers sparse; router aux loss coef "
                     f"{m.router_aux_loss_coef}; experts over mesh expert="
                     f"{cfg.policy.jax_cfg.mesh.expert}")
    return lines + _lora(cfg, lora, m), m.context_length


def _lora(cfg: Any, lora: Any, m: Any) -> list[str]:
    """The LoRA line (none for full fine-tuning); with the model's config `m`, the adapted
    projections and parameter counts, checked as the run's model build checks them."""
    if lora is None:
        return []
    key = "policy.megatron_cfg.peft" if lora.naming == "megatron" else "policy.dtensor_cfg.lora_cfg"
    if lora.match_all_linear:
        which = "every linear layer (match_all_linear)"
    elif lora.target_modules:
        which = f"targets {list(lora.target_modules)}"
    elif lora.naming == "megatron":
        which = "targets linear_qkv, linear_proj, linear_fc1, linear_fc2 (no target_modules)"
    elif lora.exclude_modules:
        which = "every linear layer, lm_head included (exclude_modules without target_modules)"
    else:
        which = "every *_proj (no target_modules)"
    which += f" minus {list(lora.exclude_modules)}" if lora.exclude_modules else ""
    line = (f"LoRA ({key}, {lora.naming} module names): rank {lora.dim}, alpha {lora.alpha:g}, "
            f"scale {lora.scale:g}, {which}; dropout {lora.dropout:g} ({lora.dropout_position}); "
            "float32 adapters, frozen base")
    if m is None:
        return [line + "; adapted projections are counted when the model's config.json is local"]
    from jax_sft.memory import lora_param_count, lora_sites
    from jax_sft.models.decoder import lora_sites as check_sites

    check_sites(m, lora, cfg.policy.jax_cfg.scan_layers)  # the run's checks (SettingError)
    sites = lora_sites(m, lora)
    trainable, total = lora_param_count(m, lora)
    head = " (lm_head included)" if (None, "lm_head") in sites else ""
    return [f"{line}; {len(sites)} adapted projections{head}, {trainable:,} trainable parameters of "
            f"{total:,} ({100 * trainable / total:.3g}%)"]


def _data(cfg: Any) -> list[str]:
    from jax_sft.data import describe_data

    return [f"data: {line}" for line in describe_data(cfg)]


def _optimizer(cfg: Any) -> list[str]:
    import jax

    from jax_sft.optim import optimizer_from_config

    jax.config.update("jax_platforms", "cpu")  # only the schedule is evaluated
    # The number of steps is max_num_steps here: an epoch's length needs the data (read at start).
    _, schedule, description = optimizer_from_config(cfg, cfg.sft.max_num_steps)
    last = max(cfg.sft.max_num_steps - 1, 0)
    points = sorted({0, 1, last // 2, last} & set(range(last + 1)))
    lrs = ", ".join(f"step {i}: {float(schedule(i)):.4g}" for i in points)
    return [f"optimizer: {description}", f"learning rate: {lrs}"]


def _steps_and_outputs(cfg: Any) -> list[str]:
    s, ck = cfg.sft, cfg.checkpointing
    lines = [f"steps: at most {s.max_num_steps} (sft.max_num_steps), or {s.max_num_epochs} "
             f"epoch(s) of the train split if fewer; validation every {s.val_period} steps"]
    if ck.enabled:
        steps = sorted(int(p.name[5:]) for p in Path(ck.checkpoint_dir).glob("step_*")
                       if p.name[5:].isdigit())
        resume = f"; resumes from step_{steps[-1]}" if steps else ""
        lines.append(f"checkpoints: {ck.checkpoint_dir} every {ck.save_period} steps{resume}")
    lines.append(f"logs: {cfg.logger.log_dir}")
    return lines
