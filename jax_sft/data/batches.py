"""Sequences -> fixed-shape micro-batches: packing (`pack`), rows (`fill_rows`), this process's
share of a step (`ProcessRows`: the plan's batch geometry, its data-parallel ranks and the pad id),
and `StepBatch`, one optimizer step's micro-batches.

Arrays of a micro-batch, all int32 [rows, seq]:

  input_ids    token ids; padding: the tokenizer's pad id (eos when it has none)
  targets      targets[i] = input_ids[i + 1] within a segment; pad id at a segment's last token
  loss_mask    1 where targets[i] is a training target
  segment_ids  1, 2, ... for the sequences packed in a row (1 unpacked); 0 on padding
  positions    0, 1, ... within each segment; 0 on padding

A micro-batch holds the rows of each local rank, rank after rank (the order of the rows of the
global array). Padded rows: one sequence per row. Packed rows: each rank packs its own sequences
of the step into rows (first fit / best fit), `BatchPlan.rank_rows` rows per rank per
micro-batch; the number of micro-batches per step varies (and may differ between processes: see
`pad_micro_batches`).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import numpy as np

from jax_sft.choices import PACKING

__all__ = [
    "ARRAY_KEYS",
    "BatchPlan",
    "ProcessRows",
    "StepBatch",
    "pack",
    "fill_rows",
    "pad_micro_batches",
    "process_dp_ranks",
    "micro_batches",
    "rank_rows",
]

ARRAY_KEYS = ("input_ids", "targets", "loss_mask", "segment_ids", "positions")


@dataclasses.dataclass(frozen=True)
class BatchPlan:
    """Batch geometry. Rows have `seq_len` tokens (max_total_sequence_length rounded up to
    make_sequence_length_divisible_by); each of the `dp` data-parallel ranks supplies `rank_batch`
    sequences per step in micro-batches of `rank_rows` rows (packed: train_mb_tokens // seq_len
    rows, a varying number per step; padded: `micro_batches` of train_micro_batch_size)."""

    seq_len: int
    max_total_length: int  # policy.max_total_sequence_length
    max_input_length: int  # over-length threshold (data.max_input_seq_length)
    global_batch: int
    micro_batch: int
    dp: int
    packing: bool
    algorithm: str  # packing algorithm
    rank_rows: int
    val_global_batch: int
    val_micro_batch: int
    max_sequences_per_bin: int | None = None  # packed rows: most sequences in one row (None: no bound)

    @property
    def rank_batch(self) -> int:
        return self.global_batch // self.dp

    @property
    def micro_batches(self) -> int:
        """Micro-batches per step of padded rows."""
        return self.rank_batch // self.micro_batch

    @property
    def val_rank_batch(self) -> int:
        return self.val_global_batch // self.dp


def pack(lengths: Sequence[int], capacity: int, algorithm: str, max_sequences: int | None = None) -> list[list[int]]:
    """Bins (lists of item indices) of total length <= capacity and, with `max_sequences`
    (`policy.sequence_packing.max_sequences_per_bin`), at most that many items: a bin holding
    that many has no room left. "first_fit": items in order, each into the first bin with room;
    "first_fit_decreasing" and "modified_first_fit_decreasing" (NeMo RL's default name; MFFD's
    pairing refinement is not implemented): first fit, longest first; "best_fit": longest first,
    each into the fullest bin with room.

    (Grain's FirstFit/BestFitPackIterDataset pack a stream into a rolling set of bins that spans
    step boundaries; an optimizer step here packs exactly its own sequences, hence this function.)"""
    if algorithm not in PACKING:
        raise ValueError(f"policy.sequence_packing.algorithm={algorithm!r}: expected one of {PACKING}")
    lengths = np.asarray(lengths, np.int64)
    if len(lengths) and lengths.max() > capacity:
        raise ValueError(f"a sequence of {lengths.max()} tokens does not fit a row of {capacity}")
    order = range(len(lengths)) if algorithm == "first_fit" else np.argsort(-lengths, kind="stable")
    if max_sequences is not None and max_sequences < 1:
        raise ValueError(f"policy.sequence_packing.max_sequences_per_bin={max_sequences}: expected >= 1 or null")
    free = np.zeros(0, np.int64)
    bins: list[list[int]] = []
    for i in order:
        n = lengths[i]
        fits = np.flatnonzero(free >= n)
        if len(fits) == 0:
            b = len(bins)
            bins.append([])
            free = np.append(free, capacity)
        else:
            b = fits[np.argmin(free[fits])] if algorithm == "best_fit" else fits[0]
        bins[b].append(int(i))
        free[b] -= n
        if max_sequences is not None and len(bins[b]) >= max_sequences:
            free[b] = -1  # full: no item fits any more
    return bins


def fill_rows(
    rows: Sequence[Sequence[tuple[np.ndarray, np.ndarray]]], num_rows: int, seq_len: int, pad_id: int
) -> dict[str, np.ndarray]:
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
            out["input_ids"][r, o : o + n] = ids
            out["targets"][r, o : o + n - 1] = ids[1:]
            out["loss_mask"][r, o : o + n - 1] = loss[1:]
            out["segment_ids"][r, o : o + n] = segment
            out["positions"][r, o : o + n] = arange[:n]
            o += n
    return out


@dataclasses.dataclass(frozen=True)
class ProcessRows:
    """This process's share of the plan's batches: the data-parallel ranks whose rows it supplies
    (ascending, as its rows appear in the global arrays) and the pad id. Data is sharded by
    data-parallel rank, not by process, so the global batches are the same whatever the number of
    processes."""

    batch: BatchPlan
    dp_ranks: tuple[int, ...]
    pad_id: int

    def __post_init__(self):
        dp, ranks = self.batch.dp, self.dp_ranks
        if not ranks or list(ranks) != sorted(set(ranks)) or not all(0 <= r < dp for r in ranks):
            raise ValueError(f"dp_size={dp}, dp_ranks={ranks}: expected distinct ascending ranks in [0, dp_size)")

    @classmethod
    def of(cls, batch: BatchPlan, tokenizer, dp_ranks: Sequence[int]) -> ProcessRows:
        """`batch` on the process supplying `dp_ranks`, padding with the tokenizer's pad id (eos
        when it has none)."""
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        if pad_id is None:
            raise ValueError(f"tokenizer {tokenizer.name_or_path!r} has neither a pad nor an eos token to pad with")
        return cls(batch, tuple(int(r) for r in dp_ranks), int(pad_id))

    seq_len = property(lambda self: self.batch.seq_len)
    max_length = property(lambda self: self.batch.max_input_length)
    global_batch = property(lambda self: self.batch.global_batch)
    dp_size = property(lambda self: self.batch.dp)
    rank_batch = property(lambda self: self.batch.rank_batch)
    rank_rows = property(lambda self: self.batch.rank_rows)
    packing = property(lambda self: self.batch.packing)
    algorithm = property(lambda self: self.batch.algorithm)
    val_global_batch = property(lambda self: self.batch.val_global_batch)
    val_rank_batch = property(lambda self: self.batch.val_rank_batch)
    val_rank_rows = property(lambda self: self.batch.val_micro_batch)

    @property
    def local_batch(self) -> int:
        return self.rank_batch * len(self.dp_ranks)

    @property
    def rows_per_micro_batch(self) -> int:  # local rows
        return self.rank_rows * len(self.dp_ranks)


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
    dataset_epochs: tuple[int, ...] | None = None  # weighted mixture: each train dataset's epoch

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


def rank_rows(seqs: list[tuple[np.ndarray, np.ndarray]], layout: ProcessRows, packing: bool) -> list[list]:
    """One rank's rows: each a list of (ids, loss) sequences (packed) or a single one (padded)."""
    if not packing:
        return [[s] for s in seqs]
    bins = pack([len(s[0]) for s in seqs], layout.seq_len, layout.algorithm, layout.batch.max_sequences_per_bin)
    return [[seqs[i] for i in b] for b in bins]


def micro_batches(
    per_rank: list[list[list]], rank_rows: int, layout: ProcessRows, min_micro_batches: int = 1
) -> list[dict[str, np.ndarray]]:
    """Micro-batches from each local rank's rows: micro-batch k holds rows [k*rank_rows, (k+1)*rank_rows)
    of every rank in turn (padding where a rank has fewer), so that its rows sit where the global
    arrays put that rank's shard."""
    n = max([min_micro_batches] + [math.ceil(len(rows) / rank_rows) for rows in per_rank])
    out = []
    for k in range(n):
        rows = []
        for rank in per_rank:
            part = rank[k * rank_rows : (k + 1) * rank_rows]
            rows += part + [[]] * (rank_rows - len(part))
        out.append(fill_rows(rows, rank_rows * len(per_rank), layout.seq_len, layout.pad_id))
    return out
