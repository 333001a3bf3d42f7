"""From formatted conversations to device-ready batches, with Grain.

Construction (`SFTData`) templates, tokenises and loss-masks this process's share of both splits
once, up front, into flat int32/uint8 arrays (the cache), so that bad input fails at start-up and
the training loop only gathers, packs and pads. The work runs in `data.num_workers` Grain worker
processes (`mp_prefetch`; 0: in-process). One core does the whole pipeline at several hundred
thousand tokens per second (bench/data_pipeline.py), far beyond what a training step consumes.

Sharding: the train split's first `n - n % process_count` examples are dealt out round-robin
(process p holds examples p, p + P, ...); validation likewise, keeping every example. A step
takes `train_global_batch_size / process_count` of this process's examples, in an order that a
seeded Grain shuffle makes different every epoch; the last partial batch of an epoch is dropped.

Rows have fixed length `seq` = max_total_sequence_length rounded up to
make_sequence_length_divisible_by, so that the train step compiles once. Arrays of a micro-batch,
all int32 [rows, seq]:

  input_ids    token ids; padding: the tokenizer's pad id (eos when it has none)
  targets      targets[i] = input_ids[i + 1] within a segment; pad id at a segment's last token
  loss_mask    1 where targets[i] is a training target
  segment_ids  1, 2, ... for the sequences packed in a row (1 unpacked); 0 on padding
  positions    0, 1, ... within each segment; 0 on padding

Padded rows: one sequence per row, micro-batches of `train_micro_batch_size * dp_size /
process_count` rows. Packed rows (`policy.sequence_packing.enabled`): a step's sequences are
packed into rows (first fit / best fit), micro-batches of `train_mb_tokens // seq` rows per
data-parallel rank; the number of micro-batches per step varies (and may differ between
processes: see `pad_micro_batches`).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Iterator, Sequence
from typing import Any

import grain
import numpy as np
from absl import flags as absl_flags

from jax_sft.data.chat import ConversationEncoder
from jax_sft.data.datasets import SFTDataset, build_dataset

log = logging.getLogger(__name__)

__all__ = ["SFTData", "StepBatch", "TrainIterator", "TokenizedSplit", "Layout", "tokenize_split",
           "apply_overlength", "pack", "fill_rows", "pad_micro_batches", "ARRAY_KEYS", "OVERLENGTH", "PACKING"]

ARRAY_KEYS = ("input_ids", "targets", "loss_mask", "segment_ids", "positions")
OVERLENGTH = ("truncate", "drop", "mask")
PACKING = ("modified_first_fit_decreasing", "first_fit_decreasing", "first_fit", "best_fit")
_STATE_VERSION = 1


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

    def __init__(self, rows, indices: np.ndarray, encoder: ConversationEncoder, split: str):
        self.rows, self.indices, self.encoder, self.split = rows, indices, encoder, split

    def __call__(self, chunk: Sequence[int]) -> tuple[list[int], bytes, bytes]:
        idx = [int(self.indices[p]) for p in chunk]
        encoded = self.encoder.encode([self.rows[i] for i in idx], [f"{self.split} example {i}" for i in idx])
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
                   chunk_size: int = 64) -> tuple[TokenizedSplit, dict[str, int]]:
    """Encodes rows[indices] into a TokenizedSplit, applying `data.overlength` and the no-loss rule
    (a conversation without a loss token is an error naming it, or skipped and counted when
    `skip_without_loss`). Returns (split, counts)."""
    if overlength not in OVERLENGTH:
        raise ValueError(f"data.overlength={overlength!r}: expected one of {OVERLENGTH}")
    ds = grain.MapDataset.range(len(indices)).batch(chunk_size, batch_fn=list)
    ds = ds.map(_EncodeChunk(rows, indices, encoder, split))
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
                if status != "masked" and not loss.any():
                    if not skip_without_loss:
                        why = f" after truncation to {max_length} tokens" if status == "truncated" else ""
                        raise ValueError(f"{split} example {index}: no token to train on{why} (no assistant "
                                         "message is trained); fix the example or set "
                                         "data.skip_examples_without_loss=true to skip and count such examples")
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
    """How sequences become micro-batches on this process (all counts derived from the config)."""

    seq_len: int  # row length
    max_length: int  # over-length threshold (data.max_input_seq_length)
    pad_id: int
    global_batch: int  # sequences per optimizer step, all processes
    local_batch: int  # sequences per step on this process
    rows_per_micro_batch: int  # local rows of one micro-batch
    packing: bool
    algorithm: str
    val_global_batch: int
    val_rows_per_micro_batch: int  # local
    process_index: int
    process_count: int

    @classmethod
    def from_config(cls, cfg, tokenizer, dp_size: int, process_index: int, process_count: int) -> Layout:
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
        if dp_size < 1 or process_count < 1 or not 0 <= process_index < process_count:
            raise ValueError(f"dp_size={dp_size}, process_index={process_index}, process_count={process_count}: "
                             "expected dp_size >= 1 and 0 <= process_index < process_count")
        G, mbs = policy.train_global_batch_size, policy.train_micro_batch_size
        packing = bool(policy.sequence_packing.enabled)
        if packing:
            mb_tokens = policy.sequence_packing.get("train_mb_tokens") or policy.max_total_sequence_length * mbs
            per_rank = mb_tokens // seq_len
            if per_rank < 1:
                raise ValueError(f"policy.sequence_packing.train_mb_tokens={mb_tokens} is less than one row of "
                                 f"{seq_len} tokens")
            rows = _split_rows(per_rank * dp_size, process_count, "packed micro-batch rows (train_mb_tokens // seq "
                               "* dp_size)")
        else:
            if G % (mbs * dp_size):
                raise ValueError(f"policy.train_global_batch_size={G} must be a multiple of train_micro_batch_size "
                                 f"* dp_size = {mbs} * {dp_size}")
            rows = _split_rows(mbs * dp_size, process_count, "policy.train_micro_batch_size * dp_size")
        local_batch = _split_rows(G, process_count, "policy.train_global_batch_size")
        Gv, vmbs = sft.val_global_batch_size, sft.val_micro_batch_size
        if Gv % (vmbs * dp_size):
            raise ValueError(f"sft.val_global_batch_size={Gv} must be a multiple of val_micro_batch_size * dp_size "
                             f"= {vmbs} * {dp_size}")
        val_rows = _split_rows(vmbs * dp_size, process_count, "sft.val_micro_batch_size * dp_size")
        algorithm = policy.sequence_packing.get("algorithm") or "first_fit_decreasing"
        if packing and algorithm not in PACKING:
            raise ValueError(f"policy.sequence_packing.algorithm={algorithm!r}: expected one of {PACKING}")
        return cls(seq_len, max_length, int(pad_id), G, local_batch, rows, packing, algorithm, Gv, val_rows,
                   process_index, process_count)


def _split_rows(total: int, process_count: int, what: str) -> int:
    if total % process_count:
        raise ValueError(f"{what} = {total} must be a multiple of the number of processes ({process_count})")
    return total // process_count


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


def _micro_batches(seqs: list[tuple[np.ndarray, np.ndarray]], layout: Layout, rows_per_mb: int,
                   packing: bool, min_micro_batches: int = 1) -> list[dict[str, np.ndarray]]:
    if packing:
        rows = [[seqs[i] for i in b] for b in pack([len(s[0]) for s in seqs], layout.seq_len, layout.algorithm)]
    else:
        rows = [[s] for s in seqs]
    n = max(min_micro_batches, math.ceil(len(rows) / rows_per_mb))
    return [fill_rows(rows[k * rows_per_mb:(k + 1) * rows_per_mb], rows_per_mb, layout.seq_len, layout.pad_id)
            for k in range(n)]


class _AssembleStep:
    """Grain map_with_index: step index -> StepBatch (reads the cache; picklable)."""

    def __init__(self, split: TokenizedSplit, order: grain.MapDataset, layout: Layout, steps_per_epoch: int):
        self.split, self.order, self.layout, self.steps_per_epoch = split, order, layout, steps_per_epoch

    def __call__(self, step: int, _) -> StepBatch:
        epoch, b = divmod(step, self.steps_per_epoch)
        L, n = self.layout, len(self.split)
        base = epoch * n + b * L.local_batch
        picks = [self.order[base + j] for j in range(L.local_batch)]
        seqs = [self.split.example(i) for i in picks]
        micro = _micro_batches(seqs, L, L.rows_per_micro_batch, L.packing)
        return StepBatch(micro, step, epoch, L.global_batch, L.local_batch, sum(len(s[0]) for s in seqs),
                         sum(int(mb["loss_mask"].sum()) for mb in micro), self.split.source[picks])


class TrainIterator(Iterator[StepBatch]):
    """Endless iterator of StepBatch (epoch after epoch) over a Grain pipeline.

    `get_state()` is a JSON-serialisable dict; `set_state(state)` on an iterator of the same data
    and config continues exactly where the state was taken (the next batch is the one an
    uninterrupted iterator gives next), also in a new process.
    """

    def __init__(self, dataset: grain.MapDataset, fingerprint: dict[str, Any]):
        self._fingerprint = fingerprint
        self._it = dataset.to_iter_dataset(grain.ReadOptions(num_threads=1, prefetch_buffer_size=2)).__iter__()

    def __next__(self) -> StepBatch:
        return next(self._it)

    def close(self) -> None:
        """Stops the prefetch thread."""
        self._it.close()

    def get_state(self) -> dict[str, Any]:
        return {"version": _STATE_VERSION, "data": dict(self._fingerprint), "grain": self._it.get_state()}

    def set_state(self, state: dict[str, Any]) -> None:
        if state.get("version") != _STATE_VERSION:
            raise ValueError(f"data iterator state version {state.get('version')!r}; expected {_STATE_VERSION}")
        if state["data"] != self._fingerprint:
            diff = {k: (state["data"].get(k), v) for k, v in self._fingerprint.items() if state["data"].get(k) != v}
            raise ValueError(f"the data iterator state was saved for different data or settings "
                             f"(saved, now): {diff}; resume with the same dataset, batch sizes, seed and processes")
        self._it.set_state(state["grain"])


# ----------------------------------------------------------------------------- SFTData


def _agree_min(value: int, process_count: int) -> int:
    """The minimum of `value` over JAX processes (so that every process runs the same steps)."""
    if process_count == 1:
        return value
    import jax  # noqa: PLC0415 (jax only for multi-process runs)
    from jax.experimental import multihost_utils  # noqa: PLC0415

    if jax.process_count() == 1:  # processes simulated in one (tests): nothing to agree with
        return value

    return int(np.min(multihost_utils.process_allgather(np.asarray(value, np.int64))))


class SFTData:
    """The data side of an SFT run: datasets, tokenisation (once, up front), train and validation
    batches. See the module docstring for shapes and conventions.

    cfg: the validated run config. tokenizer: from `load_tokenizer(cfg)`. dp_size: data-parallel
    ranks (mesh data * fsdp). process_index / process_count: default jax.process_index() /
    jax.process_count(). dataset: a built dataset (default `build_dataset(cfg)`).
    """

    def __init__(self, cfg, tokenizer, *, dp_size: int, process_index: int | None = None,
                 process_count: int | None = None, dataset: SFTDataset | None = None):
        if process_index is None or process_count is None:
            import jax  # noqa: PLC0415

            process_index = jax.process_index() if process_index is None else process_index
            process_count = jax.process_count() if process_count is None else process_count
        self.cfg, self.tokenizer = cfg, tokenizer
        self.layout = L = Layout.from_config(cfg, tokenizer, dp_size, process_index, process_count)
        self.dataset = dataset if dataset is not None else build_dataset(cfg)
        self.encoder = ConversationEncoder.from_config(cfg, tokenizer, self.dataset.task_spec)
        train_rows, val_rows = self.dataset.formatted_ds["train"], self.dataset.formatted_ds["validation"]
        n_train = len(train_rows) - len(train_rows) % process_count
        self.num_val_examples = len(val_rows)
        common = dict(max_length=L.max_length, overlength=cfg.data.overlength,
                      skip_without_loss=bool(cfg.data.skip_examples_without_loss),
                      num_workers=int(cfg.data.get("num_workers") or 0))
        self.train_split, train_counts = tokenize_split(
            train_rows, np.arange(process_index, n_train, process_count), self.encoder, split="train", **common)
        self.val_split, val_counts = tokenize_split(
            val_rows, np.arange(process_index, len(val_rows), process_count), self.encoder, split="validation",
            **common)
        self._counts = {"train": train_counts, "validation": val_counts}
        self.steps_per_epoch = _agree_min(len(self.train_split) // L.local_batch, process_count)
        if self.steps_per_epoch == 0:
            raise ValueError(f"the train split has {len(self.train_split)} usable examples on this process, fewer "
                             f"than one step's {L.local_batch} (train_global_batch_size / processes)")
        for split, c in self._counts.items():
            if c["truncated"] or c["dropped"] or c["masked"] or c["skipped"]:
                log.warning("%s: of %d examples, %d truncated, %d dropped, %d masked (over %d tokens), %d skipped "
                            "(no loss token)", split, c["examples"], c["truncated"], c["dropped"], c["masked"],
                            L.max_length, c["skipped"])
        log.info("data: %d steps per epoch; %s", self.steps_per_epoch, self.stats)

    @property
    def stats(self) -> dict[str, int]:
        """Counters for the trainer's logs: "data/<split>_<name>" for examples, kept, truncated,
        dropped, masked, skipped (no loss token), tokens and loss_tokens (this process)."""
        return {f"data/{split}_{k}": v for split, c in self._counts.items() for k, v in c.items()}

    def train_iterator(self) -> TrainIterator:
        """A fresh iterator from the first step; `set_state` moves it to a saved position."""
        L = self.layout
        order = grain.MapDataset.range(len(self.train_split))
        if self.cfg.data.shuffle:
            order = order.shuffle(seed=int(self.cfg.sft.seed))
        steps = grain.MapDataset.range(self.steps_per_epoch).repeat()
        steps = steps.map_with_index(_AssembleStep(self.train_split, order, L, self.steps_per_epoch))
        fingerprint = dict(examples=len(self.train_split), tokens=int(self.train_split.starts[-1]),
                           steps_per_epoch=self.steps_per_epoch, seed=int(self.cfg.sft.seed),
                           shuffle=bool(self.cfg.data.shuffle), global_batch=L.global_batch, seq_len=L.seq_len,
                           packing=L.packing, process_index=L.process_index, process_count=L.process_count)
        return TrainIterator(steps, fingerprint)

    @property
    def num_val_batches(self) -> int:
        """Global validation batches per validation run (sft.val_batches; <= 0: the whole split)."""
        n = math.ceil(self.num_val_examples / self.layout.val_global_batch)
        val_batches = self.cfg.sft.val_batches
        return n if val_batches <= 0 else min(n, val_batches)

    def val_batches(self) -> Iterator[dict[str, np.ndarray]]:
        """Validation micro-batches (padded rows, int32 [val_micro_batch_size * dp_size /
        process_count, seq]) from the start of the split, in order, fresh on every call. Every process
        yields the same number; rows past the end of the split are padding (no loss)."""
        L = self.layout
        local = L.val_global_batch // L.process_count
        per_batch = L.val_global_batch // (L.val_rows_per_micro_batch * L.process_count)
        for b in range(self.num_val_batches):
            seqs = [self.val_split.example(i) for i in range(b * local, min((b + 1) * local, len(self.val_split)))]
            yield from _micro_batches(seqs, L, L.val_rows_per_micro_batch, False, per_batch)
