"""Mixture-of-experts MLPs: top-k softmax routing, dropless.

The (token, expert) pairs are sorted by expert and run through `jax.lax.ragged_dot` grouped
matmuls, no dense loop over experts; with an "expert" mesh axis > 1 the experts are split over it
(`expert_parallel`). Each call also returns the router statistics that the decoder turns into
transformers' load-balancing loss.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import PartitionSpec as P

from jax_sft.models.config import ModelConfig
from jax_sft.models.layers import ACTIVATIONS, meta, normal_init
from jax_sft.models.sharding import BATCH_AXES


class MoE(nnx.Module):
    """Sparse MLP: router [embed, experts]; experts' gate/up [experts, embed, mlp], down
    [experts, mlp, embed]. Each token goes to its top-k experts (softmax probabilities, renormalised
    over the k when `norm_topk_prob`), weighted by them; no token is dropped."""

    def __init__(self, cfg: ModelConfig, *, dtype, param_dtype, rngs: nnx.Rngs, mesh=None):
        e, m, n = cfg.hidden_size, cfg.moe_intermediate_size, cfg.num_experts
        init = lambda shape, *names: nnx.Param(normal_init(rngs.params(), shape, param_dtype), **meta(*names))  # noqa: E731
        self.router = init((e, n), "embed", "router")
        self.gate_proj = init((n, e, m), "expert", "embed", "expert_mlp")
        self.up_proj = init((n, e, m), "expert", "embed", "expert_mlp")
        self.down_proj = init((n, m, e), "expert", "expert_mlp", "embed")
        self.top_k, self.norm_topk_prob = cfg.experts_per_token, cfg.norm_topk_prob
        self.act = ACTIVATIONS[cfg.activation]
        self.dtype = dtype
        # A mesh with an expert axis > 1: experts run under `expert_parallel`.
        self.mesh = mesh if mesh is not None and mesh.shape.get("expert", 1) > 1 else None

    def route(self, x2d):
        """[tokens, embed] -> fp32 probabilities [tokens, experts], top-k (weights, experts)."""
        logits = jnp.einsum("ne,ex->nx", x2d, self.router[...].astype(self.dtype))
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
        mats = (
            self.gate_proj[...].astype(self.dtype),
            self.up_proj[...].astype(self.dtype),
            self.down_proj[...].astype(self.dtype),
        )
        if self.mesh is None:
            out = grouped_experts(x2d, experts, weights, *mats, self.act)
        else:
            out = expert_parallel(self.mesh, x2d, experts, weights, *mats, self.act)
        mask = jnp.ones((b * t,), jnp.float32) if token_mask is None else token_mask.reshape(-1).astype(jnp.float32)
        slot_mask = jnp.broadcast_to(mask[:, None], experts.shape).reshape(-1)
        counts = jnp.zeros((probs.shape[-1],), jnp.float32).at[experts.reshape(-1)].add(slot_mask)
        stats = jnp.stack([counts, (probs * mask[:, None]).sum(0)])
        return out.reshape(b, t, e).astype(self.dtype), stats


def grouped_experts(x, experts, weights, gate, up, down, act):
    """Dropless expert MLPs: x [n, embed]; experts, weights [n, k] -> [n, embed] fp32.

    The n * k (token, expert) pairs are sorted by expert and each expert's contiguous rows go
    through its matrices in one `jax.lax.ragged_dot` per projection. Expert ids >= the number of
    experts given (another device's, under expert parallelism) contribute zero. `gate` None: the
    experts are not gated, act(x @ up) @ down (Nemotron-H)."""
    n, k = experts.shape
    groups = up.shape[0]
    flat = experts.reshape(-1)
    order = jnp.argsort(flat, stable=True)  # foreign ids (>= groups) sort last
    rows = x[order // k]  # [n * k, embed], grouped by expert
    sizes = jnp.zeros((groups,), jnp.int32).at[flat].add(1, mode="drop")
    if gate is None:
        h = act(jax.lax.ragged_dot(rows, up, sizes))
    else:
        h = act(jax.lax.ragged_dot(rows, gate, sizes)) * jax.lax.ragged_dot(rows, up, sizes)
    y = jax.lax.ragged_dot(h.astype(x.dtype), down, sizes, preferred_element_type=jnp.float32)
    y = jnp.where((flat[order] < groups)[:, None], y, 0.0)  # rows outside every group
    y = jnp.zeros_like(y).at[order].set(y).reshape(n, k, -1)  # back to (token, slot) order
    return jnp.einsum("nkd,nk->nd", y, weights.astype(jnp.float32))


def expert_parallel(mesh, x, experts, weights, gate, up, down, act):
    """`grouped_experts` with the experts split over the mesh's "expert" axis (shard_map).

    Each device gathers the tokens (and their routing) of its expert-axis group, runs the pairs
    that go to its own num_experts / expert experts, and the partial outputs are summed and
    scattered back to the devices the tokens came from (all-gather / reduce-scatter, dropless).
    Expert weights arrive gathered over "fsdp" and split over "tensor" (their mlp dimension,
    whose partial down projections are summed)."""
    rows = P(BATCH_AXES, None)
    up_spec, down_spec = P("expert", None, "tensor"), P("expert", "tensor", None)
    gate_spec = None if gate is None else up_spec  # not gated (gate None): nothing to split

    def local(x, experts, weights, gate, up, down):
        gather = partial(jax.lax.all_gather, axis_name="expert", axis=0, tiled=True)
        x, experts, weights = gather(x), gather(experts), gather(weights)
        n_local = up.shape[0]
        mine = experts - jax.lax.axis_index("expert") * n_local
        mine = jnp.where((mine >= 0) & (mine < n_local), mine, n_local)
        y = jax.lax.psum(grouped_experts(x, mine, weights, gate, up, down, act), "tensor")
        return jax.lax.psum_scatter(y, "expert", scatter_dimension=0, tiled=True)

    return jax.shard_map(local, mesh=mesh, in_specs=(rows, rows, rows, gate_spec, up_spec, down_spec), out_specs=rows)(
        x, experts, weights, gate, up, down
    )


def dense_experts(x, experts, weights, gate, up, down, act):
    """Reference for `grouped_experts` (tests, benchmarks): every expert on every token."""
    h = act(jnp.einsum("nd,xdm->xnm", x, up))
    if gate is not None:
        h = act(jnp.einsum("nd,xdm->xnm", x, gate)) * jnp.einsum("nd,xdm->xnm", x, up)
    y = jnp.einsum("xnm,xmd->xnd", h, down, preferred_element_type=jnp.float32)  # [experts, n, d]
    w = (jax.nn.one_hot(experts, up.shape[0], dtype=jnp.float32) * weights[..., None]).sum(1)
    return jnp.einsum("xnd,nx->nd", y, w)
