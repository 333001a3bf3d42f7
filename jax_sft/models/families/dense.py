"""Dense decoders with Llama's layout: Llama, Mistral, Qwen2, Qwen3, OLMo 2 and Phi-3.

Each reading mirrors the transformers 5 config class of the family (its defaults, `head_dim`,
which projections have biases, which layers use a sliding window), so that a checkpoint means the
same here as in `transformers`.
"""

from __future__ import annotations

from typing import Any

from jax_sft.models.families.common import (
    LLAMA_WEIGHTS,
    QK_NORM_WEIGHTS,
    biases,
    every_layer,
    no_dropout,
    qwen_windows,
)
from jax_sft.models.registry import Family, register
from jax_sft.models.weights import HEADS, IN_HEADS, LINEAR, SAME, HfTensor

PRE_NORM = "pre-norm attention (MHA / GQA / MQA), gated MLP"


def _llama(d: dict[str, Any], source: str) -> dict[str, Any]:
    bias = d.get("attention_bias", False)
    return dict(**biases(bias, bias, d.get("mlp_bias", False)), sliding_windows=every_layer(d, None))


def _mistral(d: dict[str, Any], source: str) -> dict[str, Any]:
    return dict(**biases(False, False, False), sliding_windows=every_layer(d, d.get("sliding_window")))


def _qwen2(d: dict[str, Any], source: str) -> dict[str, Any]:
    # Hard-coded in Qwen2Attention: q/k/v biases, none on o_proj.
    return dict(**biases(True, False, False), sliding_windows=qwen_windows(d, source))


def _qwen3(d: dict[str, Any], source: str) -> dict[str, Any]:
    bias = d.get("attention_bias", False)
    return dict(**biases(bias, bias, False), qk_norm="head", sliding_windows=qwen_windows(d, source))


def _olmo2(d: dict[str, Any], source: str) -> dict[str, Any]:
    """OLMo 2: norms after attention and after the MLP (none before), q/k RMSNorm over the whole
    projection (all heads at once), biases on all four attention projections with attention_bias."""
    bias = d.get("attention_bias", False)
    return dict(
        **biases(bias, bias, False), norm_placement="post", qk_norm="projection", sliding_windows=every_layer(d, None)
    )


def _phi3(d: dict[str, Any], source: str) -> dict[str, Any]:
    """Phi-3: Llama's layers with fused q/k/v and gate/up tensors in the checkpoint, no biases, the
    window (when set) on every layer."""
    no_dropout(d, source, "resid_pdrop", "embd_pdrop")
    return dict(**biases(False, False, False), sliding_windows=every_layer(d, d.get("sliding_window")))


register(
    Family(
        name="llama",
        architectures=("LlamaForCausalLM",),
        label="Llama 2, 3, 3.1, 3.2",
        layer_kinds=PRE_NORM,
        weights=LLAMA_WEIGHTS,
        fields=_llama,
    )
)
register(
    Family(
        name="qwen2",
        architectures=("Qwen2ForCausalLM",),
        label="Qwen2, Qwen2.5",
        layer_kinds=PRE_NORM + "; q/k/v biases; sliding window on the upper layers",
        weights=LLAMA_WEIGHTS,
        fields=_qwen2,
    )
)
register(
    Family(
        name="qwen3",
        architectures=("Qwen3ForCausalLM",),
        label="Qwen3 (dense)",
        layer_kinds=PRE_NORM + "; RMSNorm on q and k per head",
        weights={**LLAMA_WEIGHTS, **QK_NORM_WEIGHTS},
        fields=_qwen3,
        head_dim=128,
    )
)
register(
    Family(
        name="mistral",
        architectures=("MistralForCausalLM",),
        label="Mistral",
        layer_kinds=PRE_NORM + "; sliding window on every layer",
        weights=LLAMA_WEIGHTS,
        fields=_mistral,
    )
)
register(
    Family(
        name="olmo2",
        architectures=("Olmo2ForCausalLM",),
        label="OLMo 2",
        layer_kinds="attention and gated MLP each followed by RMSNorm (post-norm); RMSNorm on the whole q and k "
        "projections",
        weights={
            **LLAMA_WEIGHTS,
            **{
                f"layers.{{i}}.self_attn.{p}_norm.weight": HfTensor(
                    f"model.layers.{{i}}.self_attn.{p}_norm.weight", HEADS
                )
                for p in "qk"
            },  # [heads, head_dim] here, [heads * head_dim] in the file
            "layers.{i}.post_feedforward_layernorm.weight": HfTensor(
                "model.layers.{i}.post_feedforward_layernorm.weight", SAME
            ),
        },
        fields=_olmo2,
        defaults=dict(rms_norm_eps=1e-5, vocab_size=50304),
    )
)
register(
    Family(
        name="phi3",
        architectures=("Phi3ForCausalLM",),
        label="Phi-3, Phi-3.5 (mini, medium)",
        layer_kinds=PRE_NORM + "; fused qkv_proj and gate_up_proj tensors",
        weights={
            **LLAMA_WEIGHTS,
            **{
                f"layers.{{i}}.self_attn.{p}_proj.kernel": HfTensor(
                    "model.layers.{i}.self_attn.qkv_proj.weight", IN_HEADS, part
                )
                for part, p in enumerate("qkv")
            },
            **{
                f"layers.{{i}}.mlp.{p}_proj.kernel": HfTensor("model.layers.{i}.mlp.gate_up_proj.weight", LINEAR, part)
                for part, p in enumerate(("gate", "up"))
            },
        },
        fields=_phi3,
        defaults=dict(rms_norm_eps=1e-5, max_position_embeddings=4096, vocab_size=32064),
    )
)
