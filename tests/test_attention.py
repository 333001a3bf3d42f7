"""Attention kernels: the packed-layout description (CPU), the kernel choice, and on a GPU each
fused kernel against "xla" on random inputs, forward and gradients (skipped without a GPU).

GPU comparisons use ||a - b|| / ||b|| over the whole tensor, b being "xla" (fp32 softmax) on the
same bfloat16 inputs; bf16 kernels land between 1e-3 and 1e-2.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jax_sft.models import CausalLM, ModelConfig
from jax_sft.models import attention as attention_lib

ON_GPU = jax.default_backend() == "gpu"
gpu = pytest.mark.skipif(not ON_GPU, reason="needs a GPU (cuDNN kernels)")
HOPPER = ON_GPU and attention_lib._compute_capability() >= (9, 0)


def random_segments(rng, rows: int, seq: int, max_len: int, pad_rows=True) -> np.ndarray:
    """Rows of contiguous segments 1, 2, ... of random lengths, then padding (0) on some rows."""
    seg = np.zeros((rows, seq), np.int32)
    for r in range(rows):
        o, k = 0, 1
        fill = seq if (r % 2 == 0 or not pad_rows) else int(rng.integers(seq // 2, seq))
        while o < fill:
            n = min(int(rng.integers(1, max_len + 1)), fill - o)
            seg[r, o : o + n] = k
            o, k = o + n, k + 1
    return seg


def mask_from_runs(seqlen: np.ndarray, offsets: np.ndarray, seq: int) -> np.ndarray:
    """[rows, seq, seq] causal mask described by cuDNN's (seqlen, offsets): what the kernel sees."""
    rows = seqlen.shape[0]
    mask = np.zeros((rows, seq, seq), bool)
    for r in range(rows):
        for start, n in zip(offsets[r], seqlen[r]):
            if n < 0:
                continue
            idx = np.arange(start, start + n)
            mask[r][np.ix_(idx, idx)] = np.tril(np.ones((n, n), bool))
    return mask


def test_segment_runs_describe_the_segment_mask():
    rng = np.random.default_rng(0)
    seq = 48
    seg = random_segments(rng, 6, seq, 12)
    seg[1] = 0  # an all-padding row
    seg[3] = 1  # one segment filling the row
    runs = attention_lib.count_runs(seg)
    m = int(runs.max())
    seqlen, offsets = jax.jit(attention_lib.segment_runs, static_argnums=1)(jnp.asarray(seg), m)
    seqlen, offsets = np.asarray(seqlen), np.asarray(offsets)
    assert seqlen.shape == (6, m) and offsets.shape == (6, m + 1)
    assert (offsets[:, -1] == -1).all() and seqlen.dtype == np.int32
    np.testing.assert_array_equal((seqlen >= 0).sum(1), runs)
    np.testing.assert_array_equal(seqlen.clip(0).sum(1), seq)  # every token in one run

    i = np.arange(seq)
    expected = (seg[:, :, None] == seg[:, None, :]) & (i[None, :, None] >= i[None, None, :])
    np.testing.assert_array_equal(mask_from_runs(seqlen, offsets, seq), expected)


def test_segment_runs_overflow_stays_covered():
    """More runs than max_segments: the last described run stretches to the end of the row."""
    seg = np.repeat(np.arange(1, 9), 4)[None].astype(np.int32)  # 8 runs of 4
    seqlen, offsets = attention_lib.segment_runs(jnp.asarray(seg), 3)
    assert np.asarray(seqlen).tolist() == [[4, 4, 24]] and np.asarray(offsets).tolist() == [[0, 4, 8, -1]]


def test_check_packed_rows():
    seg = np.array([[1, 1, 2, 2, 2, 0], [1, 2, 3, 4, 5, 0]], np.int32)
    attention_lib.check_packed_rows(seg, 6)
    with pytest.raises(ValueError, match=r"packed row 1 .* holds 6 segments.*max_segments_per_row=5"):
        attention_lib.check_packed_rows(seg, 5)
    with pytest.raises(ValueError, match="packed row 0: a segment id occurs in more than one run"):
        attention_lib.check_packed_rows(np.array([[1, 1, 0, 1, 0, 0]], np.int32), 8)


