"""Mixture-of-experts MLPs: top-k softmax routing, dropless.

The (token, expert) pairs are sorted by expert and run through `jax.lax.ragged_dot` grouped
matmuls, no dense loop over experts; with an "expert" mesh axis > 1 the experts are split over it
(`expert_parallel`). Each call also returns the router statistics that the decoder turns into
transformers' load-balancing loss.

Variants (`ModelConfig`): `moe_bias` adds a router bias and biases on each expert's gate, up and
down projections (gpt-oss); `expert_glu` is "gated" (act(gate) * up) or gpt-oss's
"clamped_swiglu". gpt-oss routes by softmax over the top-k logits, which is the softmax over all
experts renormalised over the top k (`norm_topk_prob`).
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import PartitionSpec as P

from jax_sft.models.config import ModelConfig
from jax_sft.models.layers import ACTIVATIONS, meta, normal_init
from jax_sft.models.sharding import BATCH_AXES, CONTEXT, context_size, dp_size


def ungated(act):
    """The glu of experts that are not gated (`grouped_experts` with gate None): act(up x)
    (Nemotron-H: relu^2)."""
    return lambda gate, up: act(up)


def glu_of(cfg: ModelConfig):
    """The experts' h = glu(gate x, up x) of `cfg.expert_glu` (fp32 or compute-dtype inputs)."""
    if cfg.expert_glu == "clamped_swiglu":
        alpha, limit = cfg.swiglu_alpha, cfg.swiglu_limit

        def clamped_swiglu(gate, up):
            gate = jnp.minimum(gate, limit)
            up = jnp.clip(up, -limit, limit)
            return (up + 1) * (gate * jax.nn.sigmoid(gate * alpha))

        return clamped_swiglu
    act = ACTIVATIONS[cfg.activation]
    return lambda gate, up: act(gate) * up


class MoE(nnx.Module):
    """Sparse MLP: router [embed, experts]; experts' gate/up [experts, embed, mlp], down
    [experts, mlp, embed] (with `moe_bias`: router_bias [experts], gate/up_bias [experts, mlp],
    down_bias [experts, embed]). Each token goes to its top-k experts (softmax probabilities,
    renormalised over the k when `norm_topk_prob`), weighted by them; no token is dropped."""

    def __init__(self, cfg: ModelConfig, *, dtype, param_dtype, rngs: nnx.Rngs, mesh=None):
        e, m, n = cfg.hidden_size, cfg.moe_intermediate_size, cfg.num_experts
        init = lambda shape, *names: nnx.Param(normal_init(rngs.params(), shape, param_dtype), **meta(*names))  # noqa: E731
        self.router = init((e, n), "embed", "router")
        self.gate_proj = init((n, e, m), "expert", "embed", "expert_mlp")
        self.up_proj = init((n, e, m), "expert", "embed", "expert_mlp")
        self.down_proj = init((n, m, e), "expert", "expert_mlp", "embed")
        zeros = lambda shape, *names: nnx.Param(jnp.zeros(shape, param_dtype), **meta(*names))  # noqa: E731
        self.router_bias = zeros((n,), "router") if cfg.moe_bias else None
        self.gate_bias = zeros((n, m), "expert", "expert_mlp") if cfg.moe_bias else None
        self.up_bias = zeros((n, m), "expert", "expert_mlp") if cfg.moe_bias else None
        self.down_bias = zeros((n, e), "expert", "embed") if cfg.moe_bias else None
        self.top_k, self.norm_topk_prob = cfg.experts_per_token, cfg.norm_topk_prob
        self.glu = glu_of(cfg)
        self.dtype = dtype
        # A mesh with an expert axis > 1: experts run under `expert_parallel`.
        self.mesh = mesh if mesh is not None and mesh.shape.get("expert", 1) > 1 else None

    def route(self, x2d):
        """[tokens, embed] -> fp32 probabilities [tokens, experts], top-k (weights, experts)."""
        logits = jnp.einsum("ne,ex->nx", x2d, self.router[...].astype(self.dtype))
        if self.router_bias is not None:
            logits = logits + self.router_bias[...].astype(self.dtype)
        probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
        weights, experts = jax.lax.top_k(probs, self.top_k)
        if self.norm_topk_prob:
            weights = weights / weights.sum(axis=-1, keepdims=True)
        return probs, weights, experts

    def __call__(self, x, token_mask=None, dropout_key=None):
        """-> (output like x, router statistics [2, experts] fp32: top-k counts and probability
        sums over the tokens of `token_mask` ([b, t], None: all))."""
        b, t, e = x.shape
        x2d = x.reshape(b * t, e)
        probs, weights, experts = self.route(x2d)
        mats = tuple(w[...].astype(self.dtype) for w in (self.gate_proj, self.up_proj, self.down_proj))
        biases = tuple(
            None if b is None else b[...].astype(jnp.float32) for b in (self.gate_bias, self.up_bias, self.down_bias)
        )
        if self.mesh is None:
            out = grouped_experts(x2d, experts, weights, *mats, self.glu, biases)
        else:
            # Tokens of rows split over a context axis stay on their devices.
            n = context_size(self.mesh)
            split = n > 1 and t % n == 0 and b % dp_size(self.mesh) == 0
            out = expert_parallel(self.mesh, x2d, experts, weights, *mats, self.glu, biases, split_context=split)
        mask = jnp.ones((b * t,), jnp.float32) if token_mask is None else token_mask.reshape(-1).astype(jnp.float32)
        slot_mask = jnp.broadcast_to(mask[:, None], experts.shape).reshape(-1)
        counts = jnp.zeros((probs.shape[-1],), jnp.float32).at[experts.reshape(-1)].add(slot_mask)
        stats = jnp.stack([counts, (probs * mask[:, None]).sum(0)])
        return out.reshape(b, t, e).astype(self.dtype), stats


