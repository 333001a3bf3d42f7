"""policy.hf_config_overrides, YaRN RoPE against transformers, and the one-line refusal of the
architectures jax_sft cannot build.

Relative error is max|a - b| / max|b| over all logits, b being transformers' float32 eager model.
"""

from __future__ import annotations

import json

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from hf_models import COMMON, FAMILIES, hf_logits, jax_logits, make_hf_model

from jax_sft.models import SUPPORTED_ARCHITECTURES, from_pretrained, read_config, save_pretrained
from jax_sft.models.config import RopeConfig, apply_overrides
from jax_sft.models.rope import rope_inv_freq

VOCAB = COMMON["vocab_size"]
ORIGINAL = 64  # a small original context, so that positions far beyond it are cheap to test


def yarn(**extra) -> dict:
    """The YaRN dict of NeMo RL's sft-qwen3-0.6B-1n8g-megatron-yarn-128k recipe, scaled down."""
    return {
        **dict(
            rope_type="yarn",
            rope_theta=1000000.0,
            factor=3.2,
            truncate=True,
            beta_fast=32,
            beta_slow=1,
            mscale=1,
            mscale_all_dim=0,
            original_max_position_embeddings=ORIGINAL,
        ),
        **extra,
    }


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


def hf_with_rope(family: str, base_dir, rope: dict) -> transformers.PreTrainedModel:
    """transformers' model with `base_dir`'s weights and `rope` as its RoPE parameters."""
    config = transformers.AutoConfig.from_pretrained(base_dir, rope_scaling=rope)
    model = FAMILIES[family][1].from_pretrained(base_dir, config=config, dtype=torch.float32)
    model.config._attn_implementation = "eager"
    return model.eval()


@pytest.mark.parametrize("family", ["qwen3", "llama"])
@pytest.mark.parametrize(
    "variant",
    [{}, dict(truncate=False, mscale=2, mscale_all_dim=1), dict(attention_factor=0.8, beta_fast=16, beta_slow=2)],
)
def test_yarn_logits_match_transformers(family, variant, tmp_path):
    base = tmp_path / "base"
    make_hf_model(family, base)
    rope = yarn(**variant)
    hf = hf_with_rope(family, base, rope)
    assert hf.config.rope_parameters["rope_type"] == "yarn"
    model = from_pretrained(base, dtype=jnp.float32, hf_config_overrides={"rope_scaling": rope})
    assert model.config.rope.rope_type == "yarn"
    _, hf_attention_factor = transformers.modeling_rope_utils._compute_yarn_parameters(hf.config)
    assert model.config.rope.attention_factor == pytest.approx(hf_attention_factor, rel=1e-15)
    head_dim = model.config.head_dim
    np.testing.assert_array_equal(  # bit for bit: the same float32 operations
        rope_inv_freq(model.config.rope, head_dim), hf.model.rotary_emb.inv_freq.numpy()
    )

    rng = np.random.default_rng(0)
    ids = rng.integers(0, VOCAB, (2, 16))
    err = rel_err(jax_logits(model, ids), hf_logits(hf, ids))
    assert err < 1e-4, f"positions 0..15: rel err {err:.2e}"
    # Far beyond original_max_position_embeddings=64 (up to factor x 64 and past it).
    positions = np.sort(rng.integers(0, 4 * int(3.2 * ORIGINAL), (2, 16)), axis=1)
    assert positions.max() > 3.2 * ORIGINAL
    err = rel_err(jax_logits(model, ids, positions), hf_logits(hf, ids, positions))
    assert err < 1e-4, f"positions up to {positions.max()}: rel err {err:.2e}"


def test_yarn_changes_the_logits(tmp_path):
    """The parity above would not notice YaRN if it changed nothing."""
    make_hf_model("qwen3", tmp_path / "base")
    plain = from_pretrained(tmp_path / "base", dtype=jnp.float32)
    scaled = from_pretrained(tmp_path / "base", dtype=jnp.float32, hf_config_overrides={"rope_scaling": yarn()})
    ids = np.random.default_rng(1).integers(0, VOCAB, (1, 16))
    positions = np.arange(16)[None] * 20
    assert rel_err(jax_logits(scaled, ids, positions), jax_logits(plain, ids, positions)) > 1e-2


