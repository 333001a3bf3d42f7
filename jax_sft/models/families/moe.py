"""Mixture-of-experts decoders: Qwen3-MoE and Mixtral.

Experts, top-k, which layers are sparse and the router's aux loss, as transformers 5 reads them. A
stacked [experts, ...] parameter is one HF tensor per expert ("{j}"), as the hub and
transformers 5's save_pretrained store them. As in transformers, the load-balancing loss joins the
training loss only when config.json's `output_router_logits` is true (Qwen3-30B-A3B ships false);
it is logged either way.
"""

from __future__ import annotations

from typing import Any

from jax_sft.models.errors import ModelConfigError
from jax_sft.models.families.common import LLAMA_WEIGHTS, QK_NORM_WEIGHTS, biases, every_layer
from jax_sft.models.registry import Family, register
from jax_sft.models.weights import LINEAR, HfTensor

_LAYERS = "pre-norm attention, dropless top-k mixture of experts (grouped matmuls)"


def _experts(d: dict[str, Any], source: str) -> tuple[int, int, float]:
    """(experts, top-k, aux loss coefficient: 0 unless output_router_logits)."""
    experts = d.get("num_local_experts", d.get("num_experts", 128))
    top_k = int(d["num_experts_per_tok"])
    if not (isinstance(experts, int) and 1 <= top_k <= experts):
        raise ModelConfigError(f"{source}: num_experts_per_tok={top_k} must be within 1..num experts={experts}")
    coef = float(d["router_aux_loss_coef"]) if d.get("output_router_logits") else 0.0
    return experts, top_k, coef


def _qwen3_moe(d: dict[str, Any], source: str) -> dict[str, Any]:
    experts, top_k, coef = _experts(d, source)
    num_layers = int(d["num_hidden_layers"])
    step, dense = int(d["decoder_sparse_step"]), set(d.get("mlp_only_layers") or [])
    sparse = tuple(i not in dense and (i + 1) % step == 0 for i in range(num_layers))
    window = d.get("sliding_window", 4096) if d.get("use_sliding_window", False) else None  # every layer
    bias = d.get("attention_bias", False)
    return dict(
        **biases(bias, bias, False),
        qk_norm="head",
        sliding_windows=every_layer(d, window),
        num_experts=experts,
        experts_per_token=top_k,
        moe_intermediate_size=int(d["moe_intermediate_size"]),
        norm_topk_prob=bool(d.get("norm_topk_prob", False)),
        moe_layers=sparse,
        router_aux_loss_coef=coef,
    )


def _mixtral(d: dict[str, Any], source: str) -> dict[str, Any]:
    experts, top_k, coef = _experts(d, source)
    if float(d.get("router_jitter_noise") or 0.0) != 0.0:
        raise ModelConfigError(f"{source}: router_jitter_noise={d['router_jitter_noise']} is not supported; set 0.0")
    return dict(
        **biases(False, False, False),
        sliding_windows=every_layer(d, d.get("sliding_window")),
        num_experts=experts,
        experts_per_token=top_k,
        moe_intermediate_size=int(d["intermediate_size"]),
        norm_topk_prob=True,
        moe_layers=(True,) * int(d["num_hidden_layers"]),
        router_aux_loss_coef=coef,
    )


register(
    Family(
        name="qwen3moe",
        architectures=("Qwen3MoeForCausalLM",),
        label="Qwen3-MoE (30B-A3B, 235B-A22B)",
        layer_kinds=_LAYERS + "; RMSNorm on q and k per head; dense layers where mlp_only_layers say",
        weights={
            **LLAMA_WEIGHTS,
            **QK_NORM_WEIGHTS,
            "layers.{i}.mlp.router": HfTensor("model.layers.{i}.mlp.gate.weight", LINEAR),
            **{
                f"layers.{{i}}.mlp.{p}_proj": HfTensor(f"model.layers.{{i}}.mlp.experts.{{j}}.{p}_proj.weight", LINEAR)
                for p in ("gate", "up", "down")
            },
        },
        fields=_qwen3_moe,
        defaults=dict(
            num_experts_per_tok=8, moe_intermediate_size=768, decoder_sparse_step=1, router_aux_loss_coef=0.001
        ),
    )
)
register(
    Family(
        name="mixtral",
        architectures=("MixtralForCausalLM",),
        label="Mixtral",
        layer_kinds=_LAYERS + "; top-k weights renormalised",
        weights={
            **LLAMA_WEIGHTS,
            "layers.{i}.mlp.router": HfTensor("model.layers.{i}.block_sparse_moe.gate.weight", LINEAR),
            **{
                f"layers.{{i}}.mlp.{p}_proj": HfTensor(
                    f"model.layers.{{i}}.block_sparse_moe.experts.{{j}}.{w}.weight", LINEAR
                )
                for p, w in (("gate", "w1"), ("up", "w3"), ("down", "w2"))
            },
        },
        fields=_mixtral,
        defaults=dict(num_local_experts=8, num_experts_per_tok=2, router_aux_loss_coef=0.001),
    )
)
