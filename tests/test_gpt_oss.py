"""gpt-oss beyond the family table (tests/hf_models.py FAMILIES runs its parity, packing, bf16,
round-trip, sharding, generation and training tests): config defaults, MXFP4 checkpoints, bf16
round trips, the layer features that the parity would miss if they did nothing, the kernel
choice for attention sinks, and NeMo RL's dequantize_base_checkpoint."""

from __future__ import annotations

import dataclasses
import json

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from hf_models import hf_logits, jax_logits, make_hf_model, save_mxfp4
from safetensors import safe_open
from transformers.integrations.mxfp4 import convert_moe_packed_tensors

from jax_sft.models import CausalLM, ModelConfig, from_pretrained, save_pretrained
from jax_sft.models import attention as attention_lib
from jax_sft.models.moe import glu_of

VOCAB = 256
EXPERT_TENSORS = ("gate_up_proj", "down_proj")  # MXFP4 on the hub


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """(torch model, bf16 folder, MXFP4 folder): the family table's tiny gpt-oss, saved in bf16
    as the hub's BF16 copies are, and with its experts in MXFP4 as openai/gpt-oss-* is."""
    root = tmp_path_factory.mktemp("gpt_oss")
    hf = make_hf_model("gpt_oss", root / "f32")
    hf.to(torch.bfloat16).save_pretrained(root / "bf16")
    save_mxfp4(root / "bf16", root / "mxfp4")
    return hf.to(torch.float32), root / "bf16", root / "mxfp4"


def test_config_follows_transformers_defaults():
    """config.json with nothing but the architecture reads as GptOssConfig() does."""
    m = ModelConfig.from_hf_dict({"architectures": ["GptOssForCausalLM"], "model_type": "gpt_oss"})
    hf = transformers.GptOssConfig()
    assert (m.num_layers, m.hidden_size, m.num_heads, m.num_kv_heads, m.head_dim, m.vocab_size) == (
        hf.num_hidden_layers,
        hf.hidden_size,
        hf.num_attention_heads,
        hf.num_key_value_heads,
        hf.head_dim,
        hf.vocab_size,
    )
    assert m.sliding_windows == tuple(hf.sliding_window if t == "sliding_attention" else None for t in hf.layer_types)
    assert m.sliding_windows[:2] == (128, None)  # sliding on the even layers
    assert (m.num_experts, m.experts_per_token, m.moe_intermediate_size) == (128, 4, 2880)
    assert m.attention_sinks and m.moe_bias and m.norm_topk_prob and m.qkv_bias and m.o_bias
    assert (m.expert_glu, m.swiglu_alpha, m.swiglu_limit, m.router_aux_loss_coef) == ("clamped_swiglu", 1.702, 7.0, 0)
    rope = m.rope
    assert (rope.rope_type, rope.theta, rope.factor, rope.truncate) == ("yarn", 150000.0, 32.0, False)
    assert rope.original_max_position_embeddings == 4096 and m.context_length == 131072
    # GptOssConfig's defaults are gpt-oss-120b's sizes: 116.8B parameters, 5.1B active (the model
    # card's count: the embedding not included); MFU counts the active ones.
    assert m.param_count() == pytest.approx(116.8e9, rel=1e-3)
    assert m.training_flops([1]) / 6 == pytest.approx(5.13e9, rel=1e-2)
    small = ModelConfig.from_hf_dict(
        {"architectures": ["GptOssForCausalLM"], "num_hidden_layers": 24, "num_local_experts": 32}
    )
    assert small.param_count() == pytest.approx(20.9e9, rel=1e-3)  # gpt-oss-20b
    assert small.training_flops([1]) / 6 == pytest.approx(3.61e9, rel=1e-2)


def test_mxfp4_checkpoint_loads_dequantized_as_transformers_does(checkpoints, tmp_path):
    """The MXFP4 experts read as transformers' own dequantization gives them (exactly), the
    logits as transformers' model of the same folder; the export is a plain bf16 checkpoint
    (no blocks, no quantization_config) that reads back to the same tensors."""
    _, _, mxfp4 = checkpoints
    model = from_pretrained(mxfp4, dtype=jnp.float32)
    assert model.config.quantization == "mxfp4"
    with safe_open(str(mxfp4 / "model.safetensors"), "pt") as f:
        for i, layer in enumerate(model.layers):
            gate_up, down = (
                convert_moe_packed_tensors(
                    f.get_tensor(f"model.layers.{i}.mlp.experts.{n}_blocks"),
                    f.get_tensor(f"model.layers.{i}.mlp.experts.{n}_scales"),
                    dtype=torch.float32,
                ).numpy()
                for n in EXPERT_TENSORS
            )
            np.testing.assert_array_equal(layer.mlp.gate_proj[...], gate_up[..., 0::2])
            np.testing.assert_array_equal(layer.mlp.up_proj[...], gate_up[..., 1::2])
            np.testing.assert_array_equal(layer.mlp.down_proj[...], down)
    hf = transformers.AutoModelForCausalLM.from_pretrained(mxfp4, dtype=torch.float32, attn_implementation="eager")
    ids = np.random.default_rng(0).integers(0, VOCAB, (2, 16))
    err = rel_err(jax_logits(model, ids), hf_logits(hf.eval(), ids))
    assert err < 1e-5, f"MXFP4 checkpoint: logits vs transformers rel err {err:.2e}"

    save_pretrained(model, tmp_path / "out", dtype="bfloat16")
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert "quantization_config" not in config and config["dtype"] == "bfloat16"
    with safe_open(str(tmp_path / "out" / "model.safetensors"), "np") as f:
        names = set(f.keys())
    assert "model.layers.0.mlp.experts.gate_up_proj" in names and not any("_blocks" in n for n in names)
    again = from_pretrained(tmp_path / "out", dtype=jnp.float32)
    assert again.config.quantization is None
    for a, b in zip(nnx.to_flat_state(nnx.state(model)), nnx.to_flat_state(nnx.state(again))):
        np.testing.assert_array_equal(a[1][...], b[1][...], err_msg=str(a[0]))  # bf16 inputs: exact


