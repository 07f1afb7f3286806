"""Evaluate an embedding model on MMEB-style tasks: Hit@1, NDCG@5, MRR (and MRR@10, Recall@k)
per task, averaged per group and overall (MMEB-V2: per modality and overall of each task's
primary metric), as a markdown table and a JSON file; on one process or sharded over many.

    tte eval checkpoints/run1 --tasks digits --out results.json
    tte eval checkpoints/run1 --tasks digits/plus_two,my_tasks.yaml --no-think
    tte eval RUN_DIR --tasks knowledge --think auto --frontier   # the think gate, swept (frontier.py)
    tte eval RUN_DIR --tasks mmeb_v2 --data-root /data/MMEB-V2 --cache-dir /scratch/emb
    torchrun --nproc_per_node 8 -m unified_tte.cli eval RUN_DIR --tasks mmeb_v2 --data-root /data/MMEB-V2
    tte eval checkpoints/smollm2-tte --tasks knowledge --task-option seed=0

    from unified_tte.eval import evaluate_model, format_table
    results = evaluate_model(model, resolve_tasks("digits"), batch_size=16)
    print(format_table(results))

Queries are embedded with `model.think_then_embed` (or `model.embed` without a trace under
`use_think=False`); candidates and corpus items with `model.embed` and no trace, each distinct
content once per task (candidate lists repeat across queries; they are deduplicated by text,
image and video content). The score is the dot product of the unit vectors (cosine).

Scoring follows MMEB: a candidate-list row's positive is the candidate at its index, and any
candidate with the same content IS the positive (it was embedded once); an exact tie between
genuinely different candidates is decided by the tie rule (`tie_rule`, `--tie-rule`; metrics.py)
and counted ("n_tied"). A corpus task (visdoc, video retrieval and classification) ranks every
query against the task's whole corpus with graded relevance, laid out in VLM2Vec's candidate order.

Scale-out: under torchrun each rank computes whole global batches (b = rank, rank + world, ...)
of queries and candidates, rank 0 gathers them and scores, so N ranks give the same embeddings,
and therefore scores, as one process. `cache_dir` keeps every computed batch per (model hash,
task, item) (cache.py): an interrupted evaluation resumes where it stopped. Rank 0 shows a
progress bar with items per second and the time left.
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import sys
import time
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from ..data import EvalTask, resolve_tasks, validate_eval_task
from ..data.registry import task_options
from ..data.traces import check_ecr_shape
from ..distributed import Ranks, barrier, gather, init_ranks, my_batches
from ..errors import DataError, command, positive_int
from ..locks import lock_folder
from ..model import UnifiedTTE, zoo
from ..model.config import THINK_POLICIES
from ..model.environment import check_kernel_environment
from ..model.gate import OPERATING_POINTS
from ..model.inputs import content_key as candidate_key
from .cache import EmbeddingCache, model_key
from .frontier import build_frontier, write_frontier
from .metrics import (MMEB_METRICS, METRICS, TIE_RULES, aggregate, check_tie_rule, distinct_candidates,
                      mmeb_averages, ranking_metrics, score_queries)

N_EXAMPLES = 3   # traces kept per task in the results, to eyeball what the reasoner wrote


def _digest(role: str, key: tuple, settings: str = "") -> str:
    return hashlib.sha1(json.dumps([role, settings, repr(key)]).encode()).hexdigest()


class TaskPlan:
    """What a task embeds and how it is scored: the distinct items, each query's items and gains."""

    def __init__(self, task: EvalTask):
        validate_eval_task(task)
        memo, index = {}, {}
        self.distinct: list = []

        def add(item) -> int:
            key = candidate_key(item, memo)
            if key not in index:
                index[key] = len(self.distinct)
                self.distinct.append(item)
            return index[key]

        self.corpus_ids = {cid: add(item) for cid, item in (task.corpus or {}).items()}
        # The corpus in VLM2Vec's candidate order (generate_cand_dataset: the rows' relevant items
        # in row order, then the rest of the corpus), the order the "reference" tie rule keeps.
        corpus_items = list(dict.fromkeys([self.corpus_ids[cid] for row in task.rows
                                           for cid in (row.relevance or {})] + list(self.corpus_ids.values())))
        self.items: list[list[int]] = []     # per query: distinct indices it is ranked over
        self.gains: list[np.ndarray] = []
        for row in task.rows:
            if row.relevance is not None:
                gain = {}
                for cid, g in row.relevance.items():   # duplicates of a relevant item share its gain
                    i = self.corpus_ids[cid]
                    gain[i] = max(gain.get(i, 0.0), float(g))
                self.items.append(corpus_items)
                self.gains.append(np.asarray([gain.get(i, 0.0) for i in corpus_items]))
            else:
                idx = [add(c) for c in row.candidates]
                positive = [1.0 if c == row.positive else 0.0 for c in range(len(idx))]
                keep, gains = distinct_candidates(idx, positive)   # each distinct content once
                self.items.append([idx[c] for c in keep])
                self.gains.append(gains)
        self.keys = [_digest("item", candidate_key(x, memo)) for x in self.distinct]
        self.query_keys = [_digest("query", candidate_key(r.query, memo)) for r in task.rows]


