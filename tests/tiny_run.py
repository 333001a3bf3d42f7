"""Assets for the trainer's tests: a tiny Llama with a BPE tokenizer and arithmetic chat data."""

from __future__ import annotations

import json
from pathlib import Path

import jax.numpy as jnp
from flax import nnx

from jax_sft.models import CausalLM, ModelConfig, save_pretrained
from jax_sft.quickstart import make_dataset, make_tokenizer


# What each family adds to the tiny Llama's config.json (make_tiny_run_assets(family=...)).
FAMILY_CONFIGS = {
    "llama": {},
    "gemma2": {"architectures": ["Gemma2ForCausalLM"], "model_type": "gemma2", "query_pre_attn_scalar": 16,
               "sliding_window": 24, "final_logit_softcapping": 30.0, "attn_logit_softcapping": 50.0,
               "hidden_activation": "gelu_pytorch_tanh"},
    "gemma3": {"architectures": ["Gemma3ForCausalLM"], "model_type": "gemma3_text", "query_pre_attn_scalar": 16,
               "sliding_window": 24, "hidden_activation": "gelu_pytorch_tanh",
               "layer_types": ["sliding_attention", "full_attention"], "rope_theta": None,
               "rope_parameters": {"full_attention": {"rope_type": "default", "rope_theta": 1000000.0},
                                   "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}}},
    "qwen3_moe": {"architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe", "num_experts": 4,
                  "num_experts_per_tok": 2, "moe_intermediate_size": 64, "norm_topk_prob": True,
                  "decoder_sparse_step": 1, "mlp_only_layers": [], "output_router_logits": True,
                  "router_aux_loss_coef": 0.01},
    "mixtral": {"architectures": ["MixtralForCausalLM"], "model_type": "mixtral", "num_local_experts": 4,
                "num_experts_per_tok": 2, "output_router_logits": True, "router_aux_loss_coef": 0.02},
}


def make_tiny_run_assets(out: Path, family: str = "llama") -> Path:
    """out/model: a 2-layer model of `family` (Llama: tied embeddings, GQA; see FAMILY_CONFIGS)
    with its tokenizer; out/data/{train,val}.jsonl: 512 / 64 conversations (the quickstart's
    generator)."""
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
    hf = {k: v for k, v in {**hf, **FAMILY_CONFIGS[family]}.items() if v is not None}
    model = CausalLM(ModelConfig.from_hf_dict(hf), dtype=jnp.float32, param_dtype=jnp.float32, rngs=nnx.Rngs(0))
    save_pretrained(model, out / "model", tokenizer=tokenizer)
    return out


def write_model_config(folder: Path) -> Path:
    """folder/config.json of a tiny 2-layer Llama (vocab 320, hidden 64) and nothing else: enough
    for `--dry_run`, which reads a local model's config but no weights."""
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 320,
        "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 256}))
    return folder
