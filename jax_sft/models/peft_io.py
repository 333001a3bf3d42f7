"""LoRA adapters -> a Hugging Face PEFT adapter folder, without torch or peft.

    save_peft_adapter(model, "out/adapter", base_model_name_or_path="Qwen/Qwen3-0.6B")
    # in transformers + peft:
    #   PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), "out/adapter")

Writes `adapter_config.json` (peft_type LORA, task_type CAUSAL_LM, r, lora_alpha, lora_dropout,
target_modules, ...) and `adapter_model.safetensors` with the tensor names peft's save_pretrained
writes for the default adapter: `base_model.model.<HF module name>.lora_A.weight` [r, in] and
`...lora_B.weight` [out, r]. Both sides scale by lora_alpha / r (no rsLoRA), so A and B are
written as they are, reshaped and transposed: a q_proj A [hidden, r] becomes lora_A [r, hidden],
its B [r, heads, head_dim] lora_B [heads * head_dim, r]; an o_proj A [heads, head_dim, r] becomes
lora_A [r, heads * head_dim]. Scan-stacked adapters ([num_layers, ...]) become one tensor pair
per layer. lm_head's adapter (tied embeddings too) is `base_model.model.lm_head.lora_*`.

target_modules says exactly which modules have adapters, in peft's terms: a list of module names
(peft matches a module whose name ends with `.<entry>`) when every layer has the same adapted
projections and every layer's MLP is dense; otherwise (hybrid models always) one regular
expression that fully matches exactly the adapted modules' names (peft applies `re.fullmatch` to
a string). Hybrid layers' modules are named as transformers names them (Nemotron-H:
`model.layers.<i>.mixer.in_proj`, `...mixer.shared_experts.up_proj`); Mamba-2's in_proj adapter,
held as one A and a B per block of its kernel, is written as PEFT's one lora_B (the blocks' rows
in the order of transformers' in_proj rows).

lora_dropout is the training setting; peft applies dropout to the adapter's input (NeMo RL's
dropout_position "pre"); at inference neither applies it. Writing follows save_pretrained's rules
(`hf_write.export_target_problem`, atomic replacement, the `.jax_sft_export` marker; process 0
writes, every process takes part in gathering).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import nnx
from safetensors.numpy import save_file

from jax_sft.errors import SettingError
from jax_sft.models.decoder import CausalLM
from jax_sft.models.hf_names import fused_projections, hf_tensor, is_stacked
from jax_sft.models.hf_write import EXPORT_MARKER, atomic_dir, check_export_target, to_host
from jax_sft.models.lora import LoRAParam, site_of
from jax_sft.models.options import LM_HEAD, hf_module_name, layer_projections

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PREFIX = "base_model.model."  # peft's prefix of the wrapped model's module names


def adapter_sites(model: CausalLM) -> frozenset[tuple[int | None, str]]:
    """The (layer, projection) sites of `model`'s adapters ((None, "lm_head") for lm_head)."""
    sites = set()
    for path, _ in nnx.to_flat_state(nnx.state(model, LoRAParam)):
        layer, proj = site_of(path)
        if proj != LM_HEAD and layer is None:  # scan-stacked: on every layer
            sites.update((i, proj) for i in range(model.config.num_layers))
        else:
            sites.add((layer, proj))
    return frozenset(sites)


def target_modules(config, sites: frozenset[tuple[int | None, str]]) -> list[str] | str:
    """peft's target_modules matching exactly `sites` (see the module docstring)."""
    layers = layer_projections(config)
    order = [*dict.fromkeys(p for projs in layers for p, _ in projs), LM_HEAD]
    names = sorted({p for _, p in sites}, key=order.index)
    every_layer = {(None if p == LM_HEAD else i, p) for p in names for i in range(config.num_layers)}
    plain = not config.layer_kinds and (config.num_experts == 0 or not any(config.moe_layers))
    if sites == every_layer and plain:
        return names
    by_layer: dict[tuple[tuple[str, str], ...], list[int]] = {}
    for i, projs in enumerate(layers):
        chosen = tuple((p, parent) for p, parent in projs if (i, p) in sites)
        if chosen:
            by_layer.setdefault(chosen, []).append(i)
    alternatives = []
    for chosen, indices in by_layer.items():
        parents: dict[str, list[str]] = {}
        for p, parent in chosen:
            parents.setdefault(parent, []).append(p)
        inner = "|".join(rf"{re.escape(parent)}\.(?:{'|'.join(ps)})" for parent, ps in parents.items())
        alternatives.append(rf"model\.layers\.(?:{'|'.join(map(str, indices))})\.(?:{inner})")
    if (None, LM_HEAD) in sites:
        alternatives.append(LM_HEAD)
    return "|".join(alternatives)


def adapter_config(model: CausalLM, base_model_name_or_path: str) -> dict[str, Any]:
    """adapter_config.json's content (peft's LoraConfig fields; the rest take peft's defaults)."""
    lora = model.lora
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": str(base_model_name_or_path),
        "r": lora.dim,
        "lora_alpha": lora.alpha,
        "lora_dropout": float(lora.dropout),
        "target_modules": target_modules(model.config, adapter_sites(model)),
        "exclude_modules": None,
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "lora_bias": False,
        "init_lora_weights": True,
        "modules_to_save": None,
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": {},
        "alpha_pattern": {},
        "inference_mode": True,
    }


