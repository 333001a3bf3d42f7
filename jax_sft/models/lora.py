"""LoRA: low-rank adapters on the decoder's linear projections, as NeMo RL trains them.

A targeted projection y = x @ W (+ bias) becomes

    y = x @ W (+ bias) + scale * (x @ A) @ B,   scale = alpha / dim

A: [*in_dims, dim] (the base kernel's input dimensions), B: [dim, *out_dims]; B starts at zero, so
the model starts as the base. "xavier" draws A from N(0, 2 / (fan_in + dim)) (torch's
xavier_normal_ on the [dim, fan_in] weight), "uniform" from U(-1/sqrt(fan_in), 1/sqrt(fan_in))
(torch's kaiming_uniform_ with a=sqrt(5)), as NeMo RL's Automodel LoRA initialises. Dropout is
applied to x ("pre") or to the adapter's output ("post") while training.

Adapters are `LoRAParam`s (a subclass of `nnx.Param`): training splits the model with that filter,
so only adapters get gradients and optimizer state, and the base (`nnx.Param` otherwise) is frozen.
Adapters carry the logical axes of their base kernel's dimensions (plus "lora_rank", replicated),
so they shard with it.

Which projections get adapters: `jax_sft.models.options.LoraConfig` (NeMo RL's module matching,
HF and Megatron names). Megatron's fused linear_qkv / linear_fc1 adapters share one A across the
fused projections; here each projection has its own A (same rank).

Mixture-of-experts experts and routers get no adapters (they stay frozen).
"""

from __future__ import annotations

import math
import zlib

import jax
import jax.numpy as jnp
from flax import nnx

from jax_sft import choices
from jax_sft.models.options import LM_HEAD, LoraConfig


class LoRAParam(nnx.Param):
    """A LoRA adapter matrix: the only trainable parameters of a LoRA run."""


class LoRA(nnx.Module):
    """The adapter of one projection: `delta(x)` = scale * (x @ A) @ B in the compute dtype.

    in_dims / out_dims: the base kernel's input and output dimension sizes with their logical
    axis names; `in_subscripts` / `out_subscripts`: their einsum letters in the projection."""

    def __init__(
        self,
        cfg: LoraConfig,
        in_dims: tuple[tuple[int, str], ...],
        out_dims: tuple[tuple[int, str], ...],
        in_subscripts: str,
        out_subscripts: str,
        *,
        dtype,
        rngs: nnx.Rngs,
    ):
        r = cfg.dim
        in_shape, in_names = tuple(d for d, _ in in_dims), tuple(n for _, n in in_dims)
        out_shape, out_names = tuple(d for d, _ in out_dims), tuple(n for _, n in out_dims)
        meta = lambda *names: {"out_sharding": names, "eager_sharding": False}  # noqa: E731
        self.lora_a = LoRAParam(init_a(cfg.a_init, rngs.params(), in_shape + (r,)), **meta(*in_names, "lora_rank"))
        self.lora_b = LoRAParam(jnp.zeros((r,) + out_shape, jnp.float32), **meta("lora_rank", *out_names))
        self.scale = cfg.scale
        self.dropout = float(cfg.dropout)
        self.dropout_position = cfg.dropout_position
        self.dtype = dtype
        self.in_subscripts, self.out_subscripts = in_subscripts, out_subscripts

    def __call__(self, x: jax.Array, dropout_key: jax.Array | None = None) -> jax.Array:
        """x: [..., *in_dims] -> [..., *out_dims] in the compute dtype. dropout_key: None = no
        dropout (evaluation, or dropout 0)."""
        drop = dropout_key is not None and self.dropout > 0.0
        if drop and self.dropout_position == "pre":
            x = _dropout(x, self.dropout, dropout_key)
        a = self.lora_a[...].astype(self.dtype)
        b = self.lora_b[...].astype(self.dtype)
        h = jnp.einsum(f"...{self.in_subscripts},{self.in_subscripts}r->...r", x.astype(self.dtype), a)
        h = h * jnp.asarray(self.scale, self.dtype)
        y = jnp.einsum(f"...r,r{self.out_subscripts}->...{self.out_subscripts}", h, b)
        if drop and self.dropout_position == "post":
            y = _dropout(y, self.dropout, dropout_key)
        return y

    def delta_kernel(self) -> jax.Array:
        """scale * A @ B as a [*in_dims, *out_dims] float32 kernel (merging into the base)."""
        ins, outs = self.in_subscripts, self.out_subscripts
        return self.scale * jnp.einsum(
            f"{ins}r,r{outs}->{ins}{outs}", self.lora_a[...].astype(jnp.float32), self.lora_b[...].astype(jnp.float32)
        )


