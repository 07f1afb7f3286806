"""Retrieval metrics as MMEB reports them: Hit@1 (MMEB's "precision@1"), NDCG@5, MRR@10 and
Recall@k per task, macro-averaged over the tasks of each group and over all tasks, plus
MMEB-V2's per-modality and overall averages of each task's primary metric.

    from unified_tte.eval.metrics import evaluate_scores, ranking_metrics, aggregate
    m = evaluate_scores(scores, positives)    # scores [Q, C] (or ragged list), positives [Q]
    # {"hit@1": 0.9, "ndcg@5": 0.95, "mrr": 0.94, "mrr@10": 0.94, "n": Q}  (fractions)
    m = ranking_metrics(scores, gains)        # one query: graded gains, several positives

Names: "mrr@10" is MRR cut at rank 10, as VLM2Vec reports it; "mrr" is the full-rank MRR.
"ndcg@5" uses linear graded gains (MMEB-V2's "ndcg_linear@5"): DCG = sum gain / log2(rank + 1)
over the top 5, divided by the ideal DCG of the query's gains; with one positive it is
1 / log2(rank + 1). "recall@k" is the share of a query's positives in its top k.

Tie rule (pessimistic): a relevant item ranks BELOW every non-relevant item whose score equals
its own, so a model that scores everything equal gets the worst rank, never a lucky Hit@1:
    rank of a positive = 1 + #{j not relevant : score[j] >= its score} + #{relevant j ahead}.
The evaluator scores each DISTINCT candidate content once, so a candidate identical to the
positive (MMEB lists repeat class names) is the positive, not a tie that loses. NaN scores are
an error.
"""
from __future__ import annotations

import math
from typing import Mapping, Sequence

import numpy as np

METRICS = ("hit@1", "ndcg@5", "mrr")
MMEB_METRICS = ("mrr@10", "recall@5")   # shown beside METRICS for MMEB tasks
RECALL_AT = (1, 5, 10)


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


def ranking_metrics(scores, gains) -> dict:
    """Metrics of one query ranked over items with graded `gains` (> 0: relevant), pessimistic
    ties. Returns {"hit@1", "ndcg@5", "mrr", "mrr@10", "recall@1/5/10"}."""
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    g = np.asarray(gains, dtype=np.float64).reshape(-1)
    if s.size == 0 or s.size != g.size:
        raise ValueError(f"{s.size} scores for {g.size} gains; a query needs at least one item")
    if np.isnan(s).any():
        raise ValueError("NaN in the scores; check the embeddings for NaN/inf")
    relevant = g > 0
    if not relevant.any():
        raise ValueError("a query with no relevant item cannot be scored")
    order = np.lexsort((relevant, -s))              # by score, then irrelevant first among ties
    ranked = g[order]
    first = int(np.argmax(ranked > 0)) + 1
    discount = 1.0 / np.log2(np.arange(2, 7))
    ideal = np.sort(g)[::-1][:5]
    out = {"hit@1": float(ranked[0] > 0),
           "ndcg@5": float((ranked[:5] * discount[:len(ranked[:5])]).sum() / (ideal * discount[:len(ideal)]).sum()),
           "mrr": 1.0 / first, "mrr@10": 1.0 / first if first <= 10 else 0.0}
    for k in RECALL_AT:
        out[f"recall@{k}"] = float((ranked[:k] > 0).sum() / relevant.sum())
    return out


def mean_metrics(per_query: Sequence[dict]) -> dict:
    """Means of ranking_metrics over queries, with "n"."""
    if not per_query:
        raise ValueError("no queries to evaluate")
    out = {k: float(np.mean([m[k] for m in per_query])) for k in per_query[0]}
    out["n"] = len(per_query)
    return out


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
        "mrr@10": sum(1.0 / r for r in ranks if r <= 10) / n,
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


def mmeb_averages(per_task: Mapping[str, Mapping]) -> dict:
    """MMEB-V2's report: each task's primary metric (its "primary" key: Hit@1 for image and
    video, NDCG@5 for visdoc) averaged per modality and over all tasks. Tasks without a
    "modality" are left out; {} when there are none.

    Returns {modality: {"score", "n_tasks"}, ..., "overall": {"score", "n_tasks"}}."""
    scored = {t: m for t, m in per_task.items() if m.get("modality")}
    if not scored:
        return {}
    out: dict[str, dict] = {}
    for modality in dict.fromkeys(m["modality"] for m in scored.values()):
        values = [m[m["primary"]] for m in scored.values() if m["modality"] == modality]
        out[modality] = {"score": float(np.mean(values)), "n_tasks": len(values)}
    out["overall"] = {"score": float(np.mean([m[m["primary"]] for m in scored.values()])),
                      "n_tasks": len(scored)}
    return out
