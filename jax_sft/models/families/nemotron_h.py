"""Nemotron-H (`NemotronHForCausalLM`: Nemotron-Nano v2 and v3): a hybrid of Mamba-2, attention,
MLP and mixture-of-experts layers, each layer one block (models/hybrid.py).

The layer pattern is config.json's `layers_block_type` (transformers 5: "linear_attention",
"full_attention", "mlp", "moe"; older "mamba", "attention"), else the hub's
`hybrid_override_pattern` ("M", "*", "-", "E"); the number of layers is its length (transformers
ignores num_hidden_layers). As transformers' modeling code: attention has no RoPE and no biases
(attention_bias and sliding_window are not used), the MLPs are not gated (mlp_hidden_act, relu2),
MLP and shared-expert biases follow mlp_bias, in_proj / out_proj biases use_bias, the conv's
use_conv_bias; the MoE router is sigmoid with the e_score_correction_bias, grouped top-k (n_group,
topk_group), routed_scaling_factor and one shared expert of moe_shared_expert_intermediate_size;
no router aux loss joins the loss (transformers computes none); lm_head is never tied to the
embeddings (transformers' class ties nothing, whatever tie_word_embeddings says). Tensors as the hub and
transformers 5's save_pretrained store them: `backbone.*`, one tensor per routed expert.

Not built (one line says so): a moe_latent_size (latent expert projections), mamba_hidden_act
other than silu, dropout.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from jax_sft.models.config import LAYER_KINDS, LAYER_PATTERN, MambaConfig
from jax_sft.models.errors import ModelConfigError
from jax_sft.models.families.common import no_dropout
from jax_sft.models.registry import Family, register
from jax_sft.models.rope import RopeConfig
from jax_sft.models.weights import HEADS, IN_HEADS, LINEAR, OUT_HEADS, SAME, HfTensor, TensorLayout

# transformers' block names (new and legacy) and the hub pattern's characters -> LAYER_KINDS.
_BLOCKS = {"linear_attention": "mamba", "mamba": "mamba", "full_attention": "attention", "attention": "attention"}
_BLOCKS |= {"mlp": "mlp", "moe": "moe"}
_PATTERN = {c: kind for kind, c in LAYER_PATTERN.items()}
assert set(_BLOCKS.values()) == set(LAYER_KINDS)


def layer_kinds(d: dict[str, Any], source: str) -> tuple[str, ...]:
    """The layer kinds of a Nemotron-H config dict (see the module docstring)."""
    blocks = d.get("layers_block_type") or d.get("layer_types")
    if blocks is None:
        pattern = d.get("hybrid_override_pattern")
        if not isinstance(pattern, str) or not pattern or set(pattern) - set(_PATTERN):
            raise ModelConfigError(
                f"{source}: a NemotronHForCausalLM needs layers_block_type (a list of {sorted(_BLOCKS)}) or "
                f"hybrid_override_pattern (characters of {''.join(_PATTERN)}), got {pattern!r}"
            )
        return tuple(_PATTERN[c] for c in pattern)
    if not isinstance(blocks, list) or not blocks or any(b not in _BLOCKS for b in blocks):
        raise ModelConfigError(f"{source}: layers_block_type={blocks!r}: expected a list of {sorted(_BLOCKS)}")
    return tuple(_BLOCKS[b] for b in blocks)


def _prepare(d: dict[str, Any], source: str) -> dict[str, Any]:
    """num_hidden_layers from the layer pattern; the norms' epsilon under the common key."""
    return {**d, "num_hidden_layers": len(layer_kinds(d, source)), "rms_norm_eps": d["layer_norm_epsilon"]}


def _number(x: Any) -> float:
    """A config number; transformers 5 writes infinity as {"__float__": "Infinity"}."""
    return float(x["__float__"]) if isinstance(x, dict) and "__float__" in x else float(x)