def test_kernel_choice_and_errors():
    bf16 = jnp.bfloat16
    if not ON_GPU:
        for packed in (False, True):
            assert attention_lib.resolve_implementation("auto", bf16, 64, packed) == "xla"
        with pytest.raises(ValueError, match="attention='cudnn' needs a GPU"):
            attention_lib.resolve_implementation("cudnn", bf16, 64, packed=False)
        with pytest.raises(ValueError, match="packed layout, which needs a Hopper"):
            attention_lib.resolve_implementation("cudnn", bf16, 64, packed=True)
    else:
        assert attention_lib.resolve_implementation("auto", bf16, 64, False) == "cudnn"
        assert attention_lib.resolve_implementation("auto", bf16, 64, True) == ("cudnn" if HOPPER else "xla")
        assert attention_lib.resolve_implementation("auto", jnp.float32, 64, False) == "xla"
    assert attention_lib.resolve_implementation("xla", bf16, 64, True) == "xla"
    # Packed rows with a sliding window: cuDNN's packed layout is not verified with a window.
    assert attention_lib.resolve_implementation("auto", bf16, 64, True, windowed=True) == "xla"
    with pytest.raises(ValueError, match="packed sequences.*sliding window.*use attention='auto' or 'xla'"):
        attention_lib.resolve_implementation("cudnn", bf16, 64, packed=True, windowed=True)
    assert "xla" in attention_lib.describe("auto", jnp.float32, 64, True, 64)
    with pytest.raises(ValueError, match="attention='flash'; choose one of"):
        attention_lib.resolve_implementation("flash", bf16, 64, False)


def test_model_reports_kernel():
    cfg = ModelConfig.from_hf_dict(
        {
            "architectures": ["LlamaForCausalLM"],
            "vocab_size": 64,
            "hidden_size": 64,
            "intermediate_size": 64,
            "num_hidden_layers": 1,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "max_position_embeddings": 64,
        }
    )
    model = CausalLM(cfg, dtype=jnp.bfloat16, attention="auto", rngs=nnx.Rngs(0))
    expected = "cudnn" if ON_GPU and HOPPER else "xla"
    assert model.attention_kernel(packed=True) == expected
    assert model.describe_attention(packed=True).startswith("attention='auto' -> " + expected)
    with pytest.raises(ValueError, match="max_segments=0 must be a positive integer"):
        CausalLM(cfg, max_segments=0, rngs=nnx.Rngs(0))

    # Layers that differ in window may differ in kernel (packed rows: windowed layers run xla).
    mixed = dataclasses.replace(cfg, num_layers=2, sliding_windows=(None, 8))
    model = CausalLM(mixed, dtype=jnp.bfloat16, attention="auto", rngs=nnx.Rngs(0))
    assert model.attention_kernel(packed=True) == ("cudnn+xla" if HOPPER else "xla")
    assert model.attention_kernel(packed=False) == ("cudnn" if ON_GPU else "xla")
    if HOPPER:
        assert "on sliding-window layers" in model.describe_attention(packed=True)


# ----------------------------------------------------------------------------- GPU


def rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def _qkv(seed, b, t, n, kv, d):
    k = jax.random.split(jax.random.key(seed), 4)
    q = jax.random.normal(k[0], (b, t, n, d), jnp.bfloat16)
    kk = jax.random.normal(k[1], (b, t, kv, d), jnp.bfloat16)
    v = jax.random.normal(k[2], (b, t, kv, d), jnp.bfloat16)
    ct = jax.random.normal(k[3], (b, t, n, d), jnp.float32)
    return q, kk, v, ct


def _value_and_grads(impl, q, k, v, ct, **kw):
    def f(q, k, v):
        out = attention_lib.attention(q, k, v, implementation=impl, **kw)
        return (out.astype(jnp.float32) * ct).sum(), out

    (_, out), grads = jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2), has_aux=True))(q, k, v)
    return out, grads