class FusedLoRA(nnx.Module):
    """The adapter of a projection whose HF module is one linear layer but whose kernel is stored
    as several blocks of its output (Mamba-2's in_proj, models/mamba.py): one A [embed, dim] and a B
    per block, `lora_b_<part>` [dim, *shape] (PEFT's lora_B is their rows concatenated in order)."""

    def __init__(self, cfg: LoraConfig, e: int, parts: dict, *, dtype, rngs: nnx.Rngs):
        r = cfg.dim
        meta = lambda *names: {"out_sharding": names, "eager_sharding": False}  # noqa: E731
        self.lora_a = LoRAParam(init_a(cfg.a_init, rngs.params(), (e, r)), **meta("embed", "lora_rank"))
        for name, (shape, names) in parts.items():
            setattr(self, f"lora_b_{name}", LoRAParam(jnp.zeros((r, *shape), jnp.float32), **meta("lora_rank", *names)))
        self.parts = tuple(parts)
        self.scale, self.dropout, self.dropout_position = cfg.scale, float(cfg.dropout), cfg.dropout_position
        self.dtype = dtype

    def __call__(self, x: jax.Array, dropout_key: jax.Array | None = None) -> dict[str, jax.Array]:
        """x [..., embed] -> {part: [..., *shape]} in the compute dtype (dropout as `LoRA`)."""
        drop = dropout_key is not None and self.dropout > 0.0
        if drop and self.dropout_position == "pre":
            x = _dropout(x, self.dropout, dropout_key)
        h = jnp.einsum("...e,er->...r", x.astype(self.dtype), self.lora_a[...].astype(self.dtype))
        h = h * jnp.asarray(self.scale, self.dtype)
        keys = jax.random.split(dropout_key, len(self.parts)) if drop else [None] * len(self.parts)
        out = {}
        for name, key in zip(self.parts, keys):
            y = jnp.tensordot(h, getattr(self, f"lora_b_{name}")[...].astype(self.dtype), axes=1)
            out[name] = _dropout(y, self.dropout, key) if drop and self.dropout_position == "post" else y
        return out


def _dropout(x: jax.Array, rate: float, key: jax.Array) -> jax.Array:
    keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
    return jnp.where(keep, x / jnp.asarray(1.0 - rate, x.dtype), jnp.zeros((), x.dtype))


def init_a(method: str, key: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """A's initial value [*in_dims, dim] float32 (see the module docstring)."""
    fan_in, r = math.prod(shape[:-1]), shape[-1]
    if method == "xavier":
        return jax.random.normal(key, shape, jnp.float32) * math.sqrt(2.0 / (fan_in + r))
    if method == "uniform":
        bound = 1.0 / math.sqrt(fan_in)
        return jax.random.uniform(key, shape, jnp.float32, -bound, bound)
    raise ValueError(f"lora_A_init={method!r}: expected one of {list(choices.LORA_A_INITS)}")


def site_key(seed: int, layer: int | None, proj: str) -> jax.Array:
    """The init key of one site's A: a function of the seed and the site only, so that adapters
    start equal whatever the mesh or whether layers are scanned."""
    return jax.random.fold_in(jax.random.key(seed), zlib.crc32(f"{layer}.{proj}".encode()))


def site_of(path: tuple) -> tuple[int | None, str]:
    """(layer index or None when scan-stacked / lm_head, projection) of an adapter's state path,
    e.g. ("layers", 3, "self_attn", "q_proj", "lora", "lora_a") -> (3, "q_proj")."""
    if path[0] == "lm_head_lora":
        return None, LM_HEAD
    layer = path[1] if isinstance(path[1], int) or str(path[1]).isdigit() else None
    return (None if layer is None else int(layer)), str(path[-3])


def initial_value(cfg: LoraConfig, path: tuple, shape: tuple[int, ...], num_layers: int) -> jax.Array:
    """An adapter's starting value (float32): B zeros, A drawn with `site_key` per layer (a
    scan-stacked A [num_layers, ...] stacks the per-layer draws, so it equals the unrolled one)."""
    if str(path[-1]).startswith("lora_b"):  # lora_b, or a FusedLoRA's lora_b_<part>
        return jnp.zeros(shape, jnp.float32)
    layer, proj = site_of(path)
    stacked = path[0] == "layers" and layer is None
    if not stacked:
        return init_a(cfg.a_init, site_key(cfg.seed, layer, proj), shape)
    return jnp.stack([init_a(cfg.a_init, site_key(cfg.seed, i, proj), shape[1:]) for i in range(num_layers)])
