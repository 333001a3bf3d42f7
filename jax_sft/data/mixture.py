"""Weighted mixtures of the train datasets: a `weight` on every `data.train` entry (jax_sft's own
key) makes each step draw from the datasets in those proportions, of the sequences
(`data.mixture_by: examples`) or of the tokens (`tokens`). Without weights the train datasets are
concatenated, as NeMo RL does (`jax_sft.data.pipeline`'s shards).

The draws are a pure function of the seed and the global draw index t = step x G + slot (G =
train_global_batch_size), so that, as for the concatenation, the data position is the step index
alone: the same on every process, resumable on any number of processes and devices.

  * Which dataset draw t comes from: the datasets are split in halves, recursively; at each split
    the first t draws of the node send floor(t p + u) - floor(u) to the left half (p: the left
    half's share of the node, u: an offset drawn from the seed per node). Each dataset's count
    among the first t draws is within one or two draws of t x its share at every t, so the
    proportions hold over any window of steps, not only on average; a seeded permutation of a
    step's G draws over its slots spreads the datasets over the data-parallel ranks.
  * Which example: the k-th draw of dataset d is example order_{d,e}[k mod n_d] of it, with
    epoch e = k // n_d counted per dataset and order_{d,e} a seeded permutation (the identity
    with `data.shuffle=false`): a dataset is reshuffled after each full pass of its own.
  * By tokens: the share of sequences of dataset d is proportional to weight_d / mean_d, mean_d
    being its mean example length (tokens after `data.overlength`), measured at start-up on up
    to `MEAN_SAMPLE` seeded examples of it (all of them up front, where the cache has them).

A mixture's epoch, which `sft.max_num_epochs` counts, is as many sequences as the train datasets
hold together (what an epoch of their concatenation would be).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from jax_sft.choices import MIXTURE_BY
from jax_sft.data.sections import WEIGHT

__all__ = ["MEAN_SAMPLE", "Mixture", "MixturePicks", "mixture_of", "describe_weights", "draws", "sample_means"]

MEAN_SAMPLE = 1000  # examples encoded per dataset to measure its mean length (data.mixture_by=tokens)
_ROUTE, _SLOTS, _ORDER, _SAMPLE = 1, 2, 3, 4  # streams of the seed


@dataclasses.dataclass(frozen=True)
class Mixture:
    """The train datasets of a weighted run: labels ("train[0]", ...), where each one's rows start
    in the concatenated train split and how many it has, the weights as given, what
    they share out, each dataset's mean length (by tokens), and the resulting share of the
    sequences drawn from each (`probabilities`)."""

    labels: tuple[str, ...]
    starts: tuple[int, ...]
    sizes: tuple[int, ...]
    weights: tuple[float, ...]
    by: str
    mean_tokens: tuple[float, ...] | None = None

    def __post_init__(self):
        if self.by not in MIXTURE_BY:
            raise ValueError(f"data.mixture_by={self.by!r}: expected one of {MIXTURE_BY}")

    @property
    def probabilities(self) -> tuple[float, ...]:
        w = np.asarray(self.weights, np.float64)
        if self.by == "tokens":
            if self.mean_tokens is None:
                raise ValueError("a mixture by tokens needs each dataset's mean length (with_means)")
            w = w / np.asarray(self.mean_tokens, np.float64)
        return tuple(float(x) for x in w / w.sum())

    def with_means(self, means: Sequence[float]) -> Mixture:
        return dataclasses.replace(self, mean_tokens=tuple(float(m) for m in means))

    def describe(self, global_batch: int) -> list[str]:
        """The start-up log's lines: each dataset's share of the sequences (and of the tokens), and
        how many passes over it an epoch of the mixture makes."""
        total, p = sum(self.sizes), self.probabilities
        what = "the sequences" if self.by == "examples" else "the tokens"
        lines = [f"mixture by {self.by}: the weights share out {what}; an epoch is {total:,} sequences"]
        for i, label in enumerate(self.labels):
            share = f"{100 * p[i]:.2f}% of the sequences"
            if self.mean_tokens is not None:
                tokens = np.asarray(p) * np.asarray(self.mean_tokens)
                share += f", {100 * tokens[i] / tokens.sum():.2f}% of the tokens (mean {self.mean_tokens[i]:.1f})"
            passes = total * p[i] / max(self.sizes[i], 1)
            lines.append(
                f"  {label}: weight {self.weights[i]:g} -> {share}; {self.sizes[i]:,} rows, "
                f"{passes:.3g} passes per epoch (~{global_batch * p[i]:.3g} per step)"
            )
        return lines

    def fingerprint(self) -> dict[str, Any]:
        """What the data stream depends on, for the iterator state."""
        return {"labels": list(self.labels), "sizes": list(self.sizes), "by": self.by, "p": list(self.probabilities)}


def mixture_of(dataset: Any, by: str) -> Mixture | None:
    """The mixture of a built dataset whose train sections carry weights (None: no weights, the
    concatenation); by tokens the means are filled in later (`with_means`)."""
    parts = getattr(dataset, "parts", {}).get("train") or []
    if not parts or not any(WEIGHT in s.keys and s.keys[WEIGHT] is not None for s, _, _ in parts):
        return None
    sizes = [len(rows) for _, _, rows in parts]
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(int)
    return Mixture(
        labels=tuple(s.label for s, _, _ in parts),
        starts=tuple(int(x) for x in starts),
        sizes=tuple(sizes),
        weights=tuple(float(s.keys[WEIGHT]) for s, _, _ in parts),
        by=by,
    )


def describe_weights(weights: Sequence[float], labels: Sequence[str], by: str) -> str:
    """The dry run's line (no rows read): the weights as shares."""
    total = float(sum(weights))
    shares = ", ".join(f"{label} {100 * w / total:.2f}%" for label, w in zip(labels, weights))
    what = "sequences" if by == "examples" else "tokens (shares of sequences follow from mean lengths at start-up)"
    return f"mixture by {by}: {shares} of the {what}"


