"""Causal self-attention with a selectable kernel.

    attention(q, k, v, segment_ids=None, sliding_window=None, implementation="auto",
              max_segments=64, scale=None, softcap=None, sinks=None) -> out

q: [batch, seq, q_heads, head_dim]; k, v: [batch, seq, kv_heads, head_dim] (q_heads a multiple of
kv_heads: GQA); out like q. Query i attends key j when j <= i, and, with `sliding_window` W (HF's
meaning, as transformers' sdpa/eager mask `kv_idx > q_idx - W`), when i - j < W; with
`segment_ids` [batch, seq] int, only when both tokens have the same segment id. Scores are
q.k * `scale` (None: head_dim ** -0.5; Gemma: query_pre_attn_scalar ** -0.5), then with `softcap`
c (Gemma 2) c * tanh(scores / c), before the mask and the fp32 softmax. `sinks` [q_heads]
(gpt-oss's attention sinks) is a learned logit per head that joins each softmax's denominator and
nothing else: probs_ij = exp(s_ij) / (exp(sink_h) + sum_j' exp(s_ij')), so a query may attend to
"nothing" (its weights sum to less than 1). It applies per query row, so packed rows and GQA
(query heads grouped over their kv head) need nothing special.

Packing convention: real tokens of the k-th sequence in a row have segment id k >= 1; padding has
segment id 0. Padding therefore attends (causally) only to padding, real tokens never see it, and
every query sees at least itself, so no softmax row is ever empty (no NaN). Rows without
segment_ids that are only right-padded need none: under the causal mask the padding at the end
cannot affect the real tokens before it.

Kernels:
  "xla":   runs everywhere. fp32 logits and softmax; GQA by grouping the query heads
           ([b, t, kv, group, d]), without repeating k/v. Materialises [b, heads, t, t] scores.
  "cudnn": GPU flash attention (bfloat16/float16). Without segment ids:
           `jax.nn.dot_product_attention(implementation="cudnn")`. With segment ids: cuDNN's packed
           ("ragged") layout, each segment an independent causal sequence, so the work is that of
           the segments and not of the whole row. It needs a Hopper or newer GPU, segments that
           each occupy one contiguous run of a row (the data pipeline's layout: 1, 1, 2, 2, 2, 0, 0),
           and at most `max_segments` runs per row (a static bound: cuDNN keeps softmax
           statistics of shape [batch * max_segments, heads, seq]). The trailing padding counts
           as one run; it attends causally to itself, exactly as under "xla". The training loop
           checks every packed micro-batch against the bound on the host (`check_packed_rows`),
           since a jitted kernel cannot raise. Packed rows with a sliding window raise (cuDNN
           takes the window, but that combination is not verified against "xla" here).
  "auto":  "cudnn" on a GPU where dtype, head_dim and the batch layout allow (packed rows: Hopper
           or newer, no sliding window; no soft-capping and no attention sinks, which cuDNN's
           kernel lacks), else "xla"; decided per layer, so a model whose layers differ in window
           may mix them. `resolve_implementation` says which one a call gets.

Attention sinks on the GPU: cuDNN's flash attention (and jax.nn.dot_product_attention) computes
softmax(s) V with no term for a logit outside the keys, so its output for a sink layer would be
wrong (every query's weights would sum to 1). "xla" is exact (the sink enters the fp32 log-sum-exp
of each row), so "auto" runs sink layers (all of gpt-oss's) with "xla", and "cudnn" is refused
for them with one line. (An exact cuDNN formulation would rescale each row by
sigmoid(lse - sink), which needs the kernel's softmax statistics; jax does not return them.)

Checked on an H100 (cuDNN 9.19, jax 0.11.2) against "xla", forward and gradients, bf16 inputs:
padded rows with MHA/GQA/MQA, head_dim 64 and 128, no window and windows 40 and 100; packed rows
with MHA and GQA, head_dim 128 and 64 (||a - b|| / ||b|| < 2e-2 in tests/test_attention.py;
2.7e-3 to 3.9e-3 in tests/gpu/probe_packed.py).
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jax_sft.choices import ATTENTION as IMPLEMENTATIONS

DEFAULT_MAX_SEGMENTS = 64  # runs of segment ids per packed row for the cuDNN packed layout
_CUDNN_DTYPES = (jnp.bfloat16, jnp.float16)


def _backend() -> str:
    return jax.default_backend()


def _compute_capability() -> tuple[int, int] | None:
    """(major, minor) of the first GPU, or None off GPU."""
    if _backend() != "gpu":
        return None
    cc = getattr(jax.devices()[0], "compute_capability", None)
    if not cc:
        return None
    major, minor = (int(x) for x in str(cc).split(".")[:2])
    return major, minor


def _max_cudnn_head_dim() -> int:
    cc = _compute_capability()
    return 256 if cc is not None and cc >= (9, 0) else 128


def _cudnn_dtype(dtype) -> bool:
    return jnp.dtype(dtype) in [jnp.dtype(d) for d in _CUDNN_DTYPES]


def check_implementation(implementation: str, dtype, head_dim: int) -> None:
    """Raises early (at model construction) for a choice that cannot run here."""
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"attention={implementation!r}; choose one of {IMPLEMENTATIONS}")
    if implementation == "cudnn":
        if _backend() != "gpu":
            raise ValueError(
                f"attention='cudnn' needs a GPU but the JAX backend is {_backend()!r}; use attention='xla' (or 'auto')"
            )
        if not _cudnn_dtype(dtype):
            raise ValueError(
                f"attention='cudnn' needs bfloat16 or float16 compute, got {jnp.dtype(dtype).name}; "
                "use attention='xla' for float32"
            )
        limit = _max_cudnn_head_dim()
        if head_dim % 8 or head_dim > limit:
            raise ValueError(
                f"attention='cudnn' needs head_dim <= {limit} and a multiple of 8 on this GPU, "
                f"got {head_dim}; use attention='xla'"
            )


def resolve_implementation(
    implementation: str,
    dtype,
    head_dim: int,
    packed: bool,
    windowed: bool = False,
    softcap: bool = False,
    sinks: bool = False,
) -> str:
    """The kernel ("cudnn" or "xla") a call gets; "cudnn" that cannot honour the layout raises.
    `windowed`: the layer has a sliding window; `softcap`: its scores are soft-capped; `sinks`: it
    has attention sinks."""
    hopper = (_compute_capability() or (0, 0)) >= (9, 0)
    if implementation == "cudnn" and softcap:
        raise ValueError(
            "attention='cudnn' with attention logit soft-capping (Gemma 2's attn_logit_softcapping): "
            "cuDNN's flash attention does not soft-cap; use attention='auto' or 'xla'"
        )
    if implementation == "cudnn" and sinks:
        raise ValueError(
            "attention='cudnn' with attention sinks (gpt-oss): cuDNN's flash attention has no sink "
            "term in its softmax, so its output would be wrong; use attention='auto' or 'xla'"
        )
    if implementation == "cudnn" and packed and windowed:
        raise ValueError(
            "attention='cudnn' with segment_ids (packed sequences) and a sliding window: cuDNN's "
            "packed layout with a window is not verified against 'xla' in jax_sft; use "
            "attention='auto' or 'xla' (the windowed layers then run 'xla'), or disable sequence packing"
        )
    if implementation == "cudnn" and packed and not hopper:
        raise ValueError(
            "attention='cudnn' with segment_ids (packed sequences) uses cuDNN's packed layout, "
            f"which needs a Hopper or newer GPU (compute capability >= 9.0; found "
            f"{_compute_capability() or _backend()}); use attention='xla' or disable sequence packing"
        )
    check_implementation(implementation, dtype, head_dim)
    if implementation == "cudnn":
        return "cudnn"
    if implementation == "xla":
        return "xla"
    cudnn_ok = (
        _backend() == "gpu"
        and _cudnn_dtype(dtype)
        and head_dim % 8 == 0
        and head_dim <= _max_cudnn_head_dim()
        and (hopper or not packed)
        and not (packed and windowed)
        and not softcap
        and not sinks
    )
    return "cudnn" if cudnn_ok else "xla"


def describe(
    implementation: str,
    dtype,
    head_dim: int,
    packed: bool,
    max_segments: int,
    windows: Sequence[int | None] = (None,),
    softcap: bool = False,
    sinks: bool = False,
) -> str:
    """One line for the run log: which kernel the layers (their `windows`) run, and why."""
    names = {
        "xla": "xla (fp32 softmax over materialised [batch, heads, seq, seq] scores"
        + (", soft-capped scores: no cudnn kernel" if softcap else "")
        + (", attention sinks: no cudnn kernel" if sinks else "")
        + ")",
        "cudnn": "cudnn flash attention" + (f", packed layout (<= {max_segments} segments per row)" if packed else ""),
    }
    by_kind = {}
    for w in windows:
        kind = "sliding-window layers" if w is not None else "full-attention layers"
        by_kind[kind] = resolve_implementation(implementation, dtype, head_dim, packed, w is not None, softcap, sinks)
    chosen = f"attention={implementation!r} -> "
    if len(set(by_kind.values())) == 1:
        return chosen + names[next(iter(by_kind.values()))]
    return chosen + "; ".join(f"{names[impl]} on {kind}" for kind, impl in by_kind.items())


def attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    segment_ids: jax.Array | None = None,
    sliding_window: int | None = None,
    implementation: str = "auto",
    max_segments: int = DEFAULT_MAX_SEGMENTS,
    scale: float | None = None,
    softcap: float | None = None,
    sinks: jax.Array | None = None,
) -> jax.Array:
    """Causal attention, see the module docstring. Softmax scale: `scale`, default head_dim ** -0.5."""
    head_dim = q.shape[-1]
    scale = float(head_dim) ** -0.5 if scale is None else float(scale)
    impl = resolve_implementation(
        implementation,
        q.dtype,
        head_dim,
        segment_ids is not None,
        sliding_window is not None,
        softcap is not None,
        sinks is not None,
    )
    if impl == "cudnn" and segment_ids is not None:
        return _cudnn_packed(q, k, v, segment_ids, sliding_window, max_segments, scale)
    if impl == "cudnn":
        return jax.nn.dot_product_attention(
            q,
            k,
            v,
            scale=scale,
            is_causal=True,
            # jax's (left, right) window is inclusive: i - j <= left; HF's W is exclusive.
            local_window_size=None if sliding_window is None else (sliding_window - 1, 0),
            implementation="cudnn",
        )
    return _xla_attention(q, k, v, segment_ids, sliding_window, scale, softcap, sinks)


def cached_attention(
    q: jax.Array,
    k_cache: jax.Array,
    v_cache: jax.Array,
    q_positions: jax.Array,
    *,
    sliding_window: int | None = None,
    scale: float | None = None,
    softcap: float | None = None,
    sinks: jax.Array | None = None,
) -> jax.Array:
    """Attention of new queries over a KV cache (generation; `kv_cache.py`).

    q: [b, t, heads, d] at positions q_positions [b, t]; k_cache, v_cache: [b, S, kv_heads, d],
    slot j holding the key/value of position j of that row. A query at position i attends slot j
    when j <= i (and i - j < sliding_window): slots past a row's current position (padding, or
    not yet generated) are never seen. fp32 logits and softmax, as the "xla" kernel; `scale`,
    `softcap` and `sinks` as in `attention`.
    """
    return _xla_attention(q, k_cache, v_cache, None, sliding_window, scale, softcap, sinks, q_positions=q_positions)


# ----------------------------------------------------------------------------- packed rows


def segment_runs(segment_ids: jax.Array, max_segments: int) -> tuple[jax.Array, jax.Array]:
    """cuDNN's packed-layout description of rows of contiguous segments.

    segment_ids [b, t] -> (seqlen [b, M] int32, offsets [b, M + 1] int32), M = max_segments:
    the length and start of each run of equal ids, -1 beyond the row's last run. A row with more
    than M runs would leave tokens outside every segment; the last described run is then
    stretched to the end of the row so that every output stays finite (but wrong across those
    runs): `check_packed_rows` rejects such batches on the host before they get here.
    """
    b, t = segment_ids.shape
    starts = jnp.concatenate([jnp.ones((b, 1), bool), segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1)

    def row(s):
        idx = jnp.nonzero(s, size=max_segments, fill_value=t)[0].astype(jnp.int32)  # [M]
        ends = jnp.concatenate([idx[1:], jnp.full((1,), t, jnp.int32)])
        valid = idx < t
        seqlen = jnp.where(valid, ends - idx, -1)
        offsets = jnp.concatenate([jnp.where(valid, idx, -1), jnp.full((1,), -1, jnp.int32)])
        return seqlen, offsets

    return jax.vmap(row)(starts)


_PACKED_MASK_TYPE = "PADDING_CAUSAL"  # each segment: its own causal sequence of `seqlen` tokens


def _cudnn_packed(q, k, v, segment_ids, sliding_window, max_segments, scale):
    # jax exposes the packed layout only through its cuDNN module (jax 0.10 and 0.11 alike).
    from jax._src.cudnn.fused_attention_stablehlo import MaskType
    from jax._src.cudnn.fused_attention_stablehlo import dot_product_attention as cudnn_attention

    seqlen, offsets = segment_runs(segment_ids, max_segments)
    return cudnn_attention(
        q,
        k,
        v,
        q_seqlen=seqlen,
        kv_seqlen=seqlen,
        q_offsets=offsets,
        kv_offsets=offsets,
        scale=scale,
        mask_type=MaskType[_PACKED_MASK_TYPE],
        qkv_layout="BTNH",
        sliding_window_length=sliding_window,  # cuDNN's window is HF's: (i - W, i]
    )


def count_runs(segment_ids: np.ndarray) -> np.ndarray:
    """Host side: [rows, seq] segment ids -> [rows] number of runs of equal ids."""
    seg = np.asarray(segment_ids)
    return 1 + (seg[:, 1:] != seg[:, :-1]).sum(axis=1)


def check_packed_rows(segment_ids: np.ndarray, max_segments: int) -> None:
    """Host side: raises when a packed micro-batch cannot go through the cuDNN packed layout.

    Every segment id must occupy one contiguous run of its row, and a row may hold at most
    `max_segments` runs (the trailing padding is one).
    """
    seg = np.asarray(segment_ids)
    runs = count_runs(seg)
    worst = int(runs.argmax())
    if runs[worst] > max_segments:
        raise ValueError(
            f"packed row {worst} of the micro-batch holds {int(runs[worst])} segments (padding "
            f"included), more than policy.jax_cfg.max_segments_per_row={max_segments} that the "
            "cuDNN packed-attention kernel was compiled for; raise max_segments_per_row (softmax "
            "statistics grow with it) or use policy.jax_cfg.attention='xla'"
        )
    for r, row in enumerate(seg):
        if len(np.unique(row)) != runs[r]:
            raise ValueError(
                f"packed row {r}: a segment id occurs in more than one run ({row.tolist()[:64]}...); "
                "the cuDNN packed-attention kernel needs each sequence contiguous. Use "
                "policy.jax_cfg.attention='xla' for such layouts"
            )


# ----------------------------------------------------------------------------- xla


def _xla_attention(
    q: jax.Array,  # [b, t, n, d]
    k: jax.Array,  # [b, s, kv, d]
    v: jax.Array,  # [b, s, kv, d]
    segment_ids: jax.Array | None,  # [b, t]
    sliding_window: int | None,
    scale: float | None = None,  # None: head_dim ** -0.5
    softcap: float | None = None,
    sinks: jax.Array | None = None,  # [n]: a logit per query head in the softmax's denominator
    q_positions: jax.Array | None = None,  # [b, t]: cached attention (see `cached_attention`)
) -> jax.Array:
    b, t, n, d = q.shape
    s, kv = k.shape[1], k.shape[2]
    if n % kv:
        raise ValueError(f"q_heads={n} is not a multiple of kv_heads={kv}")
    qg = q.reshape(b, t, kv, n // kv, d)
    logits = jnp.einsum("btkgd,bskd->bkgts", qg, k, preferred_element_type=jnp.float32)
    logits = logits * jnp.float32(d**-0.5 if scale is None else scale)  # [b, kv, g, t, s] fp32
    if softcap is not None:
        logits = jnp.float32(softcap) * jnp.tanh(logits / jnp.float32(softcap))

    i = jnp.arange(t)[None, :, None] if q_positions is None else q_positions[:, :, None]
    j = jnp.arange(s)[None, None, :]
    mask = j <= i  # [1 or b, t, s]
    if sliding_window is not None:
        mask = mask & (i - j < sliding_window)
    if segment_ids is not None:
        mask = mask & (segment_ids[:, :, None] == segment_ids[:, None, :])  # [b, t, s]
    # Finite fill: a row that were fully masked would give a uniform softmax, never NaN.
    logits = jnp.where(mask[:, None, None], logits, jnp.finfo(jnp.float32).min)
    if sinks is None:
        probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    else:  # the sink joins each row's log-sum-exp only: head h = kv head k, group member g
        sink = sinks.astype(jnp.float32).reshape(1, kv, n // kv, 1)
        log_z = jnp.logaddexp(jax.nn.logsumexp(logits, axis=-1), sink)  # [b, kv, g, t]
        probs = jnp.exp(logits - log_z[..., None]).astype(v.dtype)
    out = jnp.einsum("bkgts,bskd->btkgd", probs, v, preferred_element_type=jnp.float32)
    return out.reshape(b, t, n, d).astype(q.dtype)