def test_overrides_reach_the_model_and_the_export(tmp_path):
    make_hf_model("qwen3", tmp_path / "base")
    overrides = {"rope_scaling": yarn(), "rms_norm_eps": 1e-3, "max_position_embeddings": ORIGINAL}
    model = from_pretrained(tmp_path / "base", dtype=jnp.float32, hf_config_overrides=overrides)
    assert model.config.rms_norm_eps == 1e-3
    # YaRN extends the context: the length check of a run uses factor x original.
    assert model.config.max_position_embeddings == ORIGINAL
    assert model.config.context_length == int(3.2 * ORIGINAL)
    save_pretrained(model, tmp_path / "out")
    written = json.loads((tmp_path / "out" / "config.json").read_text())
    # transformers 5 files keep RoPE in rope_parameters; the override lands there, nothing else.
    assert written["rope_parameters"] == {**yarn()} and "rope_scaling" not in written
    assert written["rms_norm_eps"] == 1e-3
    assert read_config(tmp_path / "out").rope == model.config.rope  # no overrides needed now
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32)
    hf.config._attn_implementation = "eager"
    assert hf.config.rope_parameters["rope_type"] == "yarn"
    ids = np.random.default_rng(2).integers(0, VOCAB, (1, 16))
    positions = np.arange(16)[None] * 30
    err = rel_err(jax_logits(model, ids, positions), hf_logits(hf.eval(), ids, positions))
    assert err < 1e-4, f"HF loading the export: rel err {err:.2e}"


def test_apply_overrides_as_autoconfig_kwargs():
    old_style = {"rope_theta": 5.0, "rope_scaling": {"rope_type": "linear", "factor": 2.0}, "a": 1}
    assert apply_overrides(old_style, {"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}) == {
        "rope_theta": 5.0,
        "rope_scaling": {"rope_type": "yarn", "factor": 4.0},
        "a": 1,
    }
    new_style = {"rope_parameters": {"rope_type": "default", "rope_theta": 7.0}, "a": 1}
    assert apply_overrides(new_style, {"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}) == {
        "rope_parameters": {"rope_type": "yarn", "rope_theta": 7.0, "factor": 4.0},
        "a": 1,
    }
    assert apply_overrides(new_style, None) == new_style
    assert apply_overrides(new_style, {"a": {"b": 2}})["a"] == {"b": 2}  # replaced, not merged


def test_unknown_rope_type_is_an_error_naming_it(tmp_path):
    make_hf_model("qwen3", tmp_path / "base")
    with pytest.raises(
        ValueError,
        match=r"with policy.hf_config_overrides: rope_parameters "
        r"rope_type='longrope' is not supported",
    ):
        read_config(tmp_path / "base", {"rope_scaling": {"rope_type": "longrope", "factor": 2.0}})


@pytest.mark.parametrize(
    "arch, model_type, kind",
    [
        ("Qwen2_5_VLForConditionalGeneration", "qwen2_5_vl", "a vision-language model"),
        ("JambaForCausalLM", "jamba", "a Mamba hybrid other than Nemotron-H"),
        ("DeepseekV3ForCausalLM", "deepseek_v3", "a mixture-of-experts model"),
        ("OlmoeForCausalLM", "olmoe", "a mixture-of-experts model"),
        ("Starcoder2ForCausalLM", "starcoder2", None),
    ],
)
def test_unsupported_architectures_fail_in_one_line(arch, model_type, kind, tmp_path):
    (tmp_path / "config.json").write_text(
        json.dumps({"architectures": [arch], "model_type": model_type, "hidden_size": 8})
    )
    with pytest.raises(ValueError) as info:
        read_config(tmp_path)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"{tmp_path / 'config.json'}: architectures=['{arch}'] (model_type='{model_type}')")
    assert (f"({kind}" in message) if kind else ("model_type='starcoder2') is not" in message)
    # The list is the registry's (jax_sft/models/families/), in registration order.
    assert message.endswith("supported architectures: " + ", ".join(SUPPORTED_ARCHITECTURES))
    assert {"LlamaForCausalLM", "Olmo2ForCausalLM", "Phi3ForCausalLM", "MixtralForCausalLM"} <= set(
        SUPPORTED_ARCHITECTURES
    )


def test_rope_config_defaults_keep_other_types_unscaled():
    assert RopeConfig(theta=1.0).attention_factor == 1.0
