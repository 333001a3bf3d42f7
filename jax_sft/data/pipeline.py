"""From formatted conversations to device-ready batches, with Grain.

`data.tokenize=upfront` (default): construction (`SFTData`) templates, tokenises and loss-masks this
process's share of both splits once, into flat int32/uint8 arrays (the cache), so that bad input
fails at start-up and the training loop only gathers, packs and pads; the work runs in
`data.num_workers` Grain worker processes (`mp_prefetch`; 0: in-process). `data.tokenize=lazy`:
construction encodes nothing; each step encodes its own examples when it is assembled (in the
workers, ahead of the training loop), so start-up time and memory do not depend on the dataset's
size (bench/data_scale.py) and a bad row fails when its step is reached, naming its file and line
(`python -m jax_sft.inspect_data --validate_data` checks every row beforehand). Both give the same
batches, except that a lazily dropped or skipped example leaves its step one sequence short
instead of being taken out of its shard. One core does the whole pipeline at a few hundred
thousand tokens per second (bench/data_pipeline.py), far beyond what a training step consumes.

The iterator state is the index of the next step (and what the stream depends on): the same on
every process, so a run resumes on any number of processes and devices.

Sharding does not depend on the device layout, so that a step's sequences are the same on one
device, on a mesh of any data-parallel size and over any number of processes. The train split is
cut into G = train_global_batch_size shards: a seeded permutation of the examples (the identity
with `data.shuffle=false`) dealt out round-robin, so shard j holds the examples at permuted
positions j, j + G, ... Each step takes one example of every shard, in an order that a seeded
Grain shuffle of each shard makes different every epoch; an epoch has as many steps as the
smallest shard has examples (NeMo RL drops the last partial batch too). Data-parallel rank r of
dp supplies shards [r G/dp, (r+1) G/dp), and a process tokenises only the examples of the shards
of its ranks (`dp_ranks`). Validation is cut likewise into val_global_batch_size shards without
permutation, so that validation batch b is examples [b Gv, (b+1) Gv) as in NeMo RL.

Rows have fixed length `seq` = max_total_sequence_length rounded up to
make_sequence_length_divisible_by, so that the train step compiles once. Arrays of a micro-batch,
all int32 [rows, seq]:

  input_ids    token ids; padding: the tokenizer's pad id (eos when it has none)
  targets      targets[i] = input_ids[i + 1] within a segment; pad id at a segment's last token
  loss_mask    1 where targets[i] is a training target
  segment_ids  1, 2, ... for the sequences packed in a row (1 unpacked); 0 on padding
  positions    0, 1, ... within each segment; 0 on padding

A micro-batch holds `train_micro_batch_size` rows of each local rank, rank after rank (the order
of the rows of the global array). Padded rows: one sequence per row. Packed rows
(`policy.sequence_packing.enabled`): each rank packs its own sequences of the step into rows
(first fit / best fit), `train_mb_tokens // seq` rows per rank per micro-batch; the number of
micro-batches per step varies (and may differ between processes: see `pad_micro_batches`).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import grain
import numpy as np
from absl import flags as absl_flags

from jax_sft.data.chat import ConversationEncoder
from jax_sft.distributed import allgather_ints
from jax_sft.errors import DataError
from jax_sft.data.datasets import Place, SFTDataset
from jax_sft.data.layout import build_dataset

log = logging.getLogger(__name__)

__all__ = ["SFTData", "StepBatch", "TrainIterator", "TokenizedSplit", "Layout", "tokenize_split",
           "apply_overlength", "dataset_place", "pack", "fill_rows", "pad_micro_batches", "ARRAY_KEYS", "OVERLENGTH", "PACKING"]

ARRAY_KEYS = ("input_ids", "targets", "loss_mask", "segment_ids", "positions")
OVERLENGTH = ("truncate", "drop", "mask")
PACKING = ("modified_first_fit_decreasing", "first_fit_decreasing", "first_fit", "best_fit")
_STATE_VERSION = 2
TOKENIZE = ("upfront", "lazy")
_ENDLESS = 2**62  # steps of the stream (epochs repeat)
NO_VALIDATION = ("sft.val_period={}: expected 0 when there is no validation data (data.validation is null and no "
                 "train dataset carves a split with split_validation_size), as NeMo RL requires; or give validation "
                 "data")


# ----------------------------------------------------------------------------- the token cache


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

    def __init__(self, rows, encoder: ConversationEncoder, place: Callable[[int], str], *, max_length: int,
                 overlength: str, skip_without_loss: bool):
        if overlength not in OVERLENGTH:
            raise ValueError(f"data.overlength={overlength!r}: expected one of {OVERLENGTH}")
        self.rows, self.encoder, self.place = rows, encoder, place
        self.max_length, self.overlength, self.skip_without_loss = max_length, overlength, skip_without_loss

    def __len__(self) -> int:
        return len(self.rows)

    def examples(self, indices: Sequence[int]) -> list[tuple[np.ndarray, np.ndarray] | None]:
        indices = [int(i) for i in indices]
        encoded = self.encoder.encode([self.rows[i] for i in indices], [Place(self.place, i) for i in indices])
        out = []
        for i, e in zip(indices, encoded):
            ids, loss, status = apply_overlength(e.ids, e.loss, self.max_length, self.overlength)
            keep = ids is not None and _has_loss(loss, status, self.skip_without_loss, self.place, i, self.max_length)
            out.append((ids, loss) if keep else None)
        return out

    def sources(self, indices: Sequence[int]) -> np.ndarray:
        return np.asarray(indices, np.int64)


def _has_loss(loss: np.ndarray, status: str, skip: bool, place: Callable[[int], str], index: int,
              max_length: int) -> bool:
    """Whether an example that was not dropped is kept: it has a loss token (or was masked by
    `data.overlength=mask`); without one it is skipped when `skip`, else a DataError naming it."""
    if status == "masked" or loss.any():
        return True
    if not skip:
        why = f" after truncation to {max_length} tokens" if status == "truncated" else ""
        raise DataError(f"{place(index)}: no token to train on{why} (no assistant message is trained); fix the "
                        "example or set data.skip_examples_without_loss=true to skip and count such examples")
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
        encoded = self.encoder.encode([self.rows[i] for i in idx], [Place(self.place, i) for i in idx])
        return ([len(e.ids) for e in encoded], b"".join(e.ids.astype(np.int32).tobytes() for e in encoded),
                b"".join(e.loss.astype(np.uint8).tobytes() for e in encoded))


def _unpack_chunk(chunk: tuple[list[int], bytes, bytes]) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    lengths, ids, loss = chunk
    ids, loss = np.frombuffer(ids, np.int32), np.frombuffer(loss, np.uint8)
    offset = 0
    for n in lengths:
        yield ids[offset:offset + n], loss[offset:offset + n]
        offset += n


def tokenize_split(rows, indices: np.ndarray, encoder: ConversationEncoder, *, split: str, max_length: int,
                   overlength: str, skip_without_loss: bool, num_workers: int = 0,
                   chunk_size: int = 64, place: Callable[[int], str] | None = None
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
        log.warning("%s: tokenising %d examples in one process; set data.num_workers to use more cores",
                    split, len(indices))
    if num_workers > 0:
        if not absl_flags.FLAGS.is_parsed():  # Grain reads its absl flags when it starts workers
            absl_flags.FLAGS.mark_as_parsed()
        it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers, per_worker_buffer_size=2))
    counts = dict(examples=len(indices), kept=0, truncated=0, dropped=0, masked=0, skipped=0, tokens=0,
                  loss_tokens=0)
    tokens, losses, lengths, source = [], [], [], []
    t0, position = time.perf_counter(), 0
    iterator = iter(it)
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
                lengths.append(len(ids))
                source.append(index)
    finally:
        iterator.close()  # stops the worker processes
    counts["kept"] = len(lengths)
    counts["tokens"] = int(sum(lengths))
    counts["loss_tokens"] = int(sum(int(loss.sum()) for loss in losses))
    dt = time.perf_counter() - t0
    log.info("%s: tokenised %d examples, %d tokens in %.1f s (%.0f tokens/s)", split, len(indices),
             counts["tokens"], dt, counts["tokens"] / max(dt, 1e-9))
    starts = np.zeros(len(lengths) + 1, np.int64)
    np.cumsum(lengths, out=starts[1:])
    return TokenizedSplit(_concat(tokens, np.int32), _concat(losses, np.uint8), starts,
                          np.asarray(source, np.int64)), counts


def _row_place(split: str, index: int) -> str:
    return f"{split} row {index}"


def dataset_place(dataset, split: str) -> Callable[[int], str]:
    """place(i): where row i of `split` of a built dataset comes from (file and line where known)."""
    if callable(getattr(dataset, "place", None)):
        return functools.partial(dataset.place, split)
    return functools.partial(_row_place, f"{type(dataset).__name__} {split}")


def _concat(arrays: list[np.ndarray], dtype) -> np.ndarray:
    return np.concatenate(arrays).astype(dtype, copy=False) if arrays else np.zeros(0, dtype)


# ----------------------------------------------------------------------------- packing and rows


def pack(lengths: Sequence[int], capacity: int, algorithm: str) -> list[list[int]]:
    """Bins (lists of item indices) of total length <= capacity. "first_fit": items in order, each
    into the first bin with room; "first_fit_decreasing" and "modified_first_fit_decreasing" (NeMo
    RL's default name; MFFD's pairing refinement is not implemented): first fit, longest first;
    "best_fit": longest first, each into the fullest bin with room.

    (Grain's FirstFit/BestFitPackIterDataset pack a stream into a rolling set of bins that spans
    step boundaries; an optimizer step here packs exactly its own sequences, hence this function.)"""
    if algorithm not in PACKING:
        raise ValueError(f"policy.sequence_packing.algorithm={algorithm!r}: expected one of {PACKING}")
    lengths = np.asarray(lengths, np.int64)
    if len(lengths) and lengths.max() > capacity:
        raise ValueError(f"a sequence of {lengths.max()} tokens does not fit a row of {capacity}")
    order = range(len(lengths)) if algorithm == "first_fit" else np.argsort(-lengths, kind="stable")
    free = np.zeros(0, np.int64)
    bins: list[list[int]] = []
    for i in order:
        n = lengths[i]
        fits = np.flatnonzero(free >= n)
        if len(fits) == 0:
            bins.append([int(i)])
            free = np.append(free, capacity - n)
            continue
        b = fits[np.argmin(free[fits])] if algorithm == "best_fit" else fits[0]
        bins[b].append(int(i))
        free[b] -= n
    return bins


def fill_rows(rows: Sequence[Sequence[tuple[np.ndarray, np.ndarray]]], num_rows: int, seq_len: int,
              pad_id: int) -> dict[str, np.ndarray]:
    """The arrays (int32 [num_rows, seq_len], see the module docstring) of `rows`, each a list of
    (ids, loss) sequences laid end to end; rows beyond len(rows) are padding."""
    out = {k: np.zeros((num_rows, seq_len), np.int32) for k in ARRAY_KEYS}
    out["input_ids"].fill(pad_id)
    out["targets"].fill(pad_id)
    arange = np.arange(seq_len, dtype=np.int32)
    for r, row in enumerate(rows):
        o = 0
        for segment, (ids, loss) in enumerate(row, start=1):
            n = len(ids)
            if o + n > seq_len:
                raise ValueError(f"row {r}: {o + n} tokens do not fit a row of {seq_len}")
            out["input_ids"][r, o:o + n] = ids
            out["targets"][r, o:o + n - 1] = ids[1:]
            out["loss_mask"][r, o:o + n - 1] = loss[1:]
            out["segment_ids"][r, o:o + n] = segment
            out["positions"][r, o:o + n] = arange[:n]
            o += n
    return out


@dataclasses.dataclass(frozen=True)
class Layout:
    """How sequences become micro-batches on this process (all counts derived from the config).

    Data is sharded by data-parallel rank, not by process: rank r of `dp_size` owns train examples
    r, r + dp_size, ... and supplies `rank_batch` of them per step; this process supplies the
    ranks `dp_ranks` (ascending, as its rows appear in the global arrays). The global batches are
    therefore the same whatever the number of processes.
    """

    seq_len: int  # row length
    max_length: int  # over-length threshold (data.max_input_seq_length)
    pad_id: int
    global_batch: int  # sequences per optimizer step, all ranks
    dp_size: int
    dp_ranks: tuple[int, ...]  # the data-parallel ranks whose rows this process supplies
    rank_batch: int  # sequences per step of one rank
    rank_rows: int  # rows of one micro-batch of one rank
    packing: bool
    algorithm: str
    val_global_batch: int
    val_rank_batch: int  # validation sequences per batch of one rank
    val_rank_rows: int  # rows of one validation micro-batch of one rank

    @property
    def local_batch(self) -> int:
        return self.rank_batch * len(self.dp_ranks)

    @property
    def rows_per_micro_batch(self) -> int:  # local rows
        return self.rank_rows * len(self.dp_ranks)

    @classmethod
    def from_config(cls, cfg, tokenizer, dp_size: int, dp_ranks: Sequence[int]) -> Layout:
        policy, sft = cfg.policy, cfg.sft
        divisible = policy.get("make_sequence_length_divisible_by") or 1
        seq_len = -(-policy.max_total_sequence_length // divisible) * divisible
        max_length = cfg.data.get("max_input_seq_length") or policy.max_total_sequence_length
        if max_length > seq_len:
            raise ValueError(f"data.max_input_seq_length={max_length} exceeds the row length {seq_len} "
                             "(policy.max_total_sequence_length rounded up to make_sequence_length_divisible_by)")
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        if pad_id is None:
            raise ValueError(f"tokenizer {tokenizer.name_or_path!r} has neither a pad nor an eos token to pad with")
        dp_ranks = tuple(int(r) for r in dp_ranks)
        if dp_size < 1 or not dp_ranks or list(dp_ranks) != sorted(set(dp_ranks)) \
                or not all(0 <= r < dp_size for r in dp_ranks):
            raise ValueError(f"dp_size={dp_size}, dp_ranks={dp_ranks}: expected dp_size >= 1 and distinct "
                             "ascending ranks in [0, dp_size)")
        G, mbs = policy.train_global_batch_size, policy.train_micro_batch_size
        if G % (mbs * dp_size):
            raise ValueError(f"policy.train_global_batch_size={G} must be a multiple of train_micro_batch_size "
                             f"* dp_size = {mbs} * {dp_size}")
        packing = bool(policy.sequence_packing.enabled)
        rank_rows = mbs
        if packing:
            mb_tokens = policy.sequence_packing.get("train_mb_tokens") or policy.max_total_sequence_length * mbs
            rank_rows = mb_tokens // seq_len
            if rank_rows < 1:
                raise ValueError(f"policy.sequence_packing.train_mb_tokens={mb_tokens} is less than one row of "
                                 f"{seq_len} tokens")
        Gv, vmbs = sft.val_global_batch_size, sft.val_micro_batch_size
        if Gv % (vmbs * dp_size):
            raise ValueError(f"sft.val_global_batch_size={Gv} must be a multiple of val_micro_batch_size * dp_size "
                             f"= {vmbs} * {dp_size}")
        algorithm = policy.sequence_packing.get("algorithm") or "first_fit_decreasing"
        if packing and algorithm not in PACKING:
            raise ValueError(f"policy.sequence_packing.algorithm={algorithm!r}: expected one of {PACKING}")
        return cls(seq_len, max_length, int(pad_id), G, dp_size, dp_ranks, G // dp_size, rank_rows, packing,
                   algorithm, Gv, Gv // dp_size, vmbs)


def process_dp_ranks(dp_size: int, process_index: int, process_count: int) -> tuple[int, ...]:
    """The data-parallel ranks of a process when each holds a contiguous block of the mesh's
    (data, fsdp) positions: dp_size / P ranks each, or, with fewer ranks than processes (tensor
    parallelism across hosts), the one rank that P / dp_size processes share."""
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index={process_index} is not in [0, process_count={process_count})")
    if dp_size % process_count == 0:
        per = dp_size // process_count
        return tuple(range(process_index * per, (process_index + 1) * per))
    if process_count % dp_size == 0:
        return (process_index // (process_count // dp_size),)
    raise ValueError(f"data-parallel size {dp_size} and {process_count} processes: one must divide the other")


def _shard_members(split: TokenizedSplit, shard_of: np.ndarray, position: np.ndarray,
                   shards: Sequence[int]) -> list[np.ndarray]:
    """For each shard, the positions in `split` of its kept examples, in dealing order.
    shard_of / position: the shard of each source example and its place in the dealing order."""
    shard, pos = shard_of[split.source], position[split.source]
    by_shard = np.lexsort((pos, shard))  # positions in split, grouped by shard, dealing order within
    starts = np.searchsorted(shard[by_shard], list(shards), side="left")
    ends = np.searchsorted(shard[by_shard], list(shards), side="right")
    return [by_shard[a:b] for a, b in zip(starts, ends)]


# ----------------------------------------------------------------------------- steps


@dataclasses.dataclass
class StepBatch:
    """One optimizer step's data on this process.

    micro_batches: dicts of int32 [local_rows, seq] arrays (`ARRAY_KEYS`), consumed in order with
    gradient accumulation. num_sequences: sequences in the step over all processes
    (train_global_batch_size); local_sequences: this process's share. num_loss_tokens: this
    process's loss tokens (the loss normaliser is their sum over processes).
    """

    micro_batches: list[dict[str, np.ndarray]]
    step: int  # 0-based index of the step in the data stream
    epoch: int  # 0-based
    num_sequences: int
    local_sequences: int
    num_tokens: int
    num_loss_tokens: int
    indices: np.ndarray  # int64 [local_sequences]: the sequences' indices in the train split

    @property
    def num_micro_batches(self) -> int:
        return len(self.micro_batches)


def pad_micro_batches(batch: StepBatch, count: int, pad_id: int) -> StepBatch:
    """`batch` with all-padding micro-batches (no loss) appended up to `count`: processes whose
    packed steps have fewer micro-batches than others pad to the maximum over processes."""
    if count < batch.num_micro_batches:
        raise ValueError(f"count={count} is less than the step's {batch.num_micro_batches} micro-batches")
    rows, seq = batch.micro_batches[0]["input_ids"].shape
    extra = [fill_rows([], rows, seq, pad_id) for _ in range(count - batch.num_micro_batches)]
    return dataclasses.replace(batch, micro_batches=batch.micro_batches + extra)


def _rank_rows(seqs: list[tuple[np.ndarray, np.ndarray]], layout: Layout, packing: bool) -> list[list]:
    """One rank's rows: each a list of (ids, loss) sequences (packed) or a single one (padded)."""
    if not packing:
        return [[s] for s in seqs]
    return [[seqs[i] for i in b] for b in pack([len(s[0]) for s in seqs], layout.seq_len, layout.algorithm)]


