"""The task registry: task names -> eval tasks, from registry YAML files (local MMEB files in
any layout mmeb.py reads), the built-in generated tasks (`BUILTIN_TASKS`: name -> builder) and
the MMEB suites (`SUITES`: every task of MMEB-eval V1 and MMEB-V2, read from a data root the user
supplies; nothing is downloaded).

    from unified_tte.data.registry import resolve_tasks
    tasks = resolve_tasks("digits")                  # the built-in task, made in memory
    tasks = resolve_tasks("my_tasks.yaml")           # every task a user registry names
    tasks = resolve_tasks("mmeb_v2", data_root="/data/MMEB-V2")          # all 78 MMEB-V2 tasks
    tasks = resolve_tasks("mmeb_v2/video,mmeb_v1/DocVQA", data_root=...) # a modality or group, a task
"""
from __future__ import annotations

import inspect
import os
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from ..errors import DataError
from . import digits, knowledge
from .mmeb import load_eval_task
from .records import read_yaml_mapping
from .schema import EvalTask

BUILTIN_TASK_DIR = Path(__file__).parent / "tasks"
SUITE_DIR = Path(__file__).parent / "suites"
# A label set name -> its class names file (one a line, `#` comments cite the source): the fixed
# candidates of classification tasks, e.g. `labels: kinetics700` in a registry entry.
LABEL_SET_DIR = Path(__file__).parent / "labels"
LABEL_SETS = {p.stem: p for p in sorted(LABEL_SET_DIR.glob("*.txt"))}
# A suite name -> its registry YAML; its relative paths are taken from the data root.
SUITES = {p.stem: p for p in sorted(SUITE_DIR.glob("*.yaml"))}
DATA_ROOT_ENV = "TTE_MMEB_ROOT"
# A built-in task name -> its builder: keyword options (from a registry entry or a recipe) in,
# an object with `.train_rows` and `.eval_tasks` out. Eval sizes come in as `max_eval_per_task`.
BUILTIN_TASKS = {"digits": digits.build_digits, "knowledge": knowledge.build_knowledge}


def _builder(name: str):
    if name not in BUILTIN_TASKS:
        raise DataError(f"unknown built-in task {name!r}; known: {sorted(BUILTIN_TASKS)}.")
    return BUILTIN_TASKS[name]


def build_builtin(name: str, **options):
    """A built-in task by name (see BUILTIN_TASKS)."""
    builder = _builder(name)
    unknown = sorted(set(options) - set(builder_options(name)))
    if unknown:
        raise DataError(f"built-in task {name!r}: unknown option(s) {unknown} (from --task-option, a recipe's "
                        f"data.options or a registry entry); known: {sorted(builder_options(name))}.")
    try:
        return builder(**options)
    except TypeError as e:  # an option of the wrong type
        raise DataError(f"built-in task {name!r}: {e}") from None


def builder_options(name: str) -> list[str]:
    """The keyword options the builder of built-in task `name` takes."""
    return list(inspect.signature(_builder(name)).parameters)


def task_options(pairs: Sequence[str], where: str = "--task-option") -> dict:
    """`KEY=VALUE` pairs (YAML values) as a built-in task builder's keyword options."""
    import yaml

    options = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise DataError(f"{where} {pair!r}: expected KEY=VALUE, e.g. seed=1.")
        options[key.strip()] = yaml.safe_load(value) if value.strip() else None
    return options


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
    frame_root: Path | None = None    # video tasks: <frame_root>/<video id>/ holds the frames
    qry_inst: str = ""                # instructions put before the query / target texts
    tgt_inst: str = ""
    labels: list[str] | None = None   # video classification: the class names (the corpus)
    max_pixels: int | None = None     # cap on this task's images, e.g. document pages
    modality: str | None = None       # MMEB-V2: image | video | visdoc
    primary: str | None = None        # the metric MMEB-V2 averages (default by modality)
    distribution: str | None = None   # MMEB-V1: IND | OOD
    legacy_path: Path | None = None   # an older release's folder, read (with a warning) without `path`
    legacy_image_root: Path | None = None


_SPEC_KEYS = {"path", "image_root", "group", "needs_reasoning", "task_type", "builtin", "frame_root",
              "qry_inst", "tgt_inst", "labels", "max_pixels", "modality", "primary", "distribution",
              "legacy_path", "legacy_image_root"}
