"""From formatted conversations to device-ready batches, with Grain.

`data.tokenize=lazy` (default): construction (`SFTData`) encodes nothing; each step templates,
tokenises and loss-masks its own examples when it is assembled (in `data.num_workers` Grain worker
processes, `mp_prefetch`, ahead of the training loop; 0: a thread of this process), so start-up
time and memory do not depend on the dataset's size (bench/data_scale.py) and a bad row fails when
its step is reached, naming its file and line (`--validate_data`, `check_dataset`, checks every row
beforehand). `data.tokenize=upfront`: construction encodes this process's share of both splits
once, into flat int32/uint8 arrays (the cache), so that bad input fails at start-up and the
training loop only gathers, packs and pads. Both give the same batches, except that a lazily
dropped or skipped example leaves its step one sequence short instead of being taken out of its
shard. One core does the whole pipeline at a few hundred thousand tokens per second
(bench/data_pipeline.py), far beyond what a training step consumes.

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

A weighted mixture (a `weight` on every `data.train` entry) replaces the shards of the train split
by draws that are a pure function of the seed and the step (`jax_sft.data.mixture`), so that the
state stays the next step's index.

Rows have the plan's fixed length (`BatchPlan.seq_len`), so that the train step compiles once;
micro-batches and their arrays: `jax_sft.data.batches`.

"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import grain
import numpy as np

from jax_sft.data.batches import BatchPlan, ProcessRows, StepBatch, micro_batches, process_dp_ranks, rank_rows
from jax_sft.data.build import build_dataset
from jax_sft.data.chat import ConversationEncoder
from jax_sft.data.formats import SFTDataset
from jax_sft.data.mixture import MixturePicks, mixture_of, sample_means
from jax_sft.data.sections import NO_VALIDATION
from jax_sft.data.tokens import (
    LazySplit,
    TokenizedSplit,
    check_rows,
    dataset_place,
    start_workers,
    tokenize_split,
)
from jax_sft.distributed import allgather_ints

log = logging.getLogger(__name__)

__all__ = ["DataPlan", "SFTData", "TrainIterator", "check_dataset"]

_STATE_VERSION = 2
_ENDLESS = 2**62  # steps of the stream (epochs repeat)


def _shard_members(
    split: TokenizedSplit, shard_of: np.ndarray, position: np.ndarray, shards: Sequence[int]
) -> list[np.ndarray]:
    """For each shard, the positions in `split` of its kept examples, in dealing order.
    shard_of / position: the shard of each source example and its place in the dealing order."""
    shard, pos = shard_of[split.source], position[split.source]
    by_shard = np.lexsort((pos, shard))  # positions in split, grouped by shard, dealing order within
    starts = np.searchsorted(shard[by_shard], list(shards), side="left")
    ends = np.searchsorted(shard[by_shard], list(shards), side="right")
    return [by_shard[a:b] for a, b in zip(starts, ends)]


class _ShardPicks:
    """The concatenation's picker: step -> (epoch, the positions in the split of each local rank's
    sequences), one example of every shard of the rank (picklable).

    Each shard's order in epoch e is a permutation seeded by (seed, shard, e) (identity without
    `data.shuffle`), the same in whichever process holds the shard. (Grain's index shuffle costs
    about a millisecond per lookup on shards this small; a step needs one lookup per sequence.)"""

    def __init__(self, members: list[list[np.ndarray]], shards: list[list[int]], steps_per_epoch: int, seed):
        self.members, self.shards = members, shards  # [local rank][shard of the rank]
        self.steps_per_epoch, self.seed = steps_per_epoch, seed
        self._epoch, self._orders = -1, []

    def _orders_of(self, epoch: int) -> list[list[np.ndarray]]:
        if epoch != self._epoch:
            self._orders = [
                [
                    m if self.seed is None else m[np.random.default_rng([self.seed, shard, epoch]).permutation(len(m))]
                    for shard, m in zip(shards, members)
                ]
                for shards, members in zip(self.shards, self.members)
            ]
            self._epoch = epoch
        return self._orders

    def __call__(self, step: int) -> tuple[int, list[list[int]]]:
        epoch, b = divmod(step, self.steps_per_epoch)
        return epoch, [[int(order[b]) for order in orders] for orders in self._orders_of(epoch)]

    def dataset_epochs(self, step: int) -> None:
        return None


class _AssembleStep:
    """Grain map: step index -> StepBatch (reads the token cache, or encodes lazily; picklable).
    `picks(step)`: (epoch, positions in `split` of each local rank's sequences), from the shards of
    the concatenation (`_ShardPicks`) or a weighted mixture (`jax_sft.data.mixture.MixturePicks`).
    A step's sequences are `split.examples(picks)`; a lazily dropped or skipped one (None) leaves
    its rank one sequence short in that step."""

    def __init__(self, split: TokenizedSplit | LazySplit, picks: _ShardPicks | MixturePicks, layout: ProcessRows):
        self.split, self.picks, self.layout = split, picks, layout

    def __call__(self, step: int) -> StepBatch:
        step = int(step)
        epoch, ranks = self.picks(step)
        L = self.layout
        picks, per_rank, tokens = [], [], 0
        for rank_picks in ranks:
            seqs = self.split.examples(rank_picks)
            picks += [p for p, seq in zip(rank_picks, seqs) if seq is not None]
            seqs = [seq for seq in seqs if seq is not None]
            tokens += sum(len(seq[0]) for seq in seqs)
            per_rank.append(rank_rows(seqs, L, L.packing))
        micro = micro_batches(per_rank, L.rank_rows, L)
        return StepBatch(
            micro,
            step,
            epoch,
            L.global_batch,
            L.local_batch,
            int(tokens),
            sum(int(mb["loss_mask"].sum()) for mb in micro),
            self.split.sources(picks),
            self.picks.dataset_epochs(step),
        )


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
            raise ValueError(
                f"the data iterator state was saved for different data or settings "
                f"(saved, now): {diff}; resume with the same dataset, batch sizes and seed"
            )
        self._it.close()
        self._it = iter(self._build(step))
        self._next_step = step


def _step_stream(assemble: _AssembleStep, workers: int, start: int) -> grain.IterDataset:
    """The StepBatches from step `start` on; with `workers` > 0 assembled (and, lazily, encoded) in
    that many Grain worker processes, step after step in order."""
    steps = grain.MapDataset.range(start, _ENDLESS).map(assemble)
    it = steps.to_iter_dataset(grain.ReadOptions(num_threads=1 if workers == 0 else 0, prefetch_buffer_size=2))
    if workers > 0:
        it = start_workers(it, workers)
    return it


@dataclasses.dataclass(frozen=True)
class DataPlan:
    """What the data side of a run is built from (made by `jax_sft.config.plan.make_plan`): the
    validated config (its `data` sections, `policy.tokenizer` and the template keys), the batch
    geometry and the pipeline's settings."""

    config: Any  # the validated ConfigDict
    batch: BatchPlan
    tokenize: str  # data.tokenize
    overlength: str  # data.overlength
    num_workers: int  # data.num_workers
    shuffle: bool  # data.shuffle
    skip_without_loss: bool  # data.skip_examples_without_loss
    seed: int  # sft.seed
    val_period: int  # sft.val_period
    val_batches: int  # sft.val_batches (<= 0: the whole split)
    mixture_by: str = "examples"  # data.mixture_by (weighted data.train entries)


def check_dataset(plan: DataPlan, dataset: SFTDataset, encoder: ConversationEncoder, part: int = 0, parts: int = 1):
    """`--validate_data`: the error message of every row of both splits of `dataset` that fails to
    encode as training encodes it (template, tokens, `data.overlength`, the no-loss rule), in
    order; rows part, part + parts, ... of each split (a process's share), in `data.num_workers`
    worker processes. Independent of `data.tokenize`, so that it runs before an up-front cache."""
    args = dict(
        max_length=plan.batch.max_input_length, overlength=plan.overlength, skip_without_loss=plan.skip_without_loss
    )
    for name in ("train", "validation"):
        rows = dataset.formatted_ds[name]
        split = LazySplit(rows, encoder, dataset_place(dataset, name), **args)
        yield from check_rows(split, np.arange(part, len(rows), parts), num_workers=plan.num_workers)


class SFTData:
    """The data side of an SFT run: datasets, tokenisation (up front or lazily, `data.tokenize`),
    train and validation batches. See the module docstring for shapes and conventions.

    plan: the run plan's `DataPlan`. tokenizer: from `load_tokenizer(plan.config)`. dp_ranks: the
    data-parallel ranks whose rows this process supplies, ascending (default: `process_dp_ranks`
    of jax.process_index() / jax.process_count(); a single process supplies all). dataset: a built
    dataset (default `build_dataset(plan.config)`).
    """

    def __init__(
        self, plan: DataPlan, tokenizer, *, dp_ranks: Sequence[int] | None = None, dataset: SFTDataset | None = None
    ):
        dp_size = plan.batch.dp
        if dp_ranks is None:
            import jax  # noqa: PLC0415  (only a process of a run has devices to ask)

            dp_ranks = process_dp_ranks(dp_size, jax.process_index(), jax.process_count())
        self.plan, self.tokenizer = plan, tokenizer
        self.layout = L = ProcessRows.of(plan.batch, tokenizer, dp_ranks)
        self.dataset = dataset if dataset is not None else build_dataset(plan.config)
        self.encoder = ConversationEncoder.from_config(plan.config, tokenizer, self.dataset.task_spec)
        train_rows, val_rows = self.dataset.formatted_ds["train"], self.dataset.formatted_ds["validation"]
        self.num_train_examples, self.num_val_examples = len(train_rows), len(val_rows)
        if not len(val_rows) and plan.val_period > 0:
            raise ValueError(NO_VALIDATION.format(plan.val_period))
        self.tokenize = plan.tokenize
        G, Gv = L.global_batch, L.val_global_batch
        n = len(train_rows)
        dealt = np.random.default_rng(plan.seed).permutation(n) if plan.shuffle else np.arange(n)

        def owned(r: int, total: int) -> list[int]:  # the shards of rank r
            return list(range(r * total // dp_size, (r + 1) * total // dp_size))

        self._train_shards = my_train = [owned(r, G) for r in L.dp_ranks]
        my_val = [owned(r, Gv) for r in L.dp_ranks]
        self.mixture = mixture_of(self.dataset, plan.mixture_by)
        if self.mixture is not None:  # any example may land in any rank's slot: every row is this process's
            my_train = [list(range(G))]
        if self.tokenize == "lazy":
            self._lazy(train_rows, val_rows, dealt, my_train, my_val)
        else:
            self._upfront(train_rows, val_rows, dealt, my_train, my_val)
        if self.mixture is not None:
            self._mix()
        if self.steps_per_epoch == 0:
            raise ValueError(
                f"the train split has too few usable examples for one step of "
                f"train_global_batch_size={G} (a shard of its examples is empty)"
            )
        log.info("data: %d steps per epoch; %s", self.steps_per_epoch, self.stats)

    def _mix(self) -> None:
        """A weighted mixture: each dataset's examples (up front: those kept), its mean length when
        the weights share out tokens, and an epoch of as many sequences as the datasets hold."""
        m, split = self.mixture, self.train_split
        if isinstance(split, TokenizedSplit):
            ends = np.asarray(m.starts) + np.asarray(m.sizes)
            self._mixture_members = [
                np.flatnonzero((split.source >= a) & (split.source < b)) for a, b in zip(m.starts, ends)
            ]
            for label, members in zip(m.labels, self._mixture_members):
                if not len(members):
                    raise ValueError(f"{label}: no usable example left (all dropped or skipped)")
            if m.by == "tokens":
                m = m.with_means([split.lengths[members].mean() for members in self._mixture_members])
            self.steps_per_epoch = len(split) // self.layout.global_batch
        else:
            self._mixture_members = None
            if m.by == "tokens":
                m = m.with_means(sample_means(m, self._lengths, self.plan.seed))
        self.mixture = m
        for line in self.describe_mixture():
            log.info("%s", line)

    def _lengths(self, rows: list[int]) -> list[int | None]:
        return [None if e is None else len(e[0]) for e in self.train_split.examples(rows)]

    def describe_mixture(self) -> list[str]:
        """The start-up log's lines of a weighted mixture (none without weights)."""
        return [] if self.mixture is None else self.mixture.describe(self.layout.global_batch)

    def _split_args(self) -> dict[str, Any]:
        return dict(
            max_length=self.layout.max_length,
            overlength=self.plan.overlength,
            skip_without_loss=self.plan.skip_without_loss,
        )

    def _lazy(self, train_rows, val_rows, dealt: np.ndarray, my_train: list[list[int]], my_val: list[list[int]]):
        """Nothing is encoded here: shard j's members are the row indices dealt at positions j, j+G, ...
        (the same members as up front when no example is dropped or skipped)."""
        G, Gv = self.layout.global_batch, self.layout.val_global_batch
        self.train_split = LazySplit(
            train_rows, self.encoder, dataset_place(self.dataset, "train"), **self._split_args()
        )
        self.val_split = LazySplit(
            val_rows, self.encoder, dataset_place(self.dataset, "validation"), **self._split_args()
        )
        self._train_members = [[dealt[j::G] for j in shards] for shards in my_train]
        self._val_members = [[np.arange(j, len(val_rows), Gv) for j in shards] for shards in my_val]
        self._counts = {"train": {"examples": len(train_rows)}, "validation": {"examples": len(val_rows)}}
        self.steps_per_epoch = len(train_rows) // G

    def _upfront(self, train_rows, val_rows, dealt: np.ndarray, my_train: list[list[int]], my_val: list[list[int]]):
        """This process's shards of both splits encoded now, into flat arrays."""
        n, G, Gv = len(train_rows), self.layout.global_batch, self.layout.val_global_batch
        common = dict(self._split_args(), num_workers=self.plan.num_workers)
        train_position = np.empty(n, np.int64)
        train_position[dealt] = np.arange(n)  # example i is dealt at train_position[i]
        train_shard, val_shard = train_position % G, np.arange(len(val_rows)) % Gv
        val_position = np.arange(len(val_rows))
        self.train_split, train_counts = tokenize_split(
            train_rows,
            np.flatnonzero(np.isin(train_shard, sum(my_train, []))),
            self.encoder,
            split="train",
            place=dataset_place(self.dataset, "train"),
            **common,
        )
        self.val_split, val_counts = tokenize_split(
            val_rows,
            np.flatnonzero(np.isin(val_shard, sum(my_val, []))),
            self.encoder,
            split="validation",
            place=dataset_place(self.dataset, "validation"),
            **common,
        )
        self._train_members = [_shard_members(self.train_split, train_shard, train_position, sh) for sh in my_train]
        self._val_members = [_shard_members(self.val_split, val_shard, val_position, sh) for sh in my_val]
        self._counts = {"train": train_counts, "validation": val_counts}
        # The smallest shard holds n // G examples as dealt; drops and skips (known to the process that
        # tokenised them) can make a shard smaller still, so the processes agree on the minimum.
        smallest = min([n // G] + [len(m) for rank in self._train_members for m in rank])
        self.steps_per_epoch = int(allgather_ints([smallest]).min())  # every process runs the same steps
        for split, c in self._counts.items():
            if c["truncated"] or c["dropped"] or c["masked"] or c["skipped"]:
                log.warning(
                    "%s: of %d examples, %d truncated, %d dropped, %d masked (over %d tokens), %d skipped "
                    "(no loss token)",
                    split,
                    c["examples"],
                    c["truncated"],
                    c["dropped"],
                    c["masked"],
                    self.layout.max_length,
                    c["skipped"],
                )

    @property
    def stats(self) -> dict[str, int]:
        """Counters for the trainer's logs: "data/<split>_<name>" for examples, kept, truncated,
        dropped, masked, skipped (no loss token), tokens and loss_tokens (this process); lazily
        only examples (nothing else is known at start-up)."""
        return {f"data/{split}_{k}": v for split, c in self._counts.items() for k, v in c.items()}

    def train_iterator(self) -> TrainIterator:
        """A fresh iterator from the first step; `set_state` moves it to a saved position."""
        L, seed = self.layout, self.plan.seed
        if self.mixture is None:
            picks = _ShardPicks(
                self._train_members, self._train_shards, self.steps_per_epoch, seed if self.plan.shuffle else None
            )
        else:
            picks = MixturePicks(
                self.mixture,
                self._mixture_members,
                self._train_shards,
                L.global_batch,
                self.steps_per_epoch,
                seed,
                self.plan.shuffle,
            )
        assemble = _AssembleStep(self.train_split, picks, L)
        workers = self.plan.num_workers if self.tokenize == "lazy" else 0
        build = functools.partial(_step_stream, assemble, workers)
        # What the stream depends on; not the device layout (a run may resume on another one).
        fingerprint = dict(
            train_examples=self.num_train_examples,
            steps_per_epoch=self.steps_per_epoch,
            seed=seed,
            shuffle=self.plan.shuffle,
            global_batch=L.global_batch,
            seq_len=L.seq_len,
            packing=L.packing,
        )
        if self.mixture is not None:
            fingerprint["mixture"] = self.mixture.fingerprint()
        return TrainIterator(build, fingerprint)

    @property
    def num_val_batches(self) -> int:
        """Global validation batches per validation run (sft.val_batches; <= 0: the whole split)."""
        L = self.layout
        n = math.ceil(self.num_val_examples / L.val_global_batch)
        val_batches = self.plan.val_batches
        return n if val_batches <= 0 else min(n, val_batches)

    def val_batches(self) -> Iterator[dict[str, np.ndarray]]:
        """Validation micro-batches (padded rows, int32 [val_micro_batch_size * len(dp_ranks), seq])
        from the start of the split, in order, fresh on every call. Every process yields the same
        number; rows past the end of a rank's share are padding (no loss)."""
        L = self.layout
        per_batch = L.val_rank_batch // L.val_rank_rows
        for b in range(self.num_val_batches):
            per_rank = [
                [
                    [seq]
                    for seq in self.val_split.examples([int(m[b]) for m in members if b < len(m)])
                    if seq is not None
                ]
                for members in self._val_members
            ]
            yield from micro_batches(per_rank, L.val_rank_rows, L, per_batch)