def _compare(q, k, v, ct, **kw):
    out, grads = _value_and_grads("cudnn", q, k, v, ct, **kw)
    ref, ref_grads = _value_and_grads("xla", q, k, v, ct, **kw)
    assert np.isfinite(np.asarray(out, np.float32)).all()
    errs = [rel(out, ref)] + [rel(g, r) for g, r in zip(grads, ref_grads)]
    assert max(errs) < 2e-2, f"out, dq, dk, dv rel errors {errs}"
    return errs


# (q heads, kv heads), head_dim, sliding window: MHA and GQA, Llama-1B's 64 and 8B's 128.
CASES = [((8, 8), 128, None), ((8, 2), 64, None), ((8, 2), 64, 40), ((8, 1), 128, 100)]


@gpu
@pytest.mark.parametrize("heads, d, window", CASES)
def test_cudnn_padded_matches_xla(heads, d, window):
    q, k, v, ct = _qkv(0, 2, 512, *heads, d)
    _compare(q, k, v, ct, sliding_window=window)


@gpu
@pytest.mark.skipif(not HOPPER, reason="cuDNN's packed layout needs Hopper")
@pytest.mark.parametrize("heads, d", [((8, 8), 128), ((8, 2), 64), ((8, 1), 128)])
def test_cudnn_packed_matches_xla(heads, d):
    rng = np.random.default_rng(d + heads[1])
    seq = 512
    seg = random_segments(rng, 4, seq, 160)
    seg[1, :] = 1  # one full-length sequence
    m = int(attention_lib.count_runs(seg).max())
    q, k, v, ct = _qkv(1, 4, seq, *heads, d)
    _compare(q, k, v, ct, segment_ids=jnp.asarray(seg), max_segments=m + 3)


@gpu
@pytest.mark.skipif(not HOPPER, reason="cuDNN's packed layout needs Hopper")
def test_cudnn_packed_many_short_segments():
    rng = np.random.default_rng(5)
    seg = random_segments(rng, 2, 1024, 24)  # ~80 segments per row
    m = int(attention_lib.count_runs(seg).max())
    q, k, v, ct = _qkv(2, 2, 1024, 8, 2, 64)
    _compare(q, k, v, ct, segment_ids=jnp.asarray(seg), max_segments=m)


@gpu
@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("scan", [False, True])
def test_model_cudnn_matches_xla(packed, scan):
    if packed and not HOPPER:
        pytest.skip("cuDNN's packed layout needs Hopper")
    cfg = ModelConfig.from_hf_dict(
        {
            "architectures": ["LlamaForCausalLM"],
            "vocab_size": 512,
            "hidden_size": 256,
            "intermediate_size": 512,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "max_position_embeddings": 4096,
        }
    )
    models = {
        impl: CausalLM(cfg, dtype=jnp.bfloat16, attention=impl, scan_layers=scan, rngs=nnx.Rngs(0))
        for impl in ("xla", "cudnn")
    }
    rng = np.random.default_rng(3)
    ids = jnp.asarray(rng.integers(0, 512, (2, 256)))
    seg = jnp.asarray(random_segments(rng, 2, 256, 90)) if packed else None
    pos = None
    if packed:
        s = np.asarray(seg)
        pos = np.zeros_like(s)
        for r in range(2):
            starts = np.r_[0, np.flatnonzero(np.diff(s[r])) + 1]
            for a, b in zip(starts, np.r_[starts[1:], 256]):
                pos[r, a:b] = np.arange(b - a)
        pos = jnp.asarray(pos)

    def loss_and_grads(model):
        graphdef, state = nnx.split(model)

        def loss(state):
            logits = nnx.merge(graphdef, state)(ids, positions=pos, segment_ids=seg)
            return jax.nn.logsumexp(logits, -1).mean(), logits

        return jax.jit(jax.value_and_grad(loss, has_aux=True))(state)

    (l1, logits1), g1 = loss_and_grads(models["cudnn"])
    (l0, logits0), g0 = loss_and_grads(models["xla"])
    assert rel(logits1, logits0) < 2e-2
    errs = [rel(a, b) for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g0))]
    assert max(errs) < 5e-2, errs