def _micro_batches(per_rank: list[list[list]], rank_rows: int, layout: Layout,
                   min_micro_batches: int = 1) -> list[dict[str, np.ndarray]]:
    """Micro-batches from each local rank's rows: micro-batch k holds rows [k*rank_rows, (k+1)*rank_rows)
    of every rank in turn (padding where a rank has fewer), so that its rows sit where the global
    arrays put that rank's shard."""
    n = max([min_micro_batches] + [math.ceil(len(rows) / rank_rows) for rows in per_rank])
    out = []
    for k in range(n):
        rows = []
        for rank in per_rank:
            part = rank[k * rank_rows:(k + 1) * rank_rows]
            rows += part + [[]] * (rank_rows - len(part))
        out.append(fill_rows(rows, rank_rows * len(per_rank), layout.seq_len, layout.pad_id))
    return out


class _AssembleStep:
    """Grain map: step index -> StepBatch (reads the token cache, or encodes lazily; picklable).

    Each shard's order in epoch e is a permutation seeded by (seed, shard, e) (identity without
    `data.shuffle`), the same in whichever process holds the shard. (Grain's index shuffle costs
    about a millisecond per lookup on shards this small; a step needs one lookup per sequence.)
    A step's sequences are `split.examples(picks)`; a lazily dropped or skipped one (None) leaves
    its rank one sequence short in that step."""

    def __init__(self, split: TokenizedSplit | LazySplit, members: list[list[np.ndarray]],
                 shards: list[list[int]], layout: Layout, steps_per_epoch: int, seed: int | None):
        self.split, self.members, self.shards = split, members, shards  # [local rank][shard of the rank]
        self.layout, self.steps_per_epoch, self.seed = layout, steps_per_epoch, seed
        self._epoch, self._orders = -1, []

    def _orders_of(self, epoch: int) -> list[list[np.ndarray]]:
        if epoch != self._epoch:
            self._orders = [[m if self.seed is None else m[np.random.default_rng([self.seed, shard, epoch])
                                                            .permutation(len(m))]
                             for shard, m in zip(shards, members)]
                            for shards, members in zip(self.shards, self.members)]
            self._epoch = epoch
        return self._orders

    def __call__(self, step: int) -> StepBatch:
        step = int(step)
        epoch, b = divmod(step, self.steps_per_epoch)
        L = self.layout
        picks, per_rank, tokens = [], [], 0
        for orders in self._orders_of(epoch):
            rank_picks = [int(order[b]) for order in orders]
            seqs = self.split.examples(rank_picks)
            picks += [p for p, seq in zip(rank_picks, seqs) if seq is not None]
            seqs = [seq for seq in seqs if seq is not None]
            tokens += sum(len(seq[0]) for seq in seqs)
            per_rank.append(_rank_rows(seqs, L, L.packing))
        micro = _micro_batches(per_rank, L.rank_rows, L)
        return StepBatch(micro, step, epoch, L.global_batch, L.local_batch, int(tokens),
                         sum(int(mb["loss_mask"].sum()) for mb in micro), self.split.sources(picks))


