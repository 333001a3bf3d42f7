"""Context parallelism: each row's sequence split over the mesh's "context" axis, and causal
attention across it.

Layout (zig-zag, load-balanced for causal attention): a row of t tokens is cut into 2n chunks of
c = t / (2n) tokens (n: the context axis size); device r holds chunk r and chunk 2n-1-r, in that
order, so every device has as many early (cheap) as late (expensive) queries.

    order = zigzag_order(t, n)      # numpy [t]: the natural index of each position of the layout
    x_zz = to_zigzag(x, n)          # [b, t, ...] natural -> layout (axis 1); from_zigzag undoes it

Every [b, t] input (ids, positions, segment ids, targets, loss mask) is permuted the same way, so
RoPE, packed segments, the loss and its token counts see the same tokens as without the split;
only attention needs the tokens' natural indices, which it computes from the layout. The local
token order (chunk r, then chunk 2n-1-r) is increasing in natural index, so a device's own keys
are causal in local order.

Attention across the axis (`attention`, inside `shard_map` over the whole mesh: rows over the
data-parallel axes, the sequence over "context", heads over "tensor"; a custom VJP):

  "ring":       the K/V of each device (with its segment ids) travel around the axis
                (`ppermute`); the queries merge each block into an online softmax (running max
                and sum, fp32). The backward pass is a second ring: the blocks' probabilities are
                recomputed from the saved log-sum-exp, and dK/dV travel with K/V, back at their
                owner after n passes. Per ring step a device attends two c x c blocks (step 0:
                three) and skips the blocks causality hides, so the work is balanced; the next
                block travels while one is attended. Each ring is one scan over its n steps
                (compile time flat in n); its last pass of K/V is not used.
  "all_gather": K/V and segment ids all-gathered over the axis once (the same volume as the
                ring, one collective); each device attends its two query chunks to the 2n + 1 key
                chunks they can see; the backward pass reduce-scatters dK/dV (fp32). It holds the
                whole row's K/V on every device, which GQA with few kv heads keeps small.
  "auto":       "all_gather" when the gathered K/V are no larger than the device's queries
                (kv_heads x n <= q_heads), else "ring".

Every block runs XLA operations: fp32 scores over at most `MAX_BLOCK` keys at a time (its keys
cut into sub-blocks of the largest divisor of c up to it), masks from the tokens' natural
indices: causal, HF's sliding window (i - j < W), equal segment ids, soft-capping
c * tanh(s / c) before the mask, exactly as `attention.py`'s "xla" kernel computes them. (A cuDNN
kernel per block is not implemented: jax's cuDNN attention returns a block's softmax statistics,
but its backward pass recomputes the probabilities from the block's own statistics, and a ring
needs them from the merged ones of all blocks; and it could not be checked here without a GPU.)
"""

from __future__ import annotations

import dataclasses
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from jax_sft.choices import CONTEXT_ATTENTION
from jax_sft.models.sharding import BATCH_AXES, CONTEXT, context_size, dp_size

MAX_BLOCK = 1024  # keys per sub-block of a block's scores
_F32 = jnp.float32


@dataclasses.dataclass(frozen=True)
class ContextParallel:
    """A model's context split: the mesh (its "context" axis > 1) and the attention strategy
    ("ring" or "all_gather", see the module docstring)."""

    mesh: Mesh
    strategy: str

    @property
    def size(self) -> int:
        return context_size(self.mesh)


def choose_strategy(requested: str, num_heads: int, num_kv_heads: int, size: int) -> str:
    """The strategy for `requested` ("auto", "ring", "all_gather"): "auto" gathers K/V when the
    gathered K/V are no larger than the local queries (kv_heads x size <= q_heads)."""
    if requested not in CONTEXT_ATTENTION:
        raise ValueError(f"context_attention={requested!r}; choose one of {CONTEXT_ATTENTION}")
    if requested != "auto":
        return requested
    return "all_gather" if num_kv_heads * size <= num_heads else "ring"


