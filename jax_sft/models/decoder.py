"""The decoder: one Flax NNX model for Llama, Qwen2, Qwen3, Mistral, Gemma 2, Gemma 3, Qwen3-MoE
and Mixtral (see `ModelConfig`, whose flags select norms, activation, soft-capping, RoPE per layer
type and mixture-of-experts layers).

    model = CausalLM(config, dtype=jnp.bfloat16, param_dtype=jnp.float32, rngs=nnx.Rngs(0))
    logits = model(input_ids, positions=None, segment_ids=None)   # [b, t, vocab] float32
    hidden = model.hidden_states(input_ids, positions, segment_ids)  # [b, t, hidden] compute dtype
    logits = model.unembed(hidden)                                   # hidden @ lm_head_kernel()

`input_ids`, `positions`, `segment_ids` are [batch, seq] integers. `positions` (default
0..seq-1) feed RoPE; for packed rows they restart at 0 in each segment. `segment_ids` restricts
attention to the token's own segment (convention in `attention.py`: 0 = padding).

Parameters are stored in `param_dtype`, the forward pass runs in `dtype` (compute); RMSNorm,
RoPE and softmax run in float32. Parameter layouts and their logical axis names are listed in
`sharding.py`. `remat` ("none", "full" or a `jax.checkpoint_policies` name) applies per layer.

Mixture of experts (`MoE`): top-k softmax routing, dropless: the (token, expert) pairs are sorted
by expert and run through `jax.lax.ragged_dot` grouped matmuls, no dense loop over experts.
`hidden_states_and_aux(...)` also returns the router's load-balancing loss, as transformers'
`load_balancing_loss_func` computes it over the real tokens (segment id > 0) of all MoE layers.

`scan_layers=True` stores the layers stacked (every layer parameter gets a leading [num_layers]
axis, path `layers.<name>` instead of `layers.<i>.<name>`) and runs them with one `jax.lax.scan`,
so compile time does not grow with depth; the values are the same as unrolled. It needs the same
attention window on every layer. `hf_io` reads and writes both layouts (HF files are per layer).
`attention` picks the kernel (see `attention.py`); `max_segments` bounds the segments per packed
row for the cuDNN packed layout.
"""

from __future__ import annotations

import dataclasses
import math
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import PartitionSpec as P

from jax_sft.errors import SettingError
from jax_sft.models import attention as attention_lib
from jax_sft.models import kv_cache as kv_cache_lib
from jax_sft.models.config import ModelConfig, RopeConfig
from jax_sft.models.lora import LM_HEAD, LoRA, LoraConfig

REMAT_POLICIES = (
    "none",
    "full",
    "dots_saveable",
    "dots_with_no_batch_dims_saveable",
    "checkpoint_dots",
    "checkpoint_dots_with_no_batch_dims",
    "nothing_saveable",
    "everything_saveable",
)

_normal = nnx.initializers.normal(0.02)  # HF's initializer_range default


def _meta(*names: str) -> dict:
    """Param metadata: logical axis names; sharding is applied by the caller (sharding.py)."""
    return {"out_sharding": names, "eager_sharding": False}


class RMSNorm(nnx.Module):
    """(offset + weight) * x / sqrt(mean(x^2) + eps), in float32; returns `dtype`.
    weight: [features]; offset 0 (Llama) or 1 (Gemma, whose weights are stored around 0)."""

    def __init__(self, features: int, eps: float, *, dtype, param_dtype, offset: float = 0.0):
        self.weight = nnx.Param(jnp.full((features,), 1.0 - offset, param_dtype), **_meta("norm"))
        self.eps = eps
        self.offset = offset
        self.dtype = dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return ((self.offset + self.weight[...].astype(jnp.float32)) * normed).astype(self.dtype)