class TrainIterator(Iterator[StepBatch]):
    """Endless iterator of StepBatch (epoch after epoch) over a Grain pipeline.

    `get_state()` is a JSON-serialisable dict: the index of the next step and what the stream
    depends on, nothing of the device layout, the processes or the workers. `set_state(state)`
    on an iterator of the same data and config continues exactly where the state was taken (the
    next batch is the one an uninterrupted iterator gives next), in a new process too, and on any
    number of processes and devices. `build(step)` gives the Grain iterator from step `step` on.
    """

    def __init__(self, build: Callable[[int], grain.IterDataset], fingerprint: dict[str, Any]):
        self._build, self._fingerprint = build, fingerprint
        self._next_step = 0
        self._it = iter(build(0))

    def __next__(self) -> StepBatch:
        batch = next(self._it)
        self._next_step = batch.step + 1
        return batch

    def close(self) -> None:
        """Stops the prefetch thread and the worker processes."""
        self._it.close()

    def get_state(self) -> dict[str, Any]:
        return {"version": _STATE_VERSION, "data": dict(self._fingerprint), "next_step": self._next_step}

    def set_state(self, state: dict[str, Any]) -> None:
        version = state.get("version")
        if version == 1:  # jax_sft before the global data position: the Grain state of the step stream
            step = int(state["grain"]["next_index"])
        elif version == _STATE_VERSION:
            step = int(state["next_step"])
        else:
            raise ValueError(f"data iterator state version {version!r}; expected {_STATE_VERSION} (or 1)")
        saved, now = state["data"], self._fingerprint
        if saved != now:
            diff = {k: (saved.get(k), v) for k, v in now.items() if saved.get(k) != v}
            raise ValueError(f"the data iterator state was saved for different data or settings "
                             f"(saved, now): {diff}; resume with the same dataset, batch sizes and seed")
        self._it.close()
        self._it = iter(self._build(step))
        self._next_step = step


