"""Hugging Face checkpoints -> `CausalLM`, without torch.

    model = from_pretrained("Qwen/Qwen3-0.6B" or "/path/to/folder", ModelOptions(...), mesh=mesh)
    model = from_pretrained(path, dtype=jnp.bfloat16)      # the keyword form of the options

`config.json` picks the family (`ModelConfig`, the registry); tensors come from
`model.safetensors` or the shards listed in `model.safetensors.index.json`, opened with
`safe_open(framework="numpy")`. The model is built abstractly (`nnx.eval_shape`) and each
parameter is filled straight into its sharding with `jax.make_array_from_callback`, reading only the
slices the local devices hold. Every checkpoint tensor must be used: missing, unused, mis-shaped
tensors and unreadable files raise `CheckpointError` naming the file and tensor. Tied embeddings
follow transformers 5: with `tie_word_embeddings` true, a stored `lm_head.weight` equal to the
embedding is ignored, one that differs makes the model untied (warning; config.json is written back
untied), and a checkpoint with only `lm_head.weight` ties to it. Old `*.rotary_emb.inv_freq`
buffers are ignored. A Gemma3ForConditionalGeneration folder is read through its text model's
tensors (`model.language_model.*` or the older `language_model.model.*`; the vision tower and
projector are not read). A tensor stored in MXFP4 (`X_blocks` + `X_scales`, the hub's gpt-oss
experts) is read as the dequantized `X` (`jax_sft.models.mxfp4`), into the parameters' dtype.
Parameters whose vocabulary rows the model pads (`CausalLM.vocab_rows`: a multiple of the mesh's
tensor axis) get zeros in the padding.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import re
from functools import partial
from pathlib import Path
from typing import Any

import jax
import ml_dtypes  # noqa: F401  (registers bfloat16 with numpy for safetensors)
import numpy as np
from flax import nnx
from safetensors import SafetensorError, safe_open

from jax_sft.errors import MissingFileError
from jax_sft.models import lora as lora_lib
from jax_sft.models.config import ModelConfig, apply_overrides
from jax_sft.models.decoder import CausalLM
from jax_sft.models.errors import CheckpointError
from jax_sft.models.fp8 import Fp8History
from jax_sft.models.hf_names import SAFE_INDEX, SAFE_WEIGHTS, hf_names
from jax_sft.models.lora import LoRAParam
from jax_sft.models.mxfp4 import BLOCKS, SCALES, Mxfp4Slice
from jax_sft.models.options import ModelOptions
from jax_sft.models.sharding import param_shardings
from jax_sft.models.weights import FusedRows, HfTensor, InterleavedPart

logger = logging.getLogger(__name__)

# What a hub download fetches: configs, weights, tokenizer files (never code).
HUB_ALLOW_PATTERNS = ["*.json", "*.safetensors", "tokenizer.model", "*.tiktoken", "*.txt", "*.jinja"]
# Gemma3ForConditionalGeneration: the text model's tensors under a prefix (transformers 5's, then
# the hub's older one); the vision tower and projector are left unread.
_MULTIMODAL_TEXT = (("model.language_model.", "lm_head."), ("language_model.model.", "language_model.lm_head."))
_MULTIMODAL_OTHER = re.compile(r"^(model\.)?(vision_tower|multi_modal_projector)\.")
_IGNORED = re.compile(r".*\.rotary_emb\.inv_freq$")


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


def local_model_dir(name: str) -> Path | None:
    """The folder holding `name`'s config.json without any download: `name` itself, or its
    snapshot in the HF cache; None for a hub id not in the cache."""
    path = Path(name).expanduser()
    if path.is_dir():
        return path
    if name.count("/") != 1 or name.startswith(("/", ".", "~")):
        raise MissingFileError(
            f"policy.model_name={name!r}: not a model folder (and not a hub id of the form org/name)"
        )
    from huggingface_hub import try_to_load_from_cache  # noqa: PLC0415

    cached = try_to_load_from_cache(name, "config.json")
    return Path(cached).parent if isinstance(cached, str) else None


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


class SafetensorFiles:
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
            for name in handle.keys():  # noqa: SIM118  (a safetensors handle, not a dict)
                if weight_map is not None and weight_map.get(name) != file:
                    raise CheckpointError(f"{path}: tensor {name} is not mapped to this file by {self.index}")
                self.file_of[name] = file
        for name, file in (weight_map or {}).items():
            if name not in self.file_of:
                raise CheckpointError(f"{model_dir / file}: tensor {name} (listed in {self.index}) is missing")
        self.dir = model_dir
        self.stored: dict[str, str] = {}  # name as read -> name in the file, where they differ
        self.fused: dict[tuple, Any] = {}  # jax path -> the view of its part of a fused tensor (hf_slice -> view)
        self.mxfp4 = self._mxfp4_pairs()  # name -> ((blocks name, its file), (scales name, its file))

    def _mxfp4_pairs(self) -> dict[str, tuple[tuple[str, str], tuple[str, str]]]:
        """The MXFP4 tensors (X_blocks with X_scales), seen as X from now on."""
        pairs = {}
        for name in list(self.file_of):
            base = name.removesuffix(BLOCKS)
            if name.endswith(BLOCKS) and base + SCALES in self.file_of:
                scales = base + SCALES
                pairs[base] = ((name, self.file_of[name]), (scales, self.file_of.pop(scales)))
                self.file_of[base] = self.file_of.pop(name)
        return pairs

    def view_text_of_multimodal(self) -> None:
        """Gemma3ForConditionalGeneration: its text tensors under their text-model names
        (model.*, lm_head.weight); the vision tower and projector are dropped from view."""
        prefixes = [(t, h) for t, h in _MULTIMODAL_TEXT if any(n.startswith(t) for n in self.file_of)]
        if not prefixes:
            raise CheckpointError(
                f"{self.dir}: a Gemma3ForConditionalGeneration checkpoint without text-model tensors "
                f"(none starts with {' or '.join(t for t, _ in _MULTIMODAL_TEXT)})"
            )
        (text, head), file_of = prefixes[0], {}
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
        if name in self.mxfp4:
            return Mxfp4Slice(name, *(self.handles[file].get_slice(n) for n, file in self.mxfp4[name]))
        return self.handles[self.file_of[name]].get_slice(self.stored.get(name, name))


@dataclasses.dataclass
class _Planned:
    """One parameter to fill: its abstract variable, HF tensor names ([stacked dims]) and entry,
    and its shape in the checkpoint (`var`'s, less any vocabulary padding)."""

    path: tuple
    var: Any
    names: np.ndarray
    entry: HfTensor
    stored_shape: tuple[int, ...]


def from_pretrained(
    name_or_path: str | os.PathLike,
    options: ModelOptions | None = None,
    *,
    mesh: jax.sharding.Mesh | None = None,
    hf_config_overrides: dict[str, Any] | None = None,
    **option_fields,
) -> CausalLM:
    """Loads an HF checkpoint of a registered family; with `mesh`, each parameter is created
    directly in its sharding (sharding.LOGICAL_AXIS_RULES). `options` (or its keyword form: dtype,
    param_dtype, attention, remat, scan_layers, max_segments, lora) as `CausalLM` takes them;
    `hf_config_overrides` merged into config.json (see `read_config`). LoRA adapters are
    initialised as `lora.initial_value` says (B = 0: the base model)."""
    options = ModelOptions.of(options, **option_fields)
    model_dir = resolve_model_dir(name_or_path)
    config = read_config(model_dir, hf_config_overrides)
    gen_path = model_dir / "generation_config.json"
    if gen_path.is_file():
        config = dataclasses.replace(config, generation_config_json=gen_path.read_text())
    with contextlib.ExitStack() as stack:
        files = SafetensorFiles(model_dir, stack)
        if config.text_of_multimodal:
            files.view_text_of_multimodal()
            logger.warning(
                "%s: Gemma3ForConditionalGeneration: its text model is loaded; an export "
                "writes a text-only Gemma3ForCausalLM (no vision tower)",
                model_dir,
            )
        config = _resolve_tying(config, files)
        abstract = nnx.eval_shape(lambda: CausalLM(config, options, rngs=nnx.Rngs(0), mesh=mesh))
        graphdef, abs_state = nnx.split(abstract)
        shardings = {}
        if mesh is not None:
            shardings = {p: v.get_value() for p, v in nnx.to_flat_state(param_shardings(abs_state, mesh))}
        plan, adapters, histories = _plan(config, files, abs_state)
        np_dtype = np.dtype(options.param_dtype)
        filled = [(p.path, p.var.replace(_fill(p, files, np_dtype, shardings.get(p.path)))) for p in plan]
        filled += _initial_adapters(config, options, adapters, shardings)
        filled += [(path, var.replace(_zeros(var, shardings.get(path)))) for path, var in histories]
    return nnx.merge(graphdef, nnx.from_flat_state(filled))


def _plan(config: ModelConfig, files: SafetensorFiles, abs_state) -> tuple[list[_Planned], list[tuple], list[tuple]]:
    """The parameters to read, every tensor checked (present, shaped as config.json implies, fused
    blocks adding up, nothing left unused) before any data is read; the LoRA adapters; and the FP8
    amax histories (not in HF checkpoints: they start empty)."""
    plan, adapters, histories = [], [], []
    for path, var in nnx.to_flat_state(abs_state):
        if isinstance(var, LoRAParam):
            adapters.append((path, var))
            continue
        if isinstance(var, Fp8History):
            histories.append((path, var))
            continue
        names, entry = hf_names(config, path)
        for index in np.ndindex(names.shape):
            if names[index] == _EMBED and _EMBED not in files.file_of and config.tie_word_embeddings:
                names[index] = _LM_HEAD  # transformers ties to whichever of the two it has
            if names[index] not in files.file_of:
                raise CheckpointError(f"{files.where(names[index])}: tensor {names[index]} is missing")
        plan.append(_Planned(path, var, names, entry, unpadded_shape(var, config.vocab_size)))
    _check_shapes(plan, files)
    used = {n for p in plan for n in p.names.flat}
    unused = sorted(
        n
        for n in files.file_of
        if n not in used and not _IGNORED.match(n) and not (n == _LM_HEAD and config.tie_word_embeddings)
    )
    if unused:
        raise CheckpointError(
            f"{files.dir}: checkpoint tensors not used by {config.architecture}: "
            + ", ".join(f"{n} ({files.file_of[n]})" for n in unused)
        )
    return plan, adapters, histories


def _zeros(var: nnx.Variable, sharding) -> jax.Array:
    zeros = np.zeros(var.shape, var.dtype)
    return jax.device_put(zeros) if sharding is None else jax.device_put(zeros, sharding)


def unpadded_shape(var: Any, vocab_size: int) -> tuple[int, ...]:
    """The shape of a parameter without vocabulary padding: its dims named "vocab" (logical axis
    names, sharding.py) at `vocab_size`."""
    names = var.get_metadata().get("out_sharding") or (None,) * len(var.shape)
    return tuple(vocab_size if n == "vocab" else size for size, n in zip(var.shape, names))


def _check_shapes(plan: list[_Planned], files: SafetensorFiles) -> None:
    """Each tensor's shape against what config.json implies; the blocks of a fused tensor must
    stack (in part order, along dim 0, or interleaved along the last dim) to its shape, and the
    view of each part is recorded in `files`."""
    fused: dict[str, list[tuple[int, tuple, tuple, bool]]] = {}  # name -> [(part, path, block shape, interleaved)]
    for p in plan:
        inner = p.entry.layout.hf_shape(p.stored_shape[p.names.ndim :])
        for name in p.names.flat:
            if p.entry.part is not None:
                fused.setdefault(name, []).append((p.entry.part, p.path, inner, p.entry.interleaved))
                continue
            found = tuple(files.slice(name).get_shape())
            if found != inner:
                raise CheckpointError(
                    f"{files.where(name)}: tensor {name} has shape {found}, but config.json implies {inner}"
                )
    for name, parts in fused.items():
        parts.sort(key=lambda part: part[0])
        interleaved = parts[0][3]
        axis = -1 if interleaved else 0
        shape = list(parts[0][2])
        shape[axis] = sum(block[axis] for _, _, block, _ in parts)
        found = tuple(files.slice(name).get_shape())
        if found != tuple(shape) or [part for part, *_ in parts] != list(range(len(parts))):
            how = "interleaved along the last dim" if interleaved else "stacked along dim 0"
            raise CheckpointError(
                f"{files.where(name)}: fused tensor {name} has shape {found}, but config.json "
                f"implies {tuple(shape)} (its parts {how})"
            )
        start = 0
        for part, path, block, _ in parts:
            if interleaved:
                files.fused[path] = partial(InterleavedPart, part=part, parts=len(parts))
            else:
                files.fused[path] = partial(FusedRows, start=start, rows=block[0])
            start += block[0]


def _fill(p: _Planned, files: SafetensorFiles, np_dtype: np.dtype, sharding) -> jax.Array:
    """The value of one planned parameter, read block by block into `sharding` (None: one device);
    vocabulary padding (beyond `p.stored_shape`) is zeros."""
    shape, names, layout = tuple(p.var.shape), p.names, p.entry.layout

    def source(name: str):
        hf_slice = files.slice(name)
        return files.fused[p.path](hf_slice) if p.path in files.fused else hf_slice

    def stored(index):
        """Block `index` within the stored shape: leading stacked dims pick HF tensors."""
        lead, inner = index[: names.ndim], index[names.ndim :]
        picked = np.asarray(names[tuple(lead)], dtype=object)
        blocks = [layout.read(source(n), p.stored_shape[names.ndim :], inner) for n in picked.flat]
        return np.stack(blocks).reshape(picked.shape + blocks[0].shape).astype(np_dtype)

    def read(index):
        spans = [s.indices(n)[:2] for s, n in zip(index, shape)]
        clipped = [(min(lo, real), min(hi, real)) for (lo, hi), real in zip(spans, p.stored_shape)]
        if clipped == spans:
            return stored(tuple(slice(*c) for c in clipped))
        block = np.zeros([hi - lo for lo, hi in spans], np_dtype)
        if all(hi > lo for lo, hi in clipped):
            block[tuple(slice(0, hi - lo) for lo, hi in clipped)] = stored(tuple(slice(*c) for c in clipped))
        return block

    if sharding is None:
        return jax.device_put(read(tuple(slice(None) for _ in shape)))
    return jax.make_array_from_callback(shape, sharding, read)


def _initial_adapters(
    config: ModelConfig, options: ModelOptions, adapters: list[tuple], shardings: dict
) -> list[tuple]:
    """LoRA adapters' initial values, drawn by one compiled function (one per adapter took ~0.4 s
    each)."""
    if not adapters:
        return []
    inits = [
        partial(lora_lib.initial_value, options.lora, path, tuple(var.shape), config.num_layers)
        for path, var in adapters
    ]
    out_shardings = [shardings[path] for path, _ in adapters] if shardings else None
    values = jax.jit(lambda: [init() for init in inits], out_shardings=out_shardings)()
    return [(path, var.replace(value)) for (path, var), value in zip(adapters, values)]


_EMBED, _LM_HEAD = "model.embed_tokens.weight", "lm_head.weight"


def _resolve_tying(config: ModelConfig, ckpt: SafetensorFiles) -> ModelConfig:
    """transformers 5's rule for tie_word_embeddings=true with both tensors in the checkpoint:
    equal values -> tied (the copy is ignored); different values -> NOT tied, both are used
    (with a warning). The comparison reads both tensors, a block of rows at a time."""
    if not (config.tie_word_embeddings and _EMBED in ckpt.file_of and _LM_HEAD in ckpt.file_of):
        return config
    a, b = ckpt.slice(_EMBED), ckpt.slice(_LM_HEAD)
    rows = a.get_shape()[0]
    equal = a.get_shape() == b.get_shape() and all(
        np.array_equal(a[i : min(i + 4096, rows)], b[i : min(i + 4096, rows)]) for i in range(0, rows, 4096)
    )
    if equal:
        return config
    logger.warning(
        "%s: tie_word_embeddings is true but %s and %s differ; like transformers, they are "
        "loaded untied (set tie_word_embeddings=false in config.json to silence this)",
        ckpt.dir,
        _EMBED,
        _LM_HEAD,
    )
    return dataclasses.replace(config, tie_word_embeddings=False)
