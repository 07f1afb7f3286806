"""Data: the row schema, MMEB loaders, the task registry, the built-in digits task and ECR traces.

    from unified_tte.data import load_train_rows, resolve_tasks, load_traces
    rows = load_train_rows("MMEB-train/")            # every subset folder (released layout)
    tasks = resolve_tasks("digits")                  # built-in tasks and registry YAML files
    tasks = resolve_tasks("mmeb_v2", data_root="/data/MMEB-V2")   # the 78 MMEB-V2 tasks
    traces = load_traces("traces.jsonl")             # {id: "<think>...</think> answer"}

Modules, lowest first: schema (TrainRow, EvalRow, EvalTask), records (reading .jsonl/.json/
.parquet), mmeb (MMEB-train, MMEB-eval V1 and MMEB-V2 loaders), sampling (per-subset caps and
weights, same-task batches), digits, knowledge (the built-in tasks), registry (task names and
suites -> tasks), traces (the ECR format and prompts, trace files, trace noise). No module here
loads or runs a model: writing traces is `tte traces` (unified_tte/tracegen.py).
"""
from ..errors import DataError
from .mmeb import load_eval_task, load_train_rows, task_type_for, validate_eval_task
from .registry import builtin_registry, load_registry, resolve_tasks
from .schema import EvalRow, EvalTask, LoadedRows, TrainRow
from .traces import attach_traces, load_traces

__all__ = ["DataError", "TrainRow", "EvalRow", "EvalTask", "LoadedRows", "load_train_rows",
           "load_eval_task", "validate_eval_task", "task_type_for", "resolve_tasks",
           "load_registry", "builtin_registry", "load_traces", "attach_traces"]
