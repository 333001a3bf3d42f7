"""Hugging Face checkpoints <-> `CausalLM`, without torch.

    model = from_pretrained("Qwen/Qwen3-0.6B" or "/path/to/folder", dtype=jnp.bfloat16,
                            param_dtype=jnp.float32, mesh=None, attention="auto", remat="none",
                            scan_layers=False, max_segments=64)
    save_pretrained(model, "out/hf", tokenizer=tok, max_shard_size="5GB", dtype=None)

Reading: `config.json` picks the family (`ModelConfig`); tensors come from `model.safetensors` or
the shards listed in `model.safetensors.index.json`, opened with `safe_open(framework="numpy")`.
The model is built abstractly (`nnx.eval_shape`) and each parameter is filled straight into its
sharding with `jax.make_array_from_callback`, reading only the slices the local devices hold.
Every checkpoint tensor must be used: missing, unused, mis-shaped tensors and unreadable files
raise `CheckpointError` naming the file and tensor. Tied embeddings follow transformers 5:
with `tie_word_embeddings` true, a stored `lm_head.weight` equal to the embedding is ignored, one
that differs makes the model untied (warning; config.json is written back untied), and a
checkpoint with only `lm_head.weight` ties to it. Old `*.rotary_emb.inv_freq` buffers are ignored.

Writing: config.json (the original keys, `architectures` and `dtype` set), generation_config.json,
safetensors shards named as transformers names them (model-00001-of-00002.safetensors + index, or
a single model.safetensors), the tokenizer and a marker file `.jax_sft_export`. Everything is
written into a temporary folder beside `out_dir`, which replaces `out_dir` only once complete.
`out_dir` must be new, empty or an earlier export (it holds the marker): any other folder is
refused (`ExportTargetError`) unless `overwrite=True`, and even then never `/`, the home or
working directory, a folder in `protected` (the run's checkpoint_dir), a parent of these, or an
Orbax checkpoint. Only process 0 writes; every process takes
part in gathering sharded parameters (multi-host gathering is untested so far).

The HF <-> jax name and layout tables are `_NAMES` below: one per family, sharing Llama's names.
A mixture-of-experts weight is one jax parameter [experts, ...] and one HF tensor per expert
(`...experts.{j}.gate_proj.weight`, Mixtral's `w1`/`w3`/`w2`), as the hub and transformers 5's
save_pretrained store them. A Gemma3ForConditionalGeneration folder is read through its text
model's tensors (`model.language_model.*` or the older `language_model.model.*`; the vision
tower and projector are not read) and written back as a text-only Gemma3ForCausalLM.
With `scan_layers=True` a layer parameter is stacked ([num_layers, ...], path `layers.<name>`):
it is read from, and written to, the per-layer HF tensors (`model.layers.{i}.<name>`), so the files
are the same either way.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes  # noqa: F401  (registers bfloat16 with numpy for safetensors)
import numpy as np
from flax import nnx
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from jax_sft.errors import InputError, MissingFileError
from jax_sft.models.config import ModelConfig, apply_overrides
from jax_sft.models import lora as lora_lib
from jax_sft.models.decoder import CausalLM, merge_lora
from jax_sft.models.lora import LoraConfig, LoRAParam
from jax_sft.models.sharding import param_shardings

logger = logging.getLogger(__name__)

SAFE_WEIGHTS = "model.safetensors"
SAFE_INDEX = "model.safetensors.index.json"
# What a hub download fetches: configs, weights, tokenizer files (never code).
HUB_ALLOW_PATTERNS = ["*.json", "*.safetensors", "tokenizer.model", "*.tiktoken", "*.txt", "*.jinja"]


class CheckpointError(InputError, ValueError):
    """A checkpoint that cannot be read as the config says; the message names file and tensor."""


EXPORT_MARKER = ".jax_sft_export"  # written into every export: marks a folder export may replace


class ExportTargetError(InputError, ValueError):
    """The export's output folder holds files that export must not replace."""