def _embed_batches(jobs: list, batch_size: int, encode, ranks: Ranks, cache, bar,
                   reused: list) -> dict[int, tuple]:
    """Embed `jobs` ([(global index, key, input)]) by global batches dealt out to the ranks,
    through the cache (items read back from it are counted in `reused[0]`). Returns {global
    index: (vector, trace)} of this rank's batches."""
    batches = [jobs[i:i + batch_size] for i in range(0, len(jobs), batch_size)]
    out: dict[int, tuple] = {}
    for b in my_batches(len(batches), ranks):
        batch = batches[b]
        keys = [k for _, k, _ in batch]
        hit = cache.get(keys) if cache is not None else {}
        if len(hit) == len(keys):
            vectors, traces = [hit[k][0] for k in keys], [hit[k][1] for k in keys]
            reused[0] += len(keys)
        else:
            emb, traces = encode([x for _, _, x in batch])
            vectors = emb.float().cpu().numpy()
            if len(vectors) != len(batch):
                raise RuntimeError(f"the model returned {len(vectors)} embeddings for {len(batch)} inputs")
            if cache is not None:
                cache.put(keys, vectors, traces)
        for (i, _, _), v, t in zip(batch, vectors, traces):
            out[i] = (np.asarray(v, dtype=np.float32), t)
        if bar is not None:
            bar.update(len(batch) * ranks.world)
    return out


class _Borrowed:
    """A caller's progress line, counted into but not closed by one task."""

    def __init__(self, line):
        self.line = line

    def update(self, n: int) -> None:
        self.line.update(n)

    def close(self) -> None:
        pass


def _embed_task(model, task: EvalTask, plan: TaskPlan, encode_queries, settings: str, batch_size: int,
                progress, ranks: Ranks | None, cache_dir, model_hash, candidate_memo=None):
    """Every query (through `encode_queries`, batch -> (vectors, notes)) and every distinct item
    (`model.embed`) of a task, by global batches over the ranks and through the cache under
    `settings` (items also through `candidate_memo`, a MemoryCache, when there is no cache).
    Returns (Q [n_queries, *], C [n_distinct, D], per-query notes, items read back from the
    cache or None without one) on rank 0, None on the others."""
    import torch
    from tqdm.auto import tqdm

    ranks = ranks or Ranks()
    cache = None
    if cache_dir is not None and model_hash is not None:
        cache = EmbeddingCache(cache_dir, model_hash, f"{task.name}-{settings}")
        if ranks.main:
            cache.clean()
        barrier(ranks)
    if hasattr(progress, "update"):   # a caller's progress line (console.Progress) counts the items
        bar = _Borrowed(progress) if ranks.main else tqdm(disable=True)
    else:
        bar = tqdm(total=len(task.rows) + len(plan.distinct), desc=task.name, unit="item",
                   disable=not (progress and ranks.main), dynamic_ncols=True)
    reused = [0]
    with torch.no_grad():
        queries = _embed_batches([(i, k, r.query) for i, (k, r) in enumerate(zip(plan.query_keys, task.rows))],
                                 batch_size, encode_queries, ranks, cache, bar, reused)
        items = _embed_batches([(i, k, x) for i, (k, x) in enumerate(zip(plan.keys, plan.distinct))],
                               batch_size, lambda b: (model.embed(b), [""] * len(b)), ranks,
                               cache if cache is not None else candidate_memo, bar, reused)
    bar.close()
    parts = gather((queries, items, reused[0]), ranks)
    if not ranks.main:
        return None
    q_all, c_all = {}, {}
    for q, c, _ in parts:
        q_all.update(q)
        c_all.update(c)
    if len(q_all) != len(task.rows) or len(c_all) != len(plan.distinct):
        raise RuntimeError(f"task {task.name!r}: {len(q_all)} query and {len(c_all)} candidate embeddings "
                           f"for {len(task.rows)} and {len(plan.distinct)} inputs")
    Q = np.stack([q_all[i][0] for i in range(len(task.rows))])
    C = np.stack([c_all[i][0] for i in range(len(plan.distinct))])
    cached = sum(p[2] for p in parts) if cache is not None else None
    return Q, C, [q_all[i][1] for i in range(len(task.rows))], cached