def context_parallel(mesh: Mesh | None, requested: str, num_heads: int, num_kv_heads: int) -> ContextParallel | None:
    """The split of a model on `mesh` (None when its context axis is 1 or there is no mesh)."""
    size = context_size(mesh)
    if size == 1:
        return None
    return ContextParallel(mesh, choose_strategy(requested, num_heads, num_kv_heads, size))


def check_length(seq: int, n: int) -> None:
    if seq % (2 * n):
        raise ValueError(
            f"a row of {seq} tokens cannot be split over context={n} into 2 x {n} equal chunks (the zig-zag "
            f"layout); make the row length a multiple of {2 * n} (policy.make_sequence_length_divisible_by)"
        )


def block_size(chunk: int) -> int:
    """Keys per sub-block for chunks of `chunk` tokens: the largest divisor of it up to MAX_BLOCK."""
    return max(d for d in range(1, min(chunk, MAX_BLOCK) + 1) if chunk % d == 0)


def zigzag_order(seq: int, n: int) -> np.ndarray:
    """[seq] int: the natural index of each position of the zig-zag layout over n devices."""
    check_length(seq, n)
    c = seq // (2 * n)
    chunks = np.stack([np.arange(n), 2 * n - 1 - np.arange(n)], axis=1).reshape(-1)
    return (chunks[:, None] * c + np.arange(c)).reshape(-1)


def to_zigzag(x, n: int, axis: int = 1):
    """x with its `axis` (natural order) permuted into the zig-zag layout over n devices."""
    return x if n == 1 else jnp.take(x, zigzag_order(x.shape[axis], n), axis=axis)


def from_zigzag(x, n: int, axis: int = 1):
    """The inverse of `to_zigzag`."""
    return x if n == 1 else jnp.take(x, np.argsort(zigzag_order(x.shape[axis], n)), axis=axis)


def describe(cp: ContextParallel, seq: int | None = None) -> str:
    """One log line: the split and the attention across it."""
    n = cp.size
    rows = "rows"
    blocks = f"blocks of <= {MAX_BLOCK} keys"
    if seq is not None:
        c = seq // (2 * n)
        rows = f"rows of {seq} tokens in {2 * n} chunks of {c} ({seq // n} tokens per device)"
        blocks = f"blocks of {c} queries x {block_size(c)} keys"
    how = {
        "ring": f"ring attention (K/V passed around the axis, {n} steps; backward: a second ring)",
        "all_gather": "K/V all-gathered over the axis (backward: dK/dV reduce-scattered)",
    }[cp.strategy]
    return f"context={n}: {rows}, zig-zag (device r: chunks r and {2 * n - 1}-r); {how}; xla {blocks}, fp32 softmax"


# ----------------------------------------------------------------------------- the shard_map


@dataclasses.dataclass(frozen=True)
class _Kernel:
    """What a device's attention needs to know (static)."""

    n: int  # context size
    c: int  # tokens per chunk
    block: int  # keys per sub-block
    scale: float
    softcap: float | None
    window: int | None
    strategy: str


def attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    segment_ids: jax.Array | None,
    cp: ContextParallel,
    *,
    sliding_window: int | None = None,
    scale: float | None = None,
    softcap: float | None = None,
) -> jax.Array:
    """Causal attention of rows in the zig-zag layout (see the module docstring): q [b, t, heads,
    d], k, v [b, t, kv_heads, d], segment_ids [b, t] (None: unpacked), all in layout order; the
    output like q. Masks, scale and soft-capping as `attention.attention`."""
    b, t, _, d = q.shape
    n = cp.size
    check_length(t, n)
    c = t // (2 * n)
    kernel = _Kernel(
        n, c, block_size(c), float(d) ** -0.5 if scale is None else float(scale), softcap, sliding_window, cp.strategy
    )
    # Rows over the data-parallel axes when they divide the batch (training), else every device of
    # a context group takes them all.
    batch = BATCH_AXES if b % dp_size(cp.mesh) == 0 else None
    heads, rows = P(batch, CONTEXT, "tensor", None), P(batch, CONTEXT)
    local = partial(_local_attention, kernel)
    # check_vma=False: the scans' zero carries are per-device values the checker cannot type.
    shard = partial(jax.shard_map, mesh=cp.mesh, out_specs=heads, check_vma=False)
    if segment_ids is None:
        return shard(lambda q, k, v: local(q, k, v, None), in_specs=(heads,) * 3)(q, k, v)
    return shard(local, in_specs=(heads, heads, heads, rows))(q, k, v, segment_ids.astype(jnp.int32))


@partial(jax.custom_vjp, nondiff_argnums=(0,))
def _local_attention(kernel: _Kernel, q, k, v, seg):
    return _forward(kernel, q, k, v, seg)[0]


def _local_attention_fwd(kernel: _Kernel, q, k, v, seg):
    out, lse = _forward(kernel, q, k, v, seg)
    return out, (q, k, v, seg, out, lse)


def _local_attention_bwd(kernel: _Kernel, res, d_out):
    dq, dk, dv = _backward(kernel, res, d_out)
    return dq, dk, dv, None


_local_attention.defvjp(_local_attention_fwd, _local_attention_bwd)


# ----------------------------------------------------------------------------- one device


def _natural(kernel: _Kernel, device) -> jax.Array:
    """[2, c] int32: the natural indices of the two chunks `device` holds."""
    n, c = kernel.n, kernel.c
    chunks = jnp.stack([device, 2 * n - 1 - device]).astype(jnp.int32)
    return chunks[:, None] * c + jnp.arange(c, dtype=jnp.int32)[None]


def _half(x, h, c: int, axis: int):
    """Half h (0 or 1, static or traced) of x's `axis` of 2c; None stays None."""
    return None if x is None else jax.lax.dynamic_slice_in_dim(x, h * c, c, axis)


