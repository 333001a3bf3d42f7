"""Gemma 2 and Gemma 3 (and the text model of Gemma3ForConditionalGeneration checkpoints).

(1 + w) RMSNorms before and after both blocks, embeddings scaled by sqrt(hidden), the softmax scale
from query_pre_attn_scalar, soft-capped attention scores (Gemma 2) and logits, alternating
sliding-window and full layers, and Gemma 3's q/k norms and separate RoPE of the sliding layers.
The transformers 5 config classes' defaults fill what a config.json leaves out (hub Gemma 3
text_configs list only what differs from Gemma3TextConfig).
"""

from __future__ import annotations

from typing import Any

from jax_sft.models.errors import ModelConfigError
from jax_sft.models.families.common import (
    FEEDFORWARD_NORM_WEIGHTS,
    LLAMA_WEIGHTS,
    QK_NORM_WEIGHTS,
    biases,
    windows_by_layer_types,
)
from jax_sft.models.registry import Family, register
from jax_sft.models.rope import RopeConfig, read_rope

_DEFAULTS = dict(
    head_dim=256,
    hidden_activation="gelu_pytorch_tanh",
    rms_norm_eps=1e-6,
    tie_word_embeddings=True,
    query_pre_attn_scalar=256,
    sliding_window=4096,
    num_attention_heads=8,
    num_key_value_heads=4,
    hidden_size=2304,
    intermediate_size=9216,
    num_hidden_layers=26,
)
_LAYERS = "(1 + w) RMSNorm before and after attention and the gated GELU MLP; scaled embeddings; "
WEIGHTS = {**LLAMA_WEIGHTS, **FEEDFORWARD_NORM_WEIGHTS}


def _optional_float(x: Any) -> float | None:
    return None if x is None else float(x)


def _common(d: dict[str, Any], source: str, period: int) -> dict[str, Any]:
    """Gemma 2 / 3: the fields both have; even layers slide (Gemma 2: period 2), Gemma 3: all but
    every sliding_window_pattern-th."""
    if d.get("use_bidirectional_attention"):
        raise ModelConfigError(f"{source}: use_bidirectional_attention=true is not supported (causal LM only)")
    bias = d.get("attention_bias", False)
    default_types = [
        "sliding_attention" if (i + 1) % period else "full_attention" for i in range(int(d["num_hidden_layers"]))
    ]
    return dict(
        **biases(bias, bias, False),
        norm_placement="sandwich",
        norm_offset=1.0,
        embed_scale=True,
        query_scale=float(d["query_pre_attn_scalar"]) ** -0.5,
        final_softcap=_optional_float(d.get("final_logit_softcapping")),
        sliding_windows=windows_by_layer_types(d, d.get("sliding_window"), default_types, source),
    )


def _gemma2(d: dict[str, Any], source: str) -> dict[str, Any]:
    return dict(_common(d, source, 2), attn_softcap=_optional_float(d.get("attn_logit_softcapping")))


def _gemma3_ropes(d: dict[str, Any], source: str) -> tuple[RopeConfig, RopeConfig]:
    """(full-attention RoPE, sliding-window RoPE). transformers 5 writes rope_parameters per layer
    type; older files write rope_theta (+ rope_scaling, global layers only) and rope_local_base_freq."""
    params = d.get("rope_parameters")
    if isinstance(params, dict) and {"full_attention", "sliding_attention"} <= set(params):
        return tuple(
            read_rope({**d, "rope_parameters": params[t] or {"rope_type": "default"}}, f"{source} rope_parameters.{t}")
            for t in ("full_attention", "sliding_attention")
        )
    full = read_rope({**d, "rope_theta": d.get("rope_theta", 1_000_000.0)}, source)
    return full, RopeConfig(theta=float(d.get("rope_local_base_freq", 10_000.0)))


def _gemma3(d: dict[str, Any], source: str) -> dict[str, Any]:
    # Gemma 3's attention ignores attn_logit_softcapping, as transformers does.
    return dict(
        _common(d, source, int(d.get("sliding_window_pattern", 6))),
        qk_norm="head",
        local_rope=_gemma3_ropes(d, source)[1],
    )


def _text_of_multimodal(d: dict[str, Any], source: str) -> dict[str, Any]:
    """Gemma3ForConditionalGeneration: its `text_config` as a Gemma3ForCausalLM (what the export
    writes; the vision tower is not part of the model)."""
    text = d.get("text_config")
    if not isinstance(text, dict):
        raise ModelConfigError(f"{source}: Gemma3ForConditionalGeneration needs a text_config dict")
    text = {**text, "architectures": ["Gemma3ForCausalLM"], "model_type": "gemma3_text"}
    text.setdefault("tie_word_embeddings", d.get("tie_word_embeddings", True))
    if text.get("dtype") is None and text.get("torch_dtype") is None:
        text["dtype"] = d.get("dtype") or d.get("torch_dtype")
    return text


register(
    Family(
        name="gemma2",
        architectures=("Gemma2ForCausalLM",),
        label="Gemma 2",
        layer_kinds=_LAYERS + "soft-capped attention scores and logits; sliding window on even layers",
        weights=WEIGHTS,
        fields=_gemma2,
        activation_key="hidden_activation",
        defaults=dict(
            _DEFAULTS,
            vocab_size=256000,
            max_position_embeddings=8192,
            final_logit_softcapping=30.0,
            attn_logit_softcapping=50.0,
        ),
    )
)
register(
    Family(
        name="gemma3",
        architectures=("Gemma3ForCausalLM",),
        label="Gemma 3 (text)",
        layer_kinds=_LAYERS + "RMSNorm on q and k per head; 5 sliding-window layers (own RoPE) per full one",
        weights={**WEIGHTS, **QK_NORM_WEIGHTS},
        fields=_gemma3,
        activation_key="hidden_activation",
        rope=lambda d, source: _gemma3_ropes(d, source)[0],
        defaults=dict(_DEFAULTS, vocab_size=262208, max_position_embeddings=131072, sliding_window_pattern=6),
    )
)
register(
    Family(
        name="gemma3_multimodal",
        architectures=("Gemma3ForConditionalGeneration",),
        label="Gemma 3 (multimodal checkpoints: the text model)",
        layer_kinds="as Gemma 3; the vision tower is not read, and the export is a text-only Gemma3ForCausalLM",
        weights={},
        fields=lambda d, source: {},
        text_config=_text_of_multimodal,
    )
)
