"""NeMo RL's Megatron recipes on this backend: policy.megatron_cfg -> mesh, remat, optimizer and
schedule, checked against Megatron's formulas written out independently below, against torch's
AdamW / SGD with Megatron's param groups, and in a short training run on the CPU."""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tiny_run import make_tiny_run_assets

from jax_sft import train
from jax_sft.config import ConfigError, IgnoredKeysWarning, load_config, save_config
from jax_sft.optim import (
    clip_by_global_norm_megatron,
    make_megatron_optimizer,
    megatron_decay_mask,
    megatron_lr_schedule,
    megatron_wd_schedule,
)

torch = pytest.importorskip("torch")

ROOT = Path(__file__).resolve().parents[1]
NEMO_YAML = Path(__file__).parent / "data" / "nemo_rl_sft.yaml"


# ------------------------------------------------------------------ Megatron's formulas, by hand
#
# Megatron-Bridge (ConfigContainer._calculate_scheduler_steps) turns iterations into samples:
# decay = lr_decay_iters (null: train_iters) x gbs, warmup = lr_warmup_iters x gbs (or
# lr_warmup_fraction x decay) capped at decay - 1, wsd = lr_wsd_decay_iters (null: lr_decay_iters)
# x gbs, wd steps = train_iters x gbs. Megatron-Core's OptimizerParamScheduler.get_lr / get_wd then
# run at num_steps = k x gbs before the k-th (0-based) optimizer step, NeMo RL stepping the
# scheduler by gbs after each train() call.


def reference_lr(
    k,
    *,
    lr,
    min_lr,
    init,
    style,
    warmup_iters,
    decay_iters,
    train_iters,
    gbs,
    wsd_style="exponential",
    wsd_iters=None,
    warmup_fraction=None,
):
    decay = (decay_iters or train_iters) * gbs
    warmup = warmup_fraction * decay if warmup_fraction is not None else warmup_iters * gbs
    if warmup >= decay:
        warmup = decay - 1
    num = k * gbs
    if warmup > 0 and num <= warmup:
        return init + (lr - init) * num / warmup
    if style == "constant":
        return lr
    if num > decay:
        return min_lr
    if style == "inverse-square-root":
        return max(min_lr, lr * max(warmup, 1) ** 0.5 / max(num, 1) ** 0.5)
    ratio = (num - warmup) / (decay - warmup)
    if style == "linear":
        coeff = 1 - ratio
    elif style == "cosine":
        coeff = 0.5 * (math.cos(math.pi * ratio) + 1)
    else:  # WSD
        wsd = (wsd_iters or decay_iters or train_iters) * gbs
        anneal = decay - wsd
        if num <= anneal:
            coeff = 1.0
        else:
            r = (num - anneal) / wsd
            coeff = {
                "linear": 1 - r,
                "cosine": 0.5 * (math.cos(math.pi * r) + 1),
                "exponential": 2 * 0.5**r - 1,
                "minus_sqrt": 1 - r**0.5,
            }[wsd_style]
    return min_lr + coeff * (lr - min_lr)


def reference_wd(k, *, start, end, style, train_iters, gbs):
    num, steps = k * gbs, train_iters * gbs
    if num > steps or style == "constant":
        return end
    r = num / steps
    coeff = r if style == "linear" else 0.5 * (math.cos(math.pi * (1 - r)) + 1)
    return start + coeff * (end - start)


def cfgs(*, style="linear", warmup=3, decay=12, init=1e-5, lr=1e-3, min_lr=1e-4, **sched):
    opt = dict(
        optimizer="adam",
        lr=lr,
        min_lr=min_lr,
        weight_decay=0.1,
        adam_beta1=0.9,
        adam_beta2=0.98,
        adam_eps=1e-8,
        sgd_momentum=0.9,
        clip_grad=1.0,
    )
    scheduler = dict(
        lr_decay_style=style,
        lr_decay_iters=decay,
        lr_warmup_iters=warmup,
        lr_warmup_fraction=None,
        lr_warmup_init=init,
        lr_wsd_decay_style="exponential",
        lr_wsd_decay_iters=None,
        start_weight_decay=0.1,
        end_weight_decay=0.1,
        weight_decay_incr_style="constant",
    )
    scheduler.update(sched)
    return opt, scheduler


