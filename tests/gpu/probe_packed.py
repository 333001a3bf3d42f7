"""GPU probe (not collected by pytest): cuDNN packed attention vs "xla" for each mask type that
could describe per-segment causal attention; prints relative errors of out, dq, dk, dv."""

import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from test_attention import _qkv, _value_and_grads, random_segments, rel  # noqa: E402

from jax_sft.models import attention as attention_lib  # noqa: E402

seg = random_segments(np.random.default_rng(0), 4, 512, 160)
q, k, v, ct = _qkv(1, 4, 512, 8, 2, 64)
ref, ref_grads = _value_and_grads("xla", q, k, v, ct, segment_ids=jnp.asarray(seg))
for mask_type in ("PADDING_CAUSAL", "CAUSAL"):
    attention_lib._PACKED_MASK_TYPE = mask_type
    try:
        out, grads = _value_and_grads("cudnn", q, k, v, ct, segment_ids=jnp.asarray(seg), max_segments=32)
        errs = [rel(out, ref)] + [rel(g, r) for g, r in zip(grads, ref_grads)]
        print(f"probe packed mask_type={mask_type}: rel err out/dq/dk/dv = " + " ".join(f"{e:.2e}" for e in errs))
    except (ValueError, NotImplementedError, RuntimeError) as e:  # report, try the next mask type
        print(f"probe packed mask_type={mask_type}: {type(e).__name__}: {str(e)[:300]}")
print("probe devices:", jax.devices())
