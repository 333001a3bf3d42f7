"""The decoder: one Flax NNX model for Llama, Qwen2, Qwen3 and Mistral (see `ModelConfig`).

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

`scan_layers=True` stores the layers stacked (every layer parameter gets a leading [num_layers]
axis, path `layers.<name>` instead of `layers.<i>.<name>`) and runs them with one `jax.lax.scan`,
so compile time does not grow with depth; the values are the same as unrolled. It needs the same
attention window on every layer. `hf_io` reads and writes both layouts (HF files are per layer).
`attention` picks the kernel (see `attention.py`); `max_segments` bounds the segments per packed
row for the cuDNN packed layout.
"""

from __future__ import annotations

import math
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jax_sft.models import attention as attention_lib
from jax_sft.models import kv_cache as kv_cache_lib
from jax_sft.models.config import ModelConfig, RopeConfig

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
    """weight * x / sqrt(mean(x^2) + eps), in float32; returns `dtype`. weight: [features]."""

    def __init__(self, features: int, eps: float, *, dtype, param_dtype):
        self.weight = nnx.Param(jnp.ones((features,), param_dtype), **_meta("norm"))
        self.eps = eps
        self.dtype = dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return (self.weight[...].astype(jnp.float32) * normed).astype(self.dtype)


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


def _dense(einsum: str, kernel: tuple[int, ...], names: tuple[str, ...], bias: tuple[int, ...] | None,
           bias_names: tuple[str, ...], *, dtype, param_dtype, rngs: nnx.Rngs) -> nnx.Einsum:
    return nnx.Einsum(
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
    )


class Attention(nnx.Module):
    def __init__(self, cfg: ModelConfig, layer: int, *, dtype, param_dtype, implementation: str,
                 max_segments: int, rngs: nnx.Rngs):
        e, n, kv, d = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        dense = partial(_dense, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        qkv_bias = cfg.qkv_bias
        self.q_proj = dense("bte,ehd->bthd", (e, n, d), ("embed", "q_heads", "head_dim"),
                            (n, d) if qkv_bias else None, ("q_heads", "head_dim"))
        self.k_proj = dense("bte,ehd->bthd", (e, kv, d), ("embed", "kv_heads", "head_dim"),
                            (kv, d) if qkv_bias else None, ("kv_heads", "head_dim"))
        self.v_proj = dense("bte,ehd->bthd", (e, kv, d), ("embed", "kv_heads", "head_dim"),
                            (kv, d) if qkv_bias else None, ("kv_heads", "head_dim"))
        self.o_proj = dense("bthd,hde->bte", (n, d, e), ("q_heads", "head_dim", "embed"),
                            (e,) if cfg.o_bias else None, ("embed",))
        if cfg.qk_norm:
            self.q_norm = RMSNorm(d, cfg.rms_norm_eps, dtype=dtype, param_dtype=param_dtype)
            self.k_norm = RMSNorm(d, cfg.rms_norm_eps, dtype=dtype, param_dtype=param_dtype)
        else:
            self.q_norm = self.k_norm = None
        self.sliding_window = cfg.sliding_windows[layer]
        self.implementation = implementation
        self.max_segments = max_segments
        self.dtype = dtype
        self.kv_cache: kv_cache_lib.LayerCache | None = nnx.data(None)  # generation only (kv_cache.py)

    def __call__(self, x, cos, sin, segment_ids):
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)  # [b, t, heads, d]
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q = apply_rope(q, cos, sin).astype(self.dtype)
        k = apply_rope(k, cos, sin).astype(self.dtype)
        if self.kv_cache is not None:
            k_all, v_all, q_positions = self.kv_cache.write(k, v)
            if q.shape[1] == 1:  # decode; more tokens: a prefill from slot 0, attended below
                out = attention_lib.cached_attention(q, k_all, v_all, q_positions,
                                                     sliding_window=self.sliding_window)
                return self.o_proj(out)
        out = attention_lib.attention(
            q, k, v, segment_ids=segment_ids,
            sliding_window=self.sliding_window, implementation=self.implementation,
            max_segments=self.max_segments,
        )
        return self.o_proj(out)


