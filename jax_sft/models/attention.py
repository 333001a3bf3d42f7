"""Causal self-attention with a selectable implementation.

    attention(q, k, v, segment_ids=None, sliding_window=None, implementation="auto") -> out

q: [batch, seq, q_heads, head_dim]; k, v: [batch, seq, kv_heads, head_dim] (q_heads a multiple of
kv_heads: GQA); out like q. Query i attends key j when j <= i, and, with `sliding_window` W (HF's
meaning, as transformers' sdpa/eager mask `kv_idx > q_idx - W`), when i - j < W; with
`segment_ids` [batch, seq] int, only when both tokens have the same segment id.

Packing convention: real tokens of the k-th sequence in a row have segment id k >= 1; padding has
segment id 0. Padding therefore attends (causally) only to padding, real tokens never see it, and
every query sees at least itself, so no softmax row is ever empty (no NaN). Rows without
segment_ids that are only right-padded need none: under the causal mask the padding at the end
cannot affect the real tokens before it.

Implementations:
  "xla":   runs everywhere. fp32 logits and softmax; GQA by grouping the query heads
           ([b, t, kv, group, d]), without repeating k/v.
  "cudnn": GPU flash attention via `jax.nn.dot_product_attention(implementation="cudnn")`;
           bfloat16/float16 only. It cannot honour segment ids (several sequences in one row),
           so it raises when given them instead of attending across sequences.
  "auto":  "cudnn" on GPU when dtype, head_dim and the absence of segment_ids allow, else "xla".
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

IMPLEMENTATIONS = ("auto", "xla", "cudnn")
_CUDNN_DTYPES = (jnp.bfloat16, jnp.float16)


def check_implementation(implementation: str, dtype, head_dim: int) -> None:
    """Raises early (at model construction) for a choice that cannot run here."""
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"attention={implementation!r}; choose one of {IMPLEMENTATIONS}")
    if implementation == "cudnn":
        if jax.default_backend() != "gpu":
            raise ValueError(
                f"attention='cudnn' needs a GPU but the JAX backend is {jax.default_backend()!r}; "
                "use attention='xla' (or 'auto')"
            )
        if jnp.dtype(dtype) not in [jnp.dtype(d) for d in _CUDNN_DTYPES]:
            raise ValueError(
                f"attention='cudnn' needs bfloat16 or float16 compute, got {jnp.dtype(dtype).name}; "
                "use attention='xla' for float32"
            )
        if head_dim % 8 or head_dim > 256:
            raise ValueError(f"attention='cudnn' needs head_dim <= 256 and a multiple of 8, got {head_dim}")


def resolve_implementation(implementation: str, dtype, head_dim: int, packed: bool) -> str:
    """"auto" -> "cudnn" or "xla" for this call; "cudnn" with segment ids raises."""
    if implementation == "cudnn" and packed:
        raise ValueError(
            "attention='cudnn' cannot restrict attention to segments (segment_ids, i.e. packed "
            "sequences); use attention='xla' or disable sequence packing"
        )
    if implementation != "auto":
        return implementation
    cudnn_ok = (
        jax.default_backend() == "gpu"
        and jnp.dtype(dtype) in [jnp.dtype(d) for d in _CUDNN_DTYPES]
        and head_dim % 8 == 0
        and head_dim <= 128
        and not packed
    )
    return "cudnn" if cudnn_ok else "xla"


def attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    segment_ids: jax.Array | None = None,
    sliding_window: int | None = None,
    implementation: str = "auto",
) -> jax.Array:
    """Causal attention, see the module docstring. Softmax scale is head_dim ** -0.5."""
    head_dim = q.shape[-1]
    check_implementation(implementation, q.dtype, head_dim)
    impl = resolve_implementation(implementation, q.dtype, head_dim, segment_ids is not None)
    if impl == "cudnn":
        return jax.nn.dot_product_attention(
            q,
            k,
            v,
            is_causal=True,
            # jax's (left, right) window is inclusive: i - j <= left; HF's W is exclusive.
            local_window_size=None if sliding_window is None else (sliding_window - 1, 0),
            implementation="cudnn",
        )
    return _xla_attention(q, k, v, segment_ids, sliding_window)


def _xla_attention(
    q: jax.Array,  # [b, t, n, d]
    k: jax.Array,  # [b, s, kv, d]
    v: jax.Array,  # [b, s, kv, d]
    segment_ids: jax.Array | None,  # [b, t]
    sliding_window: int | None,
) -> jax.Array:
    b, t, n, d = q.shape
    kv = k.shape[2]
    if n % kv:
        raise ValueError(f"q_heads={n} is not a multiple of kv_heads={kv}")
    qg = q.reshape(b, t, kv, n // kv, d)
    logits = jnp.einsum("btkgd,bskd->bkgts", qg, k, preferred_element_type=jnp.float32)
    logits = logits * jnp.float32(d**-0.5)  # [b, kv, g, t, s] fp32

    i = jnp.arange(t)[:, None]
    j = jnp.arange(t)[None, :]
    mask = j <= i  # [t, s]
    if sliding_window is not None:
        mask = mask & (i - j < sliding_window)
    mask = mask[None]  # [1, t, s]
    if segment_ids is not None:
        mask = mask & (segment_ids[:, :, None] == segment_ids[:, None, :])  # [b, t, s]
    # Finite fill: a row that were fully masked would give a uniform softmax, never NaN.
    logits = jnp.where(mask[:, None, None], logits, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgts,bskd->btkgd", probs, v, preferred_element_type=jnp.float32)
    return out.reshape(b, t, n, d).astype(q.dtype)