def ours(schedule, steps):
    return np.asarray(jax.jit(jax.vmap(schedule))(jnp.arange(steps)), np.float64)


# float32 arithmetic of a handful of operations on values of ~1e-3: a few ulp (2^-24 relative).
RTOL = 1e-6

CASES = [
    dict(style="constant"),
    dict(style="linear"),
    dict(style="cosine"),
    dict(style="inverse-square-root"),
    dict(style="WSD", lr_wsd_decay_iters=5),
    dict(style="WSD", lr_wsd_decay_style="linear", lr_wsd_decay_iters=5),
    dict(style="WSD", lr_wsd_decay_style="cosine", lr_wsd_decay_iters=5),
    dict(style="WSD", lr_wsd_decay_style="minus_sqrt"),
    dict(style="cosine", warmup=0),
    dict(style="linear", warmup=0, lr_warmup_fraction=0.25),
    dict(style="cosine", decay=None),  # null: the run's number of steps
    dict(style="linear", warmup=20),  # warmup >= decay: cut to decay - 1 sample
    dict(style="inverse-square-root", warmup=0),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
@pytest.mark.parametrize("gbs", [1, 4])
def test_lr_schedule_matches_megatron(case, gbs):
    case = dict(case)
    opt, sched = cfgs(**case)
    total = 10
    schedule = megatron_lr_schedule(opt, sched, total_steps=total, global_batch_size=gbs)
    steps = 20  # past lr_decay_iters: the min_lr floor
    want = [
        reference_lr(
            k,
            lr=opt["lr"],
            min_lr=opt["min_lr"],
            init=sched["lr_warmup_init"],
            style=sched["lr_decay_style"],
            warmup_iters=sched["lr_warmup_iters"],
            decay_iters=sched["lr_decay_iters"],
            train_iters=total,
            gbs=gbs,
            wsd_style=sched["lr_wsd_decay_style"],
            wsd_iters=sched["lr_wsd_decay_iters"],
            warmup_fraction=sched["lr_warmup_fraction"],
        )
        for k in range(steps)
    ]
    np.testing.assert_allclose(ours(schedule, steps), want, rtol=RTOL, atol=0)
    if sched["lr_warmup_iters"] and sched["lr_warmup_iters"] < 12:
        assert want[0] == sched["lr_warmup_init"]  # the first update runs at lr_warmup_init
    if case["style"] not in ("constant",) and (sched["lr_decay_iters"] or total) < steps - 1:
        assert want[-1] == opt["min_lr"]


@pytest.mark.parametrize("style", ["constant", "linear", "cosine"])
def test_weight_decay_schedule_matches_megatron(style):
    start, end = (0.1, 0.1) if style == "constant" else (0.01, 0.2)
    _, sched = cfgs(start_weight_decay=start, end_weight_decay=end, weight_decay_incr_style=style)
    wd = megatron_wd_schedule(sched, total_steps=8, global_batch_size=3)
    want = [reference_wd(k, start=start, end=end, style=style, train_iters=8, gbs=3) for k in range(12)]
    np.testing.assert_allclose(ours(wd, 12), want, rtol=RTOL, atol=0)


# ------------------------------------------------------------------ optimizer vs torch


def tree():
    rng = np.random.default_rng(0)
    return {  # the leaf names of the decoder: kernel/embedding decay, bias/weight (norms) do not
        "embed": {"embedding": rng.normal(size=(6, 4)).astype(np.float32)},
        "proj": {
            "kernel": rng.normal(size=(4, 2, 3)).astype(np.float32),
            "bias": rng.normal(size=(2, 3)).astype(np.float32),
        },
        "norm": {"weight": rng.normal(size=(4,)).astype(np.float32)},
        "stacked_norm": {"weight": rng.normal(size=(2, 4)).astype(np.float32)},  # scan_layers
    }


def test_decay_mask_is_megatrons_param_groups():
    mask = megatron_decay_mask(tree())
    assert mask == {
        "embed": {"embedding": True},
        "proj": {"kernel": True, "bias": False},
        "norm": {"weight": False},
        "stacked_norm": {"weight": False},
    }


@pytest.mark.parametrize("kind", ["adam", "sgd"])
def test_optimizer_matches_torch_with_megatron_param_groups(kind):
    """Megatron's FusedAdam (adam_w_mode) is torch's AdamW; its SGD is torch's SGD; both with
    weight decay only on the decay group, the LR and WD set by the scheduler before each step, and
    clip_grad scaling by clip / (norm + 1e-6) (Megatron's clip_grad_by_total_norm_fp32)."""
    opt, sched = cfgs(
        style="cosine",
        warmup=2,
        decay=6,
        start_weight_decay=0.05,
        end_weight_decay=0.3,
        weight_decay_incr_style="linear",
    )
    opt.update(optimizer=kind, clip_grad=0.5)
    total, gbs, steps = 6, 2, 5
    tx, lr = make_megatron_optimizer({"optimizer": opt, "scheduler": sched}, total_steps=total, global_batch_size=gbs)
    wd = megatron_wd_schedule(sched, total_steps=total, global_batch_size=gbs)
    params = jax.tree.map(jnp.asarray, tree())
    names = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(params)]
    decays = jax.tree.leaves(megatron_decay_mask(params))
    tparams = [torch.nn.Parameter(torch.tensor(np.asarray(x))) for x in jax.tree.leaves(params)]
    groups = [
        {"params": [p for p, d in zip(tparams, decays) if d], "wd_mult": 1.0},
        {"params": [p for p, d in zip(tparams, decays) if not d], "wd_mult": 0.0},
    ]
    if kind == "adam":
        topt = torch.optim.AdamW(groups, lr=1.0, betas=(0.9, 0.98), eps=1e-8)
    else:
        topt = torch.optim.SGD(groups, lr=1.0, momentum=0.9)
    state = tx.init(params)
    rng = np.random.default_rng(1)
    for k in range(steps):
        grads = [rng.normal(size=p.shape).astype(np.float32) for p in tparams]
        for group in topt.param_groups:  # what OptimizerParamScheduler.step sets
            group["lr"] = float(lr(k))
            group["weight_decay"] = float(wd(k)) * group["wd_mult"]
        norm = math.sqrt(sum(float((g.astype(np.float64) ** 2).sum()) for g in grads))
        for p, g in zip(tparams, grads):
            p.grad = torch.tensor(g) * min(1.0, 0.5 / (norm + 1e-6))
        topt.step()
        jgrads = jax.tree.unflatten(jax.tree.structure(params), [jnp.asarray(g) for g in grads])
        updates, state = tx.update(jgrads, state, params)
        params = jax.tree.map(lambda p, u: p + u, params, updates)
    for name, a, b in zip(names, jax.tree.leaves(params), tparams):
        np.testing.assert_allclose(np.asarray(a), b.detach().numpy(), rtol=2e-5, atol=2e-6, err_msg=name)


