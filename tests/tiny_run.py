"""Assets for the trainer's tests: a tiny Llama with a BPE tokenizer and arithmetic chat data."""

from __future__ import annotations

import json
from pathlib import Path

import jax.numpy as jnp
from flax import nnx
from hf_models import FAMILIES

from jax_sft.models import CausalLM, ModelConfig, save_pretrained
from jax_sft.quickstart import make_dataset, make_tokenizer


def family_config(family: str, **changes) -> dict:
    """What `family` (a row of hf_models.FAMILIES) adds to the tiny Llama's config.json: its
    architecture, model_type and the row's settings (with `changes`)."""
    if family == "llama":
        return dict(changes)
    config_cls, model_cls, extra = FAMILIES[family]
    out = {"architectures": [model_cls.__name__], "model_type": config_cls.model_type, **extra, **changes}
    if "rope_parameters" in extra:
        out["rope_theta"] = None  # the row's rope_parameters say it all
    return out


def make_tiny_run_assets(out: Path, family: str = "llama", rows: tuple[int, int] = (512, 64), **changes) -> Path:
    """out/model: a 2-layer model of `family` (Llama: tied embeddings, GQA; others: `family_config`,
    with `changes` to its config) with its tokenizer; out/data/{train,val}.jsonl: `rows` (512 / 64)
    conversations (the quickstart's generator)."""
    (out / "data").mkdir(parents=True)
    make_dataset(out / "data", train=rows[0], val=rows[1])
    rows = [json.loads(line) for line in open(out / "data" / "train.jsonl")]
    tokenizer = make_tokenizer([m["content"] for r in rows for m in r["messages"]], vocab_size=320)
    hf = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": len(tokenizer),
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "max_position_embeddings": 256,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "tie_word_embeddings": True,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "torch_dtype": "float32",
    }
    hf = {k: v for k, v in {**hf, **family_config(family, **changes)}.items() if v is not None}
    model = CausalLM(ModelConfig.from_hf_dict(hf), dtype=jnp.float32, param_dtype=jnp.float32, rngs=nnx.Rngs(0))
    save_pretrained(model, out / "model", tokenizer=tokenizer)
    return out


def write_model_config(folder: Path) -> Path:
    """folder/config.json of a tiny 2-layer Llama (vocab 320, hidden 64) and nothing else: enough
    for `--dry_run`, which reads a local model's config but no weights."""
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(
        json.dumps(
            {
                "architectures": ["LlamaForCausalLM"],
                "model_type": "llama",
                "vocab_size": 320,
                "hidden_size": 64,
                "intermediate_size": 128,
                "num_hidden_layers": 2,
                "num_attention_heads": 4,
                "num_key_value_heads": 2,
                "max_position_embeddings": 256,
            }
        )
    )
    return folder
