"""Tokens/s of a tiny mixture-of-experts training step on CPU: jax_sft's dropless grouped matmuls
(`jax.lax.ragged_dot` over the tokens sorted by expert) against a dense loop that runs every
expert on every token and weights the outputs (what a naive implementation costs).

    python bench/moe_step.py [--experts 8] [--top_k 2] [--tokens 2048] [--steps 5]

A Qwen3-MoE-shaped model (2 layers, hidden 256, expert mlp 256), float32, one jitted
value-and-grad step of the mean squared logits plus the router aux loss; the median of `steps`
timed runs after one warm-up.
"""

import argparse
import os
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from jax_sft.models import (  # noqa: E402
    CausalLM,
    ModelConfig,
    decoder,  # noqa: E402
)


def model(experts: int, top_k: int) -> CausalLM:
    cfg = ModelConfig.from_hf_dict(
        {
            "architectures": ["Qwen3MoeForCausalLM"],
            "vocab_size": 1024,
            "hidden_size": 256,
            "intermediate_size": 512,
            "moe_intermediate_size": 256,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "head_dim": 64,
            "num_experts": experts,
            "num_experts_per_tok": top_k,
            "norm_topk_prob": True,
        }
    )
    return CausalLM(cfg, dtype=jnp.float32, param_dtype=jnp.float32, rngs=nnx.Rngs(0))


def tokens_per_second(m: CausalLM, ids: jax.Array, steps: int) -> float:
    graphdef, state = nnx.split(m)

    def loss(state):
        hidden, aux = nnx.merge(graphdef, state).hidden_states_and_aux(ids)
        return jnp.mean(hidden.astype(jnp.float32) ** 2) + aux

    step = jax.jit(jax.value_and_grad(loss))
    jax.block_until_ready(step(state))
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        jax.block_until_ready(step(state))
        times.append(time.perf_counter() - t0)
    return ids.size / float(np.median(times))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--top_k", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--steps", type=int, default=5)
    args = ap.parse_args()
    ids = jnp.asarray(np.random.default_rng(0).integers(0, 1024, (args.tokens // 512, 512)), jnp.int32)
    m = model(args.experts, args.top_k)
    grouped = tokens_per_second(m, ids, args.steps)
    decoder.grouped_experts, original = decoder.dense_experts, decoder.grouped_experts
    try:
        dense = tokens_per_second(m, ids, args.steps)
    finally:
        decoder.grouped_experts = original
    print(f"MoE step, {args.experts} experts top-{args.top_k}, {args.tokens} tokens, {jax.devices()[0].platform}:")
    print(f"  ragged grouped matmuls  {grouped:10,.0f} tokens/s")
    print(f"  dense all-experts loop  {dense:10,.0f} tokens/s   (grouped / dense = {grouped / dense:.2f}x)")


if __name__ == "__main__":
    main()