def grouped_experts(x, experts, weights, gate, up, down, glu, biases=(None, None, None)):
    """Dropless expert MLPs: x [n, embed]; experts, weights [n, k] -> [n, embed] fp32.

    The n * k (token, expert) pairs are sorted by expert and each expert's contiguous rows go
    through its matrices in one `jax.lax.ragged_dot` per projection, h = glu(gate x, up x) (`gate`
    None: the experts are not gated, glu gets None for gate x; `ungated`, Nemotron-H).
    `biases`: the experts' (gate [experts, mlp], up [experts, mlp], down [experts, embed]) biases
    or None each. Expert ids >= the number of experts given (another device's, under expert
    parallelism) contribute zero."""
    n, k = experts.shape
    groups = up.shape[0]
    flat = experts.reshape(-1)
    order = jnp.argsort(flat, stable=True)  # foreign ids (>= groups) sort last
    rows = x[order // k]  # [n * k, embed], grouped by expert
    owner = jnp.minimum(flat[order], groups - 1)  # each row's expert (clipped for foreign rows)
    sizes = jnp.zeros((groups,), jnp.int32).at[flat].add(1, mode="drop")
    g = None if gate is None else jax.lax.ragged_dot(rows, gate, sizes)
    u = jax.lax.ragged_dot(rows, up, sizes)
    gate_bias, up_bias, down_bias = biases
    if gate_bias is not None:
        g, u = g.astype(jnp.float32) + gate_bias[owner], u.astype(jnp.float32) + up_bias[owner]
    h = glu(g, u)
    y = jax.lax.ragged_dot(h.astype(x.dtype), down, sizes, preferred_element_type=jnp.float32)
    if down_bias is not None:
        y = y + down_bias[owner]
    y = jnp.where((flat[order] < groups)[:, None], y, 0.0)  # rows outside every group
    y = jnp.zeros_like(y).at[order].set(y).reshape(n, k, -1)  # back to (token, slot) order
    return jnp.einsum("nkd,nk->nd", y, weights.astype(jnp.float32))


def expert_parallel(
    mesh, x, experts, weights, gate, up, down, glu, biases=(None, None, None), split_context: bool = False
):
    """`grouped_experts` with the experts split over the mesh's "expert" axis (shard_map).

    Each device gathers the tokens (and their routing) of its expert-axis group, runs the pairs
    that go to its own num_experts / expert experts, and the partial outputs are summed and
    scattered back to the devices the tokens came from (all-gather / reduce-scatter, dropless).
    Expert weights arrive gathered over "fsdp" (and "context") and split over "tensor" (their mlp
    dimension, whose partial down projections are summed; the down bias is added once, after that
    sum). `split_context`: the tokens [b * t] are split over "context" too (rows whose sequence is
    split over it)."""
    rows = P((*BATCH_AXES, CONTEXT) if split_context else BATCH_AXES, None)
    up_spec, down_spec = P("expert", None, "tensor"), P("expert", "tensor", None)
    has_bias = biases[0] is not None
    bias_specs = (P("expert", "tensor"), P("expert", "tensor"), P("expert", None)) if has_bias else ()
    gate_spec = None if gate is None else up_spec  # not gated (gate None): nothing to split

    def local(x, experts, weights, gate, up, down, *bias):
        gather = partial(jax.lax.all_gather, axis_name="expert", axis=0, tiled=True)
        x, experts, weights = gather(x), gather(experts), gather(weights)
        n_local = up.shape[0]
        mine = experts - jax.lax.axis_index("expert") * n_local
        mine = jnp.where((mine >= 0) & (mine < n_local), mine, n_local)
        inner = (bias[0], bias[1], None) if bias else (None, None, None)
        y = jax.lax.psum(grouped_experts(x, mine, weights, gate, up, down, glu, inner), "tensor")
        if bias:  # sum_k w_k * down_bias[expert_k] over the slots routed to this device
            local_w = jnp.where(mine < n_local, weights.astype(jnp.float32), 0.0)
            y = y + jnp.einsum("nk,nkd->nd", local_w, bias[2][jnp.minimum(mine, n_local - 1)])
        return jax.lax.psum_scatter(y, "expert", scatter_dimension=0, tiled=True)

    specs = (rows, rows, rows, gate_spec, up_spec, down_spec, *bias_specs)
    return jax.shard_map(local, mesh=mesh, in_specs=specs, out_specs=rows)(
        x, experts, weights, gate, up, down, *(biases if has_bias else ())
    )


def dense_experts(x, experts, weights, gate, up, down, glu, biases=(None, None, None)):
    """Reference for `grouped_experts` (tests, benchmarks): every expert on every token."""
    g = None if gate is None else jnp.einsum("nd,xdm->xnm", x, gate)
    u = jnp.einsum("nd,xdm->xnm", x, up)
    gate_bias, up_bias, down_bias = biases
    if gate_bias is not None:
        g, u = g + gate_bias[:, None], u + up_bias[:, None]
    h = glu(g, u)
    y = jnp.einsum("xnm,xmd->xnd", h, down, preferred_element_type=jnp.float32)  # [experts, n, d]
    if down_bias is not None:
        y = y + down_bias[:, None]
    w = (jax.nn.one_hot(experts, up.shape[0], dtype=jnp.float32) * weights[..., None]).sum(1)
    return jnp.einsum("xnd,nx->nd", y, w)
