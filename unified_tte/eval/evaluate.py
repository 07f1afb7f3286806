"""Evaluate an embedding model on MMEB-style tasks: Hit@1, NDCG@5, MRR per task, averaged per
group and overall, as a markdown table and a JSON file.

    tte eval checkpoints/run1 --tasks digits --out results.json
    tte eval checkpoints/run1 --tasks digits/plus_two,my_tasks.yaml --no-think
    tte eval checkpoints/smollm2-tte --tasks knowledge --task-option seed=0

    from unified_tte.eval import evaluate_model, format_table
    results = evaluate_model(model, resolve_tasks("digits"), batch_size=16)
    print(format_table(results))

Queries are embedded with `model.think_then_embed` (or `model.embed` without a trace under
`use_think=False`); candidates with `model.embed` and no trace, each distinct candidate once per
task (candidate lists repeat across queries; they are deduplicated by text and image content).
The score is the dot product of the unit vectors (cosine). Metrics are fractions in the JSON and
percentages with one decimal in the table; ties count against the positive (see metrics.py).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from pathlib import Path
from typing import Sequence

from ..data import EvalTask, resolve_tasks, validate_eval_task
from ..data.traces import check_ecr_shape, task_options
from ..errors import DataError, command
from ..model import UnifiedTTE, zoo
from .metrics import METRICS, aggregate, evaluate_scores

N_EXAMPLES = 3   # traces kept per task in the results, to eyeball what the reasoner wrote


def _image_key(image, memo: dict) -> str:
    """Content key of an image: its resolved path, or a hash of a PIL image's pixels."""
    if isinstance(image, (str, os.PathLike)):
        return "path:" + os.path.abspath(image)
    k = memo.get(id(image))
    if k is None:
        h = hashlib.sha1(f"{image.mode}{image.size}".encode())
        h.update(image.tobytes())
        k = memo[id(image)] = "pil:" + h.hexdigest()
    return k


def candidate_key(item, memo: dict) -> tuple:
    """Two TTEInputs with the same key embed to the same vector."""
    return (item.text, tuple(_image_key(im, memo) for im in item.images))


def _batches(items: list, batch_size: int):
    for start in range(0, len(items), batch_size):
        yield items[start:start + batch_size]


def evaluate_task(model, task: EvalTask, batch_size: int = 16, use_think: bool = True,
                  max_new_tokens: int = 64, progress: bool = True) -> dict:
    """Metrics of one task: {"hit@1", "ndcg@5", "mrr", "n", "group", ...} (see evaluate_model)."""
    import torch
    from tqdm.auto import tqdm

    validate_eval_task(task)
    # Distinct candidates of the whole task, and each row's candidates as indices into them.
    memo, index, distinct, cand_idx = {}, {}, [], []
    for row in task.rows:
        idx = []
        for c in row.candidates:
            key = candidate_key(c, memo)
            if key not in index:
                index[key] = len(distinct)
                distinct.append(c)
            idx.append(index[key])
        cand_idx.append(idx)

    bar = tqdm(total=len(task.rows) + len(distinct), desc=task.name, unit="item",
               disable=not progress)
    q_embs, traces = [], []
    with torch.no_grad():
        for batch in _batches([r.query for r in task.rows], batch_size):
            if use_think:
                emb, tr = model.think_then_embed(batch, max_new_tokens=max_new_tokens)
                traces += [getattr(t, "text", t) for t in tr]
            else:
                emb = model.embed(batch)
            q_embs.append(emb.float().cpu())
            bar.update(len(batch))
        c_embs = []
        for batch in _batches(distinct, batch_size):
            c_embs.append(model.embed(batch).float().cpu())
            bar.update(len(batch))
    bar.close()
    Q, C = torch.cat(q_embs), torch.cat(c_embs)          # [n_queries, D], [n_distinct, D]
    if Q.shape[0] != len(task.rows) or C.shape[0] != len(distinct):
        raise RuntimeError(f"task {task.name!r}: the model returned {Q.shape[0]} query and "
                           f"{C.shape[0]} candidate embeddings for {len(task.rows)} and "
                           f"{len(distinct)} inputs")
    sims = Q @ C.T                                         # [n_queries, n_distinct] cosine
    scores = [sims[i, idx].tolist() for i, idx in enumerate(cand_idx)]
    out = evaluate_scores(scores, [r.positive for r in task.rows])
    out.update(group=task.modality_group, needs_reasoning=task.needs_reasoning,
               n_candidates=sum(len(r.candidates) for r in task.rows) / len(task.rows),
               n_distinct_candidates=len(distinct))
    if use_think:
        out["trace_valid"] = sum(check_ecr_shape(t) for t in traces) / len(traces)
        out["examples"] = [{"id": r.id, "trace": t} for r, t in
                           zip(task.rows[:N_EXAMPLES], traces[:N_EXAMPLES])]
    return out


