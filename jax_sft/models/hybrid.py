"""The layers of a hybrid model (Nemotron-H): each layer is ONE block, with its own pre-norm and
residual, x + mixer(norm(x)); `ModelConfig.layer_kinds[i]` says which mixer:

    "mamba"      Mamba-2 (models/mamba.py)
    "attention"  self-attention (layers.Attention; no RoPE when config.use_rope is false)
    "mlp"        an MLP that is not gated: down(act(up(x))) (`UpDownMLP`; Nemotron-H: relu^2)
    "moe"        sigmoid-routed experts plus a shared expert (`SigmoidMoE`)

Parameter paths follow transformers' (`layers.<i>.norm`, `layers.<i>.mixer.<...>`).
`SigmoidMoE` computes transformers' NemotronHMoE: router logits in float32, sigmoid scores; the
experts chosen by scores + e_score_correction_bias (a buffer in HF: loaded and exported, never
trained: no gradient reaches it and the optimizers do not decay it, `options.BUFFERS`), among the `topk_groups` best
of `expert_groups` groups (a group's score: the sum of its two best); weights the plain scores of
the chosen ones, renormalised (+1e-20) when norm_topk_prob, times routed_scaling_factor. The
experts run through moe.py's grouped matmuls (ungated), the shared expert on every token. Its
router statistics (for the logged load-balancing metric) use the scores normalised to sum to 1.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jax_sft.models import context as context_lib
from jax_sft.models.config import ModelConfig
from jax_sft.models.layers import ACTIVATIONS, Attention, RMSNorm, meta, normal_init, projection
from jax_sft.models.mamba import Mamba2
from jax_sft.models.moe import expert_parallel, grouped_experts, ungated
from jax_sft.models.options import Fp8Config, LoraConfig


class UpDownMLP(nnx.Module):
    """down(act(up(x))): Nemotron-H's MLP layers and its MoE's shared expert."""

    def __init__(
        self,
        cfg: ModelConfig,
        size: int,
        *,
        dtype,
        param_dtype,
        rngs: nnx.Rngs,
        lora: LoraConfig | None = None,
        adapted: frozenset[str] = frozenset(),
        fp8: Fp8Config | None = None,
    ):
        e, bias = cfg.hidden_size, cfg.mlp_bias
        ad = lambda name: lora if name in adapted else None  # noqa: E731
        dense = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs, fp8=fp8)
        self.up_proj = projection(
            "bte,em->btm", (e, size), ("embed", "mlp"), (size,) if bias else None, ("mlp",), lora=ad("up_proj"), **dense
        )
        self.down_proj = projection(
            "btm,me->bte",
            (size, e),
            ("mlp", "embed"),
            (e,) if bias else None,
            ("embed",),
            lora=ad("down_proj"),
            **dense,
        )
        self.act = ACTIVATIONS[cfg.activation]

    def __call__(self, x, token_mask=None, dropout_key=None):
        ku, kd = (None, None) if dropout_key is None else tuple(jax.random.split(dropout_key, 2))
        return self.down_proj(self.act(self.up_proj(x, ku)), kd), None


class Router(nnx.Module):
    """weight [embed, experts] and e_score_correction_bias [experts], float32 in use."""

    def __init__(self, e: int, n: int, *, param_dtype, rngs: nnx.Rngs):
        self.weight = nnx.Param(normal_init(rngs.params(), (e, n), param_dtype), **meta("embed", "router"))
        self.e_score_correction_bias = nnx.Param(jnp.zeros((n,), param_dtype), **meta("router"))


class Experts(nnx.Module):
    """Ungated expert MLPs: up_proj [experts, embed, mlp], down_proj [experts, mlp, embed]."""

    def __init__(self, cfg: ModelConfig, *, param_dtype, rngs: nnx.Rngs):
        e, m, n = cfg.hidden_size, cfg.moe_intermediate_size, cfg.num_experts
        init = lambda shape, *names: nnx.Param(normal_init(rngs.params(), shape, param_dtype), **meta(*names))  # noqa: E731
        self.up_proj = init((n, e, m), "expert", "embed", "expert_mlp")
        self.down_proj = init((n, m, e), "expert", "expert_mlp", "embed")


class SigmoidMoE(nnx.Module):
    """Nemotron-H's mixture of experts (see the module docstring)."""

    def __init__(
        self,
        cfg: ModelConfig,
        *,
        dtype,
        param_dtype,
        rngs: nnx.Rngs,
        mesh=None,
        lora: LoraConfig | None = None,
        adapted: frozenset[str] = frozenset(),
    ):
        self.gate = Router(cfg.hidden_size, cfg.num_experts, param_dtype=param_dtype, rngs=rngs)
        self.experts = Experts(cfg, param_dtype=param_dtype, rngs=rngs)
        self.shared_experts = UpDownMLP(
            cfg,
            cfg.shared_expert_intermediate_size,
            dtype=dtype,
            param_dtype=param_dtype,
            rngs=rngs,
            lora=lora,
            adapted=adapted,
        )
        self.top_k, self.norm_topk_prob = cfg.experts_per_token, cfg.norm_topk_prob
        self.groups, self.topk_groups, self.scaling = cfg.expert_groups, cfg.topk_groups, cfg.routed_scaling_factor
        self.act = ACTIVATIONS[cfg.activation]
        self.dtype = dtype
        self.mesh = mesh if mesh is not None and mesh.shape.get("expert", 1) > 1 else None

    def route(self, x2d: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        """[tokens, embed] -> fp32 sigmoid scores [tokens, experts], top-k (weights, experts)."""
        logits = jnp.einsum("ne,ex->nx", x2d.astype(jnp.float32), self.gate.weight[...].astype(jnp.float32))
        scores = jax.nn.sigmoid(logits)
        choice = scores + self.gate.e_score_correction_bias[...].astype(jnp.float32)
        n, experts = choice.shape
        grouped = choice.reshape(n, self.groups, experts // self.groups)
        group_scores = jax.lax.top_k(grouped, 2)[0].sum(-1)  # [n, groups]
        best = jax.lax.top_k(group_scores, self.topk_groups)[1]
        keep = jnp.zeros((n, self.groups), bool).at[jnp.arange(n)[:, None], best].set(True)
        choice = jnp.where(jnp.repeat(keep, experts // self.groups, axis=1), choice, -jnp.inf)
        chosen = jax.lax.top_k(choice, self.top_k)[1]
        weights = jnp.take_along_axis(scores, chosen, axis=-1)
        if self.norm_topk_prob:
            weights = weights / (weights.sum(-1, keepdims=True) + 1e-20)
        return scores, weights * jnp.float32(self.scaling), chosen

    def __call__(self, x, token_mask=None, dropout_key=None):
        """-> (output like x, router statistics [2, experts] fp32: top-k counts and normalised
        score sums over the tokens of `token_mask` ([b, t], None: all))."""
        b, t, e = x.shape
        x2d = x.reshape(b * t, e)
        scores, weights, chosen = self.route(x2d)
        up, down = self.experts.up_proj[...].astype(self.dtype), self.experts.down_proj[...].astype(self.dtype)
        x2d = x2d.astype(self.dtype)
        if self.mesh is None:
            routed = grouped_experts(x2d, chosen, weights, None, up, down, ungated(self.act))
        else:
            routed = expert_parallel(self.mesh, x2d, chosen, weights, None, up, down, ungated(self.act))
        shared, _ = self.shared_experts(x, dropout_key=dropout_key)
        mask = jnp.ones((b * t,), jnp.float32) if token_mask is None else token_mask.reshape(-1).astype(jnp.float32)
        slot_mask = jnp.broadcast_to(mask[:, None], chosen.shape).reshape(-1)
        counts = jnp.zeros((scores.shape[-1],), jnp.float32).at[chosen.reshape(-1)].add(slot_mask)
        probs = scores / scores.sum(-1, keepdims=True)
        stats = jnp.stack([counts, (probs * mask[:, None]).sum(0)])
        return (routed.reshape(b, t, e) + shared.astype(jnp.float32)).astype(self.dtype), stats


class HybridLayer(nnx.Module):
    """One block of a hybrid model: x + mixer(norm(x)), the mixer of `cfg.layer_kinds[layer]`.
    Built and called like `decoder.DecoderLayer`; with `fp8`, the attention and MLP mixers' projections
    run FP8 matmuls (Mamba mixers and MoE experts stay in the compute dtype)."""

    def __init__(
        self,
        cfg: ModelConfig,
        layer: int,
        *,
        dtype,
        param_dtype,
        implementation: str,
        max_segments: int,
        rngs: nnx.Rngs,
        mesh=None,
        lora: LoraConfig | None = None,
        adapted: frozenset[str] = frozenset(),
        fp8: Fp8Config | None = None,
        context: context_lib.ContextParallel | None = None,
    ):
        self.kind = cfg.layer_kinds[layer]
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype=dtype, param_dtype=param_dtype)
        common = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs, lora=lora, adapted=adapted)
        if self.kind == "mamba":
            self.mixer = Mamba2(cfg, **common)
        elif self.kind == "attention":
            self.mixer = Attention(
                cfg, layer, implementation=implementation, max_segments=max_segments, fp8=fp8, context=context, **common
            )
        elif self.kind == "mlp":
            self.mixer = UpDownMLP(cfg, cfg.intermediate_size, fp8=fp8, **common)
        else:
            self.mixer = SigmoidMoE(cfg, mesh=mesh, **common)
        self.num_experts = cfg.num_experts

    def __call__(self, x, cos, sin, segment_ids, token_mask=None, dropout_key=None):
        """-> (x, router statistics [2, num_experts]; zeros but for a "moe" layer)."""
        h = self.norm(x)
        stats = None
        if self.kind == "mamba":
            y = self.mixer(h, segment_ids, dropout_key)
        elif self.kind == "attention":
            y = self.mixer(h, cos, sin, segment_ids, dropout_key)
        else:
            y, stats = self.mixer(h, token_mask, dropout_key)
        if stats is None:
            stats = jnp.zeros((2, self.num_experts), jnp.float32)
        return x + y.astype(x.dtype), stats
