"""Export a training checkpoint to a Hugging Face model folder, or its LoRA adapters to a PEFT
adapter folder.

    python -m jax_sft.export --checkpoint results/sft/step_60 --out hf_model [--dtype bfloat16]
    python -m jax_sft.export --checkpoint results/lora/step_60 [--out hf_model] [--peft_out adapter] [--base PATH]

--out writes weights (sharded safetensors with index), config.json, generation_config.json and the
tokenizer with its chat template, atomically; `transformers.AutoModelForCausalLM.from_pretrained`
loads the result. The checkpoint carries everything needed (the model's HF config and the
tokenizer), so the original model folder need not be reachable, except for a LoRA checkpoint.

A LoRA checkpoint (its extra/lora.json names the frozen base: `models.lora.base_reference`) holds
only the adapters. --out loads the base (the recorded policy.model_name with its
hf_config_overrides, or --base), refuses a base whose config differs from the one trained on, and
writes the merged model (W + alpha/dim * A @ B). --peft_out writes the adapters as a PEFT adapter
folder (`models.peft_io`; no base weights are read), which
`peft.PeftModel.from_pretrained(base_model, DIR)` loads; give one or both. A full fine-tune has no
adapters, so --peft_out is an error for it.

Each output must be a new or empty folder or an earlier export (marked by `.jax_sft_export`);
`--overwrite` allows any other folder. Never, not even with `--overwrite` or a marker: a training
checkpoint or a folder inside one, the checkpoint being read and its checkpoint_dir, the base model
the checkpoint names (a LoRA checkpoint's recorded base or `--base`; a full fine-tune's
policy.model_name, when local), the working or home directory, `/`, or a folder holding any of
them. Only complete checkpoints whose files are all there are exported; checkpoints saved with or
without policy.jax_cfg.scan_layers both are (the layout is read from the checkpoint). Errors print
as `error: ...` with exit code 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path
from typing import Any

import jax
import yaml
from flax import nnx

from jax_sft.checkpoint import (
    CONFIG_FILE,
    LORA_FILE,
    TOKENIZER_DIR,
    complete_step_dir,
    extra_path,
    is_checkpoint_folder,
    lora_reference,
    restore_params,
    saved_model_config,
    saved_scan_layers,
)
from jax_sft.data.chat import open_tokenizer
from jax_sft.errors import InputError, MissingFileError, UsageError, exit_on_input_error
from jax_sft.models import CausalLM, ModelConfig, ModelOptions, from_pretrained, save_pretrained
from jax_sft.models.hf_read import local_model_dir
from jax_sft.models.hf_write import check_export_target
from jax_sft.models.lora import LoRAParam
from jax_sft.models.options import LoraConfig, base_problem
from jax_sft.models.peft_io import save_peft_adapter


class BaseMismatch(InputError, ValueError):
    """A LoRA checkpoint's adapters would be merged into a base other than the one trained on."""


_F32 = ModelOptions(dtype="float32", param_dtype="float32")


def _on_first_device(abstract: Any) -> Any:
    """The abstract state restored onto this host's first device."""
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), abstract)


def saved_config(step_dir: Path) -> ModelConfig:
    """The model config stored in the checkpoint's extra files."""
    hf_config, source, generation = saved_model_config(step_dir)
    config = ModelConfig.from_hf_dict(hf_config, source=source)
    return dataclasses.replace(config, generation_config_json=generation) if generation is not None else config


def full_model(step_dir: Path) -> CausalLM:
    """A full fine-tune's model, every parameter restored from the checkpoint."""
    options = dataclasses.replace(_F32, scan_layers=saved_scan_layers(step_dir))
    config = saved_config(step_dir)
    abstract = nnx.eval_shape(lambda: CausalLM(config, options, rngs=nnx.Rngs(0)))
    graphdef, abs_params, rest = nnx.split(abstract, nnx.Param, ...)
    return nnx.merge(graphdef, restore_params(step_dir, _on_first_device(abs_params), config.vocab_size), rest)


def _lora_graph(base: CausalLM, lora: LoraConfig) -> tuple[Any, Any]:
    """(graphdef, abstract adapters) of `base` with `lora` adapters (nothing is computed)."""
    options = dataclasses.replace(base.options, lora=lora)
    abstract = nnx.eval_shape(lambda: CausalLM(base.config, options, rngs=nnx.Rngs(0)))
    graphdef, abs_adapters, _ = nnx.split(abstract, LoRAParam, ...)
    return graphdef, abs_adapters


def abstract_adapters(base: CausalLM, lora: LoraConfig) -> Any:
    """The nnx.State (abstract values) that `lora`'s adapters on `base` have."""
    return _lora_graph(base, lora)[1]


def attach_lora(base: CausalLM, lora: LoraConfig, adapters: Any) -> CausalLM:
    """`base` with `lora` adapters holding `adapters` (an nnx.State as `nnx.state(model, LoRAParam)`
    has it); the base's parameters are shared, not copied. Unlike from_pretrained(lora=...), no
    initial values are drawn (that compiles for seconds)."""
    return nnx.merge(_lora_graph(base, lora)[0], adapters, nnx.state(base))