def evaluate_task(model, task: EvalTask, batch_size: int = 16, use_think: bool = True,
                  max_new_tokens: int = 64, progress: bool = True, ranks: Ranks | None = None,
                  cache_dir: str | os.PathLike | None = None, model_hash: str | None = None,
                  tie_rule: str = "pessimistic", think: str | None = None, threshold: float | None = None,
                  frontier: bool = False, traces: Mapping[str, str] | None = None, candidate_memo=None,
                  keep_traces: bool = False) -> dict | None:
    """Metrics of one task: {"hit@1", "ndcg@5", "mrr", "mrr@10", "recall@k", "n", "n_tied", "group", ...}
    (see evaluate_model). Under several ranks only rank 0 returns them (others: None)."""
    if think is not None or frontier:
        if traces is not None:
            raise ValueError("given traces and a think policy exclude each other: a given trace is always used")
        out = _evaluate_policy(model, task, batch_size, max_new_tokens, progress, ranks, cache_dir,
                               model_hash, tie_rule, think or "auto", threshold, frontier, candidate_memo)
        if out is not None and not keep_traces:
            out.pop("traces")
        return out
    plan = TaskPlan(task)
    given = None
    if traces is not None:
        missing = [r.id for r in task.rows if r.id not in traces]
        if missing:
            raise DataError(f"task {task.name!r}: no given trace for {len(missing)} queries (first: {missing[:3]})")
        given = {id(r.query): traces[r.id] for r in task.rows}

    def encode_queries(batch):
        if given is not None:
            tr = [given[id(x)] for x in batch]
            return model.embed(batch, tr), tr
        if use_think:
            emb, tr = model.think_then_embed(batch, max_new_tokens=max_new_tokens)
            return emb, [getattr(t, "text", t) for t in tr]
        return model.embed(batch), [""] * len(batch)

    settings = f"think={use_think},max_new_tokens={max_new_tokens}" if use_think else "no-think"
    if given is not None:
        settings = "given-" + hashlib.sha1(json.dumps([given[id(r.query)] for r in task.rows]).encode()).hexdigest()[:16]
    embedded = _embed_task(model, task, plan, encode_queries, settings, batch_size, progress, ranks,
                           cache_dir, model_hash, candidate_memo)
    if embedded is None:
        return None
    Q, C, traces, cached = embedded
    sims = Q @ C.T                                                        # cosine of unit vectors
    out = score_queries(((sims[q, idx], gains) for q, (idx, gains) in enumerate(zip(plan.items, plan.gains))),
                        tie_rule)
    del out["tied_queries"]                                               # results keep the count
    out.update(group=task.modality_group, needs_reasoning=task.needs_reasoning,
               n_candidates=float(np.mean([len(r.candidates) or len(task.corpus or {}) for r in task.rows])),
               n_distinct_candidates=len(plan.distinct))
    if cached is not None:
        out["cached_items"] = cached   # read back from the cache, not recomputed
    if task.modality:
        out.update(modality=task.modality, primary=task.primary)
    if task.distribution:
        out["distribution"] = task.distribution
    if use_think or given is not None:
        out["trace_valid"] = sum(check_ecr_shape(t) for t in traces) / len(traces)
        out["examples"] = [{"id": r.id, "trace": t} for r, t in
                           zip(task.rows[:N_EXAMPLES], traces[:N_EXAMPLES])]
    if keep_traces:
        out["traces"] = {r.id: t for r, t in zip(task.rows, traces)}
    return out


