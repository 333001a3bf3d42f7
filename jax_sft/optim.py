"""AdamW and learning-rate schedules with NeMo RL's (i.e. torch's) semantics.

`policy.optimizer` is `{name: "torch.optim.AdamW", kwargs: {lr, weight_decay, betas, eps, ...}}`;
weight decay is decoupled and applies to every parameter, as torch's AdamW over
`model.parameters()` does. `policy.scheduler` absent/null is a constant LR; otherwise a list of
`{name, kwargs}` torch schedulers, plus `{milestones: [...]}` when there are several, which
chains them like `torch.optim.lr_scheduler.SequentialLR`: scheduler i+1 starts counting from 0
at milestone i. The schedule is evaluated at the optimizer-step count (0 for the first update),
as NeMo RL steps its scheduler once after every optimizer step.

`make_megatron_optimizer` maps NeMo RL's `policy.megatron_cfg` (Megatron backend) onto the same
optax path: Megatron's AdamW / SGD, its weight-decay groups, clipping and OptimizerParamScheduler.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import optax

from jax_sft.errors import SettingError
from jax_sft.models.options import BUFFERS

# torch kwargs that describe an implementation, not the maths; accepted and ignored.
_IMPLEMENTATION_KWARGS = {"foreach", "fused", "capturable", "differentiable", "maximize", "amsgrad"}
_ADAMW_NAMES = {"torch.optim.AdamW", "AdamW", "adamw"}

Factor = Callable[[Any], Any]  # step (int array) -> multiplier of the base LR


def _linear(start_factor: float = 1.0 / 3, end_factor: float = 1.0, total_iters: int = 5) -> Factor:
    def factor(step):
        frac = jnp.minimum(step, total_iters) / max(total_iters, 1)
        return start_factor + (end_factor - start_factor) * frac

    return factor


def _constant(factor: float = 1.0 / 3, total_iters: int = 5) -> Factor:
    return lambda step: jnp.where(step < total_iters, factor, 1.0)


def _exponential(gamma: float) -> Factor:
    return lambda step: gamma**step


def _make_cosine(base_lr: float) -> Callable[..., Factor]:
    def cosine(T_max: int, eta_min: float = 0.0) -> Factor:  # noqa: N803 (torch's name)
        def factor(step):
            lr = eta_min + (base_lr - eta_min) * (1 + jnp.cos(math.pi * step / T_max)) / 2
            return lr / base_lr

        return factor

    return cosine


def _scheduler_factories(base_lr: float) -> dict[str, Callable[..., Factor]]:
    return {
        "LinearLR": _linear,
        "ConstantLR": _constant,
        "ExponentialLR": _exponential,
        "CosineAnnealingLR": _make_cosine(base_lr),
    }


def make_schedule(base_lr: float, scheduler: Sequence[Mapping[str, Any]] | None) -> optax.Schedule:
    """The LR at optimizer step `count` (0-based), as torch's schedulers would give it."""
    if not scheduler:
        return optax.constant_schedule(base_lr)
    factories = _scheduler_factories(base_lr)
    entries = [dict(e) for e in scheduler]
    milestones = [list(e["milestones"]) for e in entries if "milestones" in e]
    entries = [e for e in entries if "milestones" not in e]
    if len(milestones) > 1:
        raise SettingError("policy.scheduler: give one {milestones: [...]} entry, not several")
    milestones = milestones[0] if milestones else []
    if len(entries) > 1 and len(milestones) != len(entries) - 1:
        raise SettingError(
            f"policy.scheduler: {len(entries)} schedulers need {len(entries) - 1} milestones, got {milestones}"
        )
    factors = []
    for i, entry in enumerate(entries):
        name = str(entry.get("name", "")).rsplit(".", 1)[-1]
        if name not in factories:
            raise SettingError(
                f"policy.scheduler[{i}].name: unsupported scheduler {entry.get('name')!r}; "
                f"supported: {', '.join('torch.optim.lr_scheduler.' + n for n in factories)}"
            )
        kwargs = dict(entry.get("kwargs") or {})
        try:
            factors.append(factories[name](**kwargs))
        except TypeError as e:
            raise SettingError(f"policy.scheduler[{i}].kwargs for {name}: {e}") from None

    def schedule(count):
        factor = factors[0](count)
        for boundary, later in zip(milestones, factors[1:]):
            factor = jnp.where(count >= boundary, later(count - boundary), factor)
        return base_lr * factor

    return schedule


# torch.optim.AdamW's defaults: what a kwarg absent from policy.optimizer.kwargs (removed with `~`) is.
TORCH_ADAMW_DEFAULTS = {"lr": 1e-3, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.01}


