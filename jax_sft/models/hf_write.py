"""`CausalLM` -> a Hugging Face model folder, without torch.

    save_pretrained(model, "out/hf", tokenizer=tok, max_shard_size="5GB", dtype=None)

Writes config.json (the original keys, `architectures` and `dtype` set), generation_config.json,
safetensors shards named as transformers names them (model-00001-of-00002.safetensors + index, or
a single model.safetensors), the tokenizer and a marker file `.jax_sft_export`. Everything is
written into a temporary folder beside `out_dir`, which replaces `out_dir` only once complete.
`out_dir` must be new, empty or an earlier export (it holds the marker): any other folder is
refused (`ExportTargetError`) unless `overwrite=True`, and whatever markers it holds, never `/`,
the home or working directory, a folder in `protected` (checkpoint_dir, the checkpoint being read,
the base model) or inside one, a training checkpoint or a folder inside one (`is_checkpoint`, which
the caller passes: the checkpoint layout is not this package's), nor a folder holding any of them.
Only process 0 writes; every process takes part in gathering sharded parameters.
LoRA adapters are merged into the weights first; the parts of a fused HF tensor (Phi-3's
`qkv_proj`) are concatenated along its dim 0 (interleaved along its last dim where the family's
table says so: gpt-oss's `gate_up_proj`). The model's vocabulary padding (`CausalLM.vocab_rows`)
is never written: the tensors have config.json's vocab_size rows. A checkpoint read from MXFP4 is
written dequantized, in `dtype`, without config.json's quantization_config.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes  # noqa: F401  (registers bfloat16 with numpy for safetensors)
import numpy as np
from flax import nnx
from safetensors.numpy import save_file

from jax_sft.errors import InputError
from jax_sft.models.config import ModelConfig
from jax_sft.models.decoder import CausalLM, merge_lora
from jax_sft.models.hf_names import SAFE_INDEX, SAFE_WEIGHTS, hf_names, is_stacked, layer_paths
from jax_sft.models.weights import interleave

EXPORT_MARKER = ".jax_sft_export"  # written into every export: marks a folder export may replace


class ExportTargetError(InputError, ValueError):
    """The export's output folder holds files that export must not replace."""


def export_target_problem(
    out_dir: str | os.PathLike,
    *,
    overwrite: bool = False,
    protected: tuple[str | os.PathLike, ...] = (),
    is_checkpoint: Callable[[Path], bool] | None = None,
) -> str | None:
    """Why `save_pretrained` must not write (replace) `out_dir`, or None (see module docstring).

    protected: folders export never replaces, writes into or replaces a parent of (the run's
    checkpoint_dir, the checkpoint being read, the base model). is_checkpoint: whether a folder is
    a training checkpoint (or a part of one); `out_dir` must neither lie inside such a folder
    nor hold one. Both are refused whatever markers the folder carries, even with `overwrite`."""
    out = Path(out_dir).expanduser().resolve()
    problem = _guarded_problem(out, out_dir, protected) or _checkpoint_problem(out, out_dir, is_checkpoint)
    if problem:
        return problem
    if out.exists() and not out.is_dir():
        return f"export to {out_dir}: it is a file, not a folder; choose a new folder"
    if not out.is_dir() or not any(out.iterdir()) or (out / EXPORT_MARKER).is_file():
        return None
    if overwrite:
        return None
    return (
        f"export to {out_dir}: the folder holds files that no jax_sft export wrote (it lacks "
        f"{EXPORT_MARKER}); export only replaces its own earlier exports. Choose a new or empty "
        "folder, or pass --overwrite to replace it"
    )


_NEVER = (
    "export never replaces or writes into a training checkpoint, the checkpoint folder, the base model, "
    "the root, home or working directory, nor a folder holding one of them (not even with --overwrite, "
    "whatever marker files it has). Choose a new folder"
)