def test_clip_grad_scales_by_clip_over_norm_plus_1e6():
    grads = {"a": jnp.asarray([3.0, 4.0])}
    clipped, _ = clip_by_global_norm_megatron(1.0).update(grads, optax_empty())
    np.testing.assert_allclose(clipped["a"], np.array([3.0, 4.0]) / (5.0 + 1e-6), rtol=1e-7)
    kept, _ = clip_by_global_norm_megatron(10.0).update(grads, optax_empty())
    np.testing.assert_array_equal(kept["a"], grads["a"])


def optax_empty():
    import optax

    return optax.EmptyState()


def test_clip_grad_zero_or_null_does_not_clip():
    for clip in (0.0, None):
        opt, sched = cfgs()
        opt["clip_grad"] = clip
        tx, _ = make_megatron_optimizer({"optimizer": opt, "scheduler": sched}, total_steps=4, global_batch_size=1)
        params = {"w": {"kernel": jnp.ones((2, 2))}}
        grads = {"w": {"kernel": jnp.full((2, 2), 100.0)}}
        ref, _ = make_megatron_optimizer(
            {"optimizer": {**opt, "clip_grad": 1e9}, "scheduler": sched}, total_steps=4, global_batch_size=1
        )
        a, _ = tx.update(grads, tx.init(params), params)
        b, _ = ref.update(grads, ref.init(params), params)
        np.testing.assert_array_equal(a["w"]["kernel"], b["w"]["kernel"])


# ------------------------------------------------------------------ config


