"""FP8 matmuls (jax_sft/models/fp8.py): the rounding against ml_dtypes, the gradients against the
quantized products written out by hand, the config keys (jax_cfg.fp8 and NeMo RL's
megatron_cfg.fp8_cfg), and the trainer: 50 tiny steps within 2% of bf16, and delayed scaling's
amax histories saved and resumed exactly."""

from __future__ import annotations

import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import orbax.checkpoint as ocp
import pytest
from tiny_run import make_tiny_run_assets

from jax_sft import train
from jax_sft.config import ConfigError, IgnoredKeysWarning, load_config, make_plan
from jax_sft.models.fp8 import fp8_einsum, qdq, roll_history, scale_of
from jax_sft.models.options import Fp8Config

ROOT = Path(__file__).resolve().parents[1]
E4M3, E5M2 = ml_dtypes.float8_e4m3fn, ml_dtypes.float8_e5m2


def numpy_qdq(x: np.ndarray, amax: float, dtype) -> np.ndarray:
    """x rounded to `dtype` at the scale amax / max(dtype), by ml_dtypes (float32 arithmetic)."""
    fmax = np.float32(ml_dtypes.finfo(dtype).max)
    scale = np.float32(amax) / fmax
    q = np.clip(x.astype(np.float32) / scale, -fmax, fmax).astype(dtype)
    return q.astype(np.float32) * scale


def test_qdq_rounds_like_ml_dtypes_and_clips_to_the_fp8_range():
    x = np.random.default_rng(0).standard_normal((64, 32)).astype(np.float32) * 3
    for dtype in (E4M3, E5M2):
        amax = float(np.abs(x).max())
        got = np.asarray(qdq(jnp.asarray(x), scale_of(jnp.float32(amax), dtype), dtype))
        np.testing.assert_array_equal(got, numpy_qdq(x, amax, dtype))
        # A scale from a smaller amax saturates at +-amax instead of overflowing to inf/nan.
        small = np.asarray(qdq(jnp.asarray(x), scale_of(jnp.float32(1.0), dtype), dtype))
        assert np.isfinite(small).all() and np.abs(small).max() == pytest.approx(1.0)
    # e4m3 keeps 3 mantissa bits: values are not those of x, but within 2^-4 relative of them.
    err = np.abs(numpy_qdq(x, np.abs(x).max(), E4M3) - x)
    assert err.max() > 0 and (err <= np.abs(x) * 2**-4 + 1e-2).all()
    assert float(scale_of(jnp.float32(0.0), E4M3)) == 1.0 and float(scale_of(jnp.float32(np.inf), E4M3)) == 1.0


