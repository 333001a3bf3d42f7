"""AdamW, schedules and the micro-batch split against torch's AdamW and lr schedulers."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax_sft.optim import make_optimizer, make_schedule

torch = pytest.importorskip("torch")

ADAMW = {
    "name": "torch.optim.AdamW",
    "kwargs": {"lr": 1e-2, "weight_decay": 0.1, "betas": [0.9, 0.98], "eps": 1e-5, "foreach": False},
}


def torch_lrs(scheduler_builder, steps: int, base_lr: float = 1.0) -> list[float]:
    param = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([param], lr=base_lr)
    sched = scheduler_builder(opt)
    lrs = []
    for _ in range(steps):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return lrs


@pytest.mark.parametrize(
    "ours, theirs",
    [
        (
            [
                {
                    "name": "torch.optim.lr_scheduler.LinearLR",
                    "kwargs": {"start_factor": 0.1, "end_factor": 1.0, "total_iters": 7},
                }
            ],
            lambda o: torch.optim.lr_scheduler.LinearLR(o, start_factor=0.1, end_factor=1.0, total_iters=7),
        ),
        (
            [{"name": "torch.optim.lr_scheduler.CosineAnnealingLR", "kwargs": {"T_max": 20, "eta_min": 0.05}}],
            lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=20, eta_min=0.05),
        ),
        (
            [{"name": "torch.optim.lr_scheduler.ConstantLR", "kwargs": {"factor": 0.5, "total_iters": 4}}],
            lambda o: torch.optim.lr_scheduler.ConstantLR(o, factor=0.5, total_iters=4),
        ),
        (
            [
                {
                    "name": "torch.optim.lr_scheduler.LinearLR",
                    "kwargs": {"start_factor": 0.01, "end_factor": 1.0, "total_iters": 5},
                },
                {"name": "torch.optim.lr_scheduler.CosineAnnealingLR", "kwargs": {"T_max": 15, "eta_min": 0.0}},
                {"milestones": [5]},
            ],
            lambda o: torch.optim.lr_scheduler.SequentialLR(
                o,
                [
                    torch.optim.lr_scheduler.LinearLR(o, start_factor=0.01, end_factor=1.0, total_iters=5),
                    torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=15, eta_min=0.0),
                ],
                milestones=[5],
            ),
        ),
    ],
    ids=["linear_warmup", "cosine", "constant_factor", "sequential_warmup_cosine"],
)
def test_schedules_match_torch(ours, theirs):
    schedule = make_schedule(1.0, ours)
    mine = [float(schedule(jnp.asarray(i))) for i in range(25)]
    np.testing.assert_allclose(mine, torch_lrs(theirs, 25), rtol=1e-5, atol=1e-7)


def test_no_scheduler_is_constant_and_unknown_names_fail():
    assert float(make_schedule(3e-4, None)(jnp.asarray(100))) == pytest.approx(3e-4)
    with pytest.raises(ValueError, match=r"policy.scheduler\[0\].name: unsupported scheduler 'StepLR'"):
        make_schedule(1.0, [{"name": "StepLR", "kwargs": {}}])
    with pytest.raises(ValueError, match="2 schedulers need 1 milestones"):
        make_schedule(1.0, [{"name": "LinearLR"}, {"name": "ConstantLR"}])


@pytest.mark.parametrize("max_grad_norm", [None, 0.05])
def test_adamw_with_clipping_matches_torch(max_grad_norm):
    rng = np.random.default_rng(0)
    w0 = rng.normal(size=(5, 3)).astype(np.float32)
    grads = [rng.normal(size=(5, 3)).astype(np.float32) for _ in range(4)]
    tx, _ = make_optimizer(ADAMW, None, max_grad_norm)
    params = {"w": jnp.asarray(w0)}
    state = tx.init(params)
    for g in grads:
        updates, state = tx.update({"w": jnp.asarray(g)}, state, params)
        params = jax.tree.map(lambda p, u: p + u, params, updates)

    w = torch.nn.Parameter(torch.tensor(w0))
    kwargs = {k: v for k, v in ADAMW["kwargs"].items() if k != "foreach"}
    opt = torch.optim.AdamW([w], **{**kwargs, "betas": tuple(kwargs["betas"])})
    for g in grads:
        w.grad = torch.tensor(g)
        if max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_([w], max_grad_norm)
        opt.step()
    np.testing.assert_allclose(np.asarray(params["w"]), w.detach().numpy(), rtol=1e-5, atol=1e-6)


def test_optimizer_config_errors():
    with pytest.raises(ValueError, match="policy.optimizer.name: 'torch.optim.SGD' is not supported"):
        make_optimizer({"name": "torch.optim.SGD", "kwargs": {"lr": 1.0}}, None, None)
    with pytest.raises(ValueError, match=r"unknown AdamW arguments \['momentum'\]"):
        make_optimizer({"name": "torch.optim.AdamW", "kwargs": {"lr": 1.0, "momentum": 0.9}}, None, None)
