"""Restoring a checkpoint whose vocabulary rows were padded for another tensor size.

A model on a mesh whose tensor axis does not divide its vocabulary pads the embedding and lm_head
rows to a multiple of the tensor size (`jax_sft.models.decoder`, `CausalLM.vocab_rows`), and its
checkpoints store those padded arrays as they are (parameters and AdamW moments alike). The
padding is never a token: its embedding rows are never looked up and its lm_head columns are
outside the softmax, so they get no gradient and carry no information. A run that resumes (or an
export or generation that reads the checkpoint) with another padding therefore reads each such
array zero-padded or cut to its own rows (Orbax's non-strict restore). Any other difference
between the stored shapes and the target's is refused (`ShapeMismatch`), before anything is read.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

from jax_sft.errors import InputError


class ShapeMismatch(InputError, ValueError):
    """A checkpoint's arrays do not have the shapes of the model that reads them."""


def _flat_shapes(tree: Any) -> dict[str, tuple[int, ...]]:
    def key(k) -> str:
        return str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k))))

    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]  # a Variable's array is under "value" in both
    return {"/".join(key(k) for k in path): tuple(x.shape) for path, x in leaves if hasattr(x, "shape")}


def vocab_resized(item_dir: Path, target: Any, vocab_size: int | None) -> bool:
    """Whether the arrays stored in `item_dir` (an Orbax item: params/ or opt_state/) differ from
    `target`'s (a pytree of jax.ShapeDtypeStruct) in vocabulary padding only: dims where both
    sizes are at least `vocab_size`. ShapeMismatch for any other difference."""
    with ocp.StandardCheckpointer() as reader:
        stored = _flat_shapes(reader.metadata(item_dir).item_metadata.tree)
    wanted = _flat_shapes(target)
    resized = False
    for path in sorted(stored.keys() & wanted.keys()):
        have, want = stored[path], wanted[path]
        if have == want:
            continue
        vocab_rows = vocab_size is not None and len(have) == len(want)
        vocab_rows = vocab_rows and all(a == b or min(a, b) >= vocab_size for a, b in zip(have, want))
        if not vocab_rows:
            raise ShapeMismatch(
                f"{item_dir}: array {path} has shape {have} but the model reading it needs {want}; "
                "the checkpoint is of another model"
            )
        resized = True
    return resized


def restore_args(item_dir: Path, target: Any, vocab_size: int | None) -> ocp.args.StandardRestore:
    """Orbax's restore arguments of an item into `target`, non-strict (zero-padding or cutting)
    exactly when its vocabulary rows were padded otherwise (`vocab_resized`)."""
    return ocp.args.StandardRestore(target, strict=not vocab_resized(item_dir, target, vocab_size))
