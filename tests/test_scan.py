"""Scanned (stacked) layers: same values as unrolled, HF round trip, remat, sharding, compile size."""

from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hf_models import hf_logits, make_hf_model

from jax_sft.models import CausalLM, ModelConfig, from_pretrained, save_pretrained, sharding
from jax_sft.models.hf_names import is_stacked

VOCAB = 256


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("hf") / "llama"
    hf = make_hf_model("llama", path)
    return hf, path


def _ids(seed=0, shape=(2, 16)):
    return jnp.asarray(np.random.default_rng(seed).integers(0, VOCAB, shape))


def _packed(shape=(2, 16)):
    """Two rows: segments of 5 + 7 + padding, and 16 tokens in one segment."""
    seg = np.zeros(shape, np.int32)
    seg[0, :5], seg[0, 5:12], seg[1] = 1, 2, 1
    pos = np.zeros(shape, np.int32)
    pos[0, :5], pos[0, 5:12], pos[1] = np.arange(5), np.arange(7), np.arange(16)
    return jnp.asarray(seg), jnp.asarray(pos)


def test_scan_logits_equal_unrolled_and_hf(llama_dir):
    hf, path = llama_dir
    unrolled = from_pretrained(path, dtype=jnp.float32)
    scanned = from_pretrained(path, dtype=jnp.float32, scan_layers=True)
    state = nnx.state(scanned, nnx.Param)
    paths = [p for p, _ in nnx.to_flat_state(state)]
    assert any(is_stacked(p) for p in paths)
    q = dict(nnx.to_flat_state(state))[("layers", "self_attn", "q_proj", "kernel")]
    assert q.shape[0] == 2 and q.get_metadata()["out_sharding"][0] is None  # [layers, embed, heads, d]

    ids = _ids()
    seg, pos = _packed()
    for kwargs in ({}, {"positions": pos, "segment_ids": seg}):
        a = jax.jit(lambda m, **kw: m(ids, **kw))(unrolled, **kwargs)
        b = jax.jit(lambda m, **kw: m(ids, **kw))(scanned, **kwargs)
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-5, atol=1e-5)
    ref = hf_logits(hf, np.asarray(ids))
    err = np.abs(np.asarray(scanned(ids)) - ref).max() / np.abs(ref).max()
    assert err < 1e-4, err


def test_scan_hf_round_trip(llama_dir, tmp_path):
    _, path = llama_dir
    scanned = from_pretrained(path, dtype=jnp.float32, scan_layers=True)
    save_pretrained(scanned, tmp_path / "out", max_shard_size="40KB")  # several shards
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    names = set(index["weight_map"])
    assert {"model.layers.0.self_attn.q_proj.weight", "model.layers.1.mlp.down_proj.weight"} <= names
    assert not any(".layers.self_attn" in n for n in names)

    back = from_pretrained(tmp_path / "out", dtype=jnp.float32)  # unrolled reader
    orig = from_pretrained(path, dtype=jnp.float32)
    a, b = nnx.state(orig, nnx.Param), nnx.state(back, nnx.Param)
    jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), a, b)

    # And the scanned export is byte-for-byte what the unrolled model exports.
    save_pretrained(orig, tmp_path / "unrolled", max_shard_size="40KB")
    for file in sorted(set(index["weight_map"].values())):
        assert (tmp_path / "out" / file).read_bytes() == (tmp_path / "unrolled" / file).read_bytes(), file


@pytest.mark.parametrize("remat", ["full", "dots_saveable"])
def test_scan_remat_same_values_and_grads(llama_dir, remat):
    _, path = llama_dir
    ids = _ids(3, (2, 8))

    def value_and_grad(model):
        graphdef, state = nnx.split(model)

        def loss(state):
            return jnp.mean(nnx.merge(graphdef, state)(ids) ** 2)

        jaxpr = str(jax.make_jaxpr(jax.grad(loss))(state))
        return jax.jit(jax.value_and_grad(loss))(state), jaxpr

    (v0, g0), jaxpr0 = value_and_grad(from_pretrained(path, dtype=jnp.float32, scan_layers=True))
    (v1, g1), jaxpr1 = value_and_grad(from_pretrained(path, dtype=jnp.float32, scan_layers=True, remat=remat))
    assert "remat" not in jaxpr0 and ("remat" in jaxpr1 or "checkpoint" in jaxpr1)
    np.testing.assert_allclose(v1, v0, rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-8), g1, g0)


def _config(layers: int, **extra) -> ModelConfig:
    return ModelConfig.from_hf_dict(
        {
            "architectures": ["LlamaForCausalLM"],
            "vocab_size": 64,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": layers,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "max_position_embeddings": 64,
            **extra,
        }
    )


def test_scan_program_size_is_flat_in_depth():
    """The compiled program of a scanned model does not grow with the number of layers (the
    unrolled one does): the compile-time claim, measured on the HLO rather than a clock."""

    def hlo_size(layers: int, scan: bool) -> int:
        model = CausalLM(_config(layers), dtype=jnp.float32, scan_layers=scan, rngs=nnx.Rngs(0))
        graphdef, state = nnx.split(model)
        f = jax.jit(jax.grad(lambda s: nnx.merge(graphdef, s)(jnp.zeros((1, 8), jnp.int32)).sum()))
        return len(f.lower(state).as_text())

    scan2, scan8 = hlo_size(2, True), hlo_size(8, True)
    unrolled2, unrolled8 = hlo_size(2, False), hlo_size(8, False)
    assert scan8 < scan2 * 1.05, (scan2, scan8)
    assert unrolled8 > unrolled2 * 2, (unrolled2, unrolled8)


def test_scan_needs_one_window_for_all_layers():
    cfg = _config(2)
    mixed = dataclasses.replace(cfg, architecture="Qwen2ForCausalLM", sliding_windows=(None, 4))
    with pytest.raises(ValueError, match="scan_layers=True needs the same attention window.*scan_layers=false"):
        CausalLM(mixed, dtype=jnp.float32, scan_layers=True, rngs=nnx.Rngs(0))
    windowed = dataclasses.replace(cfg, sliding_windows=(4, 4))
    CausalLM(windowed, dtype=jnp.float32, scan_layers=True, rngs=nnx.Rngs(0))


@pytest.mark.skipif(len(jax.devices()) < 8, reason="needs 8 devices (the CPU test session has them)")
def test_scan_params_shard_over_fsdp():
    mesh = sharding.make_mesh(1, 4, 2, devices=jax.devices()[:8])
    abstract = nnx.eval_shape(lambda: CausalLM(_config(3), scan_layers=True, rngs=nnx.Rngs(0)))
    specs = {p: v.get_value().spec for p, v in nnx.to_flat_state(sharding.param_shardings(abstract, mesh))}
    assert specs[("layers", "self_attn", "q_proj", "kernel")] == jax.sharding.PartitionSpec(
        None, "fsdp", "tensor", None
    )
    assert specs[("layers", "mlp", "down_proj", "kernel")] == jax.sharding.PartitionSpec(None, "tensor", "fsdp")