def _guarded_problem(out: Path, out_dir: Any, protected: tuple[str | os.PathLike, ...]) -> str | None:
    """`out` is, holds or (for `protected` folders) lies inside a folder export must not touch."""
    guarded = [(Path.home().resolve(), False), (Path.cwd().resolve(), False)]
    guarded += [(Path(p).expanduser().resolve(), True) for p in protected]
    for folder, inside_too in guarded:
        if out == folder:
            what = "/" if out == Path(out.anchor) else f"{out}"
        elif out in folder.parents:
            what = f"{out}, which contains {folder}"
        elif inside_too and folder in out.parents:
            what = f"a folder inside {folder}"
        else:
            continue
        return f"export to {out_dir} would replace {what}; {_NEVER}"
    return None


def _checkpoint_problem(out: Path, out_dir: Any, is_checkpoint: Callable[[Path], bool] | None) -> str | None:
    """`out` is or lies inside a training checkpoint, or holds one."""
    if is_checkpoint is None:
        is_checkpoint = lambda folder: (folder / "_CHECKPOINT_METADATA").exists()  # noqa: E731
    for folder in (out, *out.parents):
        if folder.is_dir() and is_checkpoint(folder):
            where = "is" if folder == out else f"lies inside {folder}, which is"
            return f"export to {out_dir}: it {where} a training checkpoint; {_NEVER}"
    if out.is_dir():
        for folder, _, _ in os.walk(out):
            if is_checkpoint(Path(folder)):
                return f"export to {out_dir}: it holds the training checkpoint {folder}; {_NEVER}"
    return None


def check_export_target(out_dir: str | os.PathLike, **kwargs) -> None:
    """Raises ExportTargetError when `export_target_problem` finds one."""
    problem = export_target_problem(out_dir, **kwargs)
    if problem:
        raise ExportTargetError(problem)


def parse_size(size: int | str) -> int:
    """Bytes of "5GB" (10^9), "500MiB" (2^20), "10KB", or an int."""
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*", size, flags=re.IGNORECASE)
    if not m:
        raise ValueError(f"max_shard_size={size!r}: expected e.g. '5GB', '500MiB' or a number of bytes")
    unit = (m.group(2) or "B").upper()
    scale = (
        {"B": 1}
        | {f"{p}B": 1000 ** (i + 1) for i, p in enumerate("KMGT")}
        | {f"{p}IB": 1024 ** (i + 1) for i, p in enumerate("KMGT")}
    )
    return int(float(m.group(1)) * scale[unit])


def to_host(x: jax.Array) -> np.ndarray:
    """The whole array on this host (gathered from every process when there are several)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(jax.device_get(x))


@contextlib.contextmanager
def atomic_dir(out_dir: Path) -> Iterator[Path]:
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


# One HF tensor, or the parts of a fused one, with what writes it: [(path, shape, value getter)].
_Unit = list[tuple[tuple, tuple[int, ...], Any]]


def _units(model: CausalLM) -> list[_Unit]:
    """The model's parameters as per-layer (path, shape, getter), in the order of an unstacked
    model's parameters, grouped into write units: the parts of a fused HF tensor together."""
    params: list[tuple[tuple, tuple[int, ...], Any]] = []
    vocab = model.config.vocab_size
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        names = var.get_metadata().get("out_sharding") or (None,) * len(var.shape)
        unpadded = tuple(slice(vocab) if n == "vocab" else slice(None) for n in names)  # no vocab padding
        shape = tuple(len(range(n)[s]) for n, s in zip(var.shape, unpadded))
        if is_stacked(path):
            for i, layer_path in enumerate(layer_paths(path, var.shape[0])):
                params.append((layer_path, shape[1:], lambda v=var, i=i, u=unpadded: v[...][u][i]))
        else:
            params.append((path, shape, lambda v=var, u=unpadded: v[...][u]))
    params.sort(key=lambda p: tuple((0, x) if isinstance(x, int) else (1, str(x)) for x in p[0]))
    units: dict[Any, _Unit] = {}
    for path, shape, get in params:
        names, entry = hf_names(model.config, path)
        units.setdefault(names.item() if entry.part is not None else path, []).append((path, shape, get))
    return list(units.values())


