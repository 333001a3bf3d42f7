"""The fixed cost per micro-batch: the weights cast once per step against once per micro-step,
and the inputs moved in one transfer per micro-batch against one per array.

    python bench/step_overhead.py [--micro-batches 16] [--tokens 64] [--steps 5] [--tiny]

A packed step of many small micro-batches (one row of --tokens tokens each) on a model whose
weights are large next to that work (Llama-shaped: vocab 32000, hidden 512, 4 layers, ~45M
parameters; --tiny: vocab 320, hidden 64, 2 layers, where the host's share shows), so that what
every micro-batch pays regardless of its tokens shows. Every variant runs jax_sft's real step
functions (`jax_sft.step.make_step_fns`) with bf16 compute and fp32 master weights, and moves
each micro-batch's rows to the device inside the timed step, as the trainer does:

  cast every micro-step, 5 transfers   before issue 12: each micro-step casts the fp32 weights;
                                       five arrays and a step counter moved per micro-batch
  cast once, 5 transfers               before issue 25: the bf16 copy made once per step
  cast once, 1 transfer                now: the trainer's `to_global` (one stacked int32
                                       [5, rows, seq] array) and no counter without LoRA dropout

Prints the median step time of each, the time per micro-batch, and the loss of each (identical:
the values are the same). On a GPU the cast is a pass over all weights per micro-batch
(memory-bound) and transfers are asynchronous; on the CPU both compete with slow matmuls.
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


TINY = dict(SHAPE, vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4)
TINY["num_key_value_heads"] = 2
VARIANTS = {  # name: (cast once, one transfer)
    "cast every micro-step, 5 transfers": (False, False),
    "cast once, 5 transfers": (True, False),
    "cast once, 1 transfer (now)": (True, True),
}


def measure(cast_once: bool, stacked: bool, args) -> tuple[float, float]:
    """(median step seconds, last loss)."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from jax_sft.models import CausalLM, ModelConfig, sharding
    from jax_sft.optim import make_optimizer
    from jax_sft.step import make_step_fns, opt_state_shardings, split_model
    from jax_sft.trainer.setup import to_global

    cfg = ModelConfig.from_hf_dict(TINY if args.tiny else SHAPE)
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
    batch_sharding = sharding.batch_sharding(mesh)

    def put(mb):
        return {k: jax.make_array_from_process_local_data(batch_sharding, v) for k, v in mb.items()}

    times, loss = [], None
    for step in range(args.warmup + args.steps):
        micro = packed_micro_batches(args.micro_batches, args.tokens, cfg.vocab_size, step)
        t0 = time.perf_counter()
        compute = fns.cast(params, frozen)
        acc = fns.init_accumulator(params, fp8)
        for i, mb in enumerate(micro):
            if stacked:
                acc = fns.micro_step(compute, fp8, acc, to_global(mb, batch_sharding), fns.counter(step, i))
            else:
                acc = fns.micro_step(compute, fp8, acc, put(mb), jnp.asarray([step, i], jnp.int32))
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
    p.add_argument("--tiny", action="store_true", help="a 0.1M-parameter model: the host's share shows")
    args = p.parse_args()
    import jax

    rows = {name: measure(*variant, args) for name, variant in VARIANTS.items()}
    shape = "tiny (0.1M parameters)" if args.tiny else "Llama-shaped 45M parameters"
    print(
        f"device: {jax.devices()[0].device_kind}; {args.micro_batches} micro-batches x {args.tokens} tokens per step; "
        f"{shape}, bf16 compute, fp32 master weights"
    )
    print(f"{'variant':<36} {'step s':>8} {'per micro-batch ms':>19} {'loss':>10}")
    for name, (t, loss) in rows.items():
        print(f"{name:<36} {t:8.4f} {1000 * t / args.micro_batches:19.3f} {loss:10.5f}")
    first, *_, now = (t for t, _ in rows.values())
    before = rows["cast once, 5 transfers"][0]
    print(f"step time: {now / before:.3f}x of one transfer per array, {now / first:.3f}x of casting every micro-step")


if __name__ == "__main__":
    main()