def _mamba(d: dict[str, Any], source: str) -> MambaConfig:
    if d.get("mamba_hidden_act", "silu") != "silu":
        raise ModelConfigError(f"{source}: mamba_hidden_act={d['mamba_hidden_act']!r} is not supported (silu)")
    heads, groups = int(d["mamba_num_heads"]), int(d["n_groups"])
    if heads % groups:
        raise ModelConfigError(f"{source}: mamba_num_heads={heads} is not a multiple of n_groups={groups}")
    limit = tuple(_number(x) for x in d["time_step_limit"])
    return MambaConfig(
        num_heads=heads,
        head_dim=int(d["mamba_head_dim"]),
        state_size=int(d["ssm_state_size"]),
        groups=groups,
        conv_kernel=int(d["conv_kernel"]),
        chunk_size=int(d["chunk_size"]),
        conv_bias=bool(d["use_conv_bias"]),
        proj_bias=bool(d["use_bias"]),
        dt_limit=(limit[0], limit[1]),
        eps=float(d["layer_norm_epsilon"]),
    )


def _moe(d: dict[str, Any], source: str) -> dict[str, Any]:
    if d.get("moe_latent_size") is not None:
        raise ModelConfigError(
            f"{source}: moe_latent_size={d['moe_latent_size']} (latent expert projections) is not supported"
        )
    experts = int(d.get("n_routed_experts", d.get("num_local_experts", 8)))
    top_k, groups, topk_groups = int(d["num_experts_per_tok"]), int(d["n_group"]), int(d["topk_group"])
    if not (1 <= top_k <= experts and experts % groups == 0 and experts // groups >= 2 and 1 <= topk_groups <= groups):
        raise ModelConfigError(
            f"{source}: n_routed_experts={experts}, num_experts_per_tok={top_k}, n_group={groups}, "
            f"topk_group={topk_groups}: expected top-k within 1..experts, groups of >= 2 experts, "
            "topk_group within 1..n_group"
        )
    return dict(
        num_experts=experts,
        experts_per_token=top_k,
        moe_intermediate_size=int(d["moe_intermediate_size"]),
        norm_topk_prob=bool(d["norm_topk_prob"]),
        moe_router="sigmoid",
        expert_groups=groups,
        topk_groups=topk_groups,
        routed_scaling_factor=float(d["routed_scaling_factor"]),
        shared_expert_intermediate_size=int(d["moe_shared_expert_intermediate_size"]),
    )


def _fields(d: dict[str, Any], source: str) -> dict[str, Any]:
    no_dropout(d, source, "hidden_dropout")
    kinds = layer_kinds(d, source)
    moe = _moe(d, source) if "moe" in kinds else {}
    return dict(
        tie_word_embeddings=False,  # transformers' NemotronHForCausalLM never ties lm_head to the embeddings
        qkv_bias=False,
        o_bias=False,
        mlp_bias=bool(d.get("mlp_bias", False)),
        sliding_windows=(None,) * len(kinds),
        layer_kinds=kinds,
        moe_layers=tuple(k == "moe" for k in kinds),
        mamba=_mamba(d, source) if "mamba" in kinds else None,
        use_rope=False,
        **moe,
    )


# ----------------------------------------------------------------------------- weights

_B = "backbone.layers.{i}.mixer."
_BC_KERNEL = TensorLayout(((0,), (1, 2, 3)), transposed=True)  # [2 * groups * state, in] -> [in, 2, groups, state]
_BC = TensorLayout(((0, 1, 2),))  # [2 * groups * state] -> [2, groups, state]
_CONV = {"x": TensorLayout(((0, 1), (2,), (3,))), "bc": TensorLayout(((0, 1, 2), (3,), (4,)))}  # [ch, 1, K]

WEIGHTS: dict[str, HfTensor] = {
    "embed_tokens.embedding": HfTensor("backbone.embeddings.weight", SAME),
    "layers.{i}.norm.weight": HfTensor("backbone.layers.{i}.norm.weight", SAME),
    # Mamba-2: in_proj's rows z, x, B and C, dt; conv1d's channels x, B and C.
    **{
        f"layers.{{i}}.mixer.in_proj.kernel_{p}": HfTensor(_B + "in_proj.weight", layout, part)
        for part, (p, layout) in enumerate((("z", IN_HEADS), ("x", IN_HEADS), ("bc", _BC_KERNEL), ("dt", LINEAR)))
    },
    **{
        f"layers.{{i}}.mixer.in_proj.bias_{p}": HfTensor(_B + "in_proj.bias", layout, part)
        for part, (p, layout) in enumerate((("z", HEADS), ("x", HEADS), ("bc", _BC), ("dt", SAME)))
    },
    **{
        f"layers.{{i}}.mixer.conv1d.kernel_{p}": HfTensor(_B + "conv1d.weight", _CONV[p], n)
        for n, p in enumerate(["x", "bc"])
    },
    **{
        f"layers.{{i}}.mixer.conv1d.bias_{p}": HfTensor(_B + "conv1d.bias", layout, n)
        for n, (p, layout) in enumerate((("x", HEADS), ("bc", _BC)))
    },
    **{f"layers.{{i}}.mixer.{p}": HfTensor(_B + p, SAME) for p in ("dt_bias", "A_log", "D")},
    "layers.{i}.mixer.norm.weight": HfTensor(_B + "norm.weight", HEADS),
    "layers.{i}.mixer.out_proj.kernel": HfTensor(_B + "out_proj.weight", OUT_HEADS),
    "layers.{i}.mixer.out_proj.bias": HfTensor(_B + "out_proj.bias", SAME),
    # Attention (no biases).
    **{f"layers.{{i}}.mixer.{p}_proj.kernel": HfTensor(_B + f"{p}_proj.weight", IN_HEADS) for p in "qkv"},
    "layers.{i}.mixer.o_proj.kernel": HfTensor(_B + "o_proj.weight", OUT_HEADS),
    # MLP, and the MoE's shared expert.
    **{
        f"layers.{{i}}.mixer.{parent}{p}_proj.{kind}": HfTensor(_B + f"{parent}{p}_proj.{hf}", layout)
        for parent in ("", "shared_experts.")
        for p in ("up", "down")
        for kind, hf, layout in (("kernel", "weight", LINEAR), ("bias", "bias", SAME))
    },
    # MoE: router, its correction bias, routed experts (one HF tensor each).
    "layers.{i}.mixer.gate.weight": HfTensor(_B + "gate.weight", LINEAR),
    "layers.{i}.mixer.gate.e_score_correction_bias": HfTensor(_B + "gate.e_score_correction_bias", SAME),
    **{
        f"layers.{{i}}.mixer.experts.{p}_proj": HfTensor(_B + f"experts.{{j}}.{p}_proj.weight", LINEAR)
        for p in ("up", "down")
    },
    "norm.weight": HfTensor("backbone.norm_f.weight", SAME),
    "lm_head.kernel": HfTensor("lm_head.weight", LINEAR),
}


# ----------------------------------------------------------------------------- counts


def projection_shapes(m, layer: int | None) -> dict[str, tuple[int, int]]:
    """(input, output) sizes of the projections LoRA may adapt in `layer` (options.HYBRID_PROJECTIONS)."""
    e = m.hidden_size
    if layer is None:
        return {"lm_head": (e, m.vocab_size)}
    kind = m.layer_kinds[layer]
    if kind == "mamba":
        return {"in_proj": (e, m.mamba.in_proj_size), "out_proj": (m.mamba.inner, e)}
    if kind == "attention":
        q, kv = m.num_heads * m.head_dim, m.num_kv_heads * m.head_dim
        return {"q_proj": (e, q), "k_proj": (e, kv), "v_proj": (e, kv), "o_proj": (q, e)}
    size = m.intermediate_size if kind == "mlp" else m.shared_expert_intermediate_size
    return {"up_proj": (e, size), "down_proj": (size, e)}


def _layer_params(m, layer: int) -> int:
    """Parameters of one layer (its norm included; the MoE's correction bias counted, though HF
    keeps it as a buffer)."""
    e, kind = m.hidden_size, m.layer_kinds[layer]
    matmuls = sum(i * o for i, o in projection_shapes(m, layer).values())
    if kind == "mamba":
        mb = m.mamba
        biases = (mb.in_proj_size + e) * mb.proj_bias + mb.conv_channels * mb.conv_bias
        return e + matmuls + biases + mb.conv_channels * mb.conv_kernel + 3 * mb.num_heads + mb.inner
    if kind == "attention":
        return e + matmuls
    mlp_biases = (projection_shapes(m, layer)["up_proj"][1] + e) * m.mlp_bias
    experts = (e + 1) * m.num_experts + 2 * m.num_experts * e * m.moe_intermediate_size if kind == "moe" else 0
    return e + matmuls + mlp_biases + experts


def param_count(m) -> int:
    """Parameters of the model (no adapters)."""
    e = m.hidden_size
    head = 0 if m.tie_word_embeddings else e * m.vocab_size
    return m.vocab_size * e + sum(_layer_params(m, i) for i in range(m.num_layers)) + e + head


def training_flops(m, sequence_lengths) -> float:
    """Forward + backward (3x forward) FLOPs: 2 per multiply-add of every active projection (the
    router and top-k experts of MoE layers, the shared expert) and the LM head; causal attention's
    QK^T and AV over n(n+1)/2 pairs; per Mamba token the depthwise conv (2 x channels x kernel)
    and Megatron-LM's estimate of the scan, 7 x inner channels x state size."""
    n = np.asarray(sequence_lengths, np.float64)
    e, per_token, attention = m.hidden_size, 2.0 * m.hidden_size * m.vocab_size, 0.0
    for layer, kind in enumerate(m.layer_kinds):
        shapes = projection_shapes(m, layer)
        matmuls = sum(i * o for i, o in shapes.values())
        if kind == "mamba":
            mb = m.mamba
            per_token += 2.0 * matmuls + 2.0 * mb.conv_channels * mb.conv_kernel + 7.0 * mb.inner * mb.state_size
        elif kind == "attention":
            per_token += 2.0 * matmuls
            attention += 2 * 2 * m.num_heads * m.head_dim * (n * (n + 1) / 2).sum()
        elif kind == "moe":
            per_token += 2.0 * (matmuls + e * m.num_experts + m.experts_per_token * 2 * e * m.moe_intermediate_size)
        else:
            per_token += 2.0 * matmuls
    return 3.0 * (per_token * n.sum() + attention)


register(
    Family(
        name="nemotron_h",
        architectures=("NemotronHForCausalLM",),
        label="Nemotron-H, Nemotron-Nano v2 (9B, 12B), v3 (30B-A3B)",
        layer_kinds=(
            "hybrid: each layer one pre-norm block of Mamba-2 (chunked SSD scan, causal conv1d, gated "
            "RMSNorm), attention without RoPE, a relu² MLP, or sigmoid-routed experts (grouped top-k, "
            "correction bias, scaling) with a shared expert"
        ),
        weights=WEIGHTS,
        fields=_fields,
        prepare=_prepare,
        # NemotronHConfig's defaults for the keys the readers use.
        defaults=dict(
            head_dim=128,
            intermediate_size=21504,
            mlp_hidden_act="relu2",
            layer_norm_epsilon=1e-5,
            mamba_num_heads=128,
            mamba_head_dim=64,
            ssm_state_size=128,
            n_groups=8,
            conv_kernel=4,
            chunk_size=128,
            use_conv_bias=True,
            use_bias=False,
            time_step_limit=[0.0, math.inf],
            num_experts_per_tok=2,
            moe_intermediate_size=7688,
            moe_shared_expert_intermediate_size=7688,
            n_group=1,
            topk_group=1,
            routed_scaling_factor=1.0,
            norm_topk_prob=True,
            tie_word_embeddings=False,
            max_position_embeddings=4096,
        ),
        activation_key="mlp_hidden_act",
        rope=lambda d, source: RopeConfig(theta=float(d.get("rope_theta") or 10000.0)),  # unused: no RoPE
        param_count=param_count,
        training_flops=training_flops,
        projection_shapes=projection_shapes,
    )
)