def _policy_encoders(model, think: str, threshold, frontier: bool, max_new_tokens: int):
    """encode(batch) -> (vectors, per-query JSON notes) for a think policy. With `frontier` each
    vector is [direct | TTE | gate score] (from `embed_both`), so every threshold can be scored."""
    def note(trace, score=None) -> str:
        tokens = len(trace.token_ids) + int(trace.finished) if trace.thought else 0
        return json.dumps({"trace": trace.text, "thought": trace.thought, "tokens": tokens,
                           "used": trace.used, "score": score})

    def encode(batch):
        import torch

        if frontier:
            both = model.embed_both(batch, max_new_tokens=max_new_tokens)
            scores = model.gate.score(both.features) if model.gate is not None else torch.zeros(len(batch))
            vectors = torch.cat([both.direct, both.tte, scores.view(-1, 1).to(both.direct)], dim=1)
            return vectors, [note(t, float(s)) for t, s in zip(both.traces, scores)]
        emb, traces = model.think_then_embed(batch, max_new_tokens=max_new_tokens, think=think,
                                             threshold=threshold)
        return emb, [note(t) for t in traces]
    return encode


def _evaluate_policy(model, task, batch_size, max_new_tokens, progress, ranks, cache_dir, model_hash,
                     tie_rule, think, threshold, frontier, candidate_memo=None) -> dict | None:
    """evaluate_task under a think policy (always | never | auto), recording per task the think
    rate and the decoded tokens per query; with `frontier`, also per query the metric of the
    direct and the TTE embedding and the gate's score (frontier.py sweeps them)."""
    plan = TaskPlan(task)
    settings = f"policy={'frontier' if frontier else think},threshold={threshold},max_new_tokens={max_new_tokens}"
    embedded = _embed_task(model, task, plan, _policy_encoders(model, think, threshold, frontier, max_new_tokens),
                           settings, batch_size, progress, ranks, cache_dir, model_hash, candidate_memo)
    if embedded is None:
        return None
    Q, C, notes, cached = embedded
    notes = [json.loads(n) for n in notes]
    n = len(task.rows)
    D = C.shape[1]

    def per_query(vectors):
        sims = vectors @ C.T
        return [ranking_metrics(sims[q, idx], gains, tie_rule) for q, (idx, gains) in enumerate(zip(plan.items, plan.gains))]

    if frontier:
        direct, after = per_query(Q[:, :D]), per_query(Q[:, D:2 * D])
        scores = Q[:, 2 * D].astype(float)
        if model.gate is not None:
            point_threshold = model.gate.threshold() if threshold is None else float(threshold)
            chosen = scores > point_threshold
        else:
            chosen = np.ones(n, dtype=bool) if think != "never" else np.zeros(n, dtype=bool)
        per = [a if c else d for a, d, c in zip(after, direct, chosen)]
        tokens = [nt["tokens"] for nt in notes]
        thought = chosen.tolist()
        spent = [t if c else 0 for t, c in zip(tokens, chosen)]
    else:
        per = per_query(Q)
        thought = [nt["thought"] for nt in notes]
        spent = [nt["tokens"] for nt in notes]
    out = {k: float(np.mean([m[k] for m in per])) for k in per[0]}
    out.update(n=n, group=task.modality_group, needs_reasoning=task.needs_reasoning,
               n_candidates=float(np.mean([len(r.candidates) or len(task.corpus or {}) for r in task.rows])),
               n_distinct_candidates=len(plan.distinct), think=think, think_rate=float(np.mean(thought)),
               decoded_tokens_per_query=float(np.mean(spent)))
    if task.modality:
        out.update(modality=task.modality, primary=task.primary)
    if cached is not None:
        out["cached_items"] = cached
    texts = [nt["trace"] for nt, t in zip(notes, thought) if t]
    if texts:
        out["trace_valid"] = sum(check_ecr_shape(t) for t in texts) / len(texts)
    out["examples"] = [{"id": r.id, "trace": nt["trace"], "thought": t}
                       for r, nt, t in list(zip(task.rows, notes, thought))[:N_EXAMPLES]]
    out["traces"] = {r.id: nt["trace"] for r, nt in zip(task.rows, notes)}
    if frontier:
        metric = task.primary or "hit@1"
        out["frontier_data"] = {"metric": metric, "score": scores.tolist(), "tokens": tokens,
                                "direct": [m[metric] for m in direct], "tte": [m[metric] for m in after],
                                "direct_hit@1": [m["hit@1"] for m in direct], "tte_hit@1": [m["hit@1"] for m in after]}
    return out