def _step_stream(assemble: _AssembleStep, workers: int, start: int) -> grain.IterDataset:
    """The StepBatches from step `start` on; with `workers` > 0 assembled (and, lazily, encoded) in
    that many Grain worker processes, step after step in order."""
    steps = grain.MapDataset.range(start, _ENDLESS).map(assemble)
    it = steps.to_iter_dataset(grain.ReadOptions(num_threads=1 if workers == 0 else 0, prefetch_buffer_size=2))
    if workers > 0:
        if not absl_flags.FLAGS.is_parsed():  # Grain reads its absl flags when it starts workers
            absl_flags.FLAGS.mark_as_parsed()
        it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers, per_worker_buffer_size=2))
    return it


# ----------------------------------------------------------------------------- SFTData


class SFTData:
    """The data side of an SFT run: datasets, tokenisation (up front or lazily, `data.tokenize`),
    train and validation batches. See the module docstring for shapes and conventions.

    cfg: the validated run config. tokenizer: from `load_tokenizer(cfg)`. dp_size: data-parallel
    ranks (mesh data * fsdp). dp_ranks: the ranks whose rows this process supplies, ascending
    (default: `process_dp_ranks` of jax.process_index() / jax.process_count(); a single process
    supplies all). dataset: a built dataset (default `build_dataset(cfg)`).
    """

    def __init__(self, cfg, tokenizer, *, dp_size: int, dp_ranks: Sequence[int] | None = None,
                 dataset: SFTDataset | None = None):
        if dp_ranks is None:
            import jax  # noqa: PLC0415

            dp_ranks = process_dp_ranks(dp_size, jax.process_index(), jax.process_count())
        self.cfg, self.tokenizer = cfg, tokenizer
        self.layout = L = Layout.from_config(cfg, tokenizer, dp_size, dp_ranks)
        self.dataset = dataset if dataset is not None else build_dataset(cfg)
        self.encoder = ConversationEncoder.from_config(cfg, tokenizer, self.dataset.task_spec)
        train_rows, val_rows = self.dataset.formatted_ds["train"], self.dataset.formatted_ds["validation"]
        self.num_train_examples, self.num_val_examples = len(train_rows), len(val_rows)
        if not len(val_rows) and cfg.sft.val_period > 0:
            raise ValueError(NO_VALIDATION.format(cfg.sft.val_period))
        self.tokenize = cfg.data.get("tokenize") or "upfront"
        if self.tokenize not in TOKENIZE:
            raise ValueError(f"data.tokenize={self.tokenize!r}: expected one of {TOKENIZE}")
        seed, G, Gv = int(cfg.sft.seed), L.global_batch, L.val_global_batch
        n = len(train_rows)
        dealt = np.random.default_rng(seed).permutation(n) if cfg.data.shuffle else np.arange(n)

        def owned(r: int, total: int) -> list[int]:  # the shards of rank r
            return list(range(r * total // dp_size, (r + 1) * total // dp_size))

        self._train_shards = my_train = [owned(r, G) for r in L.dp_ranks]
        my_val = [owned(r, Gv) for r in L.dp_ranks]
        if self.tokenize == "lazy":
            self._lazy(train_rows, val_rows, dealt, my_train, my_val)
        else:
            self._upfront(train_rows, val_rows, dealt, my_train, my_val)
        if self.steps_per_epoch == 0:
            raise ValueError(f"the train split has too few usable examples for one step of "
                             f"train_global_batch_size={G} (a shard of its examples is empty)")
        log.info("data: %d steps per epoch; %s", self.steps_per_epoch, self.stats)

    def _split_args(self) -> dict[str, Any]:
        return dict(max_length=self.layout.max_length, overlength=self.cfg.data.overlength,
                    skip_without_loss=bool(self.cfg.data.skip_examples_without_loss))

    def _lazy(self, train_rows, val_rows, dealt: np.ndarray, my_train: list[list[int]], my_val: list[list[int]]):
        """Nothing is encoded here: shard j's members are the row indices dealt at positions j, j+G, ...
        (the same members as up front when no example is dropped or skipped)."""
        G, Gv = self.layout.global_batch, self.layout.val_global_batch
        self.train_split = LazySplit(train_rows, self.encoder, dataset_place(self.dataset, "train"),
                                     **self._split_args())
        self.val_split = LazySplit(val_rows, self.encoder, dataset_place(self.dataset, "validation"),
                                   **self._split_args())
        self._train_members = [[dealt[j::G] for j in shards] for shards in my_train]
        self._val_members = [[np.arange(j, len(val_rows), Gv) for j in shards] for shards in my_val]
        self._counts = {"train": {"examples": len(train_rows)}, "validation": {"examples": len(val_rows)}}
        self.steps_per_epoch = len(train_rows) // G

    def _upfront(self, train_rows, val_rows, dealt: np.ndarray, my_train: list[list[int]], my_val: list[list[int]]):
        """This process's shards of both splits encoded now, into flat arrays."""
        n, G, Gv = len(train_rows), self.layout.global_batch, self.layout.val_global_batch
        common = dict(self._split_args(), num_workers=int(self.cfg.data.get("num_workers") or 0))
        train_position = np.empty(n, np.int64)
        train_position[dealt] = np.arange(n)  # example i is dealt at train_position[i]
        train_shard, val_shard = train_position % G, np.arange(len(val_rows)) % Gv
        val_position = np.arange(len(val_rows))
        self.train_split, train_counts = tokenize_split(
            train_rows, np.flatnonzero(np.isin(train_shard, sum(my_train, []))), self.encoder, split="train",
            place=dataset_place(self.dataset, "train"), **common)
        self.val_split, val_counts = tokenize_split(
            val_rows, np.flatnonzero(np.isin(val_shard, sum(my_val, []))), self.encoder, split="validation",
            place=dataset_place(self.dataset, "validation"), **common)
        self._train_members = [_shard_members(self.train_split, train_shard, train_position, sh) for sh in my_train]
        self._val_members = [_shard_members(self.val_split, val_shard, val_position, sh) for sh in my_val]
        self._counts = {"train": train_counts, "validation": val_counts}
        # The smallest shard holds n // G examples as dealt; drops and skips (known to the process that
        # tokenised them) can make a shard smaller still, so the processes agree on the minimum.
        smallest = min([n // G] + [len(m) for rank in self._train_members for m in rank])
        self.steps_per_epoch = int(allgather_ints([smallest]).min())  # every process runs the same steps
        for split, c in self._counts.items():
            if c["truncated"] or c["dropped"] or c["masked"] or c["skipped"]:
                log.warning("%s: of %d examples, %d truncated, %d dropped, %d masked (over %d tokens), %d skipped "
                            "(no loss token)", split, c["examples"], c["truncated"], c["dropped"], c["masked"],
                            self.layout.max_length, c["skipped"])

    @property
    def stats(self) -> dict[str, int]:
        """Counters for the trainer's logs: "data/<split>_<name>" for examples, kept, truncated,
        dropped, masked, skipped (no loss token), tokens and loss_tokens (this process); lazily
        only examples (nothing else is known at start-up)."""
        return {f"data/{split}_{k}": v for split, c in self._counts.items() for k, v in c.items()}

    def train_iterator(self) -> TrainIterator:
        """A fresh iterator from the first step; `set_state` moves it to a saved position."""
        L, seed = self.layout, int(self.cfg.sft.seed)
        assemble = _AssembleStep(self.train_split, self._train_members, self._train_shards, L,
                                 self.steps_per_epoch, seed if self.cfg.data.shuffle else None)
        workers = int(self.cfg.data.get("num_workers") or 0) if self.tokenize == "lazy" else 0
        build = functools.partial(_step_stream, assemble, workers)
        # What the stream depends on; not the device layout (a run may resume on another one).
        fingerprint = dict(train_examples=self.num_train_examples, steps_per_epoch=self.steps_per_epoch,
                           seed=seed, shuffle=bool(self.cfg.data.shuffle), global_batch=L.global_batch,
                           seq_len=L.seq_len, packing=L.packing)
        return TrainIterator(build, fingerprint)

    @property
    def num_val_batches(self) -> int:
        """Global validation batches per validation run (sft.val_batches; <= 0: the whole split)."""
        L = self.layout
        n = math.ceil(self.num_val_examples / L.val_global_batch)
        val_batches = self.cfg.sft.val_batches
        return n if val_batches <= 0 else min(n, val_batches)

    def val_batches(self) -> Iterator[dict[str, np.ndarray]]:
        """Validation micro-batches (padded rows, int32 [val_micro_batch_size * len(dp_ranks), seq])
        from the start of the split, in order, fresh on every call. Every process yields the same
        number; rows past the end of a rank's share are padding (no loss)."""
        L = self.layout
        per_batch = L.val_rank_batch // L.val_rank_rows
        for b in range(self.num_val_batches):
            per_rank = [[[seq] for seq in self.val_split.examples([int(m[b]) for m in members if b < len(m)])
                         if seq is not None] for members in self._val_members]
            yield from _micro_batches(per_rank, L.val_rank_rows, L, per_batch)
