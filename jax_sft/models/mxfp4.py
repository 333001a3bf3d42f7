"""MXFP4 tensors of Hugging Face checkpoints (the hub's gpt-oss experts), dequantized on load.

An MXFP4 tensor `X` is stored as two: `X_blocks` [experts, rows, groups, 16] uint8, two 4-bit
values a byte (the low nibble first), and `X_scales` [experts, rows, groups] uint8, one power of
two per group of 32 values (exponent + 127). A 4-bit value indexes `FP4_VALUES` (e2m1: sign,
two exponent bits, one mantissa bit). Row r of expert e holds the values of X[e, :, r]: the
dequantized [experts, rows, groups * 32] is transposed to X's [experts, groups * 32, rows], as
transformers' `convert_moe_packed_tensors` does (gpt-oss's `gate_up_proj` [experts, hidden,
2 * intermediate] and `down_proj` [experts, intermediate, hidden]). Every MXFP4 value times its
scale is exact in bfloat16 and float32, so the dequantized tensor is exact in either.

`Mxfp4Slice` reads blocks of the dequantized tensor lazily (only the groups a block needs), with
the `get_shape` / indexing interface of a safetensors slice.
"""

from __future__ import annotations

import numpy as np

from jax_sft.models.errors import CheckpointError

FP4_VALUES = np.array(
    [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0], np.float32
)
BLOCKS, SCALES = "_blocks", "_scales"


def dequantize(blocks: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """[..., groups, B] uint8 blocks and [..., groups] uint8 scales -> float32 [..., groups * 2B]
    (not transposed)."""
    blocks = np.asarray(blocks, np.uint8)
    values = np.empty((*blocks.shape[:-1], 2 * blocks.shape[-1]), np.float32)
    values[..., 0::2] = FP4_VALUES[blocks & 0x0F]
    values[..., 1::2] = FP4_VALUES[blocks >> 4]
    exponents = np.asarray(scales, np.int32) - 127
    out = np.ldexp(values, exponents[..., None])
    return out.reshape(*out.shape[:-2], -1)


class Mxfp4Slice:
    """The dequantized, transposed view [experts, groups * 32, rows] of an MXFP4 pair (see the
    module docstring); `name` names the tensor in errors."""

    def __init__(self, name: str, blocks, scales):
        b_shape, s_shape = tuple(blocks.get_shape()), tuple(scales.get_shape())
        if len(b_shape) != 4 or b_shape[:-1] != s_shape:
            raise CheckpointError(
                f"MXFP4 tensor {name}: {name}{BLOCKS} {b_shape} and {name}{SCALES} {s_shape} must be "
                "[experts, rows, groups, bytes] and [experts, rows, groups]"
            )
        self.blocks, self.scales = blocks, scales
        self.group = 2 * b_shape[-1]  # values per group
        self.shape = (b_shape[0], b_shape[2] * self.group, b_shape[1])

    def get_shape(self) -> list[int]:
        return list(self.shape)

    def __getitem__(self, index: tuple[slice, ...]) -> np.ndarray:
        experts, cols, rows = (s.indices(n) for s, n in zip(index, self.shape))
        if experts[2] != 1 or cols[2] != 1 or rows[2] != 1:
            raise ValueError(f"strided index {index} is not supported")
        g0, g1 = cols[0] // self.group, -(-cols[1] // self.group)
        e, r = slice(*experts[:2]), slice(*rows[:2])
        values = dequantize(self.blocks[e, r, g0:g1, :], self.scales[e, r, g0:g1])  # [e, r, (g1 - g0) * group]
        start = cols[0] - g0 * self.group
        return np.swapaxes(values[..., start : start + cols[1] - cols[0]], 1, 2)
