"""gpt-oss (`GptOssForCausalLM`: gpt-oss-20b, gpt-oss-120b), as transformers 5 reads it.

Pre-norm layers whose attention has q/k/v/o biases and attention sinks (a learned logit per head
in the softmax's denominator), alternating sliding-window and full layers (`layer_types`; by
default sliding on the even layers), YaRN RoPE, and a mixture of experts on every layer: a router
with a bias, the softmax over the top-k logits (= the softmax renormalised over the top k), and
experts with biases and a clamped SwiGLU ((clip(up, +-limit) + 1) * g * sigmoid(alpha g), g =
min(gate, limit)). The experts' tensors are one per layer: `gate_up_proj` [experts, hidden,
2 * intermediate] holds gate and up interleaved along its last dim (gate at even indices; stored
[in, out], not transposed like nn.Linear), `down_proj` [experts, intermediate, hidden], and their
biases. The hub's checkpoints store `gate_up_proj` and `down_proj` in MXFP4 (`*_blocks` /
`*_scales`, config.json's quantization_config quant_method "mxfp4"): they are dequantized on load
(`jax_sft.models.mxfp4`), and an export writes them dequantized, without quantization_config. The
router's load-balancing loss joins the training loss when output_router_logits is true, as in
transformers.
"""

from __future__ import annotations

from typing import Any

from jax_sft.models.errors import ModelConfigError
from jax_sft.models.families.common import LLAMA_WEIGHTS, biases, windows_by_layer_types
from jax_sft.models.registry import Family, register
from jax_sft.models.rope import RopeConfig, read_rope
from jax_sft.models.weights import LINEAR, SAME, HfTensor

# GptOssConfig's RoPE when config.json names none.
_DEFAULT_ROPE = dict(
    rope_type="yarn", factor=32.0, beta_fast=32.0, beta_slow=1.0, truncate=False, original_max_position_embeddings=4096
)
_DEFAULT_THETA = 150000.0  # GptOssConfig.default_theta
_EXPERTS = "model.layers.{i}.mlp.experts."


def _quantization(d: dict[str, Any], source: str) -> str | None:
    """config.json's quantization_config: none, or MXFP4 (dequantized on load)."""
    qc = d.get("quantization_config")
    if not qc:
        return None
    method = qc.get("quant_method") if isinstance(qc, dict) else None
    if method != "mxfp4":
        raise ModelConfigError(
            f"{source}: quantization_config quant_method={method!r} is not supported; gpt-oss checkpoints "
            "are read in bf16 / fp32 or in MXFP4 (quant_method 'mxfp4', dequantized on load)"
        )
    return method


def _gpt_oss(d: dict[str, Any], source: str) -> dict[str, Any]:
    num_layers = int(d["num_hidden_layers"])
    experts, top_k = int(d["num_local_experts"]), int(d["num_experts_per_tok"])
    if not 1 <= top_k <= experts:
        raise ModelConfigError(f"{source}: num_experts_per_tok={top_k} must be within 1..num_local_experts={experts}")
    bias = bool(d.get("attention_bias", True))
    default_types = ["sliding_attention" if (i + 1) % 2 else "full_attention" for i in range(num_layers)]
    return dict(
        **biases(bias, bias, False),
        sliding_windows=windows_by_layer_types(d, d.get("sliding_window"), default_types, source),
        attention_sinks=True,
        num_experts=experts,
        experts_per_token=top_k,
        moe_intermediate_size=int(d["intermediate_size"]),
        norm_topk_prob=True,  # softmax over the top-k logits
        moe_layers=(True,) * num_layers,
        router_aux_loss_coef=float(d["router_aux_loss_coef"]) if d.get("output_router_logits") else 0.0,
        moe_bias=True,
        expert_glu="clamped_swiglu",
        swiglu_alpha=float(d["swiglu_alpha"]),
        swiglu_limit=float(d["swiglu_limit"]),
        quantization=_quantization(d, source),
    )


def _rope(d: dict[str, Any], source: str) -> RopeConfig:
    """config.json's RoPE (YaRN on the hub's models), else GptOssConfig's; theta 150000 unless named."""
    params = dict(d.get("rope_parameters") or d.get("rope_scaling") or _DEFAULT_ROPE)
    params.setdefault("rope_theta", d.get("rope_theta") or _DEFAULT_THETA)
    return read_rope({**d, "rope_parameters": params}, source)


register(
    Family(
        name="gpt_oss",
        architectures=("GptOssForCausalLM",),
        label="gpt-oss (20b, 120b; bf16 or MXFP4 checkpoints)",
        layer_kinds="pre-norm attention with q/k/v/o biases and attention sinks, sliding-window and full "
        "layers alternating; mixture of experts on every layer (router bias, softmax over the top-k, "
        "experts with biases and a clamped SwiGLU); YaRN",
        weights={
            **LLAMA_WEIGHTS,
            "layers.{i}.self_attn.sinks": HfTensor("model.layers.{i}.self_attn.sinks", SAME),
            "layers.{i}.mlp.router": HfTensor("model.layers.{i}.mlp.router.weight", LINEAR),
            "layers.{i}.mlp.router_bias": HfTensor("model.layers.{i}.mlp.router.bias", SAME),
            "layers.{i}.mlp.gate_proj": HfTensor(_EXPERTS + "gate_up_proj", SAME, 0, interleaved=True),
            "layers.{i}.mlp.up_proj": HfTensor(_EXPERTS + "gate_up_proj", SAME, 1, interleaved=True),
            "layers.{i}.mlp.gate_bias": HfTensor(_EXPERTS + "gate_up_proj_bias", SAME, 0, interleaved=True),
            "layers.{i}.mlp.up_bias": HfTensor(_EXPERTS + "gate_up_proj_bias", SAME, 1, interleaved=True),
            "layers.{i}.mlp.down_proj": HfTensor(_EXPERTS + "down_proj", SAME),
            "layers.{i}.mlp.down_bias": HfTensor(_EXPERTS + "down_proj_bias", SAME),
        },
        fields=_gpt_oss,
        rope=_rope,
        defaults=dict(
            num_hidden_layers=36,
            num_local_experts=128,
            num_experts_per_tok=4,
            vocab_size=201088,
            hidden_size=2880,
            intermediate_size=2880,
            head_dim=64,
            num_attention_heads=64,
            num_key_value_heads=8,
            sliding_window=128,
            max_position_embeddings=131072,
            rms_norm_eps=1e-5,
            swiglu_alpha=1.702,
            swiglu_limit=7.0,
            router_aux_loss_coef=0.001,
        ),
    )
)