DISTRIBUTIONS = ("IND", "OOD")


def read_label_set(value, base: Path, where: str) -> list[str] | None:
    """A registry entry's `labels`: a list of class names, a shipped set's name (LABEL_SETS) or a
    text file of class names (one a line, `#` comment lines; relative to `base`)."""
    if value is None or (isinstance(value, list) and all(isinstance(x, str) for x in value)):
        labels = value
    elif isinstance(value, str) and value in LABEL_SETS:
        labels = _label_lines(LABEL_SETS[value])
    elif isinstance(value, str) and (Path(value).suffix or "/" in value):
        path = Path(value) if Path(value).is_absolute() else base / value
        if not path.is_file():
            raise DataError(f"{where}: field 'labels': label-set file {path} not found. Give a list of class "
                            f"names, a shipped set ({', '.join(LABEL_SETS)}) or a file of names, one a line.")
        labels = _label_lines(path)
    else:
        raise DataError(f"{where}: field 'labels': {value!r} is no shipped label set ({', '.join(LABEL_SETS)}); "
                        f"give a list of class names, a shipped set's name or a .txt file of names, one a line.")
    if labels is not None:
        repeated = sorted(x for x, n in Counter(labels).items() if n > 1)
        if not labels or repeated:
            raise DataError(f"{where}: field 'labels': " + (f"class name(s) {repeated[:3]} listed twice"
                            if repeated else "no class names") + "; each class must appear once.")
    return labels


def _label_lines(path: Path) -> list[str]:
    lines = path.read_text(encoding="utf-8").splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


def load_registry(yaml_path: str | os.PathLike, data_root: str | os.PathLike | None = None) -> dict[str, TaskSpec]:
    """Read a task registry YAML: a mapping of task name to an entry.

    A file entry:    `{path: eval/x.jsonl, image_root: images/, group: I2T,
                       needs_reasoning: false, task_type: classification}`
    A built-in one:  `{builtin: digits, seed: 0, image_size: 56, ...}` (other keys are options
                      for the builder).
    More keys for MMEB files: `frame_root`, `qry_inst`, `tgt_inst`, `labels` (see
    read_label_set), `max_pixels`, `modality`, `primary`, `distribution`, `legacy_path` /
    `legacy_image_root` (see TaskSpec). Relative paths are taken from `data_root`, else the YAML
    file's folder. `group` defaults to "retrieval", `image_root` to the data file's folder.
    """
    yaml_path = Path(yaml_path)
    doc = read_yaml_mapping(yaml_path, DataError, "registry")
    specs = {}
    for name, entry in doc.items():
        where = f"{yaml_path} task {name!r}"
        if not isinstance(entry, dict):
            raise DataError(f"{where}: the entry must be a mapping with 'path' (or 'builtin').")
        if entry.get("builtin"):
            options = {k: v for k, v in entry.items() if k not in _SPEC_KEYS}
            unknown = sorted(set(options) - set(builder_options(str(entry["builtin"]))))
            if unknown:
                raise DataError(f"{where}: unknown option(s) {unknown} of the built-in task {entry['builtin']!r}; "
                                f"known: {sorted(builder_options(str(entry['builtin'])))}.")
            specs[str(name)] = TaskSpec(name=str(name), builtin=str(entry["builtin"]),
                                        group=str(entry.get("group", "mixed")), options=options)
            continue
        if not entry.get("path"):
            raise DataError(f"{where}: missing field 'path' (the eval file of this task).")
        unknown = set(entry) - _SPEC_KEYS
        if unknown:
            raise DataError(f"{where}: unknown field(s) {sorted(unknown)}; known: "
                            f"{sorted(_SPEC_KEYS)}.")
        base = Path(data_root) if data_root is not None else yaml_path.parent

        def local(key):
            value = entry.get(key)
            return None if value is None else (Path(value) if Path(value).is_absolute() else base / value)

        labels = read_label_set(entry.get("labels"), base, where)
        distribution = entry.get("distribution")
        if distribution is not None and distribution not in DISTRIBUTIONS:
            raise DataError(f"{where}: field 'distribution' must be one of {', '.join(DISTRIBUTIONS)}, "
                            f"got {distribution!r}.")
        max_pixels = entry.get("max_pixels")
        if max_pixels is not None and (not isinstance(max_pixels, int) or max_pixels < 28 * 28):
            raise DataError(f"{where}: 'max_pixels' must be an integer >= 784 (28*28), got {max_pixels!r}.")
        specs[str(name)] = TaskSpec(
            name=str(name), path=local("path"), image_root=local("image_root"),
            group=str(entry.get("group", "retrieval")),
            needs_reasoning=bool(entry.get("needs_reasoning", False)),
            task_type=entry.get("task_type"), frame_root=local("frame_root"),
            qry_inst=str(entry.get("qry_inst", "")), tgt_inst=str(entry.get("tgt_inst", "")),
            labels=labels, max_pixels=max_pixels, modality=entry.get("modality"),
            primary=entry.get("primary"), distribution=distribution,
            legacy_path=local("legacy_path"), legacy_image_root=local("legacy_image_root"))
    return specs