class MLP(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        e, m = cfg.hidden_size, cfg.intermediate_size
        dense = partial(_dense, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        bias = cfg.mlp_bias
        self.gate_proj = dense("bte,em->btm", (e, m), ("embed", "mlp"), (m,) if bias else None, ("mlp",))
        self.up_proj = dense("bte,em->btm", (e, m), ("embed", "mlp"), (m,) if bias else None, ("mlp",))
        self.down_proj = dense("btm,me->bte", (m, e), ("mlp", "embed"), (e,) if bias else None, ("embed",))

    def __call__(self, x):
        return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nnx.Module):
    def __init__(self, cfg: ModelConfig, layer: int, *, dtype, param_dtype, implementation: str,
                 max_segments: int, rngs: nnx.Rngs):
        norm = partial(RMSNorm, cfg.hidden_size, cfg.rms_norm_eps, dtype=dtype, param_dtype=param_dtype)
        self.input_layernorm = norm()
        self.self_attn = Attention(cfg, layer, dtype=dtype, param_dtype=param_dtype,
                                   implementation=implementation, max_segments=max_segments,
                                   rngs=rngs)
        self.post_attention_layernorm = norm()
        self.mlp = MLP(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x, cos, sin, segment_ids):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, segment_ids)
        return x + self.mlp(self.post_attention_layernorm(x))


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
                 max_segments: int = attention_lib.DEFAULT_MAX_SEGMENTS, rngs: nnx.Rngs):
        attention_lib.check_implementation(attention, dtype, config.head_dim)
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
        self.embed_tokens = nnx.Embed(
            config.vocab_size, config.hidden_size, dtype=dtype, param_dtype=param_dtype,
            embedding_init=_normal, embedding_metadata=_meta("vocab", "embed"), rngs=rngs,
        )
        layer = partial(DecoderLayer, config, dtype=dtype, param_dtype=param_dtype,
                        implementation=attention, max_segments=max_segments)
        if scan_layers:
            if len(set(config.sliding_windows)) != 1:
                raise ValueError(
                    f"scan_layers=True needs the same attention window on every layer, but this "
                    f"{config.architecture} has per-layer windows {config.sliding_windows}; set "
                    "policy.jax_cfg.scan_layers=false"
                )

            @nnx.split_rngs(splits=config.num_layers)
            @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: None})
            def stacked(rngs):
                return layer(0, rngs=rngs)

            self.layers = stacked(rngs)  # one DecoderLayer whose parameters are [num_layers, ...]
        else:
            self.layers = nnx.List([layer(i, rngs=rngs) for i in range(config.num_layers)])
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype=dtype, param_dtype=param_dtype)
        if config.tie_word_embeddings:
            self.lm_head = None
        else:
            self.lm_head = _dense("bte,ev->btv", (config.hidden_size, config.vocab_size),
                                  ("embed", "vocab"), None, (), dtype=dtype, param_dtype=param_dtype,
                                  rngs=rngs)

    def hidden_states(self, input_ids: jax.Array, positions: jax.Array | None = None,
                      segment_ids: jax.Array | None = None) -> jax.Array:
        """[b, t] ints -> [b, t, hidden] in the compute dtype, after the final norm."""
        if input_ids.ndim != 2:
            raise ValueError(f"input_ids must be [batch, seq], got shape {input_ids.shape}")
        b, t = input_ids.shape
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
        for name, arr in (("positions", positions), ("segment_ids", segment_ids)):
            if arr is not None and arr.shape != input_ids.shape:
                raise ValueError(f"{name} shape {arr.shape} != input_ids shape {input_ids.shape}")
        inv_freq = jnp.asarray(rope_inv_freq(self.config.rope, self.config.head_dim))
        freqs = positions.astype(jnp.float32)[..., None] * inv_freq  # [b, t, d/2] fp32
        cos, sin = jnp.cos(freqs), jnp.sin(freqs)
        if self.config.rope.attention_factor != 1.0:  # YaRN's attention scaling
            scale = jnp.float32(self.config.rope.attention_factor)
            cos, sin = cos * scale, sin * scale

        x = self.embed_tokens(input_ids)
        if self.scan_layers:
            x = self._scan_layers(x, cos, sin, segment_ids)
        else:
            layer_fn = _layer_fn(self.remat)
            for layer in self.layers:
                x = layer_fn(layer, x, cos, sin, segment_ids)
        return self.norm(x)

    def _scan_layers(self, x, cos, sin, segment_ids):
        """The stacked layers as one lax.scan over their [num_layers, ...] parameters."""
        graphdef, state = nnx.split(self.layers)

        def body(h, layer_state):
            layer = nnx.merge(graphdef, layer_state)
            h = layer(h, cos, sin, segment_ids)
            return h, nnx.state(layer, nnx.Cache)  # the KV caches, when generating (kv_cache.py)

        if self.remat != "none":
            body = jax.checkpoint(body, policy=_remat_policy(self.remat), prevent_cse=False)
        x, caches = jax.lax.scan(body, x, state)
        nnx.update(self.layers, caches)
        return x

    def attention_kernel(self, packed: bool) -> str:
        """The attention kernel this model runs for padded or packed rows: "cudnn", "xla", or
        "cudnn+xla" when its full-attention and sliding-window layers differ."""
        kernels = {
            attention_lib.resolve_implementation(self.attention, self.dtype, self.config.head_dim,
                                                 packed, w is not None)
            for w in self.config.sliding_windows
        }
        return "+".join(sorted(kernels))

    def describe_attention(self, packed: bool) -> str:
        """One log line: the kernel chosen for this batch layout."""
        return attention_lib.describe(self.attention, self.dtype, self.config.head_dim, packed,
                                      self.max_segments, self.config.sliding_windows)

    def lm_head_kernel(self) -> jax.Array:
        """[hidden, vocab] unembedding in the compute dtype (the embedding transposed when tied)."""
        if self.lm_head is None:
            return self.embed_tokens.embedding[...].T.astype(self.dtype)
        return self.lm_head.kernel[...].astype(self.dtype)

    def unembed(self, hidden: jax.Array) -> jax.Array:
        """[..., hidden] (compute dtype) -> [..., vocab] float32 logits (fp32 accumulation)."""
        return jnp.einsum("...e,ev->...v", hidden.astype(self.dtype), self.lm_head_kernel(),
                          preferred_element_type=jnp.float32)

    def __call__(self, input_ids: jax.Array, positions: jax.Array | None = None,
                 segment_ids: jax.Array | None = None) -> jax.Array:
        """[b, t] ints -> [b, t, vocab] float32 logits (whole: for tests and small evals)."""
        return self.unembed(self.hidden_states(input_ids, positions, segment_ids))