def evaluate_model(model, tasks: Sequence[EvalTask], batch_size: int = 16, use_think: bool = True,
                   max_new_tokens: int = 64, progress: bool = True, ranks: Ranks | None = None,
                   cache_dir: str | os.PathLike | None = None, tie_rule: str = "pessimistic",
                   think: str | None = None, threshold: float | None = None,
                   frontier: bool = False, traces: Mapping[str, str] | None = None, candidate_memo=None,
                   keep_traces: bool = False) -> dict | None:
    """Evaluate `model` (duck-typed: `embed`, and `think_then_embed` when `use_think`).
    `progress`: a bar per task (True), none (False), or a caller's progress line (an object with
    `update(n)`, e.g. `console.Progress`) that counts every embedded item. `tie_rule`:
    "pessimistic" or "reference" (metrics.py).

    Returns {"tasks": {name: {"hit@1", "ndcg@5", "mrr", "mrr@10", "recall@1/5/10", "n", "n_tied"
    (queries with an exact tie the tie rule decided), "group", "needs_reasoning", "n_candidates",
    "n_distinct_candidates", ["modality", "primary"], ["distribution"], ["trace_valid",
    "examples"]}}, "groups": {group: {metric, "n_tasks"}}, "overall": {metric, "n_tasks"},
    ["mmeb": {modality or distribution: {"score", "n_tasks"}, "overall": ...}], "settings":
    {..., "tie_rule"}} on rank 0 (None on the other ranks of a torchrun launch).

    `think` ("always" | "never" | "auto", a UnifiedTTE's think_then_embed policy; None: today's
    use_think switch) adds per task "think_rate" and "decoded_tokens_per_query"; `threshold`
    overrides the gate's operating point. `frontier` embeds every query both ways (the gate's
    decisions are then applied to those) and adds "frontier" (eval/frontier.py: the accuracy
    against the think rate of every gate threshold, never / always / oracle, the operating points).
    `traces` ({row id: trace}) embeds every query with a given trace instead of decoding one;
    `candidate_memo` (cache.MemoryCache) keeps candidate embeddings across calls on one model;
    `keep_traces` adds per task "traces": {row id: the trace its query was embedded with}.
    """
    check_tie_rule(tie_rule)
    ranks = ranks or Ranks()
    names = [t.name for t in tasks]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise DataError(f"task(s) {dupes} given twice; task names must be unique.")
    for task in tasks:                      # every bad task fails before the model runs
        validate_eval_task(task)
    model_hash = model_key(model) if cache_dir is not None else None
    per_task = {}
    for task in tasks:
        per_task[task.name] = evaluate_task(model, task, batch_size, use_think, max_new_tokens,
                                            progress, ranks, cache_dir, model_hash, tie_rule=tie_rule,
                                            think=think, threshold=threshold, frontier=frontier, traces=traces,
                                            candidate_memo=candidate_memo, keep_traces=keep_traces)
    if not ranks.main:
        return None
    sweep = None
    if frontier:
        data = {name: m.pop("frontier_data") for name, m in per_task.items()}
        sweep = build_frontier(data, getattr(model, "gate", None), threshold)
    metrics = METRICS + (MMEB_METRICS if any("modality" in m for m in per_task.values()) else ())
    agg = aggregate(per_task, {n: m["group"] for n, m in per_task.items()}, metrics)
    out = {"tasks": per_task, **agg,
           "settings": {"use_think": use_think, "max_new_tokens": max_new_tokens,
                        "batch_size": batch_size, "ranks": ranks.world, "tie_rule": tie_rule}}
    if think is not None or frontier:
        out["settings"].update(think=think or "auto", threshold=threshold, frontier=frontier)
        out["think"] = {"think_rate": float(np.mean([m["think_rate"] for m in per_task.values()])),
                        "decoded_tokens_per_query": float(np.mean([m["decoded_tokens_per_query"]
                                                                   for m in per_task.values()]))}
    if sweep is not None:
        out["frontier"] = sweep
    mmeb = mmeb_averages(per_task)
    if mmeb:
        out["mmeb"] = mmeb
    return out


