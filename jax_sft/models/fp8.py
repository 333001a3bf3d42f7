"""FP8 matmuls for the projection layers: per-tensor scaled quantize-dequantize around the einsum.

    y = einsum(qdq(x, s_x, e4m3), qdq(W, s_W, e4m3))      forward (bf16 einsum of fp8 values)
    dy -> qdq(dy, s_g, e5m2 ("hybrid") or e4m3)           backward, before it reaches x and W

qdq(t, s, f8) = clip(t / s, +-max(f8)).astype(f8).astype(t.dtype) * s: on a GPU, XLA turns a
dot whose operands are such quantize-dequantize patterns into an FP8 GEMM (cuBLASLt, Hopper and
newer); elsewhere (the CPU) it runs as written, emulating FP8 rounding exactly. The weights stay
in their master dtype (fp32) and compute copy (bf16); only the matmul inputs are rounded, and the
gradients pass straight through the rounding (it is not differentiated).

Scales, per tensor (`Fp8Config.recipe`):
  "tensorwise"  current scaling: s = amax(|t|) / max(f8) of the tensor itself, computed where it
                is quantized (forward for x and W, backward for dy). No state.
  "delayed"     delayed scaling (Transformer Engine's default recipe): s = max(history) / max(f8),
                from the amaxes of the last `history` optimizer steps (an `Fp8History` [3, H] per
                projection: rows x, W, dy; column 0 newest; 1.0 while the history is empty).
                The history's gradient carries what a micro-batch saw: zeros but for column 0,
                which holds (amax x, amax W, amax dy); so one backward pass yields the amaxes, the
                step keeps their maximum over its micro-batches, and `roll_history` makes it the
                newest entry after the update. The histories are training state: checkpointed
                and resumed with the weights.
LoRA adapters, the lm_head, attention and mixture-of-experts experts stay in the compute dtype.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
from flax import nnx

from jax_sft.models.options import Fp8Config

__all__ = ["Fp8History", "fp8_dtypes", "qdq", "scale_of", "fp8_einsum", "roll_history"]

_FORMATS = {"hybrid": (jnp.float8_e4m3fn, jnp.float8_e5m2), "e4m3": (jnp.float8_e4m3fn, jnp.float8_e4m3fn)}


class Fp8History(nnx.Variable):
    """A projection's amax history [3, H] fp32 (rows: x, W, dy; column 0 newest): delayed scaling.
    Its gradient in a backward pass is the pass's amaxes in column 0 (see the module docstring)."""


def fp8_dtypes(cfg: Fp8Config) -> tuple:
    """(forward dtype, gradient dtype) of `cfg.format`."""
    return _FORMATS[cfg.format]


def scale_of(amax: jax.Array, dtype) -> jax.Array:
    """The dequantization scale that maps amax onto the largest value of `dtype` (1 for an amax
    that is 0 or not finite: nothing seen yet)."""
    fmax = jnp.float32(jnp.finfo(dtype).max)
    amax = amax.astype(jnp.float32)
    return jnp.where((amax > 0) & jnp.isfinite(amax), amax / fmax, jnp.float32(1.0))


def qdq(x: jax.Array, scale: jax.Array, dtype) -> jax.Array:
    """x rounded to `dtype` (fp8) at `scale` and back to x's dtype (clipped to the fp8 range)."""
    fmax = jnp.float32(jnp.finfo(dtype).max)
    q = jnp.clip(x.astype(jnp.float32) / scale, -fmax, fmax).astype(dtype)
    return (q.astype(jnp.float32) * scale).astype(x.dtype)


def _amax(x: jax.Array) -> jax.Array:
    return jnp.max(jnp.abs(x)).astype(jnp.float32)


def _scale(history: jax.Array, row: int, t: jax.Array, dtype, current: bool) -> jax.Array:
    return scale_of(_amax(t) if current else jnp.max(history[row]), dtype)


def _seen(history: jax.Array, row: int, amax: jax.Array) -> jax.Array:
    """The history's cotangent: `amax` at [row, 0], zeros elsewhere."""
    return jnp.zeros_like(history).at[row, 0].set(amax)


@partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _quantize_input(x, history, row: int, dtype, current: bool):
    """qdq(x) in the forward pass; x's gradient passes through; the history's is amax(|x|) at
    [row, 0]."""
    return qdq(x, _scale(history, row, x, dtype, current), dtype)


def _quantize_input_fwd(x, history, row, dtype, current):
    return _quantize_input(x, history, row, dtype, current), (_amax(x), history)


def _quantize_input_bwd(row, dtype, current, res, g):
    amax, history = res
    return g, _seen(history, row, amax)


_quantize_input.defvjp(_quantize_input_fwd, _quantize_input_bwd)


@partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _quantize_grad(y, history, dtype, current: bool):
    """y unchanged in the forward pass; its cotangent dy rounded to `dtype` (qdq) in the backward
    pass; the history's gradient is amax(|dy|) at [2, 0]."""
    return y


def _quantize_grad_fwd(y, history, dtype, current):
    return y, history


def _quantize_grad_bwd(dtype, current, history, g):
    return qdq(g, _scale(history, 2, g, dtype, current), dtype), _seen(history, 2, _amax(g))


_quantize_grad.defvjp(_quantize_grad_fwd, _quantize_grad_bwd)


def fp8_einsum(
    einsum_str: str, x: jax.Array, kernel: jax.Array, cfg: Fp8Config, history: jax.Array | None
) -> jax.Array:
    """einsum(einsum_str, x, kernel) with both operands in FP8 and the output's gradient rounded to
    FP8 (see the module docstring). history [3, H]: delayed scaling; None: tensorwise."""
    fwd, bwd = fp8_dtypes(cfg)
    current = history is None
    if current:
        history = jnp.zeros((3, 1), jnp.float32)  # unused but for its (dropped) gradient
    xq = _quantize_input(x, history, 0, fwd, current)
    kq = _quantize_input(kernel, history, 1, fwd, current)
    return _quantize_grad(jnp.einsum(einsum_str, xq, kq), history, bwd, current)


def roll_history(history: jax.Array, seen: jax.Array) -> jax.Array:
    """history [..., 3, H] with column 0 of `seen` (a step's maximum of the history's gradients)
    as its newest entry, the oldest dropped."""
    return jnp.concatenate([seen[..., :1].astype(history.dtype), history[..., :-1]], axis=-1)
