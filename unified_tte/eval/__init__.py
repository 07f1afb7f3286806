"""Evaluation: retrieval metrics as MMEB reports them, and `tte eval` over registered tasks.

    from unified_tte.eval import evaluate_model, format_table
    results = evaluate_model(model, resolve_tasks("digits"))
"""
from .evaluate import evaluate_model, evaluate_task, format_table
from .metrics import METRICS, aggregate, evaluate_scores

__all__ = ["evaluate_model", "evaluate_task", "format_table", "METRICS", "aggregate", "evaluate_scores"]
