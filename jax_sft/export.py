"""Export a training checkpoint to a Hugging Face model folder.

    python -m jax_sft.export --checkpoint results/sft/step_60 --out hf_model [--dtype bfloat16]

Writes weights (sharded safetensors with index), config.json, generation_config.json and the
tokenizer with its chat template, atomically; `transformers.AutoModelForCausalLM.from_pretrained`
loads the result. The checkpoint carries everything needed (the model's HF config and the
tokenizer), so the original model folder need not be reachable.
"""

from __future__ import annotations

import argparse
import json
import sys
import dataclasses
from pathlib import Path

import jax
import jax.numpy as jnp
from flax import nnx

from jax_sft.checkpoint import Checkpointer
from jax_sft.models import CausalLM, ModelConfig, save_pretrained

MODEL_CONFIG = "model/config.json"
GENERATION_CONFIG = "model/generation_config.json"


def model_files(config: ModelConfig) -> dict[str, bytes]:
    """The extra files a checkpoint needs for export (stored beside config.yaml and tokenizer)."""
    files = {MODEL_CONFIG: json.dumps(config.to_hf_dict(), indent=2).encode()}
    if config.generation_config_json is not None:
        files[GENERATION_CONFIG] = config.generation_config_json.encode()
    return files


def export_checkpoint(step_dir: str | Path, out_dir: str | Path, *, dtype: str | None = None) -> Path:
    """Restores step_dir's parameters on this host and writes them as an HF folder at out_dir."""
    from ml_collections import ConfigDict
    from transformers import AutoTokenizer

    step_dir = Path(step_dir).absolute()
    extra = step_dir / "extra"
    if not (step_dir / "params").is_dir() or not (extra / MODEL_CONFIG).is_file():
        raise FileNotFoundError(
            f"{step_dir}: not a jax_sft checkpoint (expected params/ and extra/{MODEL_CONFIG}); "
            "pass a step_N folder under checkpointing.checkpoint_dir"
        )
    step = int(step_dir.name.rsplit("_", 1)[-1])
    config = ModelConfig.from_hf_dict(json.loads((extra / MODEL_CONFIG).read_text()), source=str(extra / MODEL_CONFIG))
    if (extra / GENERATION_CONFIG).is_file():
        config = dataclasses.replace(config, generation_config_json=(extra / GENERATION_CONFIG).read_text())
    abstract = nnx.eval_shape(lambda: CausalLM(config, dtype=jnp.float32, param_dtype=jnp.float32, rngs=nnx.Rngs(0)))
    graphdef, abs_params, rest = nnx.split(abstract, nnx.Param, ...)
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), abs_params)
    ckpt_cfg = ConfigDict(
        dict(checkpoint_dir=str(step_dir.parent), save_optimizer=False, metric_name=None,
             higher_is_better=False, keep_top_k=None)
    )
    ckpt = Checkpointer(ckpt_cfg, enable_async=False)
    try:
        params, _, _, _ = ckpt.restore(step, abstract_params=target, abstract_opt_state=None, with_data=False)
    finally:
        ckpt.close()
    model = nnx.merge(graphdef, params, rest)
    tokenizer = None
    if (extra / "tokenizer").is_dir():
        tokenizer = AutoTokenizer.from_pretrained(str(extra / "tokenizer"))
    save_pretrained(model, out_dir, tokenizer=tokenizer, dtype=dtype)
    return Path(out_dir)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="a step_N folder of a jax_sft run")
    parser.add_argument("--out", required=True, help="the Hugging Face folder to write")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                        help="dtype of the written tensors (default: the source model's)")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    out = export_checkpoint(args.checkpoint, args.out, dtype=args.dtype)
    print(f"exported {args.checkpoint} -> {out}")


if __name__ == "__main__":
    main()