def export_target_problem(out_dir: str | os.PathLike, *, overwrite: bool = False,
                          protected: tuple[str | os.PathLike, ...] = ()) -> str | None:
    """Why `save_pretrained` must not write (replace) `out_dir`, or None (see module docstring)."""
    out = Path(out_dir).expanduser().resolve()
    guarded = [Path.home().resolve(), Path.cwd().resolve()]
    guarded += [Path(p).expanduser().resolve() for p in protected]
    for folder in guarded:
        if out == folder or out in folder.parents:
            what = "/" if out == Path(out.anchor) else f"{out}" + ("" if out == folder else f", which contains {folder}")
            return (f"export to {out_dir} would replace {what}; export never replaces the root, home or "
                    "working directory, the checkpoint folder or a parent of them (not even with "
                    "--overwrite). Choose a new folder")
    if out.exists() and not out.is_dir():
        return f"export to {out_dir}: it is a file, not a folder; choose a new folder"
    if not out.is_dir() or not any(out.iterdir()) or (out / EXPORT_MARKER).is_file():
        return None
    if (out / "_CHECKPOINT_METADATA").exists():
        return f"export to {out_dir}: it is a training checkpoint; export never replaces one. Choose a new folder"
    if overwrite:
        return None
    return (f"export to {out_dir}: the folder holds files that no jax_sft export wrote (it lacks "
            f"{EXPORT_MARKER}); export only replaces its own earlier exports. Choose a new or empty "
            "folder, or pass --overwrite to replace it")


def check_export_target(out_dir: str | os.PathLike, **kwargs) -> None:
    """Raises ExportTargetError when `export_target_problem` finds one."""
    problem = export_target_problem(out_dir, **kwargs)
    if problem:
        raise ExportTargetError(problem)


# --- layouts ---------------------------------------------------------------------------------
# A layout says how a jax parameter is laid out relative to the HF tensor: consecutive jax dims
# in one group form one HF dim (row-major), and "transposed" swaps the two HF dims
# (HF Linear stores [out, in]; jax kernels are [in, out]).


@dataclass(frozen=True)
class Layout:
    groups: tuple[tuple[int, ...], ...] | None  # None: one group per dim (same shape as HF)
    transposed: bool = False

    def dim_groups(self, ndim: int) -> tuple[tuple[int, ...], ...]:
        return self.groups if self.groups is not None else tuple((d,) for d in range(ndim))

    def grouped_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        """`shape` with each group of dims merged: the HF shape before any transposition."""
        return tuple(math.prod(shape[d] for d in g) for g in self.dim_groups(len(shape)))

    def hf_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        grouped = self.grouped_shape(shape)
        return grouped[::-1] if self.transposed else grouped

    def to_hf(self, x: np.ndarray) -> np.ndarray:
        x = x.reshape(self.grouped_shape(x.shape))
        return np.ascontiguousarray(x.T if self.transposed else x)

    def read(self, hf_slice, shape: tuple[int, ...], index: tuple[slice, ...]) -> np.ndarray:
        """The block `index` of the jax parameter of `shape`, read from a safetensors slice."""
        groups = self.dim_groups(len(shape))
        hf_index, block_shape, rest = [], [], []
        for g in groups:
            lead = g[0]
            start, stop, step = index[lead].indices(shape[lead])
            if step != 1:
                raise ValueError(f"strided index {index} is not supported")
            inner = math.prod(shape[d] for d in g[1:])
            hf_index.append(slice(start * inner, stop * inner))
            block_shape += [stop - start] + [shape[d] for d in g[1:]]
            rest += [slice(None)] + [index[d] for d in g[1:]]
        block = hf_slice[tuple(hf_index[::-1] if self.transposed else hf_index)]
        block = block.T if self.transposed else block
        return block.reshape(block_shape)[tuple(rest)]


SAME = Layout(None)
LINEAR = Layout(((0,), (1,)), transposed=True)  # [out, in] -> [in, out]
IN_HEADS = Layout(((0,), (1, 2)), transposed=True)  # [heads*d, in] -> [in, heads, d]
HEADS = Layout(((0, 1),))  # [heads*d] -> [heads, d]
OUT_HEADS = Layout(((0, 1), (2,)), transposed=True)  # [out, heads*d] -> [heads, d, out]