def lora_model(step_dir: Path, reference: dict[str, Any], base: str | None) -> CausalLM:
    """The base (`base`, else the recorded model_name, with the recorded hf_config_overrides) with
    the checkpoint's adapters; BaseMismatch when its config is not the one trained on."""
    lora = LoraConfig.from_dict(reference["lora"])
    name = base or reference["base"]["model_name"]
    model = from_pretrained(
        name,
        dataclasses.replace(_F32, scan_layers=saved_scan_layers(step_dir)),
        hf_config_overrides=reference["base"]["hf_config_overrides"] or None,
    )
    problem = base_problem(reference, name, model.config.to_hf_dict())
    if problem:
        raise BaseMismatch(f"{step_dir}: {problem}; pass --base with the base model it was trained on")
    adapters = restore_params(step_dir, _on_first_device(abstract_adapters(model, lora)), model.config.vocab_size)
    return attach_lora(model, lora, adapters)


def adapters_only(step_dir: Path, reference: dict[str, Any]) -> CausalLM:
    """A model whose adapters are restored from the checkpoint and whose base weights are
    abstract (never read): enough to write a PEFT adapter."""
    options = dataclasses.replace(
        _F32, scan_layers=saved_scan_layers(step_dir), lora=LoraConfig.from_dict(reference["lora"])
    )
    config = saved_config(step_dir)
    abstract = nnx.eval_shape(lambda: CausalLM(config, options, rngs=nnx.Rngs(0)))
    graphdef, abs_adapters, rest = nnx.split(abstract, LoRAParam, ...)
    return nnx.merge(graphdef, restore_params(step_dir, _on_first_device(abs_adapters), config.vocab_size), rest)


def base_folders(step_dir: Path, reference: dict[str, Any] | None, base: str | None) -> list[Path]:
    """The local folders of the model the checkpoint names as its base: a LoRA checkpoint's
    recorded base and `base`, a full fine-tune's policy.model_name (extra/config.yaml). An
    export never replaces them (a LoRA checkpoint could no longer be merged)."""
    if reference is not None:
        names = [reference["base"]["model_name"], base]
    else:
        saved = yaml.safe_load(extra_path(step_dir, CONFIG_FILE).read_text()) or {}
        names = [(saved.get("policy") or {}).get("model_name")]
    folders = []
    for name in filter(None, names):
        try:
            folder = local_model_dir(str(name))
        except MissingFileError:  # gone, or not a model folder: nothing there to protect
            continue
        if folder is not None:
            folders.append(folder)
    return folders


def export_checkpoint(
    step_dir: str | Path,
    out_dir: str | Path | None = None,
    *,
    peft_out: str | Path | None = None,
    base: str | None = None,
    dtype: str | None = None,
    overwrite: bool = False,
) -> list[Path]:
    """Writes step_dir as an HF model folder at out_dir and/or (LoRA checkpoints) its adapters as
    a PEFT adapter folder at peft_out; returns the folders written. `base`: the LoRA base to load
    instead of the recorded one. overwrite: replace a non-empty output folder that is not an
    earlier export (see module docstring)."""
    if out_dir is None and peft_out is None:
        raise UsageError("nothing to export: pass --out (the merged HF model) and/or --peft_out (a PEFT adapter)")
    step_dir = complete_step_dir(step_dir)
    reference = lora_reference(step_dir)
    if reference is None and peft_out is not None:
        raise UsageError(
            f"{step_dir}: a full fine-tune checkpoint (no extra/{LORA_FILE}) has no LoRA "
            "adapters to write as a PEFT adapter; export it with --out only"
        )
    if reference is None and base is not None:
        raise UsageError(f"{step_dir}: --base applies to LoRA checkpoints; this full fine-tune holds every weight")
    guard = dict(
        protected=(step_dir, step_dir.parent, *base_folders(step_dir, reference, base)),
        is_checkpoint=is_checkpoint_folder,
    )
    for target in (out_dir, peft_out):  # before the slow restore
        if target is not None:
            check_export_target(target, overwrite=overwrite, **guard)
    written = []
    if peft_out is not None:
        model = adapters_only(step_dir, reference)
        save_peft_adapter(
            model,
            peft_out,
            base_model_name_or_path=base or reference["base"]["model_name"],
            overwrite=overwrite,
            **guard,
        )
        written.append(Path(peft_out))
    if out_dir is not None:
        model = full_model(step_dir) if reference is None else lora_model(step_dir, reference, base)
        tokenizer = None
        if extra_path(step_dir, TOKENIZER_DIR).is_dir():
            tokenizer = open_tokenizer(extra_path(step_dir, TOKENIZER_DIR))
        save_pretrained(model, out_dir, tokenizer=tokenizer, dtype=dtype, overwrite=overwrite, **guard)
        written.append(Path(out_dir))
    return written


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m jax_sft.export", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--checkpoint", required=True, help="a step_N folder of a jax_sft run")
    parser.add_argument("--out", default=None, help="the Hugging Face model folder to write (LoRA: merged)")
    parser.add_argument("--peft_out", default=None, help="LoRA checkpoints: the PEFT adapter folder to write")
    parser.add_argument(
        "--base",
        default=None,
        help="LoRA checkpoints: the base model (folder or hub id) instead of the recorded "
        "policy.model_name; it must have the same config",
    )
    parser.add_argument(
        "--dtype",
        choices=["float32", "bfloat16", "float16"],
        default=None,
        help="dtype of the tensors --out writes (default: the source model's)",
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace a non-empty output folder that no earlier export wrote (never a checkpoint, "
        "the checkpoint folder, the base model, the working or home directory, / or a folder inside or "
        "holding them)",
    )
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    written = exit_on_input_error(
        lambda: export_checkpoint(
            args.checkpoint,
            args.out,
            peft_out=args.peft_out,
            base=args.base,
            dtype=args.dtype,
            overwrite=args.overwrite,
        )
    )
    for out in written:
        print(f"exported {args.checkpoint} -> {out}")


if __name__ == "__main__":
    main()
