"""The task registry: task names -> eval tasks, from registry YAML files (local MMEB-eval files)
and the built-in generated tasks (`BUILTIN_TASKS`: name -> builder).

    from unified_tte.data.registry import resolve_tasks
    tasks = resolve_tasks("digits")                  # the built-in task, made in memory
    tasks = resolve_tasks("my_tasks.yaml")           # every task a user registry names
"""
from __future__ import annotations

import inspect
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from ..errors import DataError
from . import digits, knowledge
from .mmeb import load_eval_task
from .schema import EvalTask

BUILTIN_TASK_DIR = Path(__file__).parent / "tasks"
# A built-in task name -> its builder: keyword options (from a registry entry or a recipe) in,
# an object with `.train_rows` and `.eval_tasks` out. Eval sizes come in as `max_eval_per_task`.
BUILTIN_TASKS = {"digits": digits.build_digits, "knowledge": knowledge.build_knowledge}


def build_builtin(name: str, **options):
    """A built-in task by name (see BUILTIN_TASKS)."""
    if name not in BUILTIN_TASKS:
        raise DataError(f"unknown built-in task {name!r}; known: {sorted(BUILTIN_TASKS)}.")
    try:
        return BUILTIN_TASKS[name](**options)
    except TypeError as e:  # an option the builder does not take
        raise DataError(f"built-in task {name!r}: {e}") from None


def builder_options(name: str) -> list[str]:
    """The keyword options the builder of built-in task `name` takes."""
    if name not in BUILTIN_TASKS:
        raise DataError(f"unknown built-in task {name!r}; known: {sorted(BUILTIN_TASKS)}.")
    return list(inspect.signature(BUILTIN_TASKS[name]).parameters)

@dataclass
class TaskSpec:
    """One registry entry: a local eval file, or a built-in generated task."""
    name: str
    path: Path | None = None
    image_root: Path | None = None
    group: str = "retrieval"
    needs_reasoning: bool = False
    task_type: str | None = None
    builtin: str | None = None        # e.g. "digits", "knowledge": generated, see BUILTIN_TASKS
    options: dict = field(default_factory=dict)   # passed to the builtin's builder


_SPEC_KEYS = {"path", "image_root", "group", "needs_reasoning", "task_type", "builtin"}


def load_registry(yaml_path: str | os.PathLike) -> dict[str, TaskSpec]:
    """Read a task registry YAML: a mapping of task name to an entry.

    A file entry:    `{path: eval/x.jsonl, image_root: images/, group: I2T,
                       needs_reasoning: false, task_type: classification}`
    A built-in one:  `{builtin: digits, seed: 0, image_size: 56, ...}` (other keys are options
                      for the builder).
    Relative `path` / `image_root` are taken from the YAML file's folder. `group` defaults to
    "retrieval", `image_root` to the data file's folder.
    """
    import yaml

    yaml_path = Path(yaml_path)
    if not yaml_path.exists():
        raise DataError(f"{yaml_path}: registry file not found.")
    try:
        doc = yaml.safe_load(yaml_path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        raise DataError(f"{yaml_path}: not valid YAML: {e}") from None
    if not isinstance(doc, dict):
        raise DataError(f"{yaml_path}: a registry maps task names to entries; got "
                        f"{type(doc).__name__}.")
    specs = {}
    for name, entry in doc.items():
        where = f"{yaml_path} task {name!r}"
        if not isinstance(entry, dict):
            raise DataError(f"{where}: the entry must be a mapping with 'path' (or 'builtin').")
        if entry.get("builtin"):
            options = {k: v for k, v in entry.items() if k not in _SPEC_KEYS}
            specs[str(name)] = TaskSpec(name=str(name), builtin=str(entry["builtin"]),
                                        group=str(entry.get("group", "mixed")), options=options)
            continue
        if not entry.get("path"):
            raise DataError(f"{where}: missing field 'path' (the eval file of this task).")
        unknown = set(entry) - _SPEC_KEYS
        if unknown:
            raise DataError(f"{where}: unknown field(s) {sorted(unknown)}; known: "
                            f"{sorted(_SPEC_KEYS)}.")
        base = yaml_path.parent
        path = Path(entry["path"])
        root = entry.get("image_root")
        specs[str(name)] = TaskSpec(
            name=str(name), path=path if path.is_absolute() else base / path,
            image_root=None if root is None else (Path(root) if Path(root).is_absolute()
                                                  else base / root),
            group=str(entry.get("group", "retrieval")),
            needs_reasoning=bool(entry.get("needs_reasoning", False)),
            task_type=entry.get("task_type"))
    return specs


def builtin_registry() -> dict[str, TaskSpec]:
    """Every task named by the YAML files shipped in unified_tte/tasks/."""
    specs: dict[str, TaskSpec] = {}
    for f in sorted(BUILTIN_TASK_DIR.glob("*.yaml")):
        specs.update(load_registry(f))
    return specs


def build_tasks(spec: TaskSpec, max_rows: int | None = None, **overrides) -> list[EvalTask]:
    """The EvalTasks of one registry entry (a built-in may give several)."""
    if spec.builtin:
        options = {**spec.options, **overrides}
        if max_rows is not None:
            options["max_eval_per_task"] = max_rows
        return build_builtin(spec.builtin, **options).eval_tasks
    return [load_eval_task(spec.path, spec.image_root, name=spec.name, group=spec.group,
                           needs_reasoning=spec.needs_reasoning, task_type=spec.task_type,
                           max_rows=max_rows)]


def resolve_tasks(names_or_yaml: str | os.PathLike | Sequence[str], registry: str | os.PathLike
                  | None = None, max_rows: int | None = None, **builtin_overrides) -> list[EvalTask]:
    """EvalTasks from task names and/or registry files.

    `names_or_yaml`: a list, or a comma-separated string, of items. An item is a registry YAML
    path (all its tasks), a task name from `registry` or from the built-in registries
    ("digits": every digits sub-task), or "digits/<sub-task>" for one sub-task.
    `max_rows` caps the queries per task; `builtin_overrides` go to built-in builders
    (e.g. `seed=1, image_size=28` for digits; eval must use the seed training used).
    """
    if isinstance(names_or_yaml, (str, os.PathLike)):
        items = [s.strip() for s in str(names_or_yaml).split(",") if s.strip()]
    else:
        items = [str(s) for s in names_or_yaml]
    known = builtin_registry()
    if registry is not None:
        known.update(load_registry(registry))
    tasks: list[EvalTask] = []
    for item in items:
        if item.endswith((".yaml", ".yml")):
            for spec in load_registry(item).values():
                tasks.extend(build_tasks(spec, max_rows, **builtin_overrides))
        elif item in known:
            tasks.extend(build_tasks(known[item], max_rows, **builtin_overrides))
        elif "/" in item and item.split("/", 1)[0] in known:
            parent, sub = item.split("/", 1)
            found = [t for t in build_tasks(known[parent], max_rows, **builtin_overrides)
                     if t.name == item]
            if not found:
                raise DataError(f"unknown sub-task {item!r} of {parent!r}.")
            tasks.extend(found)
        else:
            raise DataError(f"unknown task {item!r}. Known tasks: {sorted(known)}; or pass a "
                            f"registry YAML (see unified_tte/data/tasks/digits.yaml for the schema).")
    names = [t.name for t in tasks]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise DataError(f"task(s) {dupes} named more than once; task names must be unique.")
    return tasks
