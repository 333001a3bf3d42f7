"""Attention across the context axis: "ring" against "all_gather" (jax_sft/models/context.py),
forward + backward of one attention layer on rows split over every device, with the unsplit
"xla" kernel on one device for reference.

    XLA_FLAGS=--xla_force_host_platform_device_count=8 JAX_PLATFORMS=cpu python bench/context_attention.py
    python bench/context_attention.py --seq 32768 --heads 32 --kv-heads 8 --head-dim 64   # GPUs

Prints one line per (q heads, kv heads, strategy): median seconds of a jitted value-and-grad over
--steps runs after one warm-up, and XLA's temporary memory per device. On the CPU the "devices"
share the host's cores and memory, so communication is a copy: the figures compare the work and
memory of the two schedules, not a network; `choose_strategy`'s "auto" picks all_gather when the
gathered K/V are no larger than the device's queries (kv_heads x devices <= q_heads).
"""

from __future__ import annotations

import argparse
import statistics
import time


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seq", type=int, default=4096)
    p.add_argument("--heads", type=int, nargs="+", default=[8, 8])
    p.add_argument("--kv-heads", type=int, nargs="+", default=[8, 1])
    p.add_argument("--head-dim", type=int, default=32)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--dtype", default="float32")
    args = p.parse_args(argv)

    import jax
    import jax.numpy as jnp
    import numpy as np

    from jax_sft.models import context as context_lib
    from jax_sft.models import sharding
    from jax_sft.models.attention import attention

    n = jax.device_count()
    mesh = sharding.make_mesh(1, 1, 1, context=n)
    dtype = jnp.dtype(args.dtype)
    print(f"devices: {n} x {jax.devices()[0].device_kind}; one row of {args.seq} tokens, head_dim {args.head_dim}")

    def timed(fn, *xs):
        compiled = jax.jit(jax.value_and_grad(fn, argnums=(0, 1, 2))).lower(*xs).compile()
        jax.block_until_ready(compiled(*xs))
        times = []
        for _ in range(args.steps):
            t0 = time.perf_counter()
            jax.block_until_ready(compiled(*xs))
            times.append(time.perf_counter() - t0)
        return statistics.median(times), compiled.memory_analysis().temp_size_in_bytes / 2**20

    for heads, kv in zip(args.heads, args.kv_heads):
        rng = np.random.default_rng(0)
        q = jnp.asarray(rng.normal(size=(1, args.seq, heads, args.head_dim)), dtype)
        k, v = (jnp.asarray(rng.normal(size=(1, args.seq, kv, args.head_dim)), dtype) for _ in range(2))
        auto = context_lib.choose_strategy("auto", heads, kv, n)
        rows = []
        for strategy in ("ring", "all_gather"):
            cp = context_lib.ContextParallel(mesh, strategy)
            split = lambda q, k, v, cp=cp: context_lib.attention(q, k, v, None, cp).astype(jnp.float32).sum()  # noqa: E731
            zz = [context_lib.to_zigzag(x, n) for x in (q, k, v)]
            rows.append((strategy, *timed(split, *zz)))
        one = jax.devices()[:1]
        whole = lambda q, k, v: attention(q, k, v, implementation="auto").astype(jnp.float32).sum()  # noqa: E731
        rows.append((f"unsplit ({one[0].platform}, 1 device)", *timed(whole, *jax.device_put((q, k, v), one[0]))))
        for name, seconds, mib in rows:
            mark = "  <- auto" if name == auto else ""
            print(
                f"q heads {heads:>3}, kv heads {kv:>3}: {name:<26} {seconds:8.3f} s  temp {mib:9.1f} MiB/device{mark}"
            )


if __name__ == "__main__":
    main()
