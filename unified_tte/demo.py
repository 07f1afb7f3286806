"""`tte demo`: the main job on the built-in CPU default.

    tte demo            # tiny Qwen2-VL, think-then-embed on a few built-in digit images
"""
from __future__ import annotations

import argparse


def demo_main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="tte demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a smaller run (used by CI)")
    args = parser.parse_args(argv)
    from . import TTEInput, UnifiedTTE
    from .digits import build_digits
    from .testing import tiny_qwen2vl

    task = build_digits(max_train_per_task=4, max_eval_per_task=4)
    queries = [row.query for t in task.eval_tasks for row in t.rows[:1]]
    tte = UnifiedTTE(tiny_qwen2vl(), mode="activated")
    emb, traces = tte.think_then_embed(queries, max_new_tokens=8 if args.quick else 16)
    for q, t, e in zip(queries, traces, emb):
        print(f"{q.text[:50]:50s} | trace {len(t.token_ids):2d} tokens | emb[:3] {e[:3].tolist()}")
    assert isinstance(queries[0], TTEInput)
    return 0