def _pct(x: float) -> str:
    return f"{100.0 * x:.1f}"


def format_table(results: dict) -> str:
    """A markdown table: one line per task, then per-group averages and the overall average."""
    tasks = results["tasks"]
    think = any("trace_valid" in m for m in tasks.values())
    metrics = METRICS + (MMEB_METRICS if any("modality" in m for m in tasks.values()) else ())
    head = ["task", "group", "reasoning", "queries"] + [_LABELS[k] for k in metrics]
    head += ["valid traces"] if think else []
    policy = any("think_rate" in m for m in tasks.values())
    head += ["think rate", "tokens / query"] if policy else []
    lines = ["| " + " | ".join(head) + " |",
             "|" + "|".join(["---"] * 3 + ["---:"] * (len(head) - 3)) + "|"]
    for name, m in tasks.items():
        cells = [name, m["group"], "yes" if m.get("needs_reasoning") else "no", str(m["n"])]
        cells += [_pct(m[k]) for k in metrics]
        cells += [_pct(m["trace_valid"]) if "trace_valid" in m else ""] if think else []
        cells += [f"{m['think_rate']:.2f}", f"{m['decoded_tokens_per_query']:.1f}"] if policy else []
        lines.append("| " + " | ".join(cells) + " |")
    rows = [(f"**{g}** avg", v) for g, v in results.get("groups", {}).items()]
    if results.get("overall"):
        rows.append(("**overall** avg", results["overall"]))
    for label, v in rows:
        cells = [label, "", "", f"{v['n_tasks']} tasks"] + [_pct(v[k]) for k in metrics]
        cells += [""] if think else []
        cells += ["", ""] if policy else []
        lines.append("| " + " | ".join(cells) + " |")
    if results.get("mmeb"):
        lines += ["", "| MMEB | tasks | score (Hit@1 image/video, NDCG@5 visdoc) |", "|---|---:|---:|"]
        lines += [f"| {k} | {v['n_tasks']} | {_pct(v['score'])} |" for k, v in results["mmeb"].items()]
    tied = {name: m["n_tied"] for name, m in tasks.items() if m.get("n_tied")}
    if tied:   # ties decide these scores: say so where the scores are read
        rule = results.get("settings", {}).get("tie_rule", "pessimistic")
        shown = ", ".join(f"{name} {n}" for name, n in list(tied.items())[:5]) + (", ..." if len(tied) > 5 else "")
        lines += ["", f"Exact ties involving a positive, ranked by the {rule} tie rule (--tie-rule): "
                      f"{sum(tied.values())} queries in {len(tied)} task(s) ({shown})."]
    return "\n".join(lines)


_LABELS = {"hit@1": "Hit@1", "ndcg@5": "NDCG@5", "mrr": "MRR", "mrr@10": "MRR@10", "recall@5": "R@5"}


