"""What each step trains on: the recipe's rows (traces attached), the rows a stage can use, the
seeded order of global batches, and encoding a batch's prompts once.

    rows = load_rows(recipe)
    idx = batch_indices(len(rows), batch=32, seed=0, stage_index=1, step=7)   # global batch 7
"""
from __future__ import annotations

import warnings

import numpy as np

from ..data import load_train_rows
from ..data.sampling import BatchSampler, SubsetSpec, apply_subsets
from ..data.traces import join_traces, swap_answers
from ..data.registry import build_builtin
from ..errors import DataError, InputError, TrainError
from .recipe import Recipe


def load_rows(recipe: Recipe) -> list:
    """Every train row of the recipe (with `.trace` where one is known), before any model work."""
    data = recipe.data
    if data.builtin:  # a built-in task: its rows carry the teacher's traces
        rows = build_builtin(data.train, **data.builtin_options()).train_rows
    else:
        loaded = load_train_rows(list(data.train), image_root=data.image_root, skip_bad=data.skip_bad)
        for reason in loaded.skipped[:5]:
            warnings.warn(f"skipped: {reason}")
        if len(loaded.skipped) > 5:
            warnings.warn(f"... and {len(loaded.skipped) - 5} more skipped rows")
        rows = list(loaded)
        if data.subsets:
            rows = apply_subsets(rows, {k: SubsetSpec(**v) for k, v in data.subsets.items()})
        if data.traces:
            rows = join_traces(rows, data.traces, valid_only=True, missing="keep")
    if data.max_rows is not None:
        rows = rows[:data.max_rows]
    if not rows:
        raise TrainError("the recipe's data has no rows.")
    return list(rows)


def split_holdout(recipe: Recipe, rows: list) -> tuple[list, list]:
    """(rows the think and embed stages train on, rows held out for the gate stage): a seeded
    `data.holdout` fraction of the rows, or of the `data.holdout_by` groups (a row is held out
    when any of its entities is). Depends on the rows and the recipe's seed only, so every run
    with the same data and seed holds out the same rows."""
    fraction, key = recipe.data.holdout, recipe.data.holdout_by
    if not fraction:
        return rows, []
    if key is None:
        groups = [[r.id] for r in rows]
    else:
        missing = [r.id for r in rows if key not in r.meta]
        if missing:
            raise TrainError(f"data.holdout_by={key!r}: {len(missing)} of {len(rows)} rows have no meta "
                             f"key {key!r} (first: {missing[:3]}); name a key every row has, or drop holdout_by.")
        groups = [r.meta[key] if isinstance(r.meta[key], (list, tuple)) else [r.meta[key]] for r in rows]
    names = sorted({str(g) for group in groups for g in group})
    order = np.random.default_rng([recipe.seed, 7]).permutation(len(names))
    held = {names[i] for i in order[:max(1, round(fraction * len(names)))]}
    fit, out = [], []
    for row, group in zip(rows, groups):
        (out if any(str(g) in held for g in group) else fit).append(row)
    if not fit or not out:
        raise TrainError(f"data.holdout={fraction} leaves {len(fit)} rows to train on and {len(out)} "
                         f"held out of {len(rows)}; choose a fraction that leaves both some rows.")
    return fit, out


def without_traces(rows: list, fraction: float, seed: int, step: int) -> list:
    """`embed.no_trace_fraction`: these rows with the trace of a seeded share of them removed
    (the query embeds directly, with no trace); the draw depends on the seed, the global step
    and the row id only, so a resumed run draws the same."""
    if not fraction:
        return rows
    import dataclasses
    import hashlib

    def draw(row_id: str) -> float:   # uniform in [0, 1), a function of (seed, step, id) alone
        digest = hashlib.sha256(f"{seed}:{step}:{row_id}".encode()).digest()
        return int.from_bytes(digest[:8], "big") / 2 ** 64

    return [r if draw(r.id) >= fraction else dataclasses.replace(r, trace=None) for r in rows]


def stage_rows(recipe: Recipe, stage: str, rows: list) -> list:
    """The rows a stage trains on; a stage that cannot use the data fails here, before any work."""
    if stage == "think":
        usable = [r for r in rows if r.trace]
        if not usable:
            raise TrainError("stage think needs ECR traces and no row has one: write them with "
                             "`tte traces` and list the files in data.traces.")
        return usable
    e = recipe.embed
    if e.use_traces:
        missing = [r.id for r in rows if not r.trace]
        if missing and e.missing_traces == "drop" and len(missing) < len(rows):
            warnings.warn(f"embed: {len(missing)} of {len(rows)} rows have no trace and are left out "
                          f"(first: {missing[:3]}).")
            rows = [r for r in rows if r.trace]
        elif missing:
            raise TrainError(f"embed.use_traces is true but {len(missing)} of {len(rows)} rows have no "
                             f"trace (first: {missing[:3]}); add trace files to data.traces, set "
                             "embed.missing_traces=drop, or embed.use_traces=false.")
        if e.trace_noise:
            rows = swap_answers(rows, e.trace_noise, recipe.seed)
    if e.hard_negatives:
        missing = [r.id for r in rows if r.neg is None]
        if missing:
            raise TrainError(f"embed.hard_negatives is true but {len(missing)} of {len(rows)} rows have "
                             f"no neg_text / neg_image_path (first: {missing[:3]}); set "
                             "embed.hard_negatives=false or add negatives.")
    return rows


def batch_indices(n: int, batch: int, seed: int, stage_index: int, step: int) -> list[int]:
    """Rows of global batch `step` (0-based) of a stage over n rows of one subset: a fresh
    seeded permutation each epoch, the tail that does not fill a batch dropped. Depends on its
    arguments only, so the data position of a run is its step."""
    return BatchSampler([""] * n, batch, seed, stage_index).batch(step)


def stage_sampler(recipe: Recipe, stage: str, stage_index: int, rows: list) -> BatchSampler:
    """The stage's batches over its rows: data.subsets weights; embed.batching for embed."""
    weights = {k: v["weight"] for k, v in recipe.data.subsets.items() if v.get("weight") is not None}
    batching = recipe.embed.batching if stage == "embed" else "mixed"
    return BatchSampler([r.task for r in rows], recipe.stage(stage).batch_size, recipe.seed, stage_index,
                        batching, weights or None)


def encode_prompts(tte, inputs, traces=None, ids: list[str] | None = None, side: str = "query") -> tuple[list, int]:
    """Encode once per step (images processed once, also for GradCache's second pass), with the
    room reserved after each prompt that `embed_with_grad` / `sft_loss` reserve themselves.
    Returns the prompts and the tokens the step will run (prompt + trace + EOS + invocation).
    With the rows' `ids`, an input that fails (an image that does not decode) is named by its row
    id and `side` (query, positive, negative), not by its place in the batch."""
    try:
        prompts = tte.encode(inputs, traces)
    except InputError as e:
        if ids is None:
            raise
        index = int(str(e).split(":", 1)[0].split()[-1]) if str(e).startswith("input ") else None
        row = ids[index % len(ids)] if index is not None else "?"
        raise DataError(f"row {row!r} ({side}): {str(e).split(': ', 1)[-1]} Fix or remove the row, "
                        "or train with data.skip_bad to skip rows whose images do not decode at load time.") from e
    tails = tte.tails(len(inputs), traces)
    return prompts, sum(len(p.ids) + len(t) + len(tte.invocation_ids) for p, t in zip(prompts, tails))
