"""jax parameter paths <-> Hugging Face safetensors names, through the family's weight table.

A mixture-of-experts weight is one jax parameter [experts, ...] and one HF tensor per expert
(`...experts.{j}.gate_proj.weight`). With `scan_layers` a layer parameter is stacked
([num_layers, ...], path `layers.<name>`): it maps to the per-layer HF tensors
(`model.layers.{i}.<name>`), so the files are the same either way. A fused HF tensor (Phi-3's
`qkv_proj`) holds several jax parameters as consecutive blocks of its dim 0 (`HfTensor.part`), or
interleaved along its last dim (gpt-oss's `gate_up_proj`, `HfTensor.interleaved`). gpt-oss's
expert tensors are one per layer ([experts, ...], no "{j}").
"""

from __future__ import annotations

import re

import numpy as np

from jax_sft.models.config import ModelConfig
from jax_sft.models.registry import family_of
from jax_sft.models.weights import HfTensor

SAFE_WEIGHTS = "model.safetensors"
SAFE_INDEX = "model.safetensors.index.json"


def is_stacked(path: tuple) -> bool:
    """Whether `path` is a stacked ([num_layers, ...]) layer parameter of a scan_layers model."""
    return len(path) > 1 and path[0] == "layers" and not isinstance(path[1], int) and not str(path[1]).isdigit()


def layer_paths(path: tuple, num_layers: int) -> list[tuple]:
    """The per-layer paths of a parameter: [path] as is, one per layer when stacked."""
    if not is_stacked(path):
        return [path]
    return [("layers", i, *path[1:]) for i in range(num_layers)]


def hf_tensor(config: ModelConfig, path: tuple) -> HfTensor:
    """The HF tensor of the (per-layer) jax parameter at `path` (an nnx state path), its layer
    filled in ("{j}" left for experts)."""
    key = ".".join(str(p) for p in path)
    template = re.sub(r"^layers\.(\d+)\.", "layers.{i}.", key)
    entry = family_of(config.architecture).weights.get(template)
    if entry is None:
        raise KeyError(f"no HF name for parameter {key} ({config.architecture})")
    layer = re.match(r"^layers\.(\d+)\.", key)
    return entry._replace(name=entry.name.format(i=layer.group(1) if layer else "", j="{j}"))


def hf_names(config: ModelConfig, path: tuple) -> tuple[np.ndarray, HfTensor]:
    """The HF tensors of the parameter at `path`: an object array of names whose shape is the
    parameter's leading stacked dims ([layers] when scan-stacked, [experts] for expert weights,
    both, or none), and the entry of its (first) tensor (layout and fused part)."""
    grid, entry = [], None
    for layer_path in layer_paths(path, config.num_layers):
        entry = hf_tensor(config, layer_path)
        name = entry.name
        grid.append([name.format(j=j) for j in range(config.num_experts)] if "{j}" in name else name)
    return np.array(grid if is_stacked(path) else grid[0], dtype=object), entry


def fused_projections(config: ModelConfig) -> frozenset[str]:
    """The projections ("q_proj", ...) whose kernels a fused HF tensor holds with other projections'
    in this family (Phi-3's qkv_proj). A projection stored as blocks of its own HF tensor
    (Mamba-2's in_proj: kernel_z, kernel_x, ...) is one module, one adapter, and not listed."""
    weights = family_of(config.architecture).weights
    return frozenset(key.split(".")[-2] for key, t in weights.items() if t.part is not None and key.endswith(".kernel"))