def megatron_overrides(**extra) -> list[str]:
    """The settings of NeMo RL's sft-llama3.1-8b-1n8g-megatron recipe, on configs/sft.py."""
    base = {
        "policy.dtensor_cfg.enabled": False,
        "policy.optimizer": None,
        "policy.megatron_cfg.enabled": True,
        "policy.megatron_cfg.tensor_model_parallel_size": 2,
        "policy.megatron_cfg.pipeline_model_parallel_size": 2,
        "policy.megatron_cfg.optimizer.lr": 2.0e-05,
        "policy.megatron_cfg.optimizer.min_lr": 1.99999e-05,
        "policy.megatron_cfg.optimizer.weight_decay": 0.01,
        "policy.megatron_cfg.scheduler.lr_warmup_init": 1.9999e-65,
        "policy.make_sequence_length_divisible_by": "${policy.megatron_cfg.tensor_model_parallel_size}",
    }
    base.update(extra)
    return [f"{k}={'null' if v is None else v}" for k, v in base.items()]


def load_warned(path, overrides):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cfg = load_config(path, overrides)
    assert [w.category for w in caught] == [IgnoredKeysWarning]
    return cfg, str(caught[0].message).split("ignored: ")[1].split(", ")


def test_megatron_recipe_maps_onto_mesh_remat_and_optimizer():
    cfg, ignored = load_warned(
        ROOT / "configs" / "sft.py", megatron_overrides(**{"policy.megatron_cfg.activation_checkpointing": True})
    )
    p = cfg.policy
    assert p.jax_cfg.mesh.tensor == 2 and p.make_sequence_length_divisible_by == 2
    assert p.jax_cfg.remat == "full"
    m = p.megatron_cfg
    assert (m.optimizer.lr, m.optimizer.min_lr, m.optimizer.weight_decay) == (2e-5, 1.99999e-5, 0.01)
    assert m.optimizer.clip_grad == p.max_grad_norm == 1.0  # sft.yaml: ${policy.max_grad_norm}
    assert m.scheduler.start_weight_decay == m.scheduler.end_weight_decay == 0.01  # follow wd
    assert m.scheduler.lr_warmup_init == 1.9999e-65
    assert ignored == ["policy.megatron_cfg.pipeline_model_parallel_size"]


REFERENCE_SFT = ROOT.parent / "shared" / "reference" / "nemo-rl-configs" / "examples" / "configs" / "sft.yaml"


@pytest.mark.skipif(not REFERENCE_SFT.is_file(), reason="../shared reference configs are absent")
def test_nemo_rl_megatron_section_lists_unused_keys_in_the_one_warning(tmp_path):
    """NeMo RL's own sft.yaml megatron_cfg (every key it has today), enabled."""
    import yaml

    megatron = yaml.safe_load(REFERENCE_SFT.read_text())["policy"]["megatron_cfg"]
    recipe = {"defaults": str(NEMO_YAML), "policy": {"optimizer": None, "megatron_cfg": {**megatron, "enabled": True}}}
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    cfg, ignored = load_warned(tmp_path / "recipe.yaml", [])
    m = cfg.policy.megatron_cfg
    assert m.enabled and cfg.policy.jax_cfg.mesh.tensor == 1
    assert (m.optimizer.lr, m.optimizer.min_lr, m.optimizer.adam_beta2) == (5e-6, 4.9999e-6, 0.98)
    assert (m.scheduler.lr_decay_iters, m.scheduler.lr_warmup_iters) == (1000, 50)
    megatron_ignored = [k for k in ignored if k.startswith("policy.megatron_cfg")]
    for key in (
        "pipeline_model_parallel_size",
        "sequence_parallel",
        "expert_model_parallel_size",
        "distributed_data_parallel_config",
        "apply_rope_fusion",
        "cuda_graph_impl",
        "optimizer.use_distributed_optimizer",
        "optimizer.bf16",
        "optimizer.fp16",
        "optimizer.params_dtype",
        "optimizer.optimizer_cpu_offload",
    ):
        assert f"policy.megatron_cfg.{key}" in megatron_ignored, key
    used = (
        "enabled",
        "tensor_model_parallel_size",
        "context_parallel_size",
        "activation_checkpointing",
        "optimizer.lr",
        "scheduler.lr_decay_style",
        "scheduler.lr_warmup_init",
        "peft",
        "fp8_cfg",
    )  # peft: LoRA; fp8_cfg: FP8 matmuls
    assert not [k for k in megatron_ignored if k.removeprefix("policy.megatron_cfg.") in used]
    assert "policy.megatron_cfg" not in ignored


