"""The fixed cost per micro-batch: casting the weights once per step against once per micro-step.

    python bench/step_overhead.py [--micro-batches 16] [--tokens 64] [--steps 5]

A packed step of many small micro-batches (one row of --tokens tokens each) on a model whose
weights are large next to that work (Llama-shaped: vocab 32000, hidden 512, 4 layers, ~45M
parameters), so that what every micro-batch pays regardless of its tokens shows. Both variants
run jax_sft's real step functions (`jax_sft.step.make_step_fns`) with bf16 compute and fp32
master weights: `cast_once=True` (the trainer's) makes the bf16 copy of the weights once per
step; `cast_once=False` lets every micro-step cast the fp32 weights itself, as before. Prints the
median step time of each, the time per micro-batch, and the loss of both (identical: the values
are the same). On a GPU the cast is a pass over all weights per micro-batch (memory-bound); on the
CPU it competes with slow matmuls, so the figures here understate the saving.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

SHAPE = dict(
    architectures=["LlamaForCausalLM"],
    vocab_size=32000,
    hidden_size=512,
    intermediate_size=1376,
    num_hidden_layers=4,
    num_attention_heads=8,
    num_key_value_heads=4,
    tie_word_embeddings=False,
    max_position_embeddings=4096,
    rope_theta=500000.0,
    rms_norm_eps=1e-5,
)


def packed_micro_batches(n: int, tokens: int, vocab: int, seed: int) -> list[dict[str, np.ndarray]]:
    """n micro-batches of one packed row: two sequences each."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        cut = int(rng.integers(tokens // 4, 3 * tokens // 4))
        seg = np.where(np.arange(tokens) < cut, 1, 2).astype(np.int32)[None]
        pos = np.where(seg == 1, np.arange(tokens), np.arange(tokens) - cut).astype(np.int32)
        ids = rng.integers(0, vocab, (1, tokens)).astype(np.int32)
        out.append(
            dict(
                input_ids=ids, targets=np.roll(ids, -1, 1), loss_mask=np.ones_like(ids), segment_ids=seg, positions=pos
            )
        )
    return out


def measure(cast_once: bool, args) -> tuple[float, float]:
    """(median step seconds, last loss)."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from jax_sft.models import CausalLM, ModelConfig, sharding
    from jax_sft.optim import make_optimizer
    from jax_sft.step import make_step_fns, opt_state_shardings, split_model

    cfg = ModelConfig.from_hf_dict(SHAPE)
    mesh = sharding.make_mesh(1, 1, 1, devices=jax.devices()[:1])
    model = CausalLM(cfg, dtype=jnp.bfloat16, param_dtype=jnp.float32, rngs=nnx.Rngs(0))
    graphdef, params, fp8, frozen, rest = split_model(model, lora=False)
    shardings = sharding.param_shardings(params, mesh)
    params = jax.device_put(params, shardings)
    tx, schedule = make_optimizer({"name": "torch.optim.AdamW", "kwargs": {"lr": 1e-5}}, None, 1.0)
    opt_shardings = opt_state_shardings(tx, params, shardings, mesh)
    opt_state = jax.jit(tx.init, out_shardings=opt_shardings)(params)
    fns = make_step_fns(
        graphdef,
        rest,
        tx,
        schedule,
        mesh=mesh,
        param_shardings=shardings,
        opt_shardings=opt_shardings,
        chunk_size=args.tokens,
        packed=True,
        compute_dtype=jnp.bfloat16,
        cast_once=cast_once,
    )
    put = lambda mb: {k: jax.device_put(v, sharding.batch_sharding(mesh)) for k, v in mb.items()}  # noqa: E731
    times, loss = [], None
    for step in range(args.warmup + args.steps):
        micro = [put(mb) for mb in packed_micro_batches(args.micro_batches, args.tokens, cfg.vocab_size, step)]
        jax.block_until_ready(micro)
        t0 = time.perf_counter()
        compute = fns.cast(params, frozen)
        acc = fns.init_accumulator(params, fp8)
        for i, mb in enumerate(micro):
            acc = fns.micro_step(compute, fp8, acc, mb, jnp.asarray([step, i], jnp.int32))
        del compute
        params, opt_state, fp8, metrics = fns.apply(params, opt_state, fp8, acc, jnp.asarray(step, jnp.int32))
        loss = float(metrics["train/loss"])
        if step >= args.warmup:
            times.append(time.perf_counter() - t0)
    return statistics.median(times), loss


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--micro-batches", type=int, default=16)
    p.add_argument("--tokens", type=int, default=64, help="tokens per micro-batch (one packed row)")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    args = p.parse_args()
    import jax

    rows = {}
    for cast_once in (False, True):
        rows[cast_once] = measure(cast_once, args)
    print(
        f"device: {jax.devices()[0].device_kind}; {args.micro_batches} micro-batches x {args.tokens} tokens per step; "
        "Llama-shaped 45M parameters, bf16 compute, fp32 master weights"
    )
    print(f"{'weights cast':<28} {'step s':>8} {'per micro-batch ms':>19} {'loss':>10}")
    for cast_once, name in ((False, "every micro-step (before)"), (True, "once per step (now)")):
        t, loss = rows[cast_once]
        print(f"{name:<28} {t:8.3f} {1000 * t / args.micro_batches:19.1f} {loss:10.5f}")
    before, now = rows[False][0], rows[True][0]
    print(f"step time: {now / before:.3f}x of before ({100 * (1 - now / before):.1f}% less)")


if __name__ == "__main__":
    main()