# ----------------------------------------------------------------------------- CLI

def _load_model(checkpoint: str, backbone: str | None = None):
    """An exported checkpoint or a training run folder, on its recorded backbone or `backbone`."""
    return UnifiedTTE.from_checkpoint(checkpoint, backbone=None if backbone is None else zoo.load(backbone))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tte eval", description="Evaluate a checkpoint on "
                                "MMEB-style tasks (Hit@1, NDCG@5, MRR).")
    p.add_argument("checkpoint", help="checkpoint dir or run dir")
    p.add_argument("--tasks", default="digits", help="comma-separated task names (digits, "
                   "knowledge, ...), <task>/<sub-task>, or registry YAML paths (default: digits)")
    p.add_argument("--registry", default=None, help="a registry YAML whose task names --tasks "
                   "may use (schema: unified_tte/data/tasks/digits.yaml)")
    p.add_argument("--out", default="eval_results.json", help="JSON results file")
    p.add_argument("--batch-size", type=positive_int, default=16)
    p.add_argument("--no-think", action="store_true", help="embed queries without a trace (as --think never)")
    p.add_argument("--think", choices=THINK_POLICIES, default=None,
                   help="which queries decode a trace: always, never (the direct embedding) or auto "
                        "(the checkpoint's think gate decides per query); results add each task's think "
                        "rate and decoded tokens per query (default: always, untracked)")
    p.add_argument("--gate-point", choices=OPERATING_POINTS, default=None,
                   help="with --think auto: the gate's operating point (default: the one it was fitted with)")
    p.add_argument("--threshold", type=float, default=None,
                   help="with --think auto: think where the gate's score (in [0, 1]) exceeds this")
    p.add_argument("--frontier", action="store_true",
                   help="embed every query both ways and sweep the gate's threshold: writes "
                        "frontier.json and frontier.png (accuracy against think rate, with never, "
                        "always, the oracle and the gate's operating points) beside --out")
    p.add_argument("--max-new-tokens", type=positive_int, default=64, help="trace length limit")
    p.add_argument("--max-queries", type=positive_int, default=None, help="at most N queries per task")
    p.add_argument("--backbone", default=None, help="the base to load the adapters on: tiny | "
                   "tiny-llama | smollm2 | a local folder (default: the one the checkpoint records)")
    p.add_argument("--digits-seed", type=int, default=None, help="digits split seed (default: "
                   "the registry's); must be the seed training used")
    p.add_argument("--image-size", type=int, default=None, help="digits image size")
    p.add_argument("--max-pixels", type=int, default=None, help="cap on image / frame size in pixels "
                   "(default: the checkpoint's setting; a registry entry's max_pixels still wins for its task)")
    p.add_argument("--min-pixels", type=int, default=None, help="lower bound of image / frame size")
    p.add_argument("--data-root", default=None, help="the folder holding the MMEB releases the "
                   "mmeb_v1 / mmeb_v2 suites name (default: $TTE_MMEB_ROOT)")
    p.add_argument("--cache-dir", default=None, help="keep embeddings per (model, task, item) here; "
                   "a rerun resumes an interrupted evaluation without recomputing")
    p.add_argument("--task-option", action="append", default=[], metavar="KEY=VALUE",
                   help="an option for the built-in tasks' builders (default: the registry's), e.g. "
                        "seed=1; must match what training used (repeatable)")
    p.add_argument("--tie-rule", choices=TIE_RULES, default="pessimistic",
                   help="how an exact tie between a positive and another candidate ranks: pessimistic "
                        "(the positive last, the default) or reference (the earlier candidate first, "
                        "as VLM2Vec ranks); results count the queries it decided (n_tied)")
    p.add_argument("--no-progress", action="store_true")
    return p


