"""AdamW and learning-rate schedules with NeMo RL's (i.e. torch's) semantics.

`policy.optimizer` is `{name: "torch.optim.AdamW", kwargs: {lr, weight_decay, betas, eps, ...}}`;
weight decay is decoupled and applies to every parameter, as torch's AdamW over
`model.parameters()` does. `policy.scheduler` absent/null is a constant LR; otherwise a list of
`{name, kwargs}` torch schedulers, plus `{milestones: [...]}` when there are several, which
chains them like `torch.optim.lr_scheduler.SequentialLR`: scheduler i+1 starts counting from 0
at milestone i. The schedule is evaluated at the optimizer-step count (0 for the first update),
as NeMo RL steps its scheduler once after every optimizer step.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax.numpy as jnp
import optax

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
        raise ValueError("policy.scheduler: give one {milestones: [...]} entry, not several")
    milestones = milestones[0] if milestones else []
    if len(entries) > 1 and len(milestones) != len(entries) - 1:
        raise ValueError(
            f"policy.scheduler: {len(entries)} schedulers need {len(entries) - 1} milestones, "
            f"got {milestones}"
        )
    factors = []
    for i, entry in enumerate(entries):
        name = str(entry.get("name", "")).rsplit(".", 1)[-1]
        if name not in factories:
            raise ValueError(
                f"policy.scheduler[{i}].name: unsupported scheduler {entry.get('name')!r}; "
                f"supported: {', '.join('torch.optim.lr_scheduler.' + n for n in factories)}"
            )
        kwargs = dict(entry.get("kwargs") or {})
        try:
            factors.append(factories[name](**kwargs))
        except TypeError as e:
            raise ValueError(f"policy.scheduler[{i}].kwargs for {name}: {e}") from None

    def schedule(count):
        factor = factors[0](count)
        for boundary, later in zip(milestones, factors[1:]):
            factor = jnp.where(count >= boundary, later(count - boundary), factor)
        return base_lr * factor

    return schedule


def make_optimizer(
    optimizer_cfg: Mapping[str, Any],
    scheduler_cfg: Sequence[Mapping[str, Any]] | None,
    max_grad_norm: float | None,
) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """AdamW (+ global-norm clipping) from NeMo RL's `policy.optimizer`; returns (tx, schedule)."""
    name = optimizer_cfg.get("name", "torch.optim.AdamW")
    if name not in _ADAMW_NAMES:
        raise ValueError(
            f"policy.optimizer.name: {name!r} is not supported; use torch.optim.AdamW"
        )
    kwargs = dict(optimizer_cfg.get("kwargs") or {})
    if kwargs.get("amsgrad") or kwargs.get("maximize"):
        raise ValueError("policy.optimizer.kwargs: amsgrad / maximize are not supported")
    unknown = set(kwargs) - {"lr", "weight_decay", "betas", "eps"} - _IMPLEMENTATION_KWARGS
    if unknown:
        raise ValueError(f"policy.optimizer.kwargs: unknown AdamW arguments {sorted(unknown)}")
    lr = float(kwargs.get("lr", 1e-3))
    b1, b2 = (float(b) for b in kwargs.get("betas", (0.9, 0.999)))
    schedule = make_schedule(lr, scheduler_cfg)
    adamw = optax.adamw(
        learning_rate=schedule,
        b1=b1,
        b2=b2,
        eps=float(kwargs.get("eps", 1e-8)),
        weight_decay=float(kwargs.get("weight_decay", 0.01)),
    )
    if max_grad_norm is None:
        return adamw, schedule
    return optax.chain(optax.clip_by_global_norm(float(max_grad_norm)), adamw), schedule


def optimizer_from_config(cfg: Any) -> tuple[optax.GradientTransformation, optax.Schedule, str]:
    """(tx, schedule, one-line description) of the run config `cfg`: what the trainer runs and
    `--dry_run` shows."""
    p = cfg.policy
    opt = p.optimizer.to_dict()
    scheduler = [e.to_dict() if hasattr(e, "to_dict") else dict(e) for e in p.scheduler or []]
    tx, schedule = make_optimizer(opt, scheduler or None, p.max_grad_norm)
    k = opt.get("kwargs") or {}
    names = [str(e.get("name", "")).rsplit(".", 1)[-1] for e in scheduler if "name" in e]
    description = (f"AdamW lr={k.get('lr')} betas={list(k.get('betas', ()))} eps={k.get('eps')} "
                   f"weight_decay={k.get('weight_decay')}, clip grad norm {p.max_grad_norm}, "
                   f"schedule {' then '.join(names) or 'constant'}")
    return tx, schedule, description
