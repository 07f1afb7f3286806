"""Data: the row schema, MMEB loaders, the task registry, the built-in digits task and ECR traces.

    from unified_tte.data import load_train_rows, resolve_tasks, load_traces
    rows = load_train_rows("mmeb_train/ImageNet_1K.jsonl", image_root="mmeb_images/")
    tasks = resolve_tasks("digits")                  # built-in tasks and registry YAML files
    traces = load_traces("traces.jsonl")             # {id: "<think>...</think> answer"}

Modules, lowest first: schema (TrainRow, EvalRow, EvalTask), records (reading .jsonl/.json/
.parquet), mmeb (MMEB-train / MMEB-eval loaders), digits (the built-in task), registry (task
names -> tasks), traces (ECR prompts, trace files, `tte traces`).
"""
from ..errors import DataError
from .mmeb import load_eval_task, load_train_rows, task_type_for, validate_eval_task
from .registry import builtin_registry, load_registry, resolve_tasks
from .schema import EvalRow, EvalTask, LoadedRows, TrainRow
from .traces import attach_traces, load_traces

__all__ = ["DataError", "TrainRow", "EvalRow", "EvalTask", "LoadedRows", "load_train_rows",
           "load_eval_task", "validate_eval_task", "task_type_for", "resolve_tasks",
           "load_registry", "builtin_registry", "load_traces", "attach_traces"]