def test_disabled_megatron_cfg_stays_ignored_and_optimizer_null_needs_it():
    cfg, ignored = load_warned(NEMO_YAML, [])
    assert "policy.megatron_cfg" in ignored and not cfg.policy.megatron_cfg.enabled
    # Disabled: not used, so not checked (Megatron would refuse min_lr > lr).
    assert load_config(None, ["policy.megatron_cfg.optimizer.min_lr=1.0"]).policy.megatron_cfg.optimizer.min_lr == 1.0
    with pytest.raises(ConfigError) as info:
        load_config(ROOT / "configs" / "sft.py", ["policy.optimizer=null"])
    assert info.value.problems == [
        "policy.optimizer=None: expected a section {name, kwargs}; null only with policy.megatron_cfg.enabled=true"
    ]


@pytest.mark.parametrize(
    "override, problem",
    [
        (
            "policy.megatron_cfg.peft={enabled: true, lora_B_init_method: uniform}",  # more: test_lora_config.py
            "policy.megatron_cfg.peft.lora_B_init_method='uniform': expected \"zero\"",
        ),
        (  # NeMo RL's sft.yaml has fp8_recipe: blockwise (more: test_fp8.py)
            "policy.megatron_cfg.fp8_cfg.enabled=true",
            "policy.megatron_cfg.fp8_cfg.fp8_recipe='blockwise': expected one of delayed, tensorwise; "
            "jax_sft scales per tensor",
        ),
        (
            "policy.megatron_cfg.fp8_cfg={enabled: true, fp8_recipe: delayed, fp8_param: true}",
            "policy.megatron_cfg.fp8_cfg.fp8_param=True: expected false; FP8 weight storage is not supported",
        ),
        (
            "policy.megatron_cfg.optimizer.fp16=true",
            "policy.megatron_cfg.optimizer.fp16=True: expected false; fp16 is not supported",
        ),
        (
            "policy.megatron_cfg.optimizer.decoupled_lr=0.0001",
            "policy.megatron_cfg.optimizer.decoupled_lr=0.0001: expected null; a separate LR",
        ),
        (
            "policy.megatron_cfg.scheduler.lr_decay_stlye=cosine",
            "policy.megatron_cfg.scheduler.lr_decay_stlye='cosine': unknown key; did you mean "
            "policy.megatron_cfg.scheduler.lr_decay_style?",
        ),
        (
            "policy.megatron_cfg.scheduler.lr_decay_style=step",
            "policy.megatron_cfg.scheduler.lr_decay_style='step': expected one of constant, linear, "
            "cosine, inverse-square-root, WSD",
        ),
        (
            "policy.megatron_cfg.optimizer.optimizer=lion",
            "policy.megatron_cfg.optimizer.optimizer='lion': expected one of adam, sgd",
        ),
        (
            "policy.megatron_cfg.scheduler.lr_warmup_init=1.0",
            "policy.megatron_cfg.scheduler.lr_warmup_init=1.0: expected in [0, optimizer.lr=2e-05]",
        ),
        (
            "policy.megatron_cfg.scheduler.start_weight_decay=0.5",
            "policy.megatron_cfg.scheduler.start_weight_decay=0.5: expected 0 <= "
            "scheduler.start_weight_decay <= scheduler.end_weight_decay",
        ),
    ],
)
def test_megatron_values_that_cannot_be_honoured_are_errors(override, problem):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", IgnoredKeysWarning)
        with pytest.raises(ConfigError) as info:
            load_config(ROOT / "configs" / "sft.py", [*megatron_overrides(), override])
    assert len(info.value.problems) == 1
    assert info.value.problems[0].startswith(problem), info.value.problems[0]


def test_megatron_config_round_trips_through_config_yaml(tmp_path):
    cfg, _ = load_warned(ROOT / "configs" / "sft.py", megatron_overrides())
    with warnings.catch_warnings():
        warnings.simplefilter("error", IgnoredKeysWarning)  # our own file: nothing to ignore
        assert load_config(save_config(cfg, tmp_path / "config.yaml")) == cfg
        default = load_config(None)
        assert load_config(save_config(default, tmp_path / "default.yaml")) == default