def adamw_kwargs(kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """lr, betas, eps and weight_decay of `policy.optimizer.kwargs`, torch's default where absent."""
    return {k: kwargs.get(k, default) for k, default in TORCH_ADAMW_DEFAULTS.items()}


def make_optimizer(
    optimizer_cfg: Mapping[str, Any],
    scheduler_cfg: Sequence[Mapping[str, Any]] | None,
    max_grad_norm: float | None,
) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """AdamW (+ global-norm clipping) from NeMo RL's `policy.optimizer`; returns (tx, schedule)."""
    name = optimizer_cfg.get("name", "torch.optim.AdamW")
    if name not in _ADAMW_NAMES:
        raise SettingError(f"policy.optimizer.name: {name!r} is not supported; use torch.optim.AdamW")
    kwargs = dict(optimizer_cfg.get("kwargs") or {})
    if kwargs.get("amsgrad") or kwargs.get("maximize"):
        raise SettingError("policy.optimizer.kwargs: amsgrad / maximize are not supported")
    unknown = set(kwargs) - {"lr", "weight_decay", "betas", "eps"} - _IMPLEMENTATION_KWARGS
    if unknown:
        raise SettingError(f"policy.optimizer.kwargs: unknown AdamW arguments {sorted(unknown)}")
    k = adamw_kwargs(kwargs)
    b1, b2 = (float(b) for b in k["betas"])
    schedule = make_schedule(float(k["lr"]), scheduler_cfg)
    adamw = optax.adamw(
        learning_rate=schedule,
        b1=b1,
        b2=b2,
        eps=float(k["eps"]),
        weight_decay=float(k["weight_decay"]),
        mask=decay_mask,
    )
    if max_grad_norm is None:
        return adamw, schedule
    return optax.chain(optax.clip_by_global_norm(float(max_grad_norm)), adamw), schedule


# ------------------------------------------------------------------------------ Megatron recipes
#
# NeMo RL's Megatron backend (policy.megatron_cfg.enabled) builds Megatron-Core's optimizer and
# OptimizerParamScheduler from megatron_cfg.optimizer / .scheduler. Megatron-Bridge counts the
# scheduler in samples (warmup/decay iterations x train_global_batch_size) and NeMo RL steps it by
# train_global_batch_size once per optimizer step, so the schedule below is Megatron's formula at
# num_steps = count * global_batch_size, count being the 0-based optimizer step. lr_decay_iters
# null means the run's number of steps (NeMo RL's train_iters = min(max_num_steps, epochs x
# steps per epoch)); weight decay ramps over that same number of steps; a warmup as long as the
# decay is cut to decay - 1 sample, as Megatron-Bridge does. Weight decay skips every parameter
# Megatron puts in its no-decay group: biases and norm weights (1-D tensors there).


def _ramp(style: str, ratio):
    """Megatron's 0->1 decay coefficients of a ratio in [0, 1]."""
    return {
        "linear": lambda r: 1.0 - r,
        "cosine": lambda r: 0.5 * (jnp.cos(math.pi * r) + 1.0),
        "exponential": lambda r: 2.0 * jnp.power(0.5, r) - 1.0,
        "minus_sqrt": lambda r: 1.0 - jnp.sqrt(r),
    }[style](ratio)


def megatron_lr_schedule(
    opt: Mapping[str, Any], sched: Mapping[str, Any], *, total_steps: int, global_batch_size: int
) -> optax.Schedule:
    """Megatron's OptimizerParamScheduler.get_lr at optimizer step `count` (see above)."""
    gbs = int(global_batch_size)
    decay_iters = sched.get("lr_decay_iters") or max(int(total_steps), 1)
    decay = decay_iters * gbs
    if sched.get("lr_warmup_fraction") is not None:
        warmup = float(sched["lr_warmup_fraction"]) * decay
    else:
        warmup = int(sched.get("lr_warmup_iters") or 0) * gbs
    warmup = min(warmup, decay - 1)
    wsd = (sched.get("lr_wsd_decay_iters") or decay_iters) * gbs
    style, wsd_style = sched["lr_decay_style"], sched.get("lr_wsd_decay_style", "exponential")
    max_lr, min_lr, init = float(opt["lr"]), float(opt["min_lr"]), float(sched["lr_warmup_init"])

    def schedule(count):
        n = jnp.asarray(count, jnp.float32) * gbs
        if style == "constant":
            lr = jnp.full_like(n, max_lr)
        elif style == "inverse-square-root":
            lr = jnp.maximum(min_lr, max_lr * max(warmup, 1) ** 0.5 / jnp.sqrt(jnp.maximum(n, 1.0)))
        else:
            if style == "WSD":  # constant, then the last `wsd` samples anneal
                start = decay - wsd
                anneal = _ramp(wsd_style, jnp.clip((n - start) / wsd, 0.0, 1.0))
                coeff = jnp.where(n <= start, 1.0, anneal)
            else:
                coeff = _ramp(style, jnp.clip((n - warmup) / (decay - warmup), 0.0, 1.0))
            lr = min_lr + coeff * (max_lr - min_lr)
        if style != "constant":
            lr = jnp.where(n > decay, min_lr, lr)
        if warmup > 0:
            lr = jnp.where(n <= warmup, init + (max_lr - init) * n / warmup, lr)
        return lr

    return schedule


def megatron_wd_schedule(sched: Mapping[str, Any], *, total_steps: int, global_batch_size: int) -> optax.Schedule:
    """Megatron's OptimizerParamScheduler.get_wd at optimizer step `count`."""
    start, end = float(sched["start_weight_decay"]), float(sched["end_weight_decay"])
    style = sched["weight_decay_incr_style"]
    steps = max(int(total_steps), 1) * int(global_batch_size)

    def schedule(count):
        n = jnp.asarray(count, jnp.float32) * global_batch_size
        if style == "constant":
            return jnp.full_like(n, end)
        ratio = jnp.clip(n / steps, 0.0, 1.0)
        coeff = ratio if style == "linear" else 0.5 * (jnp.cos(math.pi * (1.0 - ratio)) + 1.0)
        return jnp.where(n > steps, end, start + coeff * (end - start))

    return schedule


def _leaf_name(path: tuple) -> str:
    names = [str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", "")))) for k in path]
    return [n for n in names if n != "value"][-1]


def decay_mask(params: Any) -> Any:
    """True for every parameter torch's AdamW decays: all but `options.BUFFERS` (HF buffers)."""
    return jax.tree_util.tree_map_with_path(lambda path, _: _leaf_name(path) not in BUFFERS, params)


def megatron_decay_mask(params: Any) -> Any:
    """True for the parameters Megatron decays: kernels and embeddings, not biases or norm weights."""
    return jax.tree_util.tree_map_with_path(lambda path, _: _leaf_name(path) in ("kernel", "embedding"), params)


def clip_by_global_norm_megatron(max_norm: float) -> optax.GradientTransformation:
    """Megatron's clip_grad_by_total_norm_fp32: scale by max_norm / (norm + 1e-6) when that is < 1."""

    def update(updates, state, params=None):
        del params
        coeff = jnp.minimum(max_norm / (optax.tree.norm(updates) + 1.0e-6), 1.0)
        return jax.tree.map(lambda g: g * coeff.astype(g.dtype), updates), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def make_megatron_optimizer(
    megatron_cfg: Mapping[str, Any], *, total_steps: int, global_batch_size: int
) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """Megatron's Adam (AdamW mode) or SGD, clipping and schedules from a validated
    `policy.megatron_cfg`; returns (tx, lr schedule)."""
    opt, sched = megatron_cfg["optimizer"], megatron_cfg["scheduler"]
    steps = dict(total_steps=total_steps, global_batch_size=global_batch_size)
    lr = megatron_lr_schedule(opt, sched, **steps)
    wd = megatron_wd_schedule(sched, **steps)
    if opt["optimizer"] == "adam":
        tx = optax.adamw(
            lr,
            b1=float(opt["adam_beta1"]),
            b2=float(opt["adam_beta2"]),
            eps=float(opt["adam_eps"]),
            weight_decay=wd,
            mask=megatron_decay_mask,
        )
    elif opt["optimizer"] == "sgd":  # torch SGD: L2 decay into the gradient, then momentum
        tx = optax.chain(
            optax.add_decayed_weights(wd, mask=megatron_decay_mask),
            optax.trace(decay=float(opt["sgd_momentum"])),
            optax.scale_by_learning_rate(lr),
        )
    else:
        raise SettingError(f"policy.megatron_cfg.optimizer.optimizer={opt['optimizer']!r}: expected adam or sgd")
    clip = opt.get("clip_grad")
    if not clip:  # null or 0: Megatron clips only when clip_grad > 0
        return tx, lr
    return optax.chain(clip_by_global_norm_megatron(float(clip)), tx), lr


def optimizer_from_config(cfg: Any, total_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule, str]:
    """(tx, lr schedule, one-line description) of the run config `cfg` over `total_steps`
    optimizer steps: policy.megatron_cfg's when the Megatron backend is enabled (NeMo RL's
    Megatron recipes), else policy.optimizer / policy.scheduler's. What the trainer runs and
    `--dry_run` shows."""
    p = cfg.policy
    if p.megatron_cfg.enabled:
        m = p.megatron_cfg.to_dict()
        tx, schedule = make_megatron_optimizer(m, total_steps=total_steps, global_batch_size=p.train_global_batch_size)
        o, s = m["optimizer"], m["scheduler"]
        description = (
            f"Megatron {o['optimizer']} lr={o['lr']} min_lr={o['min_lr']} "
            f"weight_decay={o['weight_decay']} (not biases/norms), clip_grad "
            f"{o.get('clip_grad')}, {s['lr_decay_style']} decay after "
            f"{s['lr_warmup_iters']} warmup steps from {s['lr_warmup_init']}"
        )
        return tx, schedule, description
    opt = p.optimizer.to_dict()
    scheduler = [e.to_dict() if hasattr(e, "to_dict") else dict(e) for e in p.scheduler or []]
    tx, schedule = make_optimizer(opt, scheduler or None, p.max_grad_norm)
    k = adamw_kwargs(opt.get("kwargs") or {})
    names = [str(e.get("name", "")).rsplit(".", 1)[-1] for e in scheduler if "name" in e]
    description = (
        f"AdamW lr={k['lr']} betas={list(k['betas'])} eps={k['eps']} "
        f"weight_decay={k['weight_decay']}, clip grad norm {p.max_grad_norm}, "
        f"schedule {' then '.join(names) or 'constant'}"
    )
    return tx, schedule, description
