"""How a jax parameter is stored in Hugging Face safetensors: its HF tensor name(s) and layout.

A family's weight table (`jax_sft.models.families`) maps each jax parameter path ("{i}" = layer,
"{j}" = expert) to an `HfTensor`: the HF name, the `TensorLayout` and, for a fused HF tensor
(Phi-3's `qkv_proj`, `gate_up_proj`), which part of it the parameter is. The parts of a fused
tensor are consecutive blocks of its dim 0 (HF's output dimension), in part order; a block's size
is its parameter's size along that dimension. With `interleaved` the parts alternate element by
element along the HF tensor's last dim instead (gpt-oss's `gate_up_proj`: gate at the even
indices, up at the odd ones).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

# A layout says how a jax parameter is laid out relative to the HF tensor: consecutive jax dims
# in one group form one HF dim (row-major), and "transposed" swaps the two HF dims
# (HF Linear stores [out, in]; jax kernels are [in, out]).


@dataclass(frozen=True)
class TensorLayout:
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


SAME = TensorLayout(None)
LINEAR = TensorLayout(((0,), (1,)), transposed=True)  # [out, in] -> [in, out]
IN_HEADS = TensorLayout(((0,), (1, 2)), transposed=True)  # [heads*d, in] -> [in, heads, d]
HEADS = TensorLayout(((0, 1),))  # [heads*d] -> [heads, d]
OUT_HEADS = TensorLayout(((0, 1), (2,)), transposed=True)  # [out, heads*d] -> [heads, d, out]


class HfTensor(NamedTuple):
    """One entry of a weight table: the HF tensor name (with "{i}", "{j}"), the layout and, for a
    fused tensor, the index of this parameter's block along HF dim 0 (None: the whole tensor), or
    with `interleaved` its index among the parts that alternate along the last dim."""

    name: str
    layout: TensorLayout
    part: int | None = None
    interleaved: bool = False


class FusedRows:
    """A safetensors slice seen as rows [start, start + rows) of its dim 0 (one part of a fused
    tensor), with the `get_shape` / indexing interface `TensorLayout.read` uses."""

    def __init__(self, hf_slice, start: int, rows: int):
        self.hf_slice, self.start, self.rows = hf_slice, start, rows

    def get_shape(self) -> list[int]:
        return [self.rows, *list(self.hf_slice.get_shape())[1:]]

    def __getitem__(self, index: tuple[slice, ...]) -> np.ndarray:
        first, *rest = index
        lo, hi, step = first.indices(self.rows)
        return self.hf_slice[(slice(self.start + lo, self.start + hi, step), *rest)]


class InterleavedPart:
    """A safetensors slice seen as part `part` of `parts` that alternate element by element along
    its last dim (elements part, part + parts, ...), with the `get_shape` / indexing interface of
    `TensorLayout.read`."""

    def __init__(self, hf_slice, part: int, parts: int):
        self.hf_slice, self.part, self.parts = hf_slice, part, parts

    def get_shape(self) -> list[int]:
        *lead, last = list(self.hf_slice.get_shape())
        return [*lead, last // self.parts]

    def __getitem__(self, index: tuple[slice, ...]) -> np.ndarray:
        *lead, last = index
        lo, hi, step = last.indices(self.get_shape()[-1])
        block = self.hf_slice[(*lead, slice(lo * self.parts, hi * self.parts))]
        return block[..., self.part :: self.parts][..., ::step]


def interleave(parts: list[np.ndarray]) -> np.ndarray:
    """The HF tensor of interleaved `parts` (in part order), alternating along the last dim."""
    stacked = np.stack(parts, axis=-1)
    return stacked.reshape(*stacked.shape[:-2], -1)
