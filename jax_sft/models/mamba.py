"""Mamba-2 (SSD) mixer, as transformers' NemotronHMamba2Mixer computes it on its torch path.

    mixer = Mamba2(cfg, dtype=..., param_dtype=..., rngs=...)
    y = mixer(x, segment_ids)          # [b, t, hidden] -> [b, t, hidden]

One layer: in_proj -> (z, x, B, C, dt); a causal depthwise conv1d (kernel `conv_kernel`) and SiLU
over (x, B, C); the selective scan with dt = clamp(softplus(dt + dt_bias), dt_limit), A = -exp(A_log),
B and C shared by the heads of each of `n_groups` groups, plus the D skip; y * silu(z) normalised
group-wise (RMSNorm over each of the n_groups groups of channels, transformers'
NemotronHRMSNormGated); out_proj. The scan is the chunked SSD algorithm (transformers'
`mamba2_chunk_scan`): within each chunk of `chunk_size` tokens a masked quadratic form, between
chunks a recurrence over the chunk states. It runs in float32, as do the conv accumulation and the
norm; the projections run in the compute dtype.

Packed rows: `segment_ids` [b, t] (attention.py's convention) restart the conv and SSM state at
every change of segment id, so nothing flows between the sequences of a row: the conv sees zeros
before a sequence's first token, and every state contribution (within a chunk, into a chunk's
state, across chunks) is kept only between tokens of one segment.

Parameters split transformers' fused tensors so that heads shard over "tensor": in_proj's
[z; x; B; C; dt] rows are kernels z, x [embed, heads, head_dim], bc [embed, 2, groups, state], dt
[embed, heads] (one LoRA adapter over them all, as PEFT's in_proj adapter: one A, B in row order);
conv1d's [x; B; C] channels are kernels x [heads, head_dim, 1, K], bc [2, groups, state, 1, K].

Generation (`kv_cache.attach` gives each mixer a `MambaCache`): a prefill of right-padded prompts
runs the chunked scan with dt = 0 past each row's `prompt_length` (the state passes padding
unchanged) and keeps each row's conv window and final state; a one-token call then advances them
recurrently (transformers' selective_state_update).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from jax_sft.models.config import ModelConfig
from jax_sft.models.kv_cache import MambaCache
from jax_sft.models.layers import meta, normal_init, projection
from jax_sft.models.lora import FusedLoRA
from jax_sft.models.options import LoraConfig

CONV_PARTS = ("x", "bc")  # conv1d's channel blocks


def in_proj_shapes(cfg: ModelConfig) -> dict[str, tuple[tuple[int, ...], tuple[str | None, ...]]]:
    """in_proj's output blocks, in the order of transformers' rows: part -> (shape, logical axis names)."""
    m = cfg.mamba
    heads = ((m.num_heads, m.head_dim), ("mamba_heads", "mamba_head_dim"))
    return {
        "z": heads,
        "x": heads,
        "bc": ((2, m.groups, m.state_size), ("ssm_bc", "ssm_groups", "ssm_state")),
        "dt": ((m.num_heads,), ("mamba_heads",)),
    }


class FusedProjection(nnx.Module):
    """x [b, t, embed] -> {part: [b, t, *shape]}: one kernel (and bias) per output block of a fused
    HF linear layer, with one LoRA adapter over the whole output (`FusedLoRA`)."""

    def __init__(self, e: int, parts: dict, bias: bool, *, dtype, param_dtype, rngs, lora: LoraConfig | None):
        for name, (shape, names) in parts.items():
            kernel = normal_init(rngs.params(), (e, *shape), param_dtype)
            setattr(self, f"kernel_{name}", nnx.Param(kernel, **meta("embed", *names)))
            if bias:
                setattr(self, f"bias_{name}", nnx.Param(jnp.zeros(shape, param_dtype), **meta(*names)))
        self.parts, self.has_bias, self.dtype = tuple(parts), bias, dtype
        self.lora = nnx.data(None if lora is None else FusedLoRA(lora, e, parts, dtype=dtype, rngs=rngs))

    def __call__(self, x: jax.Array, dropout_key=None) -> dict[str, jax.Array]:
        x = x.astype(self.dtype)
        deltas = None if self.lora is None else self.lora(x, dropout_key)
        out = {}
        for name in self.parts:
            kernel = getattr(self, f"kernel_{name}")[...].astype(self.dtype)
            y = jnp.tensordot(x, kernel, axes=1)  # [b, t, embed] x [embed, *shape]
            if self.has_bias:
                y = y + getattr(self, f"bias_{name}")[...].astype(self.dtype)
            out[name] = y if deltas is None else y + deltas[name].astype(y.dtype)
        return out


class Mamba2(nnx.Module):
    """The Mamba-2 mixer of a Nemotron-H layer (see the module docstring)."""

    def __init__(
        self,
        cfg: ModelConfig,
        *,
        dtype,
        param_dtype,
        rngs: nnx.Rngs,
        lora: LoraConfig | None = None,
        adapted: frozenset[str] = frozenset(),
    ):
        m = self.m = cfg.mamba
        e, h = cfg.hidden_size, m.num_heads
        self.in_proj = FusedProjection(
            e,
            in_proj_shapes(cfg),
            m.proj_bias,
            dtype=dtype,
            param_dtype=param_dtype,
            rngs=rngs,
            lora=lora if "in_proj" in adapted else None,
        )
        self.conv1d = CausalConv(cfg, param_dtype=param_dtype, rngs=rngs)
        param = lambda value, *names: nnx.Param(value.astype(param_dtype), **meta(*names))  # noqa: E731
        self.dt_bias = param(jnp.ones((h,)), "mamba_heads")
        self.A_log = param(jnp.log(jnp.arange(1, h + 1, dtype=jnp.float32)), "mamba_heads")
        self.D = param(jnp.ones((h,)), "mamba_heads")
        self.norm = GatedRMSNorm(param(jnp.ones((h, m.head_dim)), "mamba_heads", "mamba_head_dim"), m.groups, m.eps)
        self.out_proj = projection(
            "bthp,hpe->bte",
            (h, m.head_dim, e),
            ("mamba_heads", "mamba_head_dim", "embed"),
            (e,) if m.proj_bias else None,
            ("embed",),
            dtype=dtype,
            param_dtype=param_dtype,
            rngs=rngs,
            lora=lora if "out_proj" in adapted else None,
        )
        self.dtype = dtype
        self.ssm_cache: MambaCache | None = nnx.data(None)  # generation only (kv_cache.py)

    def __call__(self, x: jax.Array, segment_ids: jax.Array | None = None, dropout_key=None) -> jax.Array:
        ki, ko = (None, None) if dropout_key is None else tuple(jax.random.split(dropout_key, 2))
        p = self.in_proj(x, ki)
        if self.ssm_cache is not None and x.shape[1] == 1:
            y = self._decode(p)
        else:
            y = self._sequence(p, segment_ids)
        y = self.norm(y, p["z"])
        return self.out_proj(y.astype(self.dtype), ko)

    def _dt(self, dt: jax.Array) -> jax.Array:
        """float32 time steps: clamp(softplus(dt + dt_bias), *dt_limit)."""
        dt = jax.nn.softplus(dt.astype(jnp.float32) + self.dt_bias[...].astype(jnp.float32))
        lo, hi = self.m.dt_limit
        return jnp.clip(dt, lo, hi) if (lo, hi) != (0.0, math.inf) else dt

    def _sequence(self, p: dict, segment_ids: jax.Array | None) -> jax.Array:
        """The chunked scan over whole rows (training; a generation prefill) -> y [b, t, h, p] fp32."""
        b, t = p["x"].shape[:2]
        segments = segment_counter(segment_ids, (b, t))
        conv_in = {name: p[name] for name in CONV_PARTS}
        conv_out = self.conv1d(conv_in, segments)
        xs, bc = conv_out["x"].astype(self.dtype), conv_out["bc"].astype(self.dtype)
        dt = self._dt(p["dt"])
        cache = self.ssm_cache
        if cache is not None:  # prefill: the state passes each row's padding unchanged
            dt = jnp.where(jnp.arange(t)[None, :, None] < cache.prompt_length[...][:, None, None], dt, 0.0)
        a = -jnp.exp(self.A_log[...].astype(jnp.float32))
        y, final = ssd(xs.astype(jnp.float32), dt, a, bc[:, :, 0], bc[:, :, 1], segments, self.m.chunk_size)
        if cache is not None:
            cache.ssm[...] = final
            for name in CONV_PARTS:
                getattr(cache, f"conv_{name}")[...] = conv_window(conv_in[name], cache.prompt_length[...], self.m)
        return y + self.D[...].astype(jnp.float32)[:, None] * xs.astype(jnp.float32)

    def _decode(self, p: dict) -> jax.Array:
        """One token per row from the cached conv window and SSM state -> y [b, 1, h, p] fp32."""
        cache, m = self.ssm_cache, self.m
        out = {}
        for name in CONV_PARTS:
            state = getattr(cache, f"conv_{name}")
            window = jnp.concatenate([state[...], p[name].astype(state.dtype)], axis=1)  # [b, K, ...]
            state[...] = window[:, 1:]
            out[name] = self.conv1d.step(name, window).astype(self.dtype)
        xs = out["x"][:, 0].astype(jnp.float32)  # [b, h, p]
        bc = out["bc"][:, 0].astype(jnp.float32)  # [b, 2, g, n]
        dt = self._dt(p["dt"])[:, 0]  # [b, h]
        a = -jnp.exp(self.A_log[...].astype(jnp.float32))
        per_head = jnp.repeat(bc, m.num_heads // m.groups, axis=2)  # [b, 2, h, n]
        state = cache.ssm[...] * jnp.exp(dt * a)[..., None, None]
        state = state + (dt[..., None] * xs)[..., None] * per_head[:, 0, :, None, :]
        cache.ssm[...] = state
        y = jnp.einsum("bhpn,bhn->bhp", state, per_head[:, 1]) + self.D[...].astype(jnp.float32)[:, None] * xs
        return y[:, None]


class CausalConv(nnx.Module):
    """The depthwise causal conv1d over the (x, B, C) channels, then SiLU, in float32; channel
    blocks as `CONV_PARTS`, each kernel [*channels, 1, K] (transformers' [channels, 1, K] rows)."""

    def __init__(self, cfg: ModelConfig, *, param_dtype, rngs: nnx.Rngs):
        m = cfg.mamba
        shapes = in_proj_shapes(cfg)
        self.k = m.conv_kernel
        for name in CONV_PARTS:
            shape, names = shapes[name]
            bound = 1.0 / math.sqrt(m.conv_kernel)  # torch's Conv1d default (fan_in = K)
            value = jax.random.uniform(rngs.params(), (*shape, 1, self.k), jnp.float32, -bound, bound)
            setattr(
                self, f"kernel_{name}", nnx.Param(value.astype(param_dtype), **meta(*names, "conv_in", "conv_kernel"))
            )
            if m.conv_bias:
                setattr(self, f"bias_{name}", nnx.Param(jnp.zeros(shape, param_dtype), **meta(*names)))
        self.has_bias = m.conv_bias

    def _weights(self, name: str) -> tuple[jax.Array, jax.Array | None]:
        w = getattr(self, f"kernel_{name}")[...].astype(jnp.float32)[..., 0, :]  # [*channels, K]
        bias = getattr(self, f"bias_{name}")[...].astype(jnp.float32) if self.has_bias else None
        return w, bias

    def __call__(self, inputs: dict[str, jax.Array], segments: jax.Array) -> dict[str, jax.Array]:
        """{part: [b, t, *channels]} -> the same, fp32; the window of token i holds only the tokens
        of its own segment (`segments`: segment_counter)."""
        b, t = segments.shape
        k = self.k
        # window slot j of token i holds input i - (K - 1) + j; it is of i's segment when the
        # segment counter there equals i's (zero-padded before the row: never).
        counters = jnp.pad(segments, [(0, 0), (k - 1, 0)], constant_values=-1)
        same = jnp.stack([counters[:, j : j + t] for j in range(k)], axis=-1) == segments[..., None]  # [b, t, K]
        out = {}
        for name, x in inputs.items():
            w, bias = self._weights(name)
            x = jnp.pad(x.astype(jnp.float32), [(0, 0), (k - 1, 0)] + [(0, 0)] * (x.ndim - 2))
            window = jnp.stack([x[:, j : j + t] for j in range(k)], axis=2)  # [b, t, K, *channels]
            mask = same.reshape(b, t, k, *([1] * (window.ndim - 3)))
            y = jnp.einsum("btk...,...k->bt...", jnp.where(mask, window, 0.0), w)
            out[name] = jax.nn.silu(y if bias is None else y + bias)
        return out

    def step(self, name: str, window: jax.Array) -> jax.Array:
        """window [b, K, *channels] (oldest first) -> [b, 1, *channels] fp32: one decode step."""
        w, bias = self._weights(name)
        y = jnp.einsum("bk...,...k->b...", window.astype(jnp.float32), w)
        return jax.nn.silu(y if bias is None else y + bias)[:, None]


def conv_window(x: jax.Array, lengths: jax.Array, m) -> jax.Array:
    """The conv state after a prefill: per row, its inputs at positions length - K + 1 .. length - 1
    (zeros before the row's start). x [b, t, *channels] -> [b, K - 1, *channels]."""
    k = m.conv_kernel
    padded = jnp.pad(x, [(0, 0), (k - 1, 0)] + [(0, 0)] * (x.ndim - 2))

    def row(xr, n):
        return jax.lax.dynamic_slice_in_dim(xr, n, k - 1, axis=0)

    return jax.vmap(row)(padded, lengths.astype(jnp.int32))


def segment_counter(segment_ids: jax.Array | None, shape: tuple[int, int]) -> jax.Array:
    """[b, t] int32: how many segment starts precede each token in its row (0 without segment
    ids); two tokens are in one sequence when their counters are equal."""
    if segment_ids is None:
        return jnp.zeros(shape, jnp.int32)
    starts = jnp.concatenate(
        [jnp.zeros((shape[0], 1), jnp.int32), (segment_ids[:, 1:] != segment_ids[:, :-1]).astype(jnp.int32)], axis=1
    )
    return jnp.cumsum(starts, axis=1)


class GatedRMSNorm(nnx.Module):
    """transformers' NemotronHRMSNormGated (norm_before_gate=False): y * silu(z), then RMSNorm over
    each of `groups` contiguous blocks of the heads x head_dim channels, times weight [h, p]; fp32."""

    def __init__(self, weight: nnx.Param, groups: int, eps: float):
        self.weight, self.groups, self.eps = weight, groups, eps

    def __call__(self, y: jax.Array, z: jax.Array) -> jax.Array:
        """y, z [b, t, h, p] -> fp32 [b, t, h, p]."""
        b, t, h, p = y.shape
        g = y.astype(jnp.float32) * jax.nn.silu(z.astype(jnp.float32))
        g = g.reshape(b, t, self.groups, (h // self.groups) * p)
        g = g * jax.lax.rsqrt(jnp.mean(g * g, axis=-1, keepdims=True) + self.eps)
        return self.weight[...].astype(jnp.float32) * g.reshape(b, t, h, p)


def ssd(x, dt, a, b_in, c_in, segments, chunk: int) -> tuple[jax.Array, jax.Array]:
    """The chunked selective scan (state space duality) without the D skip, in float32.

    x [b, t, h, p]; dt [b, t, h] (after softplus and limits); a [h] (negative); b_in, c_in
    [b, t, g, n] shared by the h / g heads of each group; segments [b, t] (`segment_counter`).
    Returns y [b, t, h, p] and the state after the last token [b, h, p, n].

    transformers' mamba2_chunk_scan, with every product laid out as a batched matmul over
    [b, chunk, head]; the decays within a chunk are differences of its cumulative log-decays (as
    mamba_ssm's CUDA kernels compute them), those between chunks sums of the chunks' totals, each
    masked to pairs of one segment before exp."""
    bsz, t, h, p = x.shape
    g = b_in.shape[2]
    pad = (-t) % chunk
    nc = (t + pad) // chunk

    def heads_first(v):  # [b, t, h, ...] -> [b, c, h, q, ...], zero-padded to whole chunks
        v = jnp.pad(v, [(0, 0), (0, pad)] + [(0, 0)] * (v.ndim - 2))
        return jnp.moveaxis(v.reshape(bsz, nc, chunk, *v.shape[2:]), 2, 3)

    seg = jnp.pad(segments, [(0, 0), (0, pad)], mode="edge").reshape(bsz, nc, chunk)
    xs, cum = heads_first(x * dt[..., None]), jnp.cumsum(heads_first(dt * a), axis=-1)  # [b, c, h, q(, p)]
    bm, cm = (jnp.repeat(heads_first(v), h // g, axis=2) for v in (b_in, c_in))  # [b, c, h, q, n]
    # Within each chunk: a causal quadratic form between tokens of one segment.
    pairs = (seg[..., :, None] == seg[..., None, :]) & jnp.tril(jnp.ones((chunk, chunk), bool))
    decay = jnp.exp(jnp.where(pairs[:, :, None], cum[..., :, None] - cum[..., None, :], -jnp.inf))
    y = jnp.matmul(jnp.matmul(cm, jnp.swapaxes(bm, -1, -2)) * decay, xs)  # [b, c, h, q, p]
    # Each chunk's own contribution to the state at its end (its last segment's tokens only).
    to_end = jnp.where((seg == seg[..., -1:])[:, :, None], jnp.exp(cum[..., -1:] - cum), 0.0)
    states = jnp.matmul(jnp.swapaxes(bm * to_end[..., None], -1, -2), xs)  # [b, c, h, n, p]
    # Between chunks: the state at each chunk boundary, carried only while its segment goes on.
    ends = jnp.concatenate([seg[:, :1, 0], seg[:, :, -1]], axis=1)  # segment at boundary z (0: the start)
    totals = jnp.pad(cum[..., -1], [(0, 0), (1, 0), (0, 0)])  # [b, c + 1, h]: each chunk's log-decay
    # log-decay from boundary y to z: totals[y+1] + ... + totals[z], summed, not differenced (exact
    # however long the row: transformers' segment_sum).
    later = jnp.tril(jnp.ones((nc + 1, nc + 1), bool), -1)[None, :, :, None]  # [1, k, y, 1]: k > y
    spans = jnp.cumsum(jnp.where(later, totals[:, :, None], 0.0), axis=1)  # [b, z, y, h]
    kept = jnp.tril(jnp.ones((nc + 1, nc + 1), bool)) & (ends[:, :, None] == ends[:, None, :])
    carry = jnp.exp(jnp.where(kept[..., None], spans, -jnp.inf))  # [b, z, y, h]
    states = jnp.concatenate([jnp.zeros_like(states[:, :1]), states], axis=1)
    starts = jnp.einsum("bzyh,byhnp->bzhnp", carry, states)  # [b, c + 1, h, n, p]
    # Each token's share of its chunk's start state (when that state is of its segment).
    into = jnp.where((seg == ends[:, :-1, None])[:, :, None], jnp.exp(cum), 0.0)  # [b, c, h, q]
    y = y + jnp.matmul(cm * into[..., None], starts[:, :-1])
    y = jnp.moveaxis(y, 3, 2).reshape(bsz, nc * chunk, h, p)[:, :t]
    return y, jnp.swapaxes(starts[:, -1], -1, -2)
