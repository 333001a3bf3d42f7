"""Model parity figures: jax_sft's logits against HF transformers' torch models, per family.

    python bench/model_parity.py      (needs the test extra: torch)

Tiny random models of each family (tests/hf_models.py, the ground truth of the model tests);
relative error = max|a - b| / max|b|, b the reference. Columns: float32 vs HF at positions
0..15 and at sorted positions up to 20000 (rope scaling shows at long distances), bfloat16
compute vs float32, and a model loaded onto 8 CPU devices vs unsharded (mesh shape: data, fsdp,
expert, tensor; the MoE families' experts split over the expert axis).
"""

import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from hf_models import FAMILIES, hf_logits, jax_logits, make_hf_model  # noqa: E402

from jax_sft.models import from_pretrained, sharding  # noqa: E402


def rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


def main() -> None:
    root = Path(tempfile.mkdtemp())
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 256, (2, 16)).astype(np.int32)
    pos = np.sort(rng.choice(20000, (2, 16), replace=False), axis=1).astype(np.int32)
    print(
        f"{'family':9} {'f32 vs HF':>10} {'f32 vs HF, pos<=20000':>22} {'bf16 vs f32':>12} {'sharded vs unsharded':>21}"
    )
    for family in FAMILIES:
        hf = make_hf_model(family, root / family)
        f32 = from_pretrained(root / family, dtype=jnp.float32)
        # A mesh whose tensor axis divides the kv heads (the tiny Mistral has one); MoE models
        # split their 4 experts over an expert axis of 4.
        if f32.config.num_experts:
            mesh = sharding.make_mesh(1, 2, 1, expert=4)
        elif f32.config.num_kv_heads % 2 == 0:
            mesh = sharding.make_mesh(2, 2, 2)
        else:
            mesh = sharding.make_mesh(2, 4, 1)
        sharded = from_pretrained(root / family, dtype=jnp.float32, mesh=mesh)
        errors = (
            rel(jax_logits(f32, ids), hf_logits(hf, ids)),
            rel(jax_logits(f32, ids, pos), hf_logits(hf, ids, pos)),
            rel(jax_logits(from_pretrained(root / family, dtype=jnp.bfloat16), ids), jax_logits(f32, ids)),
            rel(jax_logits(sharded, ids), jax_logits(f32, ids)),
        )
        print(
            f"{family:9} {errors[0]:10.2e} {errors[1]:22.2e} {errors[2]:12.2e} {errors[3]:14.2e} "
            f"mesh{tuple(mesh.shape.values())}"
        )


if __name__ == "__main__":
    main()