def evaluate_model(model, tasks: Sequence[EvalTask], batch_size: int = 16, use_think: bool = True,
                   max_new_tokens: int = 64, progress: bool = True) -> dict:
    """Evaluate `model` (duck-typed: `embed`, and `think_then_embed` when `use_think`).

    Returns {"tasks": {name: {"hit@1", "ndcg@5", "mrr", "n", "group", "needs_reasoning",
    "n_candidates", "n_distinct_candidates", ["trace_valid", "examples"]}},
    "groups": {group: {metric, "n_tasks"}}, "overall": {metric, "n_tasks"}, "settings": {...}}.
    """
    per_task = {}
    for task in tasks:
        if task.name in per_task:
            raise DataError(f"task {task.name!r} given twice; task names must be unique.")
        per_task[task.name] = evaluate_task(model, task, batch_size, use_think, max_new_tokens,
                                            progress)
    agg = aggregate(per_task, {n: m["group"] for n, m in per_task.items()})
    return {"tasks": per_task, **agg,
            "settings": {"use_think": use_think, "max_new_tokens": max_new_tokens,
                         "batch_size": batch_size}}


def _pct(x: float) -> str:
    return f"{100.0 * x:.1f}"


def format_table(results: dict) -> str:
    """A markdown table: one line per task, then per-group averages and the overall average."""
    tasks = results["tasks"]
    think = any("trace_valid" in m for m in tasks.values())
    head = ["task", "group", "reasoning", "queries", "Hit@1", "NDCG@5", "MRR"]
    head += ["valid traces"] if think else []
    lines = ["| " + " | ".join(head) + " |",
             "|" + "|".join(["---"] * 3 + ["---:"] * (len(head) - 3)) + "|"]
    for name, m in tasks.items():
        cells = [name, m["group"], "yes" if m.get("needs_reasoning") else "no", str(m["n"])]
        cells += [_pct(m[k]) for k in METRICS]
        cells += [_pct(m["trace_valid"]) if "trace_valid" in m else ""] if think else []
        lines.append("| " + " | ".join(cells) + " |")
    rows = [(f"**{g}** avg", v) for g, v in results.get("groups", {}).items()]
    if results.get("overall"):
        rows.append(("**overall** avg", results["overall"]))
    for label, v in rows:
        cells = [label, "", "", f"{v['n_tasks']} tasks"] + [_pct(v[k]) for k in METRICS]
        cells += [""] if think else []
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


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
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--no-think", action="store_true", help="embed queries without a trace")
    p.add_argument("--max-new-tokens", type=int, default=64, help="trace length limit")
    p.add_argument("--max-queries", type=int, default=None, help="at most N queries per task")
    p.add_argument("--backbone", default=None, help="the base to load the adapters on: tiny | "
                   "tiny-llama | smollm2 | a local folder (default: the one the checkpoint records)")
    p.add_argument("--digits-seed", type=int, default=None, help="digits split seed (default: "
                   "the registry's); must be the seed training used")
    p.add_argument("--image-size", type=int, default=None, help="digits image size")
    p.add_argument("--task-option", action="append", default=[], metavar="KEY=VALUE",
                   help="an option for the built-in tasks' builders (default: the registry's), e.g. "
                        "seed=1; must match what training used (repeatable)")
    p.add_argument("--no-progress", action="store_true")
    return p


@command("eval")
def eval_main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `tte eval`: prints the table, writes the JSON."""
    args = build_parser().parse_args(argv)
    overrides = {k: v for k, v in (("seed", args.digits_seed), ("image_size", args.image_size))
                 if v is not None}
    overrides.update(task_options(args.task_option))
    tasks = resolve_tasks(args.tasks, registry=args.registry, max_rows=args.max_queries, **overrides)
    model = _load_model(args.checkpoint, args.backbone)
    results = evaluate_model(model, tasks, batch_size=args.batch_size,
                             use_think=not args.no_think, max_new_tokens=args.max_new_tokens,
                             progress=not args.no_progress)
    results["checkpoint"] = str(args.checkpoint)
    results["task_spec"] = args.tasks
    print(format_table(results))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(eval_main())