def test_dp_replicate_size_is_the_mesh_data_axis():
    cfg = load_config(None, ["policy.dtensor_cfg.dp_replicate_size=2"])
    assert (cfg.policy.jax_cfg.mesh.data, cfg.policy.jax_cfg.mesh.fsdp) == (2, -1)
    cfg = load_config(None, ["policy.dtensor_cfg.dp_replicate_size=2", "policy.jax_cfg.mesh.data=4"])
    assert cfg.policy.jax_cfg.mesh.data == 4  # an explicit mesh wins
    assert load_config(None).policy.jax_cfg.mesh.data == 1


# ------------------------------------------------------------------ a run


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> Path:
    return make_tiny_run_assets(tmp_path_factory.mktemp("assets"))


def tiny_run(assets: Path, run: Path, **extra) -> dict:
    """Overrides for a short float32 run of the tiny Llama on 8 CPU devices, no checkpoints."""
    return {
        "policy.model_name": assets / "model",
        "data.dataset_name": "openai_format",
        "policy.tokenizer.chat_template": "default",
        "data.train_data_path": assets / "data" / "train.jsonl",
        "data.val_data_path": assets / "data" / "val.jsonl",
        "checkpointing.enabled": False,
        "logger.log_dir": run / "logs",
        "logger.tensorboard_enabled": False,
        "logger.monitor_gpus": False,
        "cluster.gpus_per_node": 8,
        "sft.val_period": 0,
        "sft.val_at_start": False,
        "policy.train_global_batch_size": 16,
        "policy.train_micro_batch_size": 2,
        "policy.max_total_sequence_length": 96,
        "policy.precision": "float32",
        "policy.jax_cfg.loss_chunk_size": 96,
        **extra,
    }


