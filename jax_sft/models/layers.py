"""The decoder's layer components: RMSNorm, projections (with optional LoRA adapters), attention
and the gated MLP. Parameter layouts and their logical axis names are listed in `sharding.py`.

Attention's q/k norms (`ModelConfig.qk_norm`): "head" normalises each head's [head_dim] (Qwen3,
Gemma 3); "projection" normalises the whole [heads * head_dim] projection at once (OLMo 2), whose
weights carry the logical axis "qk_norm" (replicated; under tensor parallelism the mean of squares
is a reduction over the tensor axis, which XLA inserts).
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
from flax import nnx

from jax_sft.models import attention as attention_lib
from jax_sft.models import context as context_lib
from jax_sft.models import kv_cache as kv_cache_lib
from jax_sft.models.config import ModelConfig
from jax_sft.models.fp8 import Fp8History, fp8_einsum
from jax_sft.models.lora import LoRA
from jax_sft.models.options import Fp8Config, LoraConfig
from jax_sft.models.rope import apply_rope

normal_init = nnx.initializers.normal(0.02)  # HF's initializer_range default


def meta(*names: str) -> dict:
    """Param metadata: logical axis names; sharding is applied by the caller (sharding.py)."""
    return {"out_sharding": names, "eager_sharding": False}


class RMSNorm(nnx.Module):
    """(offset + weight) * x / sqrt(mean(x^2) + eps) over the last len(shape) axes, in float32;
    returns `dtype`. weight: `shape` ([features], or [heads, head_dim] for a q/k norm over a whole
    projection) with logical axes `names`; offset 0 (Llama) or 1 (Gemma, whose weights are stored
    around 0)."""

    def __init__(
        self,
        shape: int | tuple[int, ...],
        eps: float,
        *,
        dtype,
        param_dtype,
        offset: float = 0.0,
        names: tuple[str, ...] = ("norm",),
    ):
        shape = (shape,) if isinstance(shape, int) else tuple(shape)
        self.weight = nnx.Param(jnp.full(shape, 1.0 - offset, param_dtype), **meta(*names))
        self.axes = tuple(range(-len(shape), 0))
        self.eps = eps
        self.offset = offset
        self.dtype = dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=self.axes, keepdims=True) + self.eps)
        return ((self.offset + self.weight[...].astype(jnp.float32)) * normed).astype(self.dtype)


class Projection(nnx.Einsum):
    """`nnx.Einsum` plus an optional LoRA adapter (`lora`; None: the plain projection) and optional
    FP8 matmuls (`fp8`; `jax_sft.models.fp8`: delayed scaling keeps an `Fp8History` here).
    The bias, when there is one, spans trailing output dimensions."""

    def __init__(self, *args, lora: LoRA | None = None, fp8: Fp8Config | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.lora = nnx.data(lora)
        self.fp8 = fp8
        delayed = fp8 is not None and fp8.recipe == "delayed"
        self.fp8_history = Fp8History(jnp.zeros((3, fp8.history), jnp.float32), **meta(None, None)) if delayed else None

    def __call__(self, x: jax.Array, dropout_key: jax.Array | None = None) -> jax.Array:
        if self.fp8 is None:
            y = super().__call__(x)
        else:
            history = None if self.fp8_history is None else self.fp8_history[...]
            y = fp8_einsum(
                self.einsum_str, x.astype(self.dtype), self.kernel[...].astype(self.dtype), self.fp8, history
            )
            if self.bias is not None:
                y = y + self.bias[...].astype(self.dtype)
        return y if self.lora is None else y + self.lora(x, dropout_key).astype(y.dtype)


def projection(
    einsum: str,
    kernel: tuple[int, ...],
    names: tuple[str, ...],
    bias: tuple[int, ...] | None,
    bias_names: tuple[str, ...],
    *,
    dtype,
    param_dtype,
    rngs: nnx.Rngs,
    lora: LoraConfig | None = None,
    fp8: Fp8Config | None = None,
) -> Projection:
    """A projection; with `lora`, plus an adapter over the kernel's input and output dimensions;
    with `fp8`, FP8 matmuls."""
    adapter = None
    if lora is not None:
        x_sub, rest = einsum.split(",")
        k_sub, y_sub = rest.split("->")
        ins = "".join(c for c in k_sub if c in x_sub)
        outs = "".join(c for c in k_sub if c in y_sub)
        dims = {c: (kernel[i], names[i]) for i, c in enumerate(k_sub)}
        adapter = LoRA(
            lora, tuple(dims[c] for c in ins), tuple(dims[c] for c in outs), ins, outs, dtype=dtype, rngs=rngs
        )
    return Projection(
        einsum,
        kernel,
        bias,
        dtype=dtype,
        param_dtype=param_dtype,
        kernel_init=normal_init,
        bias_init=nnx.initializers.zeros,
        kernel_metadata=meta(*names),
        bias_metadata=meta(*bias_names),
        rngs=rngs,
        lora=adapter,
        fp8=fp8,
    )


def _keys(key: jax.Array | None, n: int) -> list[jax.Array | None]:
    """n dropout keys from one (all None when `key` is None: no dropout)."""
    return [None] * n if key is None else list(jax.random.split(key, n))


class Attention(nnx.Module):
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
        lora: LoraConfig | None = None,
        adapted: frozenset[str] = frozenset(),
        fp8: Fp8Config | None = None,
        context: context_lib.ContextParallel | None = None,
    ):
        e, n, kv, d = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        dense = partial(projection, dtype=dtype, param_dtype=param_dtype, rngs=rngs, fp8=fp8)
        qkv_bias = cfg.qkv_bias
        ad = lambda name: lora if name in adapted else None  # noqa: E731
        heads = ("embed", "q_heads", "head_dim")
        kv_heads = ("embed", "kv_heads", "head_dim")
        projections = {  # name: (einsum, kernel shape, its logical axes, bias shape (None: no bias), its axes)
            "q_proj": ("bte,ehd->bthd", (e, n, d), heads, (n, d) if qkv_bias else None, heads[1:]),
            "k_proj": ("bte,ehd->bthd", (e, kv, d), kv_heads, (kv, d) if qkv_bias else None, kv_heads[1:]),
            "v_proj": ("bte,ehd->bthd", (e, kv, d), kv_heads, (kv, d) if qkv_bias else None, kv_heads[1:]),
            "o_proj": ("bthd,hde->bte", (n, d, e), heads[1:] + heads[:1], (e,) if cfg.o_bias else None, ("embed",)),
        }
        for name, (einsum, shape, axes, bias, bias_axes) in projections.items():
            setattr(self, name, dense(einsum, shape, axes, bias, bias_axes, lora=ad(name)))
        self.q_norm, self.k_norm = _qk_norms(cfg, dtype=dtype, param_dtype=param_dtype)
        self.sinks = _sinks(cfg, param_dtype=param_dtype, rngs=rngs)
        self.sliding_window = cfg.sliding_windows[layer]
        self.scale = cfg.query_scale
        self.softcap = cfg.attn_softcap
        self.implementation = implementation
        self.max_segments = max_segments
        self.dtype = dtype
        self.context = context  # the sequence split over the mesh's context axis (None: whole rows)
        self.kv_cache: kv_cache_lib.LayerCache | None = nnx.data(None)  # generation only (kv_cache.py)

    def __call__(self, x, cos, sin, segment_ids, dropout_key=None):
        kq, kk, kv, ko = _keys(dropout_key, 4)
        q, k, v = self.q_proj(x, kq), self.k_proj(x, kk), self.v_proj(x, kv)  # [b, t, heads, d]
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if cos is not None:  # None: no position embeddings (ModelConfig.use_rope false)
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        q, k = q.astype(self.dtype), k.astype(self.dtype)
        if self.kv_cache is not None:
            k_all, v_all, q_positions = self.kv_cache.write(k, v)
            if q.shape[1] == 1:  # decode; more tokens: a prefill from slot 0, attended below
                out = attention_lib.cached_attention(
                    q,
                    k_all,
                    v_all,
                    q_positions,
                    sliding_window=self.sliding_window,
                    scale=self.scale,
                    softcap=self.softcap,
                    sinks=self._sinks(),
                )
                return self.o_proj(out, ko)
        elif self.context is not None:  # rows in the context axis's zig-zag layout (decoder.py)
            out = context_lib.attention(
                q,
                k,
                v,
                segment_ids,
                self.context,
                sliding_window=self.sliding_window,
                scale=self.scale,
                softcap=self.softcap,
            )
            return self.o_proj(out, ko)
        out = attention_lib.attention(
            q,
            k,
            v,
            segment_ids=segment_ids,
            sliding_window=self.sliding_window,
            implementation=self.implementation,
            max_segments=self.max_segments,
            scale=self.scale,
            softcap=self.softcap,
            sinks=self._sinks(),
        )
        return self.o_proj(out, ko)

    def _sinks(self) -> jax.Array | None:
        return None if self.sinks is None else self.sinks[...]


def _sinks(cfg: ModelConfig, *, param_dtype, rngs: nnx.Rngs) -> nnx.Param | None:
    """gpt-oss's attention sinks: one logit per query head (attention.py), or None."""
    if not cfg.attention_sinks:
        return None
    return nnx.Param(normal_init(rngs.params(), (cfg.num_heads,), param_dtype), **meta("q_heads"))