def _route(t: np.ndarray, probs: np.ndarray, offsets: np.ndarray, lo: int, hi: int, node: int):
    """(dataset, its draw number) of the node's draws number `t` (datasets lo..hi-1; see the
    module docstring)."""
    if hi - lo == 1:
        return np.full(len(t), lo, np.int64), t
    mid = (lo + hi) // 2
    p, u = probs[lo:mid].sum() / probs[lo:hi].sum(), offsets[node]
    before = np.floor(t * p + u) - math.floor(u)
    left = np.floor((t + 1) * p + u) - math.floor(u) > before
    before = before.astype(np.int64)
    d, k = np.empty(len(t), np.int64), np.empty(len(t), np.int64)
    d[left], k[left] = _route(before[left], probs, offsets, lo, mid, 2 * node + 1)
    d[~left], k[~left] = _route((t - before)[~left], probs, offsets, mid, hi, 2 * node + 2)
    return d, k


def draws(t: np.ndarray, probabilities: Sequence[float], seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(dataset index, draw number within that dataset) of the global draws `t` (int64 array)."""
    probs = np.asarray(probabilities, np.float64)
    offsets = np.random.default_rng([seed, _ROUTE]).random(2 * len(probs))
    return _route(np.asarray(t, np.int64), probs, offsets, 0, len(probs), 0)


class MixturePicks:
    """Grain-side picker of a mixture: step -> (epoch, the positions in the split of each local
    rank's sequences). `members[d]`: positions in the split of dataset d's examples (None: its
    rows, contiguous from `mixture.starts[d]`, as the lazy split has them). Picklable."""

    def __init__(
        self,
        mixture: Mixture,
        members: Sequence[np.ndarray] | None,
        slots: Sequence[Sequence[int]],
        global_batch: int,
        steps_per_epoch: int,
        seed: int,
        shuffle: bool,
    ):
        self.mixture, self.members, self.slots = mixture, members, [list(s) for s in slots]
        self.global_batch, self.steps_per_epoch, self.seed, self.shuffle = global_batch, steps_per_epoch, seed, shuffle
        self.sizes = [len(m) for m in members] if members is not None else list(mixture.sizes)
        self.probabilities = mixture.probabilities
        self._orders: dict[tuple[int, int], np.ndarray] = {}

    def _order(self, d: int, epoch: int) -> np.ndarray:
        key = (d, epoch)
        if key not in self._orders:  # keep this dataset's previous epoch (a step may straddle two)
            self._orders = {k: v for k, v in self._orders.items() if k[0] != d or k[1] >= epoch - 1}
            n = self.sizes[d]
            rng = np.random.default_rng([self.seed, _ORDER, d, epoch])
            self._orders[key] = rng.permutation(n) if self.shuffle else np.arange(n)
        return self._orders[key]

    def _position(self, d: int, k: int) -> int:
        epoch, r = divmod(k, self.sizes[d])
        i = int(self._order(d, epoch)[r])
        return int(self.members[d][i]) if self.members is not None else self.mixture.starts[d] + i

    def __call__(self, step: int) -> tuple[int, list[list[int]]]:
        G = self.global_batch
        slot_draw = np.arange(G)
        if self.shuffle:
            slot_draw = np.random.default_rng([self.seed, _SLOTS, step]).permutation(G)
        wanted = sorted({j for rank in self.slots for j in rank})
        d, k = draws(step * G + slot_draw[wanted], self.probabilities, self.seed)
        by_slot = {j: self._position(int(dd), int(kk)) for j, dd, kk in zip(wanted, d, k)}
        return step // self.steps_per_epoch, [[by_slot[j] for j in rank] for rank in self.slots]

    def dataset_epochs(self, step: int) -> tuple[int, ...]:
        """The epoch (passes completed) of each dataset at the start of `step`."""
        t = step * self.global_batch
        return tuple(_count_before(t, d, self.probabilities, self.seed) // n for d, n in enumerate(self.sizes))


def _count_before(t: int, d: int, probabilities: Sequence[float], seed: int) -> int:
    """How many of the first t global draws come from dataset d."""
    probs = np.asarray(probabilities, np.float64)
    offsets = np.random.default_rng([seed, _ROUTE]).random(2 * len(probs))
    lo, hi, node, count = 0, len(probs), 0, t
    while hi - lo > 1:
        mid = (lo + hi) // 2
        p, u = probs[lo:mid].sum() / probs[lo:hi].sum(), offsets[node]
        left = int(math.floor(count * p + u) - math.floor(u))
        if d < mid:
            lo, hi, node, count = lo, mid, 2 * node + 1, left
        else:
            lo, hi, node, count = mid, hi, 2 * node + 2, count - left
    return count


def sample_means(
    mixture: Mixture, lengths_of: Callable[[list[int]], list[int | None]], seed: int, sample: int = MEAN_SAMPLE
) -> list[float]:
    """Each dataset's mean example length over up to `sample` seeded rows of it (`lengths_of(rows)`:
    their lengths in tokens, None for a dropped or skipped one)."""
    means = []
    for d, (start, n) in enumerate(zip(mixture.starts, mixture.sizes)):
        rows = (
            np.arange(n)
            if n <= sample
            else np.sort(np.random.default_rng([seed, _SAMPLE, d]).choice(n, sample, replace=False))
        )
        lengths = [x for x in lengths_of([start + int(r) for r in rows]) if x is not None]
        if not lengths:
            raise ValueError(f"{mixture.labels[d]}: no usable example among {len(rows)} to measure its mean length")
        means.append(float(np.mean(lengths)))
    return means
