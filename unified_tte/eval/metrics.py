"""Retrieval metrics as MMEB reports them: Hit@1 (MMEB's "precision@1"), NDCG@5, MRR@10 and
Recall@k per task, macro-averaged over the tasks of each group and over all tasks, plus
MMEB's per-modality (and MMEB-V1's IND / OOD) averages of each task's primary metric.

    from unified_tte.eval.metrics import evaluate_scores, aggregate, mmeb_averages
    m = evaluate_scores(scores, positives, candidates=keys)   # scores [Q, C] (or ragged), keys per column
    # {"hit@1": 0.9, "ndcg@5": 0.95, "mrr": 0.94, "mrr@10": 0.94, "recall@1": ..., "recall@5": ...,
    #  "recall@10": ..., "n": Q, "n_tied": 1, "tied_queries": [7]}   (fractions)

One scorer: `evaluate_scores` (a score matrix) and the evaluator (`evaluate.evaluate_task`, which
embeds each distinct candidate content once) both rank through `ranking` and average through
`score_queries`, with the same candidate handling (`distinct_candidates`), so the same lists give
the same numbers.

Names: "mrr@10" is MRR cut at rank 10, as VLM2Vec reports it; "mrr" is the full-rank MRR.
"ndcg@5" uses linear graded gains (MMEB-V2's "ndcg_linear@5"): DCG = sum gain / log2(rank + 1)
over the top 5, divided by the ideal DCG of the query's gains; with one positive it is
1 / log2(rank + 1). "recall@k" is the share of a query's positives in its top k.

Candidates: columns with the same content key are one candidate whose gain is the highest of
theirs, so a candidate identical to the positive (MMEB lists repeat class names) IS the positive.

Ties: only an exact tie between a relevant item and an item of another gain changes a metric;
every result counts the queries that had one ("n_tied"). `tie_rule` decides them:
  "pessimistic" (default): among equal scores the lower gain ranks first, so a positive ranks
      BELOW every negative that scores the same and a model that scores everything equal gets the
      worst rank, never a lucky Hit@1.
  "reference": among equal scores the earlier candidate ranks first, as VLM2Vec ranks: MMEB-V1's
      `np.argmax` takes the first index (the positive, listed first), and for MMEB-V2 a stable sort
      by candidate order (VLM2Vec's own `np.argsort` is not stable; the README says which
      published numbers each rule reproduces).
NaN scores are an error.
"""
from __future__ import annotations

from typing import Hashable, Iterable, Mapping, Sequence

import numpy as np

METRICS = ("hit@1", "ndcg@5", "mrr")
MMEB_METRICS = ("mrr@10", "recall@5")   # shown beside METRICS for MMEB tasks
RECALL_AT = (1, 5, 10)
TIE_RULES = ("pessimistic", "reference")
_DISCOUNT = 1.0 / np.log2(np.arange(2, 7))      # ranks 1..5


def check_tie_rule(tie_rule: str) -> None:
    if tie_rule not in TIE_RULES:
        raise ValueError(f"tie rule {tie_rule!r}: expected one of {', '.join(TIE_RULES)}")


def ranking(scores, gains, tie_rule: str = "pessimistic") -> tuple[np.ndarray, bool]:
    """The ranking core: the items' gains in ranked order (best first) under `tie_rule`, and
    whether an exact tie between a relevant item and one of another gain was decided by it.

    Args:
        scores: [C] scores of one query's items, in candidate order.
        gains: [C] graded relevance (> 0: relevant; at least one).
    """
    check_tie_rule(tie_rule)
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    g = np.asarray(gains, dtype=np.float64).reshape(-1)
    if s.size == 0 or s.size != g.size:
        raise ValueError(f"{s.size} scores for {g.size} gains; a query needs at least one item")
    if np.isnan(s).any():
        raise ValueError("NaN in the scores; check the embeddings for NaN/inf")
    if not (g > 0).any():
        raise ValueError("a query with no relevant item cannot be scored")
    if tie_rule == "pessimistic":
        order = np.lexsort((g, -s))                 # by score, then the lower gain first
    else:
        order = np.argsort(-s, kind="stable")       # by score, then candidate order
    tied = any(np.ptp(g[s == v]) > 0 for v in np.unique(s[g > 0]))
    return g[order], tied


def ranked_metrics(ranked: np.ndarray) -> dict:
    """Hit@1, NDCG@5, MRR, MRR@10 and Recall@1/5/10 of gains in ranked order."""
    first = int(np.argmax(ranked > 0)) + 1
    top, ideal = ranked[:5], np.sort(ranked)[::-1][:5]
    out = {"hit@1": float(ranked[0] > 0),
           "ndcg@5": float((top * _DISCOUNT[:len(top)]).sum() / (ideal * _DISCOUNT[:len(ideal)]).sum()),
           "mrr": 1.0 / first, "mrr@10": 1.0 / first if first <= 10 else 0.0}
    relevant = (ranked > 0).sum()
    for k in RECALL_AT:
        out[f"recall@{k}"] = float((ranked[:k] > 0).sum() / relevant)
    return out


def ranking_metrics(scores, gains, tie_rule: str = "pessimistic") -> dict:
    """Metrics of one query ranked over items with graded `gains` (several positives allowed).
    Returns {"hit@1", "ndcg@5", "mrr", "mrr@10", "recall@1/5/10"}."""
    return ranked_metrics(ranking(scores, gains, tie_rule)[0])


def rank_of_positive(scores, positive: int, tie_rule: str = "pessimistic") -> int:
    """1-based rank of the positive among the candidates (each column its own candidate)."""
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    if s.size == 0:
        raise ValueError("empty score vector: a query needs at least one candidate")
    ranked, _ = ranking(s, _one_hot(positive, s.size), tie_rule)
    return int(np.argmax(ranked > 0)) + 1