# jax parameter path ("{i}" = layer) -> (HF tensor name, layout). Entries whose parameter the
# config does not create (biases, lm_head when tied) are simply not looked up.
_LLAMA_NAMES: dict[str, tuple[str, Layout]] = {
    "embed_tokens.embedding": ("model.embed_tokens.weight", SAME),
    "layers.{i}.input_layernorm.weight": ("model.layers.{i}.input_layernorm.weight", SAME),
    "layers.{i}.post_attention_layernorm.weight": ("model.layers.{i}.post_attention_layernorm.weight", SAME),
    **{
        f"layers.{{i}}.self_attn.{p}_proj.kernel": (f"model.layers.{{i}}.self_attn.{p}_proj.weight", IN_HEADS)
        for p in "qkv"
    },
    **{
        f"layers.{{i}}.self_attn.{p}_proj.bias": (f"model.layers.{{i}}.self_attn.{p}_proj.bias", HEADS)
        for p in "qkv"
    },
    "layers.{i}.self_attn.o_proj.kernel": ("model.layers.{i}.self_attn.o_proj.weight", OUT_HEADS),
    "layers.{i}.self_attn.o_proj.bias": ("model.layers.{i}.self_attn.o_proj.bias", SAME),
    **{
        f"layers.{{i}}.mlp.{p}_proj.{kind}": (f"model.layers.{{i}}.mlp.{p}_proj.{hf}", layout)
        for p in ("gate", "up", "down")
        for kind, hf, layout in (("kernel", "weight", LINEAR), ("bias", "bias", SAME))
    },
    "norm.weight": ("model.norm.weight", SAME),
    "lm_head.kernel": ("lm_head.weight", LINEAR),
}
_QWEN3_NAMES = {
    **_LLAMA_NAMES,
    "layers.{i}.self_attn.q_norm.weight": ("model.layers.{i}.self_attn.q_norm.weight", SAME),
    "layers.{i}.self_attn.k_norm.weight": ("model.layers.{i}.self_attn.k_norm.weight", SAME),
}
_GEMMA2_NAMES = {
    **_LLAMA_NAMES,
    **{f"layers.{{i}}.{n}.weight": (f"model.layers.{{i}}.{n}.weight", SAME)
       for n in ("pre_feedforward_layernorm", "post_feedforward_layernorm")},
}
# Mixture of experts: "{j}" = expert; a stacked [experts, ...] parameter is one HF tensor per expert.
_QWEN3_MOE_NAMES = {
    **_QWEN3_NAMES,
    "layers.{i}.mlp.router": ("model.layers.{i}.mlp.gate.weight", LINEAR),
    **{f"layers.{{i}}.mlp.{p}_proj": (f"model.layers.{{i}}.mlp.experts.{{j}}.{p}_proj.weight", LINEAR)
       for p in ("gate", "up", "down")},
}
_MIXTRAL_NAMES = {
    **_LLAMA_NAMES,
    "layers.{i}.mlp.router": ("model.layers.{i}.block_sparse_moe.gate.weight", LINEAR),
    **{f"layers.{{i}}.mlp.{p}_proj": (f"model.layers.{{i}}.block_sparse_moe.experts.{{j}}.{w}.weight", LINEAR)
       for p, w in (("gate", "w1"), ("up", "w3"), ("down", "w2"))},
}
_NAMES = {
    "LlamaForCausalLM": _LLAMA_NAMES,
    "MistralForCausalLM": _LLAMA_NAMES,
    "Qwen2ForCausalLM": _LLAMA_NAMES,  # + q/k/v biases, which the Llama table already names
    "Qwen3ForCausalLM": _QWEN3_NAMES,
    "Gemma2ForCausalLM": _GEMMA2_NAMES,
    "Gemma3ForCausalLM": {**_GEMMA2_NAMES, **_QWEN3_NAMES},  # + q/k norms
    "Qwen3MoeForCausalLM": _QWEN3_MOE_NAMES,
    "MixtralForCausalLM": _MIXTRAL_NAMES,
}
# Gemma3ForConditionalGeneration: the text model's tensors under a prefix (transformers 5's, then
# the hub's older one); the vision tower and projector are left unread.
_MULTIMODAL_TEXT = (("model.language_model.", "lm_head."), ("language_model.model.", "language_model.lm_head."))
_MULTIMODAL_OTHER = re.compile(r"^(model\.)?(vision_tower|multi_modal_projector)\.")
_IGNORED = re.compile(r".*\.rotary_emb\.inv_freq$")


def is_stacked(path: tuple) -> bool:
    """Whether `path` is a stacked ([num_layers, ...]) layer parameter of a scan_layers model."""
    return len(path) > 1 and path[0] == "layers" and not isinstance(path[1], int) and not str(path[1]).isdigit()


def layer_paths(path: tuple, num_layers: int) -> list[tuple]:
    """The per-layer paths of a parameter: [path] as is, one per layer when stacked."""
    if not is_stacked(path):
        return [path]
    return [("layers", i, *path[1:]) for i in range(num_layers)]