def builtin_registry() -> dict[str, TaskSpec]:
    """Every task named by the YAML files shipped in unified_tte/data/tasks/."""
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
    path, image_root = spec.path, spec.image_root
    if spec.legacy_path is not None and not path.exists() and spec.legacy_path.exists():
        warnings.warn(f"task {spec.name!r}: {path} not found, reading the older release in {spec.legacy_path}; "
                      f"its scores compare only with numbers computed on that release.", stacklevel=2)
        path, image_root = spec.legacy_path, spec.legacy_image_root or image_root
    return [load_eval_task(path, image_root, name=spec.name, group=spec.group,
                           needs_reasoning=spec.needs_reasoning, task_type=spec.task_type,
                           max_rows=max_rows, frame_root=spec.frame_root, qry_inst=spec.qry_inst,
                           tgt_inst=spec.tgt_inst, labels=spec.labels, max_pixels=spec.max_pixels,
                           modality=spec.modality, primary=spec.primary, distribution=spec.distribution)]


def suite_specs(name: str, data_root: str | os.PathLike | None) -> dict[str, TaskSpec]:
    """The tasks of an MMEB suite ("mmeb_v1", "mmeb_v2") under `data_root` (or $TTE_MMEB_ROOT)."""
    root = data_root if data_root is not None else os.environ.get(DATA_ROOT_ENV)
    if root is None:
        raise DataError(f"suite {name!r} reads the released files from a data root: pass --data-root "
                        f"(the folder the release was cloned into) or set ${DATA_ROOT_ENV}.")
    if not Path(root).is_dir():
        raise DataError(f"suite {name!r}: data root {root} is not a folder.")
    return load_registry(SUITES[name], data_root=root)


def resolve_tasks(names_or_yaml: str | os.PathLike | Sequence[str], registry: str | os.PathLike
                  | None = None, max_rows: int | None = None, data_root: str | os.PathLike | None = None,
                  **builtin_overrides) -> list[EvalTask]:
    """EvalTasks from task names and/or registry files.

    `names_or_yaml`: a list, or a comma-separated string, of items. An item is a registry YAML
    path (all its tasks), a task name from `registry` or from the built-in registries
    ("digits": every digits sub-task), or "digits/<sub-task>" for one sub-task, or an MMEB
    suite: "mmeb_v1" / "mmeb_v2" (all its tasks), "mmeb_v2/<modality or group>", "mmeb_v1/IND"
    (or OOD), "mmeb_v2/<task>", read under `data_root`.
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
        suite, _, part = item.partition("/")
        if suite in SUITES:
            specs = suite_specs(suite, data_root)
            chosen = [sp for sp in specs.values()
                      if not part or part in (sp.name, sp.modality, sp.group, sp.distribution)]
            if not chosen:
                raise DataError(f"{item!r}: no task, modality or group {part!r} in suite {suite!r}; "
                                f"modalities: {sorted({sp.modality for sp in specs.values()})}.")
            for spec in chosen:
                tasks.extend(build_tasks(spec, max_rows))
        elif item.endswith((".yaml", ".yml")):
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
            raise DataError(f"unknown task {item!r}. Known tasks: {sorted(known)}; suites: {sorted(SUITES)}; "
                            f"or pass a registry YAML (see unified_tte/data/tasks/digits.yaml for the schema).")
    names = [t.name for t in tasks]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise DataError(f"task(s) {dupes} named more than once; task names must be unique.")
    return tasks
