"""Assets for the trainer's tests: a tiny Llama with a BPE tokenizer and arithmetic chat data."""

from __future__ import annotations

import json
from pathlib import Path

import jax.numpy as jnp
from flax import nnx

from jax_sft.models import CausalLM, ModelConfig, save_pretrained
from jax_sft.quickstart import make_dataset, make_tokenizer


def make_tiny_run_assets(out: Path) -> Path:
    """out/model: a 2-layer Llama (tied embeddings, GQA) with its tokenizer; out/data/{train,val}.jsonl:
    512 / 64 conversations (the quickstart's generator)."""
    (out / "data").mkdir(parents=True)
    make_dataset(out / "data", train=512, val=64)
    rows = [json.loads(line) for line in open(out / "data" / "train.jsonl")]
    tokenizer = make_tokenizer([m["content"] for r in rows for m in r["messages"]], vocab_size=320)
    hf = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": len(tokenizer),
        "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
        "max_position_embeddings": 256, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
        "tie_word_embeddings": True, "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id, "torch_dtype": "float32",
    }
    model = CausalLM(ModelConfig.from_hf_dict(hf), dtype=jnp.float32, param_dtype=jnp.float32, rngs=nnx.Rngs(0))
    save_pretrained(model, out / "model", tokenizer=tokenizer)
    return out