def score_queries(queries: Iterable[tuple], tie_rule: str = "pessimistic") -> dict:
    """Mean metrics over queries, each given as (scores, gains) and ranked by `ranking`.

    Returns {"hit@1", "ndcg@5", "mrr", "mrr@10", "recall@1/5/10": means, "n": number of queries,
    "n_tied": queries with an exact tie the tie rule decided, "tied_queries": their indices}."""
    per_query, tied = [], []
    for q, (scores, gains) in enumerate(queries):
        ranked, was_tied = ranking(scores, gains, tie_rule)
        per_query.append(ranked_metrics(ranked))
        if was_tied:
            tied.append(q)
    if not per_query:
        raise ValueError("no queries to evaluate")
    out = {k: float(np.mean([m[k] for m in per_query])) for k in per_query[0]}
    out.update(n=len(per_query), n_tied=len(tied), tied_queries=tied)
    return out


def distinct_candidates(keys: Sequence[Hashable], gains) -> tuple[list[int], np.ndarray]:
    """One query's candidates with equal content keys collapsed: the first column of each key, in
    candidate order, and its gain, the highest among the key's columns (a duplicate of the
    positive is the positive)."""
    first: dict = {}
    merged: list[float] = []
    for column, (key, gain) in enumerate(zip(keys, gains)):
        if key not in first:
            first[key] = (column, len(merged))
            merged.append(float(gain))
        else:
            slot = first[key][1]
            merged[slot] = max(merged[slot], float(gain))
    return [column for column, _ in first.values()], np.asarray(merged)


def _one_hot(positive: int, size: int) -> np.ndarray:
    if not 0 <= positive < size:
        raise ValueError(f"positive index {positive} is outside the {size} candidates")
    gains = np.zeros(size)
    gains[positive] = 1.0
    return gains


def _gains(positive, size: int, query: int) -> np.ndarray:
    """A query's gains per column from a positive index or a {column: gain} mapping."""
    if isinstance(positive, Mapping):
        gains = np.zeros(size)
        for column, gain in positive.items():
            if not 0 <= int(column) < size:
                raise ValueError(f"query {query}: relevant column {column} is outside the {size} candidates")
            gains[int(column)] = float(gain)
        return gains
    return _one_hot(int(positive), size)


def evaluate_scores(scores, positives: Sequence, candidates: Sequence[Sequence[Hashable]] | None = None,
                    tie_rule: str = "pessimistic") -> dict:
    """Mean metrics over queries from a score matrix: what `evaluate_task` computes from the same
    lists (it calls the same core).

    Args:
        scores: [Q, C] array/tensor, or a list of Q score vectors (candidate counts may differ).
        positives: per query, the column of its positive, or {column: gain} (graded, several).
        candidates: per query, a content key per column (a text, a path, a corpus id): columns
            with equal keys are one candidate (see `distinct_candidates`), scored by the first
            of them (equal content may differ in the last bit of a matrix product). Without it
            every column is a distinct candidate, so a duplicate of the
            positive that the matrix does not show scores as an exact tie: the queries whose
            positive ties another column are listed in "tied_queries", not silently scored.
        tie_rule: "pessimistic" or "reference" (module docstring).
    Returns: see `score_queries`.
    """
    if hasattr(scores, "detach"):            # torch tensor, without importing torch here
        scores = scores.detach().float().cpu().numpy()
    if len(scores) != len(positives):
        raise ValueError(f"{len(scores)} score rows but {len(positives)} positives")
    if candidates is not None and len(candidates) != len(scores):
        raise ValueError(f"{len(scores)} score rows but {len(candidates)} candidate key lists")

    def queries():
        for q, (row, positive) in enumerate(zip(scores, positives)):
            s = np.asarray(row, dtype=np.float64).reshape(-1)
            gains = _gains(positive, s.size, q)
            if candidates is not None:
                keys = list(candidates[q])
                if len(keys) != s.size:
                    raise ValueError(f"query {q}: {s.size} scores but {len(keys)} candidate keys")
                keep, gains = distinct_candidates(keys, gains)
                s = s[keep]
            yield s, gains
    return score_queries(queries(), tie_rule)


def aggregate(per_task: Mapping[str, Mapping[str, float]], groups: Mapping[str, str],
              metrics: Sequence[str] = METRICS) -> dict:
    """Macro-averages: each group's score is the unweighted mean over its tasks, and "overall"
    the unweighted mean over all tasks (not over the groups; MMEB's overall is also a mean over
    tasks).

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
    """MMEB's report: each task's primary metric (its "primary" key: Hit@1 for image and video,
    NDCG@5 for visdoc) averaged per modality, per MMEB-V1 distribution (a task's "distribution":
    "IND", the 20 datasets MMEB-train holds, or "OOD", the 16 it does not) and over all tasks.
    Tasks without a "modality" are left out; {} when there are none.

    Returns {modality: {"score", "n_tasks"}, ..., ["IND": ..., "OOD": ...,] "overall": {...}}."""
    scored = {t: m for t, m in per_task.items() if m.get("modality")}
    if not scored:
        return {}

    def average(tasks):
        values = [m[m["primary"]] for m in tasks]
        return {"score": float(np.mean(values)), "n_tasks": len(values)}

    out: dict[str, dict] = {}
    for key in ("modality", "distribution"):
        for value in dict.fromkeys(m[key] for m in scored.values() if m.get(key)):
            out[value] = average([m for m in scored.values() if m.get(key) == value])
    out["overall"] = average(scored.values())
    return out
