"""Which rows each training step sees: per-subset caps and weights, and mixed or same-task
global batches, as VLM2Vec's published recipes sample MMEB-train.

    from unified_tte.data.sampling import SubsetSpec, apply_subsets, BatchSampler
    rows = apply_subsets(rows, {"ImageNet_1K": SubsetSpec(max_rows=100_000), "DocVQA": SubsetSpec(weight=2)})
    sampler = BatchSampler([r.task for r in rows], batch=1024, seed=0, stage_index=1, batching="same_task")
    idx = sampler.batch(step)          # global row indices of step `step`; every rank slices it

* `max_rows` keeps the FIRST rows of a subset in file order (VLM2Vec's `num_sample_per_subset`).
* `weight` is the subset's sampling probability, normalised over subsets (VLM2Vec interleaves
  its subsets with these probabilities). Without any weight, subsets are drawn in proportion
  to their sizes.
* `batching: mixed` draws every row of a global batch on its own (subset by weight, then the
  next row of that subset); with no weights given, this is the plain seeded shuffle of all rows
  per epoch (tail dropped). `same_task` draws one subset per global batch (by weight) and fills
  the whole batch from it, so in-batch negatives, and the targets gathered from every rank under
  ZeRO, all come from one subset.
* Each subset is read as a stream: a fresh seeded permutation per pass, so every row of a subset
  is seen once before any is seen again. A batch depends on (seed, stage, step) only: the data
  position of a run is its step, and a resumed run continues the same sequence.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, replace
from typing import Literal, Sequence

import numpy as np

from ..errors import DataError

BATCHING = ("mixed", "same_task")


@dataclass
class SubsetSpec:
    """Options of one training subset (the recipe's `data.subsets.<name>`)."""
    max_rows: int | None = None
    """Keep the first N rows of the subset (VLM2Vec's num_sample_per_subset)."""
    weight: float | None = None
    """Sampling probability of the subset, normalised over subsets (default: 1 when any subset
    sets a weight, else in proportion to the subset's size)."""
    max_pixels: int | None = None
    """Cap on this subset's images (e.g. document subsets); null: the model's max_pixels."""


def apply_subsets(rows: list, subsets: dict[str, SubsetSpec]) -> list:
    """Rows with each subset capped to its first `max_rows` and its images capped to its
    `max_pixels` (copies of those rows: the rows given are not changed). A subset named in
    `subsets` but absent from the rows is an error."""
    present = dict.fromkeys(r.task for r in rows)
    unknown = [name for name in subsets if name not in present]
    if unknown:
        raise DataError(f"data.subsets names {unknown}, which the train data does not hold; its subsets: "
                        f"{list(present)[:12]}{' ...' if len(present) > 12 else ''}.")
    kept, counts = [], {}
    for row in rows:
        spec = subsets.get(row.task)
        if spec is not None and spec.max_rows is not None and counts.get(row.task, 0) >= spec.max_rows:
            continue
        counts[row.task] = counts.get(row.task, 0) + 1
        if spec is not None and spec.max_pixels is not None:
            row = capped_row(row, spec.max_pixels)
        kept.append(row)
    return kept


def capped_row(row, max_pixels: int):
    """A copy of a TrainRow whose query, positive and negative are capped at `max_pixels` (new
    inputs: a loader may share one TTEInput between rows)."""
    def cap(item):
        return None if item is None else replace(item, max_pixels=max_pixels)

    return replace(row, qry=cap(row.qry), pos=cap(row.pos), neg=cap(row.neg))


@functools.lru_cache(maxsize=16)
def _permutation(n: int, seed: int, stage_index: int, stream: int, epoch: int) -> np.ndarray:
    return np.random.default_rng([seed, stage_index, stream, epoch]).permutation(n)


class BatchSampler:
    """Global batches over rows labelled by subset (see the module docstring)."""

    def __init__(self, subsets: Sequence[str], batch: int, seed: int, stage_index: int,
                 batching: Literal["mixed", "same_task"] = "mixed",
                 weights: dict[str, float] | None = None):
        if batching not in BATCHING:
            raise ValueError(f"batching must be one of {BATCHING}, got {batching!r}")
        self.size, self.seed, self.stage_index, self.batching = batch, seed, stage_index, batching
        self.names = list(dict.fromkeys(subsets))
        self.members = [np.flatnonzero(np.asarray([s == name for s in subsets])) for name in self.names]
        self.plain = batching == "mixed" and not weights
        w = np.asarray([float((weights or {}).get(n, 1.0)) if weights else len(m)
                        for n, m in zip(self.names, self.members)], dtype=np.float64)
        if (w < 0).any() or w.sum() <= 0:
            raise DataError(f"subset weights must be >= 0 with a positive sum, got {dict(zip(self.names, w))}.")
        self.p = w / w.sum()
        if batching == "same_task":
            small = [n for n, m, p in zip(self.names, self.members, self.p) if p > 0 and len(m) < batch]
            if small:
                raise DataError(f"same_task batching fills each global batch of {batch} rows from one subset, "
                                f"but subset(s) {small} hold fewer rows; give them weight 0, or lower the batch.")
        self.n = len(subsets)
        # Draw d picks subset choices[d] and reads that subset's position[d]-th stream row.
        self._choices = np.zeros(0, dtype=np.int32)
        self._position = np.zeros(0, dtype=np.int64)
        self._running = np.zeros(len(self.names), dtype=np.int64)

    def _draws(self, upto: int) -> None:
        """Extend the seeded sequence of subset draws to at least `upto` draws."""
        while len(self._choices) < upto:
            chunk = np.random.default_rng([self.seed, self.stage_index, 7919, len(self._choices)]) \
                .choice(len(self.names), size=4096, p=self.p).astype(np.int32)
            position = np.empty(len(chunk), dtype=np.int64)
            for s in np.unique(chunk):
                where = np.flatnonzero(chunk == s)
                position[where] = self._running[s] + np.arange(len(where))
                self._running[s] += len(where)
            self._choices = np.concatenate([self._choices, chunk])
            self._position = np.concatenate([self._position, position])

    def _row(self, subset: int, k: int) -> int:
        """The k-th row (0-based) of a subset's stream: pass k // n, a fresh permutation each pass."""
        members = self.members[subset]
        epoch, i = divmod(k, len(members))
        return int(members[_permutation(len(members), self.seed, self.stage_index, subset, epoch)[i]])

    def batch(self, step: int) -> list[int]:
        """Global row indices of global batch `step` (0-based)."""
        if self.plain:
            per_epoch = self.n // self.size
            if per_epoch == 0:
                raise DataError(f"a global batch of {self.size} rows needs at least that many rows; got {self.n}.")
            epoch, k = divmod(step, per_epoch)
            return _permutation(self.n, self.seed, self.stage_index, len(self.names), epoch)[
                k * self.size:(k + 1) * self.size].tolist()
        if self.batching == "same_task":
            self._draws(step + 1)
            subset, before = int(self._choices[step]), int(self._position[step])
            return [self._row(subset, before * self.size + j) for j in range(self.size)]
        start = step * self.size
        self._draws(start + self.size)
        return [self._row(int(self._choices[d]), int(self._position[d])) for d in range(start, start + self.size)]

    def subset_of_batch(self, step: int) -> str | None:
        """same_task: the subset global batch `step` is drawn from (None for mixed)."""
        if self.batching != "same_task":
            return None
        self._draws(step + 1)
        return self.names[int(self._choices[step])]