def test_megatron_recipe_trains_with_megatrons_lr_series(assets, tmp_path, capsys):
    """8 CPU devices: tensor 2 (megatron_cfg), fsdp 4; a cosine schedule with warmup from
    lr_warmup_init whose lr_decay_iters is null (the run's 6 steps), as NeMo RL would step it."""
    gbs, steps = 16, 6
    run_overrides = tiny_run(
        assets,
        tmp_path,
        **{
            "sft.max_num_steps": steps,
            "policy.train_micro_batch_size": 4,
            "policy.megatron_cfg.optimizer.lr": 1e-3,
            "policy.megatron_cfg.optimizer.min_lr": 1e-4,
            "policy.megatron_cfg.scheduler.lr_decay_style": "cosine",
            "policy.megatron_cfg.scheduler.lr_warmup_iters": 2,
            "policy.megatron_cfg.scheduler.lr_warmup_init": 1e-5,
            "policy.megatron_cfg.scheduler.lr_decay_iters": None,
        },
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", IgnoredKeysWarning)
        cfg = load_config(ROOT / "configs" / "sft.py", megatron_overrides(**run_overrides))
    result = train.run(cfg)
    assert "mesh: {'data': 1, 'fsdp': 4, 'tensor': 2} over 8 cpu devices" in capsys.readouterr().out
    rows = [json.loads(line) for line in open(result.run_dir / "metrics.jsonl")]
    lrs = [r["train/lr"] for r in rows if "train/lr" in r]
    want = [
        reference_lr(
            k,
            lr=1e-3,
            min_lr=1e-4,
            init=1e-5,
            style="cosine",
            warmup_iters=2,
            decay_iters=None,
            train_iters=steps,
            gbs=gbs,
        )
        for k in range(steps)
    ]
    np.testing.assert_allclose(lrs, want, rtol=RTOL, atol=0)
    assert want[0] == 1e-5 and want[-1] < want[2]
    assert result.final_step == steps and all(np.isfinite(list(result.train_losses.values())))


def test_hsdp_run_matches_fsdp(assets, tmp_path, capsys):
    """dp_replicate_size=2 (NeMo RL's HSDP recipe): mesh data 2 x fsdp 4, the same losses as
    fsdp 8 (same batches, same maths; only the reduction order of the gradient sums differs)."""
    losses = {}
    for name, extra in (("hsdp", {"policy.dtensor_cfg.dp_replicate_size": 2}), ("fsdp", {})):
        overrides = tiny_run(assets, tmp_path / name, **{"sft.max_num_steps": 3, **extra})
        cfg = load_config(
            ROOT / "configs" / "sft.py", [f"{k}={'null' if v is None else v}" for k, v in overrides.items()]
        )
        losses[name] = train.run(cfg).train_losses
        data = 2 if name == "hsdp" else 1
        assert f"mesh: {{'data': {data}, 'fsdp': {8 // data}, 'tensor': 1}}" in capsys.readouterr().out
    # fp32 sums of a few thousand terms in another order: ~1e-6 relative.
    np.testing.assert_allclose(list(losses["hsdp"].values()), list(losses["fsdp"].values()), rtol=1e-5)


NEMO_RECIPES = ROOT.parent / "shared" / "reference" / "nemo-rl-configs" / "examples" / "configs"


@pytest.mark.skipif(not NEMO_RECIPES.is_dir(), reason="../shared/reference/nemo-rl-configs is absent")
def test_nemo_rl_megatron_recipe_yaml_trains_on_the_cpu(assets, tmp_path, capsys):
    """NeMo RL's own sft-llama3.1-8b-1n8g-megatron.yaml as it is (megatron_cfg with tensor 2 and
    pipeline 2, its optimizer and scheduler, OpenMathInstruct-2 in today's data layout with 5%
    carved for validation, a prompt file), with only the model, the data file, the sizes and the
    output folders overridden: 4 steps on 8 CPU devices, the learning rates being Megatron's."""
    rows = [
        {m["role"]: m["content"] for m in json.loads(line)["messages"]}
        for line in open(assets / "data" / "train.jsonl")
    ]
    omi2 = tmp_path / "omi2.jsonl"  # OpenMathInstruct-2's columns
    omi2.write_text(
        "".join(
            json.dumps(
                {
                    "problem": r["user"],
                    "generated_solution": r["assistant"],
                    "expected_answer": "",
                    "problem_source": "test",
                }
            )
            + "\n"
            for r in rows
        )
    )
    (tmp_path / "math.txt").write_text("Solve: {}")
    gbs, steps = 16, 4
    overrides = [
        f"policy.model_name={assets / 'model'}",
        f"policy.tokenizer.name={assets / 'model'}",
        f"data.train.data_path={omi2}",
        f"data.default.prompt_file={tmp_path / 'math.txt'}",
        f"sft.max_num_steps={steps}",
        "sft.val_global_batch_size=8",
        f"policy.train_global_batch_size={gbs}",
        "policy.max_total_sequence_length=96",
        "policy.precision=float32",
        "policy.jax_cfg.loss_chunk_size=96",
        f"checkpointing.checkpoint_dir={tmp_path / 'ckpt'}",
        f"logger.log_dir={tmp_path / 'logs'}",
        "logger.wandb_enabled=false",
        "logger.tensorboard_enabled=false",
        "logger.monitor_gpus=false",
    ]
    recipe = NEMO_RECIPES / "recipes" / "llm" / "sft-llama3.1-8b-1n8g-megatron.yaml"
    with pytest.warns(IgnoredKeysWarning, match="pipeline_model_parallel_size"):
        cfg = load_config(recipe, overrides)
    result = train.run(cfg)
    out = capsys.readouterr().out
    assert "mesh: {'data': 1, 'fsdp': 4, 'tensor': 2} over 8 cpu devices" in out
    metrics = [json.loads(line) for line in open(result.run_dir / "metrics.jsonl")]
    lrs = [r["train/lr"] for r in metrics if "train/lr" in r]
    # The recipe's schedule: sft.yaml's constant style, 50 warmup iterations from 1.9999e-65,
    # lr 2e-5 (min_lr 1.99999e-5), lr_decay_iters 1000.
    want = [
        reference_lr(
            k,
            lr=2e-5,
            min_lr=1.99999e-5,
            init=1.9999e-65,
            style="constant",
            warmup_iters=50,
            decay_iters=1000,
            train_iters=steps,
            gbs=gbs,
        )
        for k in range(steps)
    ]
    # The LR is float32: 1.9999e-65 is 0 there (atol: the smallest normal float32).
    np.testing.assert_allclose(lrs, want, rtol=RTOL, atol=float(np.finfo(np.float32).tiny))
    assert result.final_step == steps and all(np.isfinite(list(result.train_losses.values())))
    assert 0 in result.val_losses  # validated at start on the carved 5%