def _heads_first(x: jax.Array, kv: int) -> jax.Array:
    """[b, t, heads, d] -> [b, kv, group, t, d]."""
    b, t, h, d = x.shape
    return x.reshape(b, t, kv, h // kv, d).transpose(0, 2, 3, 1, 4)


def _heads_last(x: jax.Array) -> jax.Array:
    """[b, kv, group, t, d] -> [b, t, heads, d]."""
    b, kv, g, t, d = x.shape
    return x.transpose(0, 3, 1, 2, 4).reshape(b, t, kv * g, d)


def _scores(kernel: _Kernel, q, kb, qi, ki, qs, ks):
    """q [b, kv, g, cq, d], kb [b, s, kv, d], natural indices qi [cq], ki [s], segments qs [b, cq],
    ks [b, s] (None: unpacked) -> (fp32 scores [b, kv, g, cq, s], soft-capped; the mask, broadcastable)."""
    s = jnp.einsum("bkgqd,bskd->bkgqs", q, kb, preferred_element_type=_F32) * _F32(kernel.scale)
    if kernel.softcap is not None:
        s = _F32(kernel.softcap) * jnp.tanh(s / _F32(kernel.softcap))
    mask = ki[None, :] <= qi[:, None]
    if kernel.window is not None:
        mask = mask & (qi[:, None] - ki[None, :] < kernel.window)
    mask = mask[None]
    if qs is not None:
        mask = mask & (qs[:, :, None] == ks[:, None, :])
    return s, mask[:, None, None]


def _sub_blocks(kernel: _Kernel, fn, carry, kb, vb, ki, ks):
    """fn(carry, (k, v, ki, ks)) over the key sub-blocks of a block (scan when there are several);
    -> (carry, the stacked per-sub-block outputs merged back along the keys, or None)."""
    nb = kb.shape[1] // kernel.block
    if nb == 1:
        return fn(carry, (kb, vb, ki, ks))

    def split(x, axis):
        if x is None:
            return None
        shape = x.shape[:axis] + (nb, kernel.block) + x.shape[axis + 1 :]
        return jnp.moveaxis(x.reshape(shape), axis, 0)

    carry, ys = jax.lax.scan(fn, carry, (split(kb, 1), split(vb, 1), split(ki, 0), split(ks, 1)))
    if ys is None:
        return carry, None
    merge = lambda y: jnp.moveaxis(y, 0, 1).reshape(y.shape[1], nb * y.shape[2], *y.shape[3:])  # noqa: E731
    return carry, jax.tree.map(merge, ys)


def _attend(kernel: _Kernel, state, q, qi, qs, kb, vb, ki, ks):
    """The online-softmax state (acc [b, kv, g, cq, d], max, sum [b, kv, g, cq], fp32) of queries
    q [b, kv, g, cq, d] after the keys kb, vb [b, s, kv, d]."""

    def sub(state, xs):
        acc, m, total = state
        kx, vx, kix, ksx = xs
        s, mask = _scores(kernel, q, kx, qi, kix, qs, ksx)
        s = jnp.where(mask, s, -jnp.inf)
        m_new = jnp.maximum(m, s.max(-1))
        safe = jnp.where(jnp.isfinite(m_new), m_new, 0.0)  # no key seen yet: everything stays 0
        p = jnp.exp(s - safe[..., None])
        alpha = jnp.exp(m - safe)
        pv = jnp.einsum("bkgqs,bskd->bkgqd", p.astype(vx.dtype), vx, preferred_element_type=_F32)
        return (acc * alpha[..., None] + pv, m_new, total * alpha + p.sum(-1)), None

    return _sub_blocks(kernel, sub, state, kb, vb, ki, ks)[0]


def _attend_back(kernel: _Kernel, dq, q, qi, qs, do, lse, delta, kb, vb, ki, ks):
    """The gradients of a block: -> (dq + the block's [b, kv, g, cq, d], (dk, dv) [b, s, kv, d]),
    fp32, from the queries' log-sum-exp and delta = rowsum(dout * out)."""

    def sub(dq, xs):
        kx, vx, kix, ksx = xs
        s, mask = _scores(kernel, q, kx, qi, kix, qs, ksx)
        p = jnp.where(mask, jnp.exp(s - lse[..., None]), 0.0)
        dv = jnp.einsum("bkgqs,bkgqd->bskd", p.astype(do.dtype), do, preferred_element_type=_F32)
        ds = p * (jnp.einsum("bkgqd,bskd->bkgqs", do, vx, preferred_element_type=_F32) - delta[..., None])
        if kernel.softcap is not None:  # d(c tanh(x / c))/dx = 1 - (capped / c)^2
            ds = ds * (1.0 - jnp.square(s / _F32(kernel.softcap)))
        ds = (ds * _F32(kernel.scale)).astype(q.dtype)
        dq = dq + jnp.einsum("bkgqs,bskd->bkgqd", ds, kx, preferred_element_type=_F32)
        dk = jnp.einsum("bkgqs,bkgqd->bskd", ds, q, preferred_element_type=_F32)
        return dq, (dk, dv)

    return _sub_blocks(kernel, sub, dq, kb, vb, ki, ks)


def _schedule(kernel: _Kernel, r, step):
    """-> (the (query half, key half) pairs device r attends at ring step `step`, whose keys are
    device j = r - step's, and j): (1, 0) and (h, h), h = [j > r]; the other two pairs are hidden
    by causality. Step 0 (its own keys) needs (1, 1) too, which the caller attends before the ring."""
    j = (r - step) % kernel.n
    h = (j > r).astype(jnp.int32)
    return ((1, 0), (h, h)), j


def _update(x, h, c: int, new, axis: int):
    return jax.lax.dynamic_update_slice_in_dim(x, new, h * c, axis)


def _pass_on(kernel: _Kernel, tree):
    """Every device's `tree` to the next device of the ring (r -> r + 1)."""
    perm = [(i, (i + 1) % kernel.n) for i in range(kernel.n)]
    return jax.tree.map(lambda x: jax.lax.ppermute(x, CONTEXT, perm), tree)


def _gather(x):
    return None if x is None else jax.lax.all_gather(x, CONTEXT, axis=1, tiled=True)


def _gathered_block(kernel: _Kernel, r, i):
    """Block i of 2n + 1 in the all-gather strategy: (query half, offset of its key chunk in the
    gathered row, the chunk's natural indices). Query half 0 (chunk r) sees key chunks 0..r, half
    1 (chunk 2n-1-r) chunks 0..2n-1-r."""
    n, c = kernel.n, kernel.c
    qh = (i > r).astype(jnp.int32)
    chunk = jnp.where(i <= r, i, i - r - 1).astype(jnp.int32)
    position = jnp.where(chunk < n, 2 * chunk, 2 * (2 * n - 1 - chunk) + 1)  # in the gathered row
    return qh, position * c, chunk * c + jnp.arange(c, dtype=jnp.int32)


def _slice(x, off, c: int):
    return None if x is None else jax.lax.dynamic_slice_in_dim(x, off, c, 1)


def _forward(kernel: _Kernel, q, k, v, seg):
    """-> (out like q, lse [b, kv, g, 2c] fp32) of this device's queries."""
    kvh, c, n = k.shape[2], kernel.c, kernel.n
    r = jax.lax.axis_index(CONTEXT)
    qt = _heads_first(q, kvh)
    qi = _natural(kernel, r)
    shape = qt.shape[:-1]
    state = (jnp.zeros(qt.shape, _F32), jnp.full(shape, -jnp.inf, _F32), jnp.zeros(shape, _F32))

    def attend(state, qh, kb, vb, ki, ks):
        half = tuple(_half(x, qh, c, 3) for x in state)
        new = _attend(kernel, half, _half(qt, qh, c, 3), qi[qh], _half(seg, qh, c, 1), kb, vb, ki, ks)
        return tuple(_update(x, qh, c, y, 3) for x, y in zip(state, new))

    def ring_step(state, step, travel):
        kk, vv, ss = travel
        pairs, j = _schedule(kernel, r, step)
        ki = _natural(kernel, j)
        for qh, kh in pairs:
            state = attend(state, qh, _half(kk, kh, c, 1), _half(vv, kh, c, 1), ki[kh], _half(ss, kh, c, 1))
        return state

    if kernel.strategy == "all_gather":
        whole = tuple(_gather(x) for x in (k, v, seg))

        def block(state, i):
            qh, off, ki = _gathered_block(kernel, r, i)
            return attend(state, qh, *(_slice(x, off, c) for x in whole[:2]), ki, _slice(whole[2], off, c)), None

        state, _ = jax.lax.scan(block, state, jnp.arange(2 * n + 1))
    else:
        state = attend(state, 1, _half(k, 1, c, 1), _half(v, 1, c, 1), qi[1], _half(seg, 1, c, 1))

        # One scan body for every step (compile time flat in n); the next block travels while
        # this one is attended (the last pass, back to the owners, is not used).
        def step(carry, s):
            state, travel = carry
            return (ring_step(state, s, travel), _pass_on(kernel, travel)), None

        (state, _), _ = jax.lax.scan(step, (state, (k, v, seg)), jnp.arange(n))
    acc, m, total = state
    return _heads_last(acc / total[..., None]).astype(q.dtype), m + jnp.log(total)


def _backward(kernel: _Kernel, res, d_out):
    q, k, v, seg, out, lse = res
    kvh, c = k.shape[2], kernel.c
    r = jax.lax.axis_index(CONTEXT)
    qt, do = _heads_first(q, kvh), _heads_first(d_out, kvh)
    delta = jnp.sum(do.astype(_F32) * _heads_first(out, kvh).astype(_F32), axis=-1)
    qi = _natural(kernel, r)

    def back(dq, qh, kb, vb, ki, ks):
        """-> (dq with the block's part added, the block's dk, dv)."""
        q_side = (_half(x, qh, c, 3) for x in (dq, qt))
        rest = (_half(x, qh, c, 3) for x in (do, lse, delta))
        new, (dk, dv) = _attend_back(kernel, *q_side, qi[qh], _half(seg, qh, c, 1), *rest, kb, vb, ki, ks)
        return _update(dq, qh, c, new, 3), dk, dv

    dq = jnp.zeros(qt.shape, _F32)
    run = _gather_back if kernel.strategy == "all_gather" else _ring_back
    dq, dk, dv = run(kernel, r, back, dq, k, v, seg)
    return _heads_last(dq).astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype)


