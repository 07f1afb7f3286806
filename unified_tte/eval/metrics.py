"""Retrieval metrics as MMEB reports them: Hit@1 (MMEB's "precision@1"), NDCG@5 and MRR per
task, macro-averaged over the tasks of each group and over all tasks.

    from unified_tte.metrics import evaluate_scores, aggregate
    m = evaluate_scores(scores, positives)    # scores [Q, C] (or ragged list), positives [Q]
    # {"hit@1": 0.9, "ndcg@5": 0.95, "mrr": 0.94, "n": Q}  (fractions; tables show percent)

Each query has exactly one relevant candidate, at index `positive`.

Tie rule (pessimistic): the positive ranks BELOW every candidate whose score equals its own.
    rank = 1 + #{candidates j != positive : score[j] >= score[positive]}
so a model that scores everything equal gets the worst rank, never a lucky Hit@1. NaN scores
are an error.
"""
from __future__ import annotations

import math
from typing import Mapping, Sequence

import numpy as np

METRICS = ("hit@1", "ndcg@5", "mrr")


def rank_of_positive(scores, positive: int) -> int:
    """1-based rank of the positive under the pessimistic tie rule."""
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    if s.size == 0:
        raise ValueError("empty score vector: a query needs at least one candidate")
    if not 0 <= positive < s.size:
        raise ValueError(f"positive index {positive} is outside the {s.size} candidates")
    if np.isnan(s).any():
        raise ValueError("NaN in the scores; check the embeddings for NaN/inf")
    others = np.delete(s, positive)
    return 1 + int((others >= s[positive]).sum())


def hit_at_1(scores, positive: int) -> float:
    """1.0 if the positive ranks first (ties count against it), else 0.0."""
    return float(rank_of_positive(scores, positive) == 1)


def ndcg_at_k(scores, positive: int, k: int = 5) -> float:
    """NDCG@k with one relevant item: 1/log2(rank + 1) if rank <= k else 0 (ideal DCG is 1)."""
    r = rank_of_positive(scores, positive)
    return 1.0 / math.log2(r + 1) if r <= k else 0.0


def mrr(scores, positive: int) -> float:
    """Reciprocal rank of the positive."""
    return 1.0 / rank_of_positive(scores, positive)


def evaluate_scores(scores, positives: Sequence[int], k: int = 5) -> dict:
    """Mean Hit@1, NDCG@k and MRR over queries.

    Args:
        scores: [Q, C] array/tensor, or a list of Q score vectors (candidate counts may differ).
        positives: [Q] index of the positive candidate of each query.
    Returns: {"hit@1", f"ndcg@{k}", "mrr": fractions in [0, 1], "n": Q}.
    """
    if hasattr(scores, "detach"):            # torch tensor, without importing torch here
        scores = scores.detach().float().cpu().numpy()
    positives = [int(p) for p in positives]
    if len(scores) != len(positives):
        raise ValueError(f"{len(scores)} score rows but {len(positives)} positives")
    if not positives:
        raise ValueError("no queries to evaluate")
    ranks = [rank_of_positive(s, p) for s, p in zip(scores, positives)]
    n = len(ranks)
    return {
        "hit@1": sum(r == 1 for r in ranks) / n,
        f"ndcg@{k}": sum(1.0 / math.log2(r + 1) for r in ranks if r <= k) / n,
        "mrr": sum(1.0 / r for r in ranks) / n,
        "n": n,
    }


def aggregate(per_task: Mapping[str, Mapping[str, float]], groups: Mapping[str, str],
              metrics: Sequence[str] = METRICS) -> dict:
    """MMEB-style averages: each group's score is the unweighted mean over its tasks, and
    "overall" is the unweighted mean over all tasks (not over groups, as MMEB's overall is).

    Returns {"groups": {group: {metric: mean, "n_tasks": int}}, "overall": {...}}.
    """
    missing = [t for t in per_task if t not in groups]
    if missing:
        raise ValueError(f"no group for task(s) {missing}")

    def mean(names):
        out = {m: float(np.mean([per_task[t][m] for t in names])) for m in metrics}
        out["n_tasks"] = len(names)
        return out

    by_group: dict[str, list[str]] = {}
    for t in per_task:
        by_group.setdefault(groups[t], []).append(t)
    return {"groups": {g: mean(ts) for g, ts in by_group.items()},
            "overall": mean(list(per_task)) if per_task else {}}
