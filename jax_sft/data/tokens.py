"""Examples as token ids and loss masks: the token cache of `data.tokenize=upfront`
(`tokenize_split` -> `TokenizedSplit`, flat int32 / uint8 arrays, encoded in `data.num_workers`
Grain worker processes) and the lazy view of `data.tokenize=lazy` (`LazySplit`, encoded when a step
asks), both applying `data.overlength` and the no-loss rule the same way.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import time
from collections.abc import Callable, Iterator, Sequence

import grain
import numpy as np
from absl import flags as absl_flags

from jax_sft.choices import OVERLENGTH
from jax_sft.data.chat import ConversationEncoder
from jax_sft.data.readers import Place
from jax_sft.errors import DataError

log = logging.getLogger(__name__)

__all__ = [
    "TokenizedSplit",
    "LazySplit",
    "tokenize_split",
    "apply_overlength",
    "check_rows",
    "dataset_place",
    "read_rows",
    "start_workers",
]


@dataclasses.dataclass
class TokenizedSplit:
    """Examples of one split as flat arrays: example i is tokens[starts[i]:starts[i+1]] (int32)
    with loss[...] (uint8, 1: the token is a training target); source[i] is its index in the split."""

    tokens: np.ndarray
    loss: np.ndarray
    starts: np.ndarray
    source: np.ndarray

    def __len__(self) -> int:
        return len(self.starts) - 1

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.starts)

    def example(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        s, e = self.starts[i], self.starts[i + 1]
        return self.tokens[s:e], self.loss[s:e]

    def examples(self, positions: Sequence[int]) -> list[tuple[np.ndarray, np.ndarray] | None]:
        return [self.example(int(p)) for p in positions]

    def sources(self, positions: Sequence[int]) -> np.ndarray:
        return self.source[np.asarray(positions, np.int64)]


class LazySplit:
    """A split encoded when its examples are asked for (`data.tokenize=lazy`): nothing is held but
    the rows (memory-mapped Arrow tables stay on disk). `examples(indices)` encodes rows[indices]
    with `data.overlength` and the no-loss rule applied; a dropped or skipped example is None.
    Picklable (Grain workers get a copy)."""

    def __init__(
        self,
        rows,
        encoder: ConversationEncoder,
        place: Callable[[int], str],
        *,
        max_length: int,
        overlength: str,
        skip_without_loss: bool,
    ):
        if overlength not in OVERLENGTH:
            raise ValueError(f"data.overlength={overlength!r}: expected one of {OVERLENGTH}")
        self.rows, self.encoder, self.place = rows, encoder, place
        self.max_length, self.overlength, self.skip_without_loss = max_length, overlength, skip_without_loss

    def __len__(self) -> int:
        return len(self.rows)

    def examples(self, indices: Sequence[int]) -> list[tuple[np.ndarray, np.ndarray] | None]:
        indices = [int(i) for i in indices]
        encoded = self.encoder.encode(
            read_rows(self.rows, indices, self.place), [Place(self.place, i) for i in indices]
        )
        out = []
        for i, e in zip(indices, encoded):
            ids, loss, status = apply_overlength(e.ids, e.loss, self.max_length, self.overlength)
            keep = ids is not None and _has_loss(loss, status, self.skip_without_loss, self.place, i, self.max_length)
            out.append((ids, loss) if keep else None)
        return out

    def sources(self, indices: Sequence[int]) -> np.ndarray:
        return np.asarray(indices, np.int64)


def read_rows(rows, indices: Sequence[int], place: Callable[[int], str]) -> list:
    """rows[i] for i in indices; a row holding bytes that are not UTF-8 (Arrow decodes strings when a
    row is read) is a DataError naming it."""
    try:
        return [rows[i] for i in indices]
    except UnicodeDecodeError:
        for i in indices:
            try:
                rows[i]
            except UnicodeDecodeError as e:
                raise DataError(
                    f"{place(i)}: bytes that are not UTF-8 ({e.object[e.start : e.end]!r}); text data must be UTF-8"
                ) from None
        raise


class _CheckChunk:
    """Grain map: positions in `indices` -> the errors (one message each) of encoding those rows as
    training does (`LazySplit.examples`)."""

    def __init__(self, split: LazySplit, indices: np.ndarray):
        self.split, self.indices = split, indices

    def __call__(self, chunk: Sequence[int]) -> list[str]:
        idx = [int(self.indices[p]) for p in chunk]
        try:
            self.split.examples(idx)
            return []
        except DataError:
            errors = []
            for i in idx:  # which ones
                try:
                    self.split.examples([i])
                except DataError as e:
                    errors.append(str(e))
            return errors


def check_rows(split: LazySplit, indices: np.ndarray, *, num_workers: int = 0, chunk_size: int = 64) -> Iterator[str]:
    """The error message of every row of `split` at `indices` that fails to encode as training
    encodes it (template, tokens, `data.overlength`, the no-loss rule), in order; the work runs in
    `num_workers` Grain worker processes (0: in-process). What `--validate_data` runs."""
    ds = grain.MapDataset.range(len(indices)).batch(chunk_size, batch_fn=list).map(_CheckChunk(split, indices))
    it = ds.to_iter_dataset(grain.ReadOptions(num_threads=0, prefetch_buffer_size=1))
    if num_workers > 0:
        it = start_workers(it, num_workers)
    iterator = iter(it)
    try:
        for errors in iterator:
            yield from errors
    finally:
        iterator.close()


def _has_loss(
    loss: np.ndarray, status: str, skip: bool, place: Callable[[int], str], index: int, max_length: int
) -> bool:
    """Whether an example that was not dropped is kept: it has a loss token (or was masked by
    `data.overlength=mask`); without one it is skipped when `skip`, else a DataError naming it."""
    if status == "masked" or loss.any():
        return True
    if not skip:
        why = f" after truncation to {max_length} tokens" if status == "truncated" else ""
        raise DataError(
            f"{place(index)}: no token to train on{why} (no assistant message is trained); fix the "
            "example or set data.skip_examples_without_loss=true to skip and count such examples"
        )
    return False


def apply_overlength(ids: np.ndarray, loss: np.ndarray, max_length: int, mode: str):
    """(ids, loss, status) for an example under `data.overlength`: "truncate" keeps the first
    max_length tokens; "drop" returns None ids; "mask" keeps the first max_length tokens with no
    loss (NeMo RL's behaviour: the example is kept, loss zero). status: "ok", "truncated",
    "dropped" or "masked"."""
    if len(ids) <= max_length:
        return ids, loss, "ok"
    if mode == "truncate":
        return ids[:max_length], loss[:max_length], "truncated"
    if mode == "drop":
        return None, None, "dropped"
    if mode == "mask":
        return ids[:max_length], np.zeros(max_length, np.uint8), "masked"
    raise ValueError(f"data.overlength={mode!r}: expected one of {OVERLENGTH}")


class _EncodeChunk:
    """Grain map: positions in `indices` -> (lengths, ids bytes, loss bytes) of their encodings.

    Bytes rather than arrays: Grain would move each array of a worker's output through its own
    shared-memory block."""

    def __init__(self, rows, indices: np.ndarray, encoder: ConversationEncoder, place: Callable[[int], str]):
        self.rows, self.indices, self.encoder, self.place = rows, indices, encoder, place

    def __call__(self, chunk: Sequence[int]) -> tuple[list[int], bytes, bytes]:
        idx = [int(self.indices[p]) for p in chunk]
        encoded = self.encoder.encode(read_rows(self.rows, idx, self.place), [Place(self.place, i) for i in idx])
        return (
            [len(e.ids) for e in encoded],
            b"".join(e.ids.astype(np.int32).tobytes() for e in encoded),
            b"".join(e.loss.astype(np.uint8).tobytes() for e in encoded),
        )


def _unpack_chunk(chunk: tuple[list[int], bytes, bytes]) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    lengths, ids, loss = chunk
    ids, loss = np.frombuffer(ids, np.int32), np.frombuffer(loss, np.uint8)
    offset = 0
    for n in lengths:
        yield ids[offset : offset + n], loss[offset : offset + n]
        offset += n


def tokenize_split(
    rows,
    indices: np.ndarray,
    encoder: ConversationEncoder,
    *,
    split: str,
    max_length: int,
    overlength: str,
    skip_without_loss: bool,
    num_workers: int = 0,
    chunk_size: int = 64,
    place: Callable[[int], str] | None = None,
) -> tuple[TokenizedSplit, dict[str, int]]:
    """Encodes rows[indices] into a TokenizedSplit, applying `data.overlength` and the no-loss rule
    (a conversation without a loss token is an error naming it, or skipped and counted when
    `skip_without_loss`). `place(i)` names row i in errors (default "<split> row i").
    Returns (split, counts)."""
    if overlength not in OVERLENGTH:
        raise ValueError(f"data.overlength={overlength!r}: expected one of {OVERLENGTH}")
    place = place or functools.partial(_row_place, split)
    ds = grain.MapDataset.range(len(indices)).batch(chunk_size, batch_fn=list)
    ds = ds.map(_EncodeChunk(rows, indices, encoder, place))
    it = ds.to_iter_dataset(grain.ReadOptions(num_threads=0, prefetch_buffer_size=1))
    if num_workers == 0 and len(indices) > 100_000:
        log.warning(
            "%s: tokenising %d examples in one process; set data.num_workers to use more cores", split, len(indices)
        )
    if num_workers > 0:
        it = start_workers(it, num_workers)
    t0 = time.perf_counter()
    kept, counts = _collect(it, indices, max_length, overlength, skip_without_loss, place)
    tokens, losses, source = kept
    lengths = [len(ids) for ids in tokens]
    counts.update(kept=len(lengths), tokens=int(sum(lengths)), loss_tokens=int(sum(int(x.sum()) for x in losses)))
    dt = time.perf_counter() - t0
    log.info(
        "%s: tokenised %d examples, %d tokens in %.1f s (%.0f tokens/s)",
        split,
        len(indices),
        counts["tokens"],
        dt,
        counts["tokens"] / max(dt, 1e-9),
    )
    starts = np.zeros(len(lengths) + 1, np.int64)
    np.cumsum(lengths, out=starts[1:])
    split_arrays = TokenizedSplit(
        _concat(tokens, np.int32), _concat(losses, np.uint8), starts, np.asarray(source, np.int64)
    )
    return split_arrays, counts


def _collect(
    it: grain.IterDataset,
    indices: np.ndarray,
    max_length: int,
    overlength: str,
    skip_without_loss: bool,
    place: Callable[[int], str],
) -> tuple[tuple[list, list, list], dict[str, int]]:
    """((ids, loss, source index) lists of the kept examples, counts) of the encoded chunks of `it`,
    with `data.overlength` and the no-loss rule applied, in order."""
    counts = dict(examples=len(indices), kept=0, truncated=0, dropped=0, masked=0, skipped=0, tokens=0, loss_tokens=0)
    tokens, losses, source = [], [], []
    position, iterator = 0, iter(it)
    try:
        for chunk in iterator:
            for ids, loss in _unpack_chunk(chunk):
                index = int(indices[position])
                position += 1
                ids, loss, status = apply_overlength(ids, loss, max_length, overlength)
                if status != "ok":
                    counts[status] += 1
                if ids is None:
                    continue
                if not _has_loss(loss, status, skip_without_loss, place, index, max_length):
                    counts["skipped"] += 1
                    continue
                tokens.append(ids)
                losses.append(loss)
                source.append(index)
    finally:
        iterator.close()  # stops the worker processes
    return (tokens, losses, source), counts


def _row_place(split: str, index: int) -> str:
    return f"{split} row {index}"


def dataset_place(dataset, split: str) -> Callable[[int], str]:
    """place(i): where row i of `split` of a built dataset comes from (file and line where known)."""
    if callable(getattr(dataset, "place", None)):
        return functools.partial(dataset.place, split)
    return functools.partial(_row_place, f"{type(dataset).__name__} {split}")


def _concat(arrays: list[np.ndarray], dtype) -> np.ndarray:
    return np.concatenate(arrays).astype(dtype, copy=False) if arrays else np.zeros(0, dtype)


def start_workers(it: grain.IterDataset, workers: int) -> grain.IterDataset:
    """`it` computed in `workers` Grain worker processes, in order (Grain reads its absl flags when
    it starts them, so they are marked parsed when no program parsed them)."""
    if not absl_flags.FLAGS.is_parsed():
        absl_flags.FLAGS.mark_as_parsed()
    return it.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers, per_worker_buffer_size=2))
