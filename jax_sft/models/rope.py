"""Rotary position embeddings: `RopeConfig` read from an HF config dict as transformers 5 reads it,
and the frequencies, bit-for-bit as transformers computes them.

transformers 5 writes `rope_parameters` {"rope_type", "rope_theta", ...}; older files write
`rope_theta` beside `rope_scaling` {"type" or "rope_type", ...}. Both are read; rope types
"default", "linear", "llama3" and "yarn" are supported, anything else raises.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jax_sft.models.errors import ModelConfigError

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "yarn")


@dataclasses.dataclass(frozen=True)
class RopeConfig:
    """Rotary embedding: `theta` base; `rope_type` "default" | "linear" | "llama3" | "yarn" with
    its fields (as transformers' modeling_rope_utils reads them)."""

    theta: float
    rope_type: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0  # llama3 only
    high_freq_factor: float = 4.0  # llama3 only
    original_max_position_embeddings: int = 8192  # llama3 and yarn
    beta_fast: float = 32.0  # yarn only
    beta_slow: float = 1.0  # yarn only
    truncate: bool = True  # yarn only
    attention_factor: float = 1.0  # yarn: scales cos and sin (transformers' attention_scaling)


def read_rope(d: dict[str, Any], source: str) -> RopeConfig:
    params = d.get("rope_parameters") or d.get("rope_scaling") or {}
    key = "rope_parameters" if d.get("rope_parameters") else "rope_scaling"
    if not isinstance(params, dict) or any(isinstance(v, dict) for v in params.values()):
        raise ModelConfigError(f"{source}: {key}={params!r}: per-layer-type RoPE parameters are not supported")
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ModelConfigError(
            f"{source}: {key} rope_type={rope_type!r} is not supported; supported: {SUPPORTED_ROPE_TYPES}"
        )
    if float(params.get("partial_rotary_factor", d.get("partial_rotary_factor") or 1.0)) != 1.0:
        raise ModelConfigError(f"{source}: partial_rotary_factor != 1 is not supported")
    theta = float(params.get("rope_theta", d.get("rope_theta", 10000.0)))
    if rope_type == "default":
        return RopeConfig(theta=theta)

    def field(name: str) -> Any:
        if params.get(name) is None:
            raise ModelConfigError(f"{source}: {key} of rope_type {rope_type!r} needs {name!r}")
        return params[name]

    if rope_type == "linear":
        return RopeConfig(theta=theta, rope_type="linear", factor=float(field("factor")))
    # As transformers: a top-level original_max_position_embeddings wins, then the rope dict's,
    # then max_position_embeddings.
    original = (
        d.get("original_max_position_embeddings")
        or params.get("original_max_position_embeddings")
        or d.get("max_position_embeddings")
    )
    if original is None:
        raise ModelConfigError(f"{source}: {rope_type} RoPE needs original_max_position_embeddings")
    if rope_type == "yarn":
        return read_yarn(d, params, theta, int(original))
    return RopeConfig(
        theta=theta,
        rope_type="llama3",
        factor=float(field("factor")),
        low_freq_factor=float(field("low_freq_factor")),
        high_freq_factor=float(field("high_freq_factor")),
        original_max_position_embeddings=int(original),
    )


def read_yarn(d: dict[str, Any], params: dict[str, Any], theta: float, original: int) -> RopeConfig:
    """YaRN's fields as transformers' `_compute_yarn_parameters` reads them: factor (null: the
    ratio max_position_embeddings / original), attention_factor (null: from factor, mscale and
    mscale_all_dim), beta_fast / beta_slow (falsy: 32 / 1), truncate (absent: true)."""
    factor = params.get("factor")
    if factor is None:
        factor = d.get("max_position_embeddings", 2048) / original
    factor = float(factor)

    def get_mscale(scale: float, mscale: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0

    attention_factor = params.get("attention_factor")
    if attention_factor is None:
        mscale, mscale_all_dim = params.get("mscale"), params.get("mscale_all_dim")
        if mscale and mscale_all_dim:
            attention_factor = get_mscale(factor, mscale) / get_mscale(factor, mscale_all_dim)
        else:
            attention_factor = get_mscale(factor)
    return RopeConfig(
        theta=theta,
        rope_type="yarn",
        factor=factor,
        original_max_position_embeddings=original,
        beta_fast=float(params.get("beta_fast") or 32),
        beta_slow=float(params.get("beta_slow") or 1),
        truncate=bool(params.get("truncate", True)),
        attention_factor=float(attention_factor),
    )


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