def _shards(units: list[_Unit], itemsize: int, limit: int) -> list[list[_Unit]]:
    """Units packed into shards of at most `limit` bytes (a larger unit gets a shard of its own),
    planned from shapes, before anything is gathered."""
    shards: list[list[_Unit]] = [[]]
    size = 0
    for unit in units:
        nbytes = sum(math.prod(shape) for _, shape, _ in unit) * itemsize
        if shards[-1] and size + nbytes > limit:
            shards.append([])
            size = 0
        shards[-1].append(unit)
        size += nbytes
    return shards


def _tensors(config: ModelConfig, unit: _Unit, np_dtype: np.dtype) -> dict[str, np.ndarray]:
    """The HF tensors of one unit (one per expert of expert weights; a fused tensor's parts
    concatenated in part order), gathered onto this host."""
    out, parts = {}, []
    for path, _, get in unit:
        names, entry = hf_names(config, path)
        value = to_host(get())
        if entry.part is not None:
            parts.append((entry.part, entry.layout.to_hf(value)))
            continue
        for index in np.ndindex(names.shape):
            out[names[index]] = entry.layout.to_hf(value[index]).astype(np_dtype)
    if parts:
        ordered = [v for _, v in sorted(parts, key=lambda p: p[0])]
        out[names.item()] = (interleave(ordered) if entry.interleaved else np.concatenate(ordered)).astype(np_dtype)
    return out


def save_pretrained(
    model: CausalLM,
    out_dir: str | os.PathLike,
    tokenizer=None,
    max_shard_size: int | str = "5GB",
    dtype=None,
    *,
    overwrite: bool = False,
    protected: tuple[str | os.PathLike, ...] = (),
    is_checkpoint: Callable[[Path], bool] | None = None,
) -> None:
    """Writes an HF folder that `transformers.AutoModelForCausalLM.from_pretrained` loads.

    dtype: of the written tensors; None = the checkpoint dtype named by the original
    config.json (`dtype`/`torch_dtype`), else the parameters' dtype.
    overwrite, protected, is_checkpoint: which existing `out_dir` may be replaced
    (`export_target_problem`).
    """
    check_export_target(out_dir, overwrite=overwrite, protected=protected, is_checkpoint=is_checkpoint)
    model = merge_lora(model)  # LoRA: the adapters folded into the weights
    config = model.config
    dtype_name = jnp.dtype(dtype or config.torch_dtype or model.param_dtype).name
    if dtype_name not in ("float32", "bfloat16", "float16"):
        raise ValueError(f"save_pretrained dtype={dtype_name}: use float32, bfloat16 or float16")
    np_dtype = np.dtype(jnp.dtype(dtype_name))
    shards = _shards(_units(model), np_dtype.itemsize, parse_size(max_shard_size))
    n = len(shards)
    file_names = [SAFE_WEIGHTS] if n == 1 else [f"model-{k + 1:05d}-of-{n:05d}.safetensors" for k in range(n)]
    writer = jax.process_index() == 0
    with atomic_dir(Path(out_dir)) if writer else contextlib.nullcontext() as tmp:
        weight_map, total = {}, 0
        for file, shard in zip(file_names, shards):
            tensors = {name: t for unit in shard for name, t in _tensors(config, unit, np_dtype).items()}
            weight_map.update(dict.fromkeys(tensors, file))
            total += sum(t.nbytes for t in tensors.values())
            if writer:
                save_file(tensors, str(tmp / file), metadata={"format": "pt"})
        if writer:
            _write_files(tmp, config, dtype_name, tokenizer, weight_map if n > 1 else None, total)


def _write_files(
    tmp: Path, config: ModelConfig, dtype_name: str, tokenizer, weight_map: dict | None, total: int
) -> None:
    """The index (when sharded), configs, tokenizer and marker of an export folder."""
    if weight_map is not None:
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