def hf_name(config: ModelConfig, path: tuple) -> tuple[str, Layout]:
    """(HF tensor name, layout) of the jax parameter at `path` (an nnx state path)."""
    key = ".".join(str(p) for p in path)
    template = re.sub(r"^layers\.(\d+)\.", "layers.{i}.", key)
    entry = _NAMES[config.architecture].get(template)
    if entry is None:
        raise KeyError(f"no HF name for parameter {key} ({config.architecture})")
    layer = re.match(r"^layers\.(\d+)\.", key)
    return entry[0].format(i=layer.group(1) if layer else "", j="{j}"), entry[1]


def hf_names(config: ModelConfig, path: tuple) -> tuple[np.ndarray, Layout]:
    """The HF tensors of the parameter at `path`: an object array of names whose shape is the
    parameter's leading stacked dims ([layers] when scan-stacked, [experts] for expert weights,
    both, or none), and their common layout."""
    grid = []
    for layer_path in layer_paths(path, config.num_layers):
        name, layout = hf_name(config, layer_path)
        grid.append([name.format(j=j) for j in range(config.num_experts)] if "{j}" in name else name)
    return np.array(grid if is_stacked(path) else grid[0], dtype=object), layout


# --- reading ---------------------------------------------------------------------------------


def resolve_model_dir(name_or_path: str | os.PathLike) -> Path:
    """A local folder as is; otherwise a hub id fetched (or found in the cache under HF_HOME;
    HF_HUB_OFFLINE=1 forbids network) with `huggingface_hub.snapshot_download`."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    name = str(name_or_path)
    if path.exists() or name.startswith(("/", ".", "~")) or name.count("/") != 1:
        raise MissingFileError(f"{name}: not a model folder (and not a hub id of the form org/name)")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        return Path(snapshot_download(name, allow_patterns=HUB_ALLOW_PATTERNS))
    except (HfHubHTTPError, LocalEntryNotFoundError) as e:
        raise MissingFileError(
            f"{name}: no such local folder, and the hub snapshot could not be fetched "
            f"(HF_HUB_OFFLINE={os.environ.get('HF_HUB_OFFLINE', '0')}): {e}"
        ) from e


def read_config(model_dir: Path, overrides: dict[str, Any] | None = None) -> ModelConfig:
    """model_dir/config.json, with `overrides` (NeMo RL's policy.hf_config_overrides) merged in;
    the merged dict is what `save_pretrained` writes back."""
    path = model_dir / "config.json"
    if not path.is_file():
        raise MissingFileError(f"{path}: missing (a Hugging Face model folder needs config.json)")
    try:
        d = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: not valid JSON: {e}") from e
    source = f"{path} with policy.hf_config_overrides" if overrides else str(path)
    return ModelConfig.from_hf_dict(apply_overrides(d, overrides), source=source)


class _Checkpoint:
    """The safetensors files of a folder: tensor name -> file, with open handles."""

    def __init__(self, model_dir: Path, stack: contextlib.ExitStack):
        index_path, single = model_dir / SAFE_INDEX, model_dir / SAFE_WEIGHTS
        if index_path.is_file():
            try:
                weight_map = json.loads(index_path.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise CheckpointError(f"{index_path}: not a safetensors index ({e!r})") from e
            files = sorted(set(weight_map.values()))
            self.index = index_path
        elif single.is_file():
            weight_map, files, self.index = None, [SAFE_WEIGHTS], None
        else:
            others = sorted(p.name for p in model_dir.iterdir() if p.suffix in (".bin", ".pt", ".pth"))
            raise MissingFileError(
                f"{model_dir}: neither {SAFE_WEIGHTS} nor {SAFE_INDEX} found"
                + (f" (only safetensors are read; found {others})" if others else "")
            )
        self.handles: dict[str, Any] = {}
        self.file_of: dict[str, str] = {}
        for file in files:
            path = model_dir / file
            if not path.is_file():
                raise CheckpointError(f"{self.index}: lists {file}, which does not exist in {model_dir}")
            try:
                handle = stack.enter_context(safe_open(str(path), framework="numpy"))
            except SafetensorError as e:
                raise CheckpointError(f"{path}: not a readable safetensors file: {e}") from e
            self.handles[file] = handle
            for name in handle.keys():
                if weight_map is not None and weight_map.get(name) != file:
                    raise CheckpointError(
                        f"{path}: tensor {name} is not mapped to this file by {self.index}"
                    )
                self.file_of[name] = file
        for name, file in (weight_map or {}).items():
            if name not in self.file_of:
                raise CheckpointError(
                    f"{model_dir / file}: tensor {name} (listed in {self.index}) is missing"
                )
        self.dir = model_dir
        self.stored: dict[str, str] = {}  # name as read -> name in the file, where they differ

    def view_text_of_multimodal(self) -> None:
        """Gemma3ForConditionalGeneration: its text tensors under their text-model names
        (model.*, lm_head.weight); the vision tower and projector are dropped from view."""
        for text, head in _MULTIMODAL_TEXT:
            if any(n.startswith(text) for n in self.file_of):
                break
        else:
            raise CheckpointError(
                f"{self.dir}: a Gemma3ForConditionalGeneration checkpoint without text-model tensors "
                f"(none starts with {' or '.join(t for t, _ in _MULTIMODAL_TEXT)})"
            )
        file_of = {}
        for name, file in self.file_of.items():
            if name.startswith(text):
                file_of["model." + name.removeprefix(text)] = file
            elif name.startswith(head):
                file_of["lm_head." + name.removeprefix(head)] = file
            elif not _MULTIMODAL_OTHER.match(name):
                file_of[name] = file  # reported as unused
            else:
                continue
            self.stored[next(reversed(file_of))] = name
        self.file_of = file_of

    def where(self, name: str) -> str:
        """The file holding `name`, else the file that should have (the index or model.safetensors)."""
        if name in self.file_of:
            return str(self.dir / self.file_of[name])
        return str(self.index or self.dir / SAFE_WEIGHTS)

    def slice(self, name: str):
        return self.handles[self.file_of[name]].get_slice(self.stored.get(name, name))


def from_pretrained(
    name_or_path: str | os.PathLike,
    *,
    dtype=jnp.bfloat16,
    param_dtype=jnp.float32,
    mesh: jax.sharding.Mesh | None = None,
    attention: str = "auto",
    remat: str = "none",
    scan_layers: bool = False,
    max_segments: int = 64,
    hf_config_overrides: dict[str, Any] | None = None,
    lora: LoraConfig | None = None,
) -> CausalLM:
    """Loads an HF checkpoint of a supported family (models.SUPPORTED_ARCHITECTURES); with `mesh`, each parameter is created
    directly in its sharding (sharding.LOGICAL_AXIS_RULES). `dtype` is the compute dtype;
    `attention`, `remat`, `scan_layers`, `max_segments` as `CausalLM` takes them;
    `hf_config_overrides` merged into config.json (see `read_config`). `lora`: adapters on
    the projections it targets, initialised as `lora.initial_value` says (B = 0: the base model)."""
    model_dir = resolve_model_dir(name_or_path)
    config = read_config(model_dir, hf_config_overrides)
    gen_path = model_dir / "generation_config.json"
    if gen_path.is_file():
        config = dataclasses.replace(config, generation_config_json=gen_path.read_text())
    np_dtype = np.dtype(jnp.dtype(param_dtype))

    with contextlib.ExitStack() as stack:
        ckpt = _Checkpoint(model_dir, stack)
        if config.text_of_multimodal:
            ckpt.view_text_of_multimodal()
            logger.warning("%s: Gemma3ForConditionalGeneration: its text model is loaded; an export "
                           "writes a text-only Gemma3ForCausalLM (no vision tower)", model_dir)
        config = _resolve_tying(config, ckpt)
        abstract = nnx.eval_shape(
            lambda: CausalLM(config, dtype=dtype, param_dtype=param_dtype, attention=attention,
                             remat=remat, scan_layers=scan_layers, max_segments=max_segments,
                             rngs=nnx.Rngs(0), mesh=mesh, lora=lora)
        )
        graphdef, abs_state = nnx.split(abstract)
        shardings = {}
        if mesh is not None:
            shardings = {p: v.get_value() for p, v in nnx.to_flat_state(param_shardings(abs_state, mesh))}

        plan = []  # (path, variable, hf names, layout), all checked before any data is read
        adapters = []  # (path, variable): LoRA adapters, not in the checkpoint
        for path, var in nnx.to_flat_state(abs_state):
            if isinstance(var, LoRAParam):
                adapters.append((path, var))
                continue
            names, layout = hf_names(config, path)
            inner_shape = tuple(var.shape[names.ndim:])
            for index in np.ndindex(names.shape):
                name = names[index]
                if name == _EMBED and name not in ckpt.file_of and config.tie_word_embeddings:
                    name = names[index] = _LM_HEAD  # transformers ties to whichever of the two it has
                if name not in ckpt.file_of:
                    raise CheckpointError(f"{ckpt.where(name)}: tensor {name} is missing")
                found = tuple(ckpt.slice(name).get_shape())
                expected = layout.hf_shape(inner_shape)
                if found != expected:
                    raise CheckpointError(
                        f"{ckpt.where(name)}: tensor {name} has shape {found}, but config.json "
                        f"implies {expected}"
                    )
            plan.append((path, var, names, layout))
        used = {n for _, _, names, _ in plan for n in names.flat}
        unused = sorted(
            n for n in ckpt.file_of
            if n not in used and not _IGNORED.match(n)
            and not (n == _LM_HEAD and config.tie_word_embeddings)
        )
        if unused:
            raise CheckpointError(
                f"{model_dir}: checkpoint tensors not used by {config.architecture}: "
                + ", ".join(f"{n} ({ckpt.file_of[n]})" for n in unused)
            )

        filled = []
        for path, var, names, layout in plan:
            shape = tuple(var.shape)

            def read(index, layout=layout, names=names, shape=shape):
                """Block `index` of the parameter: leading stacked dims pick HF tensors."""
                lead, inner = index[: names.ndim], index[names.ndim:]
                picked = np.asarray(names[tuple(lead)], dtype=object)
                blocks = [layout.read(ckpt.slice(n), shape[names.ndim:], inner) for n in picked.flat]
                return np.stack(blocks).reshape(picked.shape + blocks[0].shape).astype(np_dtype)

            if mesh is None:
                value = jax.device_put(read(tuple(slice(None) for _ in shape)))
            else:
                value = jax.make_array_from_callback(shape, shardings[path], read)
            filled.append((path, var.replace(value)))
        if adapters:  # one compiled function draws them all (one per adapter took ~0.4 s each)
            inits = [partial(lora_lib.initial_value, lora, path, tuple(var.shape), config.num_layers)
                     for path, var in adapters]
            out_shardings = None if mesh is None else [shardings[path] for path, _ in adapters]
            values = jax.jit(lambda: [init() for init in inits], out_shardings=out_shardings)()
            filled += [(path, var.replace(value)) for (path, var), value in zip(adapters, values)]
    return nnx.merge(graphdef, nnx.from_flat_state(filled))


_EMBED, _LM_HEAD = "model.embed_tokens.weight", "lm_head.weight"


def _resolve_tying(config: ModelConfig, ckpt: _Checkpoint) -> ModelConfig:
    """transformers 5's rule for tie_word_embeddings=true with both tensors in the checkpoint:
    equal values -> tied (the copy is ignored); different values -> NOT tied, both are used
    (with a warning). The comparison reads both tensors, a block of rows at a time."""
    if not (config.tie_word_embeddings and _EMBED in ckpt.file_of and _LM_HEAD in ckpt.file_of):
        return config
    a, b = ckpt.slice(_EMBED), ckpt.slice(_LM_HEAD)
    rows = a.get_shape()[0]
    equal = a.get_shape() == b.get_shape() and all(
        np.array_equal(a[i : min(i + 4096, rows)], b[i : min(i + 4096, rows)])
        for i in range(0, rows, 4096)
    )
    if equal:
        return config
    logger.warning(
        "%s: tie_word_embeddings is true but %s and %s differ; like transformers, they are "
        "loaded untied (set tie_word_embeddings=false in config.json to silence this)",
        ckpt.dir, _EMBED, _LM_HEAD,
    )
    return dataclasses.replace(config, tie_word_embeddings=False)


# --- writing ---------------------------------------------------------------------------------


def parse_size(size: int | str) -> int:
    """Bytes of "5GB" (10^9), "500MiB" (2^20), "10KB", or an int."""
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*", size, flags=re.IGNORECASE)
    if not m:
        raise ValueError(f"max_shard_size={size!r}: expected e.g. '5GB', '500MiB' or a number of bytes")
    unit = (m.group(2) or "B").upper()
    scale = {"B": 1} | {f"{p}B": 1000 ** (i + 1) for i, p in enumerate("KMGT")} | {
        f"{p}IB": 1024 ** (i + 1) for i, p in enumerate("KMGT")
    }
    return int(float(m.group(1)) * scale[unit])


def _to_host(x: jax.Array) -> np.ndarray:
    """The whole array on this host (gathered from every process when there are several)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(jax.device_get(x))


@contextlib.contextmanager
def _atomic_dir(out_dir: Path) -> Iterator[Path]:
    """Yields a fresh folder beside `out_dir`; on success it becomes `out_dir` (replacing it)."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out_dir.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
        os.replace(out_dir, old / out_dir.name)
        os.replace(tmp, out_dir)
        shutil.rmtree(old)
    else:
        os.replace(tmp, out_dir)


def save_pretrained(
    model: CausalLM,
    out_dir: str | os.PathLike,
    tokenizer=None,
    max_shard_size: int | str = "5GB",
    dtype=None,
    *,
    overwrite: bool = False,
    protected: tuple[str | os.PathLike, ...] = (),
) -> None:
    """Writes an HF folder that `transformers.AutoModelForCausalLM.from_pretrained` loads.

    dtype: of the written tensors; None = the checkpoint dtype named by the original
    config.json (`dtype`/`torch_dtype`), else the parameters' dtype.
    overwrite, protected: which existing `out_dir` may be replaced (`export_target_problem`).
    """
    check_export_target(out_dir, overwrite=overwrite, protected=protected)
    model = merge_lora(model)  # LoRA: the adapters folded into the weights
    config = model.config
    dtype_name = jnp.dtype(dtype or config.torch_dtype or model.param_dtype).name
    if dtype_name not in ("float32", "bfloat16", "float16"):
        raise ValueError(f"save_pretrained dtype={dtype_name}: use float32, bfloat16 or float16")
    np_dtype = np.dtype(jnp.dtype(dtype_name))
    limit = parse_size(max_shard_size)

    # (per-layer path, shape, value getter), in the order of an unstacked model's parameters.
    params: list[tuple[tuple, tuple[int, ...], Any]] = []
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        if is_stacked(path):
            for i, layer_path in enumerate(layer_paths(path, var.shape[0])):
                params.append((layer_path, tuple(var.shape[1:]), lambda v=var, i=i: v[...][i]))
        else:
            params.append((path, tuple(var.shape), lambda v=var: v[...]))
    params.sort(key=lambda p: tuple((0, x) if isinstance(x, int) else (1, str(x)) for x in p[0]))
    shards: list[list[tuple[tuple, Any]]] = [[]]  # planned from shapes, before gathering
    size = 0
    for path, shape, get in params:
        nbytes = math.prod(shape) * np_dtype.itemsize
        if shards[-1] and size + nbytes > limit:
            shards.append([])
            size = 0
        shards[-1].append((path, get))
        size += nbytes
    n = len(shards)
    file_names = [SAFE_WEIGHTS] if n == 1 else [f"model-{k + 1:05d}-of-{n:05d}.safetensors" for k in range(n)]

    writer = jax.process_index() == 0
    with (_atomic_dir(Path(out_dir)) if writer else contextlib.nullcontext()) as tmp:
        weight_map, total = {}, 0
        for file, shard in zip(file_names, shards):
            tensors = {}
            for path, get in shard:
                names, layout = hf_names(config, path)
                value = _to_host(get())
                for index in np.ndindex(names.shape):  # one tensor per expert of expert weights
                    name = names[index]
                    tensors[name] = layout.to_hf(value[index]).astype(np_dtype)
                    weight_map[name] = file
                    total += tensors[name].nbytes
            if writer:
                save_file(tensors, str(tmp / file), metadata={"format": "pt"})
        if not writer:
            return
        if n > 1:
            index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
            (tmp / SAFE_INDEX).write_text(json.dumps(index, indent=2) + "\n")
        hf_config = config.to_hf_dict(dtype_name)
        (tmp / "config.json").write_text(json.dumps(hf_config, indent=2, sort_keys=True) + "\n")
        (tmp / "generation_config.json").write_text(json.dumps(_generation_config(config), indent=2) + "\n")
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        (tmp / EXPORT_MARKER).write_text("written by jax_sft's export; a later export may replace this folder\n")


def _generation_config(config: ModelConfig) -> dict[str, Any]:
    """The source's generation_config.json, else the token ids of config.json (as transformers derives it)."""
    if config.generation_config_json is not None:
        return json.loads(config.generation_config_json)
    hf = config.to_hf_dict()
    return {k: hf[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if hf.get(k) is not None}