def _ring_back(kernel: _Kernel, r, back, dq, k, v, seg):
    """The second ring: dK/dV travel with K/V and reach their owner after n passes."""
    c = kernel.c

    def ring_step(dq, step, travel):
        kk, vv, ss, dk, dv = travel
        pairs, j = _schedule(kernel, r, step)
        ki = _natural(kernel, j)
        for qh, kh in pairs:
            dq, dkb, dvb = back(dq, qh, _half(kk, kh, c, 1), _half(vv, kh, c, 1), ki[kh], _half(ss, kh, c, 1))
            dk = _update(dk, kh, c, _half(dk, kh, c, 1) + dkb, 1)
            dv = _update(dv, kh, c, _half(dv, kh, c, 1) + dvb, 1)
        return dq, (kk, vv, ss, dk, dv)

    qi = _natural(kernel, r)[1]
    dq, dk1, dv1 = back(dq, 1, _half(k, 1, c, 1), _half(v, 1, c, 1), qi, _half(seg, 1, c, 1))  # own (1, 1)
    zeros = jnp.zeros(k.shape, _F32)
    dk, dv = _update(zeros, 1, c, dk1, 1), _update(zeros, 1, c, dv1, 1)

    def step(carry, s):
        dq, travel = ring_step(*carry[:1], s, carry[1])
        return (dq, _pass_on(kernel, travel)), None

    # After n passes dK/dV are back at their owner (the last pass of K/V is not used).
    (dq, travel), _ = jax.lax.scan(step, (dq, (k, v, seg, dk, dv)), jnp.arange(kernel.n))
    return dq, travel[3], travel[4]


def _gather_back(kernel: _Kernel, r, back, dq, k, v, seg):
    """dK/dV of the whole gathered row, summed over the axis and scattered back to their owners."""
    c = kernel.c
    kk, vv, ss = (_gather(x) for x in (k, v, seg))

    def block(carry, i):
        dq, dk, dv = carry
        qh, off, ki = _gathered_block(kernel, r, i)
        dq, dkb, dvb = back(dq, qh, _slice(kk, off, c), _slice(vv, off, c), ki, _slice(ss, off, c))
        dk = jax.lax.dynamic_update_slice_in_dim(dk, _slice(dk, off, c) + dkb, off, 1)
        dv = jax.lax.dynamic_update_slice_in_dim(dv, _slice(dv, off, c) + dvb, off, 1)
        return (dq, dk, dv), None

    zeros = (jnp.zeros(kk.shape, _F32), jnp.zeros(vv.shape, _F32))
    (dq, dk, dv), _ = jax.lax.scan(block, (dq, *zeros), jnp.arange(2 * kernel.n + 1))
    scatter = partial(jax.lax.psum_scatter, axis_name=CONTEXT, scatter_dimension=1, tiled=True)
    return dq, scatter(dk), scatter(dv)