@pytest.mark.parametrize("fmt", ["hybrid", "e4m3"])
@pytest.mark.parametrize("recipe", ["tensorwise", "delayed"])
def test_fp8_einsum_is_the_product_of_the_quantized_operands_and_so_are_its_gradients(fmt, recipe):
    rng = np.random.default_rng(1)
    x, w, dy = (rng.standard_normal(s).astype(np.float32) for s in ((6, 16), (16, 8), (6, 8)))
    fwd, bwd = E4M3, (E5M2 if fmt == "hybrid" else E4M3)
    cfg = Fp8Config(fmt, recipe, history=4)
    # Delayed: scales from a history whose maxima differ from the tensors' own amaxes.
    history = None
    amax = {"x": np.abs(x).max(), "w": np.abs(w).max(), "dy": np.abs(dy).max()}
    if recipe == "delayed":
        history = jnp.asarray([[0.5, 2.0, 1.0, 0.0], [0.25, 0.1, 0.0, 0.0], [0.0, 0.0, 3.0, 0.0]], jnp.float32)
        amax = {"x": 2.0, "w": 0.25, "dy": 3.0}
    xq, wq = numpy_qdq(x, amax["x"], fwd), numpy_qdq(w, amax["w"], fwd)
    gq = numpy_qdq(dy, amax["dy"], bwd)

    def f(x, w, h):
        return fp8_einsum("...e,eo->...o", x, w, cfg, h)

    h0 = jnp.zeros((3, 4)) if history is None else history
    y, vjp = jax.vjp(lambda x, w, h: f(x, w, None if history is None else h), jnp.asarray(x), jnp.asarray(w), h0)
    dx, dw, dh = vjp(jnp.asarray(dy))
    with jax.default_matmul_precision("highest"):
        np.testing.assert_allclose(np.asarray(y), xq @ wq, rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(np.asarray(dx), gq @ wq.T, rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(np.asarray(dw), xq.T @ gq, rtol=1e-6, atol=1e-6)
    if history is not None:  # the history's gradient: this pass's amaxes in column 0
        seen = np.zeros((3, 4), np.float32)
        seen[:, 0] = [np.abs(x).max(), np.abs(w).max(), np.abs(dy).max()]
        np.testing.assert_array_equal(np.asarray(dh), seen)
        rolled = np.asarray(roll_history(history, jnp.asarray(seen)))
        np.testing.assert_array_equal(rolled[:, 0], seen[:, 0])
        np.testing.assert_array_equal(rolled[:, 1:], np.asarray(history)[:, :-1])


# ------------------------------------------------------------------ config


def plan_fp8(path, overrides):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", IgnoredKeysWarning)
        cfg = load_config(path, overrides)
    return make_plan(cfg, devices=1).model.options.fp8


NEMO_SFT = ROOT.parent / "shared" / "reference" / "nemo-rl-configs" / "examples" / "configs" / "sft.yaml"
MEGATRON = ["policy.dtensor_cfg.enabled=false", "policy.optimizer=null", "policy.megatron_cfg.enabled=true"]


def test_jax_cfg_fp8_keys_make_the_models_fp8_config():
    assert plan_fp8(None, []) is None
    assert plan_fp8(None, ["policy.jax_cfg.fp8=hybrid"]) == Fp8Config("hybrid", "delayed", 1)
    fp8 = plan_fp8(None, ["policy.jax_cfg.fp8=e4m3", "policy.jax_cfg.fp8_recipe=tensorwise"])
    assert fp8 == Fp8Config("e4m3", "tensorwise", 1)
    with pytest.raises(ConfigError) as info:
        load_config(None, ["policy.jax_cfg.fp8=e5m2", "policy.jax_cfg.fp8_amax_history=0"])
    assert info.value.problems == [
        "policy.jax_cfg.fp8_amax_history=0: expected a positive number",
        "policy.jax_cfg.fp8='e5m2': expected one of none, hybrid, e4m3",
    ]


@pytest.mark.skipif(not NEMO_SFT.is_file(), reason="../shared reference configs are absent")
def test_nemo_rl_sft_yaml_megatron_fp8_cfg_maps_onto_jax_cfg():
    """NeMo RL's own sft.yaml, Megatron and its fp8_cfg enabled: fp8 "e4m3" as the file has it; its
    recipe "blockwise" is refused (one line naming the key), "delayed" / "tensorwise" are taken."""
    on = [*MEGATRON, "policy.megatron_cfg.fp8_cfg.enabled=true"]
    with pytest.raises(ConfigError) as info:
        plan_fp8(NEMO_SFT, on)
    assert [p.split(";")[0] for p in info.value.problems] == [
        "policy.megatron_cfg.fp8_cfg.fp8_recipe='blockwise': expected one of delayed, tensorwise"
    ]
    assert plan_fp8(NEMO_SFT, [*on, "policy.megatron_cfg.fp8_cfg.fp8_recipe=delayed"]) == Fp8Config(
        "e4m3", "delayed", 1
    )
    fp8 = plan_fp8(
        NEMO_SFT, [*on, "policy.megatron_cfg.fp8_cfg.fp8_recipe=tensorwise", "policy.megatron_cfg.fp8_cfg.fp8=hybrid"]
    )
    assert fp8 == Fp8Config("hybrid", "tensorwise", 1)
    # Disabled (as the file has it), or Megatron disabled: no FP8.
    assert plan_fp8(NEMO_SFT, MEGATRON) is None
    assert plan_fp8(NEMO_SFT, ["policy.megatron_cfg.fp8_cfg.enabled=true"]) is None


# ------------------------------------------------------------------ the trainer


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> Path:
    return make_tiny_run_assets(tmp_path_factory.mktemp("assets"))


def run(assets: Path, folder: Path, steps: int, **extra):
    base = {
        "policy.model_name": assets / "model",
        "data.train_data_path": assets / "data" / "train.jsonl",
        "data.val_data_path": assets / "data" / "val.jsonl",
        "checkpointing.checkpoint_dir": folder / "ckpt",
        "logger.log_dir": folder / "logs",
        "logger.tensorboard_enabled": False,
        "sft.max_num_steps": steps,
        "sft.val_period": 0,
        "sft.val_at_start": False,
        "sft.val_at_end": False,
        "policy.train_global_batch_size": 16,
        "policy.train_micro_batch_size": 8,  # two micro-batches: the amaxes' maximum over both
        "policy.max_total_sequence_length": 64,
        "policy.jax_cfg.loss_chunk_size": 32,
        "policy.precision": "bfloat16",
        "policy.optimizer.kwargs.lr": 3e-3,
        "policy.scheduler": None,
        "checkpointing.save_period": 5,
        "checkpointing.hf_export_dir": None,
        **{k.replace("__", "."): v for k, v in extra.items()},
    }
    overrides = [f"{k}={'null' if v is None else v}" for k, v in base.items()]
    return train.run(load_config(str(ROOT / "configs" / "quickstart.py"), overrides))


def test_fp8_training_loss_stays_within_2_percent_of_bf16_over_50_steps(assets, tmp_path):
    bf16 = run(assets, tmp_path / "bf16", 50, checkpointing__enabled=False)
    losses = {"bf16": [bf16.train_losses[s] for s in range(1, 51)]}
    for recipe in ("delayed", "tensorwise"):
        result = run(
            assets,
            tmp_path / recipe,
            50,
            checkpointing__enabled=False,
            policy__jax_cfg__fp8="hybrid",
            policy__jax_cfg__fp8_recipe=recipe,
            policy__jax_cfg__fp8_amax_history=4,
        )
        losses[recipe] = [result.train_losses[s] for s in range(1, 51)]
    print("\nstep   bf16      fp8 delayed  fp8 tensorwise")
    for s in (1, 2, 5, 10, 20, 30, 40, 50):
        row = (losses[k][s - 1] for k in ("bf16", "delayed", "tensorwise"))
        print(f"{s:>4}  " + "  ".join(f"{x:.5f}" for x in row))
    assert losses["bf16"][-1] < 0.5 * losses["bf16"][0]  # it learns, so the comparison means something
    # The mean over the last 10 steps (one step's loss is one batch's: noisy) within 2% of bf16, and
    # FP8 rounding visible: not the same run.
    tail = lambda xs: float(np.mean(xs[-10:]))  # noqa: E731
    print("mean of steps 41-50: " + ", ".join(f"{k} {tail(v):.5f}" for k, v in losses.items()))
    for recipe in ("delayed", "tensorwise"):
        assert abs(tail(losses[recipe]) - tail(losses["bf16"])) <= 0.02 * tail(losses["bf16"]), recipe
        assert losses[recipe] != losses["bf16"], recipe


def test_delayed_scaling_histories_are_saved_and_resumed_exactly(assets, tmp_path):
    fp8 = dict(policy__jax_cfg__fp8="hybrid", policy__jax_cfg__fp8_amax_history=4)
    straight = run(assets, tmp_path / "straight", 10, **fp8)
    first = run(assets, tmp_path / "resumed", 5, **fp8)
    assert sorted(first.train_losses) == [1, 2, 3, 4, 5]
    resumed = run(assets, tmp_path / "resumed", 10, **fp8)
    assert sorted(resumed.train_losses) == [6, 7, 8, 9, 10]
    # Step 6 scales by the histories of steps 2-5: resuming with empty histories (scales of 1)
    # would change its loss.
    for s in range(6, 11):
        assert resumed.train_losses[s] == straight.train_losses[s], s

    def histories(folder: Path, step: int) -> dict:
        item = folder / "ckpt" / f"step_{step}" / "fp8"
        with ocp.StandardCheckpointer() as reader:
            tree = reader.restore(item)
        return {jax.tree_util.keystr(p): np.asarray(x) for p, x in jax.tree_util.tree_leaves_with_path(tree)}

    at5, at10 = histories(tmp_path / "resumed", 5), histories(tmp_path / "resumed", 10)
    assert len(at5) == 2 * 7  # 2 layers x (q, k, v, o, gate, up, down)
    for name, h in at5.items():
        assert h.shape == (3, 4) and (h > 0).all(), name  # 5 steps filled all 4 entries
    for name, h in histories(tmp_path / "straight", 10).items():
        np.testing.assert_array_equal(at10[name], h, err_msg=name)