def check_output_file(path: Path, option: str) -> None:
    """Refuse, before any work, an output file that could not be written at the end: a folder,
    or a path in a folder this process may not create files in (probed with an empty file)."""
    if path.is_dir():
        raise DataError(f"{option} {path} is a folder; give the file to write, e.g. {path / 'eval_results.json'}")
    folder = next(p for p in (path.parent.absolute(), *path.parent.absolute().parents) if p.exists())
    if not folder.is_dir():
        raise DataError(f"{option} {path}: {folder} is a file, not a folder; choose another path")
    probe = folder / f".{path.name}.probe-{os.getpid()}"
    try:
        probe.touch(exist_ok=False)
        probe.unlink()
    except OSError as exc:
        raise DataError(f"{option} {path}: cannot create files in {folder} ({exc.strerror}); choose another "
                        "path, or make that folder writable") from None


@command("eval")
def eval_main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `tte eval`: prints the table, writes the JSON."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.no_think and args.think not in (None, "never"):
        parser.error(f"--no-think and --think {args.think} disagree; use one")
    think = "never" if args.no_think and args.think is not None else args.think
    if (args.gate_point or args.threshold is not None) and think != "auto" and not args.frontier:
        parser.error("--gate-point and --threshold pick the think gate's operating point: use them with "
                     "--think auto or --frontier")
    if args.gate_point and args.threshold is not None:
        parser.error("--gate-point and --threshold both pick the gate's threshold; give one")
    if args.threshold is not None and not 0.0 <= args.threshold <= 1.0:
        parser.error(f"--threshold is a gate score in [0, 1], got {args.threshold}")
    # The settings and output paths first: a bad one is found before the tasks and the model load.
    check_kernel_environment()
    check_output_file(Path(args.out), "--out")
    if args.cache_dir is not None and Path(args.cache_dir).exists() and not Path(args.cache_dir).is_dir():
        raise DataError(f"--cache-dir {args.cache_dir} is a file; give a folder for the embedding cache")
    overrides = {k: v for k, v in (("seed", args.digits_seed), ("image_size", args.image_size))
                 if v is not None}
    overrides.update(task_options(args.task_option))
    tasks = resolve_tasks(args.tasks, registry=args.registry, max_rows=args.max_queries,
                          data_root=args.data_root, **overrides)
    ranks = init_ranks()
    # One evaluation per cache folder at a time (rank 0 holds it for its launch).
    with lock_folder(args.cache_dir, "tte eval") if args.cache_dir is not None and ranks.main \
            else contextlib.nullcontext():
        model = _load_model(args.checkpoint, args.backbone)
        if (think == "auto" or args.gate_point or args.threshold is not None) and model.gate is None:
            raise DataError(f"{args.checkpoint} holds no think gate (gate/), so --think auto, --gate-point and "
                            "--threshold have nothing to decide with: train the recipe's `gate` stage, or use "
                            "--think always / never")
        threshold = model.gate.threshold(args.gate_point) if args.gate_point else args.threshold
        if args.max_pixels is not None or args.min_pixels is not None:
            model.set_image_size(max_pixels=args.max_pixels, min_pixels=args.min_pixels)
        if ranks.device.type == "cuda":
            model.to(ranks.device)
        barrier(ranks)                       # the timing starts when every rank has its model
        start = time.perf_counter()
        results = evaluate_model(model, tasks, batch_size=args.batch_size,
                                 use_think=not args.no_think, max_new_tokens=args.max_new_tokens,
                                 progress=not args.no_progress, ranks=ranks, cache_dir=args.cache_dir,
                                 tie_rule=args.tie_rule, think=think, threshold=threshold,
                                 frontier=args.frontier)
    if not ranks.main:
        return 0
    seconds = time.perf_counter() - start
    items = sum(m["n"] + m["n_distinct_candidates"] for m in results["tasks"].values())
    results["timing"] = {"seconds": seconds, "items": items, "items_per_s": items / seconds,
                         "ranks": ranks.world}
    results["checkpoint"] = str(args.checkpoint)
    results["task_spec"] = args.tasks
    print(format_table(results))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {out}")
    if "frontier" in results:
        paths = write_frontier(results["frontier"], out.parent, title=f"{args.checkpoint}: {args.tasks}")
        print(f"wrote {paths[0]} and {paths[1]}")
    return 0


if __name__ == "__main__":
    sys.exit(eval_main())