def _qk_norms(cfg: ModelConfig, *, dtype, param_dtype) -> tuple[RMSNorm | None, RMSNorm | None]:
    """The q and k norms of `cfg.qk_norm` (see the module docstring), or (None, None)."""
    n, kv, d = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    norm = partial(RMSNorm, eps=cfg.rms_norm_eps, dtype=dtype, param_dtype=param_dtype, offset=cfg.norm_offset)
    if cfg.qk_norm == "head":
        return norm(d), norm(d)
    if cfg.qk_norm == "projection":
        return norm((n, d), names=("q_heads", "head_dim")), norm((kv, d), names=("kv_heads", "head_dim"))
    return None, None


class MLP(nnx.Module):
    def __init__(
        self,
        cfg: ModelConfig,
        *,
        dtype,
        param_dtype,
        rngs: nnx.Rngs,
        lora: LoraConfig | None = None,
        adapted: frozenset[str] = frozenset(),
        fp8: Fp8Config | None = None,
    ):
        e, m = cfg.hidden_size, cfg.intermediate_size
        dense = partial(projection, dtype=dtype, param_dtype=param_dtype, rngs=rngs, fp8=fp8)
        bias = cfg.mlp_bias
        ad = lambda name: lora if name in adapted else None  # noqa: E731
        self.gate_proj = dense(
            "bte,em->btm", (e, m), ("embed", "mlp"), (m,) if bias else None, ("mlp",), lora=ad("gate_proj")
        )
        self.up_proj = dense(
            "bte,em->btm", (e, m), ("embed", "mlp"), (m,) if bias else None, ("mlp",), lora=ad("up_proj")
        )
        self.down_proj = dense(
            "btm,me->bte", (m, e), ("mlp", "embed"), (e,) if bias else None, ("embed",), lora=ad("down_proj")
        )
        self.act = ACTIVATIONS[cfg.activation]

    def __call__(self, x, token_mask=None, dropout_key=None):
        kg, ku, kd = _keys(dropout_key, 3)
        return self.down_proj(self.act(self.gate_proj(x, kg)) * self.up_proj(x, ku), kd), None


ACTIVATIONS = {
    "silu": jax.nn.silu,
    "gelu_tanh": partial(jax.nn.gelu, approximate=True),
    "relu2": lambda x: jnp.square(jax.nn.relu(x)),  # transformers' ReLUSquaredActivation
}