def test_bf16_checkpoint_round_trips_to_identical_tensors(checkpoints, tmp_path):
    _, bf16, _ = checkpoints
    model = from_pretrained(bf16, dtype=jnp.float32)
    save_pretrained(model, tmp_path / "out")  # in config.json's dtype: bfloat16
    with (
        safe_open(str(bf16 / "model.safetensors"), "pt") as a,
        safe_open(str(tmp_path / "out" / "model.safetensors"), "pt") as b,
    ):
        assert set(a.keys()) == set(b.keys())
        for name in a.keys():  # noqa: SIM118
            assert b.get_tensor(name).dtype == torch.bfloat16
            assert torch.equal(a.get_tensor(name), b.get_tensor(name)), name


def test_sinks_clamp_and_expert_biases_change_the_logits(checkpoints):
    """What the parity with transformers would not notice if it did nothing here."""
    _, bf16, _ = checkpoints
    model = from_pretrained(bf16, dtype=jnp.float32)
    ids = np.random.default_rng(1).integers(0, VOCAB, (1, 16))
    base = jax_logits(model, ids)

    def changed(name, change) -> float:  # the same graph (one compilation), one parameter changed
        other = nnx.clone(model)
        for layer in other.layers:
            module = layer.self_attn if name == "sinks" else layer.mlp
            getattr(module, name)[...] = change(getattr(module, name)[...])
        return rel_err(jax_logits(other, ids), base)

    assert changed("sinks", lambda s: s - 30.0) > 1e-3  # a sink of -30: none at all
    assert changed("down_bias", jnp.zeros_like) > 1e-3
    assert changed("router_bias", lambda b: b * 10) > 1e-3
    # The clamp at 0.5 bites on hidden states of the layers' scale (RMS-normed: about unit normal).
    moe = model.layers[0].mlp
    x = jnp.asarray(np.random.default_rng(2).standard_normal((1, 16, 64)), jnp.float32)
    unclamped = nnx.clone(moe)
    unclamped.glu = glu_of(dataclasses.replace(model.config, swiglu_limit=100.0))
    assert rel_err(unclamped(x)[0], moe(x)[0]) > 1e-2


def test_attention_sinks_run_xla_and_refuse_cudnn(checkpoints, monkeypatch):
    """cuDNN's flash attention has no sink term: "auto" picks "xla" for sink layers on a GPU and
    "cudnn" is refused with one line (the GPU is faked: the choice is made on the host)."""
    monkeypatch.setattr(attention_lib, "_backend", lambda: "gpu")
    monkeypatch.setattr(attention_lib, "_compute_capability", lambda: (9, 0))
    args = ("auto", jnp.bfloat16, 64, False)
    assert attention_lib.resolve_implementation(*args) == "cudnn"
    assert attention_lib.resolve_implementation(*args, sinks=True) == "xla"
    assert "attention sinks: no cudnn kernel" in attention_lib.describe(*args, 64, (128, None), sinks=True)
    config = from_pretrained(checkpoints[1], dtype=jnp.float32).config
    with pytest.raises(ValueError, match="attention='cudnn' with attention sinks .*use attention='auto' or 'xla'"):
        nnx.eval_shape(lambda: CausalLM(config, dtype=jnp.bfloat16, attention="cudnn", rngs=nnx.Rngs(0)))


def test_dequantize_base_checkpoint(checkpoints, tmp_path):
    """NeMo RL's policy.dequantize_base_checkpoint: null or true dequantize an MXFP4 checkpoint
    (the dry run says so); false is refused in one line, since nothing here trains MXFP4."""
    from jax_sft.config import load_config, make_plan
    from jax_sft.errors import ConfigError
    from jax_sft.models.hf_read import read_config

    mxfp4 = checkpoints[2]
    model_config = read_config(mxfp4)
    keys = [f"policy.model_name={mxfp4}", "policy.max_total_sequence_length=64", "policy.train_global_batch_size=8"]
    for value in ("null", "true"):
        plan = make_plan(
            load_config(None, [*keys, f"policy.dequantize_base_checkpoint={value}"]),
            devices=8,
            model_config=model_config,
        )
        assert "model: MXFP4 weights, dequantized on load to float32" in plan.describe(1, 8)
    with pytest.raises(
        ConfigError, match="policy.dequantize_base_checkpoint=false, but the model stores weights in MXFP4"
    ):
        make_plan(
            load_config(None, [*keys, "policy.dequantize_base_checkpoint=false"]), devices=8, model_config=model_config
        )