def rope_inv_freq(rope: RopeConfig, head_dim: int) -> np.ndarray:
    """[head_dim // 2] float32 inverse frequencies, bit-for-bit as transformers computes them
    (float32 exponent, power in float64 rounded to float32, llama3 smoothing in float32)."""
    exponent = np.arange(0, head_dim, 2).astype(np.float32) / np.float32(head_dim)
    pos_freqs = (np.float64(rope.theta) ** exponent.astype(np.float64)).astype(np.float32)
    inv_freq = np.float32(1.0) / pos_freqs
    if rope.rope_type == "linear":
        inv_freq = inv_freq / np.float32(rope.factor)
    elif rope.rope_type == "llama3":
        factor = np.float32(rope.factor)
        low, high = rope.low_freq_factor, rope.high_freq_factor
        old_len = rope.original_max_position_embeddings
        wavelen = np.float32(2 * np.pi) / inv_freq
        scaled = np.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
        smooth = (np.float32(old_len) / wavelen - np.float32(low)) / np.float32(high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        is_medium = ~(wavelen < old_len / high) & ~(wavelen > old_len / low)
        inv_freq = np.where(is_medium, smoothed, scaled)
    elif rope.rope_type == "yarn":
        inv_freq = _yarn_inv_freq(rope, head_dim, pos_freqs)
    return inv_freq.astype(np.float32)


def _yarn_inv_freq(rope: RopeConfig, head_dim: int, pos_freqs: np.ndarray) -> np.ndarray:
    """YaRN: a per-dimension blend of the plain (extrapolated) and factor-scaled (interpolated)
    frequencies over a linear ramp between the dimensions where the original context holds
    beta_fast and beta_slow rotations; in float32 as transformers computes it."""

    def correction_dim(rotations: float) -> float:
        turns = rope.original_max_position_embeddings / (rotations * 2 * math.pi)
        return head_dim * math.log(turns) / (2 * math.log(rope.theta))

    low, high = correction_dim(rope.beta_fast), correction_dim(rope.beta_slow)
    if rope.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, head_dim - 1)
    if low == high:
        high += 0.001  # transformers' guard against a zero-width ramp
    ramp = (np.arange(head_dim // 2, dtype=np.float32) - np.float32(low)) / np.float32(high - low)
    extrapolation = np.float32(1) - np.clip(ramp, 0, 1).astype(np.float32)
    extrapolated = np.float32(1.0) / pos_freqs
    interpolated = np.float32(1.0) / (np.float32(rope.factor) * pos_freqs)
    return interpolated * (1 - extrapolation) + extrapolated * extrapolation


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """x: [b, t, heads, d]; cos, sin: [b, t, d/2] float32. Rotates halves (HF's rotate_half) in fp32."""
    x32 = x.astype(jnp.float32)
    x1, x2 = jnp.split(x32, 2, axis=-1)
    c, s = cos[:, :, None, :], sin[:, :, None, :]
    return jnp.concatenate([x1 * c - x2 * s, x2 * c + x1 * s], axis=-1)


class Projection(nnx.Einsum):
    """`nnx.Einsum` plus an optional LoRA adapter (`lora`; None: the plain projection)."""

    def __init__(self, *args, lora: LoRA | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.lora = nnx.data(lora)

    def __call__(self, x: jax.Array, dropout_key: jax.Array | None = None) -> jax.Array:
        y = super().__call__(x)
        return y if self.lora is None else y + self.lora(x, dropout_key).astype(y.dtype)


def _dense(einsum: str, kernel: tuple[int, ...], names: tuple[str, ...], bias: tuple[int, ...] | None,
           bias_names: tuple[str, ...], *, dtype, param_dtype, rngs: nnx.Rngs,
           lora: LoraConfig | None = None) -> Projection:
    """A projection; with `lora`, plus an adapter over the kernel's input and output dimensions."""
    adapter = None
    if lora is not None:
        x_sub, rest = einsum.split(",")
        k_sub, y_sub = rest.split("->")
        ins = "".join(c for c in k_sub if c in x_sub)
        outs = "".join(c for c in k_sub if c in y_sub)
        dims = {c: (kernel[i], names[i]) for i, c in enumerate(k_sub)}
        adapter = LoRA(lora, tuple(dims[c] for c in ins), tuple(dims[c] for c in outs), ins, outs,
                       dtype=dtype, rngs=rngs)
    return Projection(
        einsum,
        kernel,
        bias,
        dtype=dtype,
        param_dtype=param_dtype,
        kernel_init=_normal,
        bias_init=nnx.initializers.zeros,
        kernel_metadata=_meta(*names),
        bias_metadata=_meta(*bias_names),
        rngs=rngs,
        lora=adapter,
    )


def _keys(key: jax.Array | None, n: int) -> list[jax.Array | None]:
    """n dropout keys from one (all None when `key` is None: no dropout)."""
    return [None] * n if key is None else list(jax.random.split(key, n))


class Attention(nnx.Module):
    def __init__(self, cfg: ModelConfig, layer: int, *, dtype, param_dtype, implementation: str,
                 max_segments: int, rngs: nnx.Rngs, lora: LoraConfig | None = None,
                 adapted: frozenset[str] = frozenset()):
        e, n, kv, d = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        dense = partial(_dense, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        qkv_bias = cfg.qkv_bias
        ad = lambda name: lora if name in adapted else None  # noqa: E731
        self.q_proj = dense("bte,ehd->bthd", (e, n, d), ("embed", "q_heads", "head_dim"),
                            (n, d) if qkv_bias else None, ("q_heads", "head_dim"), lora=ad("q_proj"))
        self.k_proj = dense("bte,ehd->bthd", (e, kv, d), ("embed", "kv_heads", "head_dim"),
                            (kv, d) if qkv_bias else None, ("kv_heads", "head_dim"), lora=ad("k_proj"))
        self.v_proj = dense("bte,ehd->bthd", (e, kv, d), ("embed", "kv_heads", "head_dim"),
                            (kv, d) if qkv_bias else None, ("kv_heads", "head_dim"), lora=ad("v_proj"))
        self.o_proj = dense("bthd,hde->bte", (n, d, e), ("q_heads", "head_dim", "embed"),
                            (e,) if cfg.o_bias else None, ("embed",), lora=ad("o_proj"))
        if cfg.qk_norm:
            norm = partial(RMSNorm, d, cfg.rms_norm_eps, dtype=dtype, param_dtype=param_dtype,
                           offset=cfg.norm_offset)
            self.q_norm, self.k_norm = norm(), norm()
        else:
            self.q_norm = self.k_norm = None
        self.sliding_window = cfg.sliding_windows[layer]
        self.scale = cfg.query_scale
        self.softcap = cfg.attn_softcap
        self.implementation = implementation
        self.max_segments = max_segments
        self.dtype = dtype
        self.kv_cache: kv_cache_lib.LayerCache | None = nnx.data(None)  # generation only (kv_cache.py)

    def __call__(self, x, cos, sin, segment_ids, dropout_key=None):
        kq, kk, kv, ko = _keys(dropout_key, 4)
        q, k, v = self.q_proj(x, kq), self.k_proj(x, kk), self.v_proj(x, kv)  # [b, t, heads, d]
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q = apply_rope(q, cos, sin).astype(self.dtype)
        k = apply_rope(k, cos, sin).astype(self.dtype)
        if self.kv_cache is not None:
            k_all, v_all, q_positions = self.kv_cache.write(k, v)
            if q.shape[1] == 1:  # decode; more tokens: a prefill from slot 0, attended below
                out = attention_lib.cached_attention(q, k_all, v_all, q_positions,
                                                     sliding_window=self.sliding_window,
                                                     scale=self.scale, softcap=self.softcap)
                return self.o_proj(out, ko)
        out = attention_lib.attention(
            q, k, v, segment_ids=segment_ids,
            sliding_window=self.sliding_window, implementation=self.implementation,
            max_segments=self.max_segments, scale=self.scale, softcap=self.softcap,
        )
        return self.o_proj(out, ko)


class MLP(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, dtype, param_dtype, rngs: nnx.Rngs, lora: LoraConfig | None = None,
                 adapted: frozenset[str] = frozenset()):
        e, m = cfg.hidden_size, cfg.intermediate_size
        dense = partial(_dense, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        bias = cfg.mlp_bias
        ad = lambda name: lora if name in adapted else None  # noqa: E731
        self.gate_proj = dense("bte,em->btm", (e, m), ("embed", "mlp"), (m,) if bias else None, ("mlp",),
                               lora=ad("gate_proj"))
        self.up_proj = dense("bte,em->btm", (e, m), ("embed", "mlp"), (m,) if bias else None, ("mlp",),
                             lora=ad("up_proj"))
        self.down_proj = dense("btm,me->bte", (m, e), ("mlp", "embed"), (e,) if bias else None, ("embed",),
                               lora=ad("down_proj"))
        self.act = ACTIVATIONS[cfg.activation]

    def __call__(self, x, token_mask=None, dropout_key=None):
        kg, ku, kd = _keys(dropout_key, 3)
        return self.down_proj(self.act(self.gate_proj(x, kg)) * self.up_proj(x, ku), kd), None


ACTIVATIONS = {"silu": jax.nn.silu, "gelu_tanh": partial(jax.nn.gelu, approximate=True)}


class MoE(nnx.Module):
    """Sparse MLP: router [embed, experts]; experts' gate/up [experts, embed, mlp], down
    [experts, mlp, embed]. Each token goes to its top-k experts (softmax probabilities, renormalised
    over the k when `norm_topk_prob`), weighted by them; no token is dropped."""

    def __init__(self, cfg: ModelConfig, *, dtype, param_dtype, rngs: nnx.Rngs, mesh=None):
        e, m, n = cfg.hidden_size, cfg.moe_intermediate_size, cfg.num_experts
        init = lambda shape, *names: nnx.Param(_normal(rngs.params(), shape, param_dtype), **_meta(*names))  # noqa: E731
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
        mats = (self.gate_proj[...].astype(self.dtype), self.up_proj[...].astype(self.dtype),
                self.down_proj[...].astype(self.dtype))
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
    experts given (another device's, under expert parallelism) contribute zero."""
    n, k = experts.shape
    groups = gate.shape[0]
    flat = experts.reshape(-1)
    order = jnp.argsort(flat, stable=True)  # foreign ids (>= groups) sort last
    rows = x[order // k]  # [n * k, embed], grouped by expert
    sizes = jnp.zeros((groups,), jnp.int32).at[flat].add(1, mode="drop")
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
    from jax_sft.models.sharding import BATCH_AXES  # (sharding imports nothing from here)

    rows = P(BATCH_AXES, None)
    up_spec, down_spec = P("expert", None, "tensor"), P("expert", "tensor", None)

    def local(x, experts, weights, gate, up, down):
        gather = partial(jax.lax.all_gather, axis_name="expert", axis=0, tiled=True)
        x, experts, weights = gather(x), gather(experts), gather(weights)
        n_local = gate.shape[0]
        mine = experts - jax.lax.axis_index("expert") * n_local
        mine = jnp.where((mine >= 0) & (mine < n_local), mine, n_local)
        y = jax.lax.psum(grouped_experts(x, mine, weights, gate, up, down, act), "tensor")
        return jax.lax.psum_scatter(y, "expert", scatter_dimension=0, tiled=True)

    return jax.shard_map(local, mesh=mesh, in_specs=(rows, rows, rows, up_spec, up_spec, down_spec),
                         out_specs=rows)(x, experts, weights, gate, up, down)


def dense_experts(x, experts, weights, gate, up, down, act):
    """Reference for `grouped_experts` (tests, benchmarks): every expert on every token."""
    h = act(jnp.einsum("nd,xdm->xnm", x, gate)) * jnp.einsum("nd,xdm->xnm", x, up)
    y = jnp.einsum("xnm,xmd->xnd", h, down, preferred_element_type=jnp.float32)  # [experts, n, d]
    w = (jax.nn.one_hot(experts, gate.shape[0], dtype=jnp.float32) * weights[..., None]).sum(1)
    return jnp.einsum("xnd,nx->nd", y, w)


class DecoderLayer(nnx.Module):
    def __init__(self, cfg: ModelConfig, layer: int, *, dtype, param_dtype, implementation: str,
                 max_segments: int, rngs: nnx.Rngs, mesh=None, lora: LoraConfig | None = None,
                 adapted: frozenset[str] = frozenset()):
        norm = partial(RMSNorm, cfg.hidden_size, cfg.rms_norm_eps, dtype=dtype, param_dtype=param_dtype,
                       offset=cfg.norm_offset)
        self.input_layernorm = norm()
        self.self_attn = Attention(cfg, layer, dtype=dtype, param_dtype=param_dtype,
                                   implementation=implementation, max_segments=max_segments,
                                   rngs=rngs, lora=lora, adapted=adapted)
        self.post_attention_layernorm = norm()
        # Gemma: post_attention_layernorm normalises the attention output; the MLP has its own
        # pre and post norms.
        self.pre_feedforward_layernorm = norm() if cfg.sandwich_norm else None
        self.post_feedforward_layernorm = norm() if cfg.sandwich_norm else None
        sparse = cfg.num_experts > 0 and cfg.moe_layers[layer]
        if sparse:
            self.mlp = MoE(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs, mesh=mesh)
        else:
            self.mlp = MLP(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs, lora=lora, adapted=adapted)
        self.num_experts = cfg.num_experts

    def __call__(self, x, cos, sin, segment_ids, token_mask=None, dropout_key=None):
        """-> (x, router statistics [2, num_experts]; zeros for a dense layer). dropout_key: LoRA
        dropout (None: none)."""
        ka, km = _keys(dropout_key, 2)
        if self.pre_feedforward_layernorm is None:
            x = x + self.self_attn(self.input_layernorm(x), cos, sin, segment_ids, ka)
            y, stats = self.mlp(self.post_attention_layernorm(x), token_mask, km)
        else:
            x = x + self.post_attention_layernorm(self.self_attn(self.input_layernorm(x), cos, sin, segment_ids, ka))
            y, stats = self.mlp(self.pre_feedforward_layernorm(x), token_mask, km)
            y = self.post_feedforward_layernorm(y)
        if stats is None:
            stats = jnp.zeros((2, self.num_experts), jnp.float32)
        return x + y, stats


def lora_sites(config: ModelConfig, lora: LoraConfig | None, scan_layers: bool) -> dict[int | None, frozenset[str]]:
    """{layer index: projections with adapters, None: {"lm_head"} or {}} for `lora` (None: none)."""
    sites = frozenset() if lora is None else lora.adapted(config.num_layers, tuple(
        not (config.num_experts > 0 and config.moe_layers[i]) for i in range(config.num_layers)))
    if lora is not None and not sites:
        raise SettingError(f"LoRA target_modules={list(lora.target_modules)}, exclude_modules="
                           f"{list(lora.exclude_modules)} match no linear layer of this {config.architecture}")
    by_layer = {i: frozenset(p for j, p in sites if j == i) for i in [None, *range(config.num_layers)]}
    if scan_layers and len({by_layer[i] for i in range(config.num_layers)}) > 1:
        raise SettingError("LoRA adapters differ between layers (target_modules / exclude_modules name "
                           "layers), but scan_layers=true needs the same on every layer; set "
                           "policy.jax_cfg.scan_layers=false")
    if lora is not None and lora.dropout > 0 and by_layer[None]:
        raise SettingError(f"LoRA dropout={lora.dropout} with an adapter on lm_head (match_all_linear "
                           "adapts it) is not supported; exclude lm_head (target_modules: ['*_proj']) or "
                           "set dropout to 0")
    return by_layer


def _remat_policy(remat: str):
    if remat not in REMAT_POLICIES:
        raise ValueError(f"remat={remat!r}; choose one of {REMAT_POLICIES}")
    return None if remat in ("none", "full") else getattr(jax.checkpoint_policies, remat)


def _layer_fn(remat: str):
    """DecoderLayer.__call__, wrapped in nnx.remat with the named policy unless remat == "none"."""
    policy = _remat_policy(remat)
    if remat == "none":
        return DecoderLayer.__call__
    return nnx.remat(DecoderLayer.__call__, policy=policy, prevent_cse=True)


class CausalLM(nnx.Module):
    """Decoder-only LM; see the module docstring for the call signatures."""

    def __init__(self, config: ModelConfig, *, dtype=jnp.bfloat16, param_dtype=jnp.float32,
                 attention: str = "auto", remat: str = "none", scan_layers: bool = False,
                 max_segments: int = attention_lib.DEFAULT_MAX_SEGMENTS, rngs: nnx.Rngs,
                 mesh: jax.sharding.Mesh | None = None, lora: LoraConfig | None = None):
        attention_lib.check_implementation(attention, dtype, config.head_dim)
        if config.attn_softcap is not None:  # raises for "cudnn", which cannot soft-cap
            attention_lib.resolve_implementation(attention, dtype, config.head_dim, False, softcap=True)
        _remat_policy(remat)  # validates the name
        if not (isinstance(max_segments, int) and max_segments >= 1):
            raise ValueError(f"max_segments={max_segments!r} must be a positive integer")
        self.config = config
        self.dtype = dtype
        self.param_dtype = param_dtype
        self.attention = attention
        self.remat = remat
        self.scan_layers = scan_layers
        self.max_segments = max_segments
        self.lora = lora
        adapted = lora_sites(config, lora, scan_layers)
        self.embed_tokens = nnx.Embed(
            config.vocab_size, config.hidden_size, dtype=dtype, param_dtype=param_dtype,
            embedding_init=_normal, embedding_metadata=_meta("vocab", "embed"), rngs=rngs,
        )
        layer = partial(DecoderLayer, config, dtype=dtype, param_dtype=param_dtype,
                        implementation=attention, max_segments=max_segments, mesh=mesh, lora=lora)
        if scan_layers:
            if len(set(config.sliding_windows)) != 1:
                raise ValueError(
                    f"scan_layers=True needs the same attention window on every layer, but this "
                    f"{config.architecture} has per-layer windows {config.sliding_windows}; set "
                    "policy.jax_cfg.scan_layers=false"
                )
            if len(set(config.moe_layers)) > 1:
                raise ValueError(
                    f"scan_layers=True needs the same MLP on every layer, but this {config.architecture} "
                    "mixes dense and mixture-of-experts layers (mlp_only_layers / decoder_sparse_step); "
                    "set policy.jax_cfg.scan_layers=false"
                )

            @nnx.split_rngs(splits=config.num_layers)
            @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: None})
            def stacked(rngs):
                return layer(0, rngs=rngs, adapted=adapted[0])

            self.layers = stacked(rngs)  # one DecoderLayer whose parameters are [num_layers, ...]
        else:
            self.layers = nnx.List([layer(i, rngs=rngs, adapted=adapted[i]) for i in range(config.num_layers)])
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype=dtype, param_dtype=param_dtype,
                            offset=config.norm_offset)
        if config.tie_word_embeddings:
            self.lm_head = None
        else:
            self.lm_head = _dense("bte,ev->btv", (config.hidden_size, config.vocab_size),
                                  ("embed", "vocab"), None, (), dtype=dtype, param_dtype=param_dtype,
                                  rngs=rngs)
        # The lm_head's adapter (tied or not), folded into `lm_head_kernel()`.
        e, v = config.hidden_size, config.vocab_size
        self.lm_head_lora = nnx.data(LoRA(lora, ((e, "embed"),), ((v, "vocab"),), "e", "v", dtype=dtype, rngs=rngs)
                                     if LM_HEAD in adapted[None] else None)

    def hidden_states(self, input_ids: jax.Array, positions: jax.Array | None = None,
                      segment_ids: jax.Array | None = None) -> jax.Array:
        """[b, t] ints -> [b, t, hidden] in the compute dtype, after the final norm."""
        return self.hidden_states_and_aux(input_ids, positions, segment_ids)[0]

    def hidden_states_and_aux(self, input_ids: jax.Array, positions: jax.Array | None = None,
                              segment_ids: jax.Array | None = None,
                              token_mask: jax.Array | None = None,
                              dropout_key: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
        """-> (hidden states, router load-balancing loss: fp32 scalar, 0 for dense models).
        `token_mask` [b, t]: the tokens the loss averages over (None: all; HF's attention_mask).
        `dropout_key`: LoRA dropout while training (None: no dropout)."""
        if input_ids.ndim != 2:
            raise ValueError(f"input_ids must be [batch, seq], got shape {input_ids.shape}")
        b, t = input_ids.shape
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
        for name, arr in (("positions", positions), ("segment_ids", segment_ids), ("token_mask", token_mask)):
            if arr is not None and arr.shape != input_ids.shape:
                raise ValueError(f"{name} shape {arr.shape} != input_ids shape {input_ids.shape}")
        tables = {}  # RopeConfig -> (cos, sin) [b, t, d/2] fp32

        def rope_of(layer: int):
            rope = self.config.rope
            if self.config.local_rope is not None and self.config.sliding_windows[layer] is not None:
                rope = self.config.local_rope
            if rope not in tables:
                inv_freq = jnp.asarray(rope_inv_freq(rope, self.config.head_dim))
                freqs = positions.astype(jnp.float32)[..., None] * inv_freq
                cos, sin = jnp.cos(freqs), jnp.sin(freqs)
                if rope.attention_factor != 1.0:  # YaRN's attention scaling
                    cos, sin = cos * jnp.float32(rope.attention_factor), sin * jnp.float32(rope.attention_factor)
                tables[rope] = (cos, sin)
            return tables[rope]

        x = self.embed_tokens(input_ids)
        if self.config.embed_scale:
            x = x * jnp.asarray(self.config.hidden_size**0.5, self.dtype)
        keys = None if dropout_key is None else jax.random.split(dropout_key, self.config.num_layers)
        if self.scan_layers:
            x, stats = self._scan_layers(x, *rope_of(0), segment_ids, token_mask, keys)
        else:
            layer_fn = _layer_fn(self.remat)
            stats = jnp.zeros((2, self.config.num_experts), jnp.float32)
            for i, layer in enumerate(self.layers):
                key = None if keys is None else keys[i]
                x, layer_stats = layer_fn(layer, x, *rope_of(i), segment_ids, token_mask, key)
                stats = stats + layer_stats
        return self.norm(x), self._aux_loss(stats, b * t if token_mask is None else token_mask.sum())

    def _aux_loss(self, stats: jax.Array, tokens) -> jax.Array:
        """transformers' load_balancing_loss_func from summed statistics: num_experts *
        sum_e (top-k count_e / rows) * (probability sum_e / rows), rows = tokens x MoE layers."""
        n_moe = sum(self.config.moe_layers)
        if not n_moe:
            return jnp.zeros((), jnp.float32)
        rows = jnp.maximum(jnp.asarray(tokens, jnp.float32) * n_moe, 1.0)
        return self.config.num_experts * jnp.sum((stats[0] / rows) * (stats[1] / rows))

    def _scan_layers(self, x, cos, sin, segment_ids, token_mask, keys):
        """The stacked layers as one lax.scan over their [num_layers, ...] parameters (and
        per-layer dropout keys, None when there is no dropout)."""
        graphdef, state = nnx.split(self.layers)

        def body(carry, xs):
            (h, stats), (layer_state, key) = carry, xs
            layer = nnx.merge(graphdef, layer_state)
            h, layer_stats = layer(h, cos, sin, segment_ids, token_mask, key)
            # The KV caches, when generating (kv_cache.py).
            return (h, stats + layer_stats), nnx.state(layer, nnx.Cache)

        if self.remat != "none":
            body = jax.checkpoint(body, policy=_remat_policy(self.remat), prevent_cse=False)
        zeros = jnp.zeros((2, self.config.num_experts), jnp.float32)
        (x, stats), caches = jax.lax.scan(body, (x, zeros), (state, keys))
        nnx.update(self.layers, caches)
        return x, stats

    def attention_kernel(self, packed: bool) -> str:
        """The attention kernel this model runs for padded or packed rows: "cudnn", "xla", or
        "cudnn+xla" when its full-attention and sliding-window layers differ."""
        kernels = {
            attention_lib.resolve_implementation(self.attention, self.dtype, self.config.head_dim,
                                                 packed, w is not None, self.config.attn_softcap is not None)
            for w in self.config.sliding_windows
        }
        return "+".join(sorted(kernels))

    def describe_attention(self, packed: bool) -> str:
        """One log line: the kernel chosen for this batch layout."""
        return attention_lib.describe(self.attention, self.dtype, self.config.head_dim, packed,
                                      self.max_segments, self.config.sliding_windows,
                                      self.config.attn_softcap is not None)

    def lm_head_kernel(self) -> jax.Array:
        """[hidden, vocab] unembedding in the compute dtype (the embedding transposed when tied),
        with the lm_head adapter's scale * A @ B added when there is one."""
        if self.lm_head is None:
            kernel = self.embed_tokens.embedding[...].T
        else:
            kernel = self.lm_head.kernel[...]
        if self.lm_head_lora is not None:
            kernel = kernel.astype(jnp.float32) + self.lm_head_lora.delta_kernel()
        return kernel.astype(self.dtype)

    def unembed(self, hidden: jax.Array) -> jax.Array:
        """[..., hidden] (compute dtype) -> [..., vocab] float32 logits (fp32 accumulation),
        soft-capped when the config says so (Gemma 2)."""
        logits = jnp.einsum("...e,ev->...v", hidden.astype(self.dtype), self.lm_head_kernel(),
                            preferred_element_type=jnp.float32)
        cap = self.config.final_softcap
        return logits if cap is None else cap * jnp.tanh(logits / cap)

    def __call__(self, input_ids: jax.Array, positions: jax.Array | None = None,
                 segment_ids: jax.Array | None = None) -> jax.Array:
        """[b, t] ints -> [b, t, vocab] float32 logits (whole: for tests and small evals)."""
        return self.unembed(self.hidden_states(input_ids, positions, segment_ids))


def merge_lora(model: CausalLM) -> CausalLM:
    """The model with every adapter folded into its base kernel (W + scale * A @ B, float32), as
    a CausalLM without LoRA; `model` itself when it has none. A tied model whose lm_head has an
    adapter comes back untied (its lm_head = embedding^T + the adapter's delta)."""
    if model.lora is None:
        return model
    untie = model.lm_head is None and model.lm_head_lora is not None
    config = dataclasses.replace(model.config, tie_word_embeddings=False) if untie else model.config
    abstract = nnx.eval_shape(lambda: CausalLM(
        config, dtype=model.dtype, param_dtype=jnp.float32, attention=model.attention, remat=model.remat,
        scan_layers=model.scan_layers, max_segments=model.max_segments, rngs=nnx.Rngs(0)))
    graphdef, abs_state = nnx.split(abstract)
    source = {path: var for path, var in nnx.to_flat_state(nnx.state(model))}
    filled = []
    for path, var in nnx.to_flat_state(abs_state):
        if untie and path == ("lm_head", "kernel"):
            value = source[("embed_tokens", "embedding")][...].T.astype(jnp.float32)
            value = value + model.lm_head_lora.delta_kernel()
        else:
            value = source[path][...]
            a, b = source.get(path[:-1] + ("lora", "lora_a")), source.get(path[:-1] + ("lora", "lora_b"))
            if path[-1] == "kernel" and a is not None:
                value = value.astype(jnp.float32) + model.lora.scale * _lora_delta(a[...], b[...], value.ndim)
            elif path == ("lm_head", "kernel") and model.lm_head_lora is not None:
                value = value.astype(jnp.float32) + model.lm_head_lora.delta_kernel()
            value = value.astype(jnp.float32) if isinstance(var, nnx.Param) else value
        filled.append((path, var.replace(value)))
    return nnx.merge(graphdef, nnx.from_flat_state(filled))


def _lora_delta(a: jax.Array, b: jax.Array, kernel_ndim: int) -> jax.Array:
    """A @ B as a kernel: a [*lead, *in, r], b [*lead, r, *out] -> [*lead, *in, *out] float32
    (lead: the layer axis of scan-stacked adapters, or nothing)."""
    n_lead = a.ndim + b.ndim - 2 - kernel_ndim
    lead, ins, outs = a.shape[:n_lead], a.shape[n_lead:-1], b.shape[n_lead + 1:]
    a2 = a.astype(jnp.float32).reshape(*lead, math.prod(ins), a.shape[-1])
    b2 = b.astype(jnp.float32).reshape(*lead, b.shape[n_lead], math.prod(outs))
    return jnp.matmul(a2, b2).reshape(*lead, *ins, *outs)
