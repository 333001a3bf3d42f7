"""Training-state memory per GPU, full fine-tuning against LoRA, from the model's shape alone.

    python bench/lora_memory.py

Llama-3.1-8B's config (vocab 128256, hidden 4096, 32 layers, 32 heads, 8 kv heads, intermediate
14336, untied lm_head), NeMo RL's LoRA recipe (sft-llama3.1-8b-1n8g-fsdp2tp1-lora: rank 128,
alpha 128, every linear layer incl. lm_head), bf16 compute. Full fine-tuning: fp32 master
weights, fp32 gradient accumulator, AdamW moments in fp32, a bf16 copy of the weights per step.
LoRA: a bf16 frozen base (policy.jax_cfg.param_dtype=bfloat16), fp32 adapters with their
gradients and AdamW moments. FSDP shards everything over the GPUs. Activations (which depend on
batch, sequence length and remat) are not included: `jax_sft.models.counts.state_bytes_per_device`.
"""

from __future__ import annotations

from jax_sft.models import ModelConfig
from jax_sft.models.counts import lora_param_count, state_bytes_per_device
from jax_sft.models.options import LoraConfig

LLAMA_31_8B = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "vocab_size": 128256,
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "max_position_embeddings": 131072,
    "rms_norm_eps": 1e-5,
    "rope_theta": 500000.0,
    "tie_word_embeddings": False,
}


def main() -> None:
    m = ModelConfig.from_hf_dict(LLAMA_31_8B)
    lora = LoraConfig(dim=128, alpha=128, match_all_linear=True)
    trainable, total = lora_param_count(m, lora)
    print(
        f"Llama-3.1-8B: {m.param_count():,} parameters; LoRA rank 128 on every linear layer: "
        f"{trainable:,} trainable ({100 * trainable / total:.2f}% of {total:,})"
    )
    print(f"{'setup':<34} {'GPUs':>4} {'weights':>8} {'grads':>8} {'AdamW':>8} {'bf16 copy':>9} {'total GiB':>9}")
    for name, adapters, param_dtype in (
        ("full fine-tune (fp32 master)", None, "float32"),
        ("LoRA r128, bf16 frozen base", lora, "bfloat16"),
        ("LoRA r128, fp32 frozen base", lora, "float32"),
    ):
        for gpus in (1, 8):
            parts = state_bytes_per_device(m, adapters, param_dtype=param_dtype, precision="bfloat16", devices=gpus)
            g = {k: v / 2**30 for k, v in parts.items()}
            print(
                f"{name:<34} {gpus:>4} {g['weights']:8.2f} {g['gradients']:8.2f} {g['optimizer']:8.2f} "
                f"{g['compute copy']:9.2f} {sum(g.values()):9.2f}"
            )


if __name__ == "__main__":
    main()