def peft_name(layer: int | None, proj: str, matrix: str, parent: str | None = None) -> str:
    """peft's tensor name of one adapter matrix (matrix: "lora_a" or "lora_b"; parent: the
    projection's module under the layer, None: a decoder's)."""
    return f"{PREFIX}{hf_module_name(layer, proj, parent)}.{'lora_A' if matrix == 'lora_a' else 'lora_B'}.weight"


def to_peft(matrix: str, value: np.ndarray) -> np.ndarray:
    """One site's A [*in, r] -> lora_A.weight [r, prod(in)], or B [r, *out] -> lora_B.weight [prod(out), r]."""
    if matrix == "lora_a":
        return np.ascontiguousarray(value.reshape(-1, value.shape[-1]).T)
    return np.ascontiguousarray(value.reshape(value.shape[0], -1).T)


def peft_tensors(adapters: nnx.State, config=None) -> dict[str, np.ndarray]:
    """{peft tensor name: float32 array} of every matrix in `adapters` (`nnx.state(model,
    LoRAParam)`, or a gradient of it), gathered onto every process. `config` (the model's
    ModelConfig; None: a decoder's names) names hybrid layers' modules and orders the blocks of a
    fused projection's B (`FusedLoRA`: its lora_b_<part> rows concatenated as HF's in_proj rows);
    dims named "vocab" are cut to its vocab_size (the model's vocabulary padding is not written)."""
    parents = (
        {}
        if config is None
        else {(i, p): parent for i, projs in enumerate(layer_projections(config)) for p, parent in projs}
    )
    tensors, blocks = {}, {}
    vocab_size = None if config is None else config.vocab_size
    for path, var in nnx.to_flat_state(adapters):
        layer, proj = site_of(path)
        matrix = str(path[-1])
        value = to_host(var[...]).astype(np.float32)
        names = var.get_metadata().get("out_sharding") or ()
        if vocab_size is not None and "vocab" in names:
            value = value[tuple(slice(vocab_size) if n == "vocab" else slice(None) for n in names)]
        if is_stacked(path) and proj != LM_HEAD:
            per_layer = [(i, value[i]) for i in range(value.shape[0])]
        else:
            per_layer = [(layer, value)]
        for i, v in per_layer:
            if matrix.startswith("lora_b_"):  # one block of a fused projection's B
                blocks.setdefault((i, proj), []).append((_block_index(config, path, matrix), v))
            else:
                tensors[peft_name(i, proj, matrix, parents.get((i, proj)))] = to_peft(matrix, v)
    for (i, proj), parts in blocks.items():
        rows = np.concatenate([to_peft("lora_b", v) for _, v in sorted(parts, key=lambda part: part[0])])
        tensors[peft_name(i, proj, "lora_b", parents.get((i, proj)))] = rows
    return dict(sorted(tensors.items()))


def _block_index(config, path: tuple, matrix: str) -> int:
    """The position of a fused projection's block (lora_b_<part>) among its HF tensor's rows: its
    kernel's part in the family's weight table."""
    if config is None:
        raise ValueError(
            f"adapter {'.'.join(map(str, path))}: the blocks of a fused projection need the model's config"
        )
    kernel = (*path[:-2], "kernel" + matrix.removeprefix("lora_b"))
    if is_stacked(kernel):
        kernel = ("layers", 0, *kernel[1:])
    return hf_tensor(config, kernel).part


def save_peft_adapter(
    model: CausalLM,
    out_dir: str | os.PathLike,
    *,
    base_model_name_or_path: str,
    overwrite: bool = False,
    protected: tuple[str | os.PathLike, ...] = (),
    is_checkpoint: Callable[[Path], bool] | None = None,
) -> None:
    """Writes `model`'s LoRA adapters as a PEFT adapter folder (see the module docstring).
    overwrite, protected, is_checkpoint: which existing `out_dir` may be replaced, as for
    save_pretrained."""
    if model.lora is None:
        raise SettingError(
            "this model has no LoRA adapters to write as a PEFT adapter (it was not "
            "built with lora=...); export the full model with save_pretrained / --out"
        )
    if model.config.text_of_multimodal:
        raise SettingError(
            "a PEFT adapter of a Gemma3ForConditionalGeneration base is not supported "
            "(peft names its modules model.language_model.*); export the merged "
            "text-only model with save_pretrained / --out instead"
        )
    fused = sorted(fused_projections(model.config) & {proj for _, proj in adapter_sites(model)})
    if fused:
        raise SettingError(
            f"a PEFT adapter of a {model.config.architecture} with adapters on {fused} is not "
            "supported (its checkpoint fuses them into one module, whose adapters peft would share); "
            "export the merged model with save_pretrained / --out instead"
        )
    check_export_target(out_dir, overwrite=overwrite, protected=protected, is_checkpoint=is_checkpoint)
    config = adapter_config(model, base_model_name_or_path)
    tensors = peft_tensors(nnx.state(model, LoRAParam), model.config)  # every process gathers
    writer = jax.process_index() == 0
    with atomic_dir(Path(out_dir)) if writer else contextlib.nullcontext() as tmp:
        if not writer:
            return
        save_file(tensors, str(tmp / ADAPTER_WEIGHTS), metadata={"format": "pt"})
        (tmp / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
        (tmp / EXPORT_MARKER).write_text("written by jax_sft's export; a later export may replace this folder\n")


def matches(pattern: list[str] | str, module_name: str) -> bool:
    """Whether peft's target_modules `pattern` selects `module_name` (peft's rule, for tests)."""
    if isinstance(pattern, str):
        return re.fullmatch(pattern, module_name) is not None
    return module_name in pattern or any(module_name.endswith(f".{p}") for p in pattern)
