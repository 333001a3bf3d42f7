"""Export a training checkpoint to a Hugging Face model folder.

    python -m jax_sft.export --checkpoint results/sft/step_60 --out hf_model [--dtype bfloat16]

Writes weights (sharded safetensors with index), config.json, generation_config.json and the
tokenizer with its chat template, atomically; `transformers.AutoModelForCausalLM.from_pretrained`
loads the result. --out must be a new or empty folder or an earlier export (marked by
`.jax_sft_export`); `--overwrite` allows any other folder except the checkpoint folder, the
working or home directory, a parent of them, or `/`. Only complete checkpoints are exported.
Errors print as `error: ...` with exit code 2. The checkpoint carries everything needed (the model's HF config and the
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

from jax_sft.checkpoint import Checkpointer, IncompleteCheckpoint, incomplete_reason
from jax_sft.errors import exit_on_input_error
from jax_sft.models import CausalLM, ModelConfig, save_pretrained
from jax_sft.models.hf_io import check_export_target

MODEL_CONFIG = "model/config.json"
GENERATION_CONFIG = "model/generation_config.json"


def model_files(config: ModelConfig) -> dict[str, bytes]:
    """The extra files a checkpoint needs for export (stored beside config.yaml and tokenizer)."""
    files = {MODEL_CONFIG: json.dumps(config.to_hf_dict(), indent=2).encode()}
    if config.generation_config_json is not None:
        files[GENERATION_CONFIG] = config.generation_config_json.encode()
    return files


def export_checkpoint(step_dir: str | Path, out_dir: str | Path, *, dtype: str | None = None,
                      overwrite: bool = False) -> Path:
    """Restores step_dir's parameters on this host and writes them as an HF folder at out_dir.

    overwrite: replace a non-empty out_dir that is not an earlier export (see module docstring).
    """
    from ml_collections import ConfigDict
    from transformers import AutoTokenizer

    step_dir = Path(step_dir).absolute()
    extra = step_dir / "extra"
    if not step_dir.name.startswith("step_") or not step_dir.name[5:].isdigit() or not step_dir.is_dir():
        raise IncompleteCheckpoint(
            f"{step_dir}: not a jax_sft checkpoint; pass a step_N folder under checkpointing.checkpoint_dir"
        )
    reason = incomplete_reason(step_dir)
    if reason is not None:
        raise IncompleteCheckpoint(
            f"{step_dir}: incomplete checkpoint ({reason}); export a complete step_N of "
            f"{step_dir.parent} instead"
        )
    protected = (step_dir.parent,)
    check_export_target(out_dir, overwrite=overwrite, protected=protected)  # before the slow restore
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
    ckpt = Checkpointer(ckpt_cfg, enable_async=False, read_only=True)
    try:
        params, _, _, _ = ckpt.restore(step, abstract_params=target, abstract_opt_state=None, with_data=False)
    finally:
        ckpt.close()
    model = nnx.merge(graphdef, params, rest)
    tokenizer = None
    if (extra / "tokenizer").is_dir():
        tokenizer = AutoTokenizer.from_pretrained(str(extra / "tokenizer"))
    save_pretrained(model, out_dir, tokenizer=tokenizer, dtype=dtype, overwrite=overwrite, protected=protected)
    return Path(out_dir)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="a step_N folder of a jax_sft run")
    parser.add_argument("--out", required=True, help="the Hugging Face folder to write")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                        help="dtype of the written tensors (default: the source model's)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace a non-empty --out that no earlier export wrote (never the checkpoint "
                             "folder, the working or home directory, their parents or /)")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    out = exit_on_input_error(
        lambda: export_checkpoint(args.checkpoint, args.out, dtype=args.dtype, overwrite=args.overwrite)
    )
    print(f"exported {args.checkpoint} -> {out}")


if __name__ == "__main__":
    main()
