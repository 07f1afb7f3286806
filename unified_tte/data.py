"""MMEB-style data from local files: training rows, eval tasks with candidate lists, ECR traces
and a YAML registry of tasks.

    from unified_tte.data import load_train_rows, load_eval_task, resolve_tasks, load_traces
    rows = load_train_rows("mmeb_train/ImageNet_1K.jsonl", image_root="mmeb_images/")
    tasks = resolve_tasks("digits")                  # the built-in task, made in memory
    tasks = resolve_tasks("my_tasks.yaml")           # every task a user registry names
    traces = load_traces("traces.jsonl")             # {id: "<think>...</think> answer"}

File formats (.jsonl, one JSON object a line; .json, a list of objects; .parquet):

* train rows, MMEB-train fields: `qry`, `qry_image_path`, `pos_text`, `pos_image_path`, and
  optionally `neg_text`, `neg_image_path`, `id`, `task`.
* eval rows, MMEB-eval fields: `qry_text`, `qry_img_path`, `tgt_text: list`, `tgt_img_path: list`
  (the two lists pair up into candidates). As in MMEB-eval the FIRST candidate is the positive,
  unless the row says otherwise with `positive: int` (an index into the candidates) or with
  `pos_text` / `pos_img_path` (which must equal one candidate).
* traces: `{"id": ..., "trace": "<think>...</think> answer", "valid": bool}` (see traces.py).

Conventions:
* Row ids are the `id` field if present, else `"{file stem}:{line}"` (1-based line of a .jsonl
  file; 0-based row index of a .parquet/.json file), so traces written for a file join back to it.
* Image paths are relative to `image_root` (default: the data file's folder); absolute paths are
  used as they are; an empty path means "no image". Paths are checked to exist at load time and
  are kept as strings; images are opened later, by the model's collator.
* MMEB's Phi-3-V style image placeholders (`<|image_1|>`) are removed from the text: the model
  puts a TTEInput's images before its text itself.

Every problem raises `DataError` naming the file, the line or row, the field and what to do.
With `skip_bad=True` the train loader skips bad rows instead and reports them in `.skipped`.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

from .inputs import TTEInput

# MMEB writes `<|image_1|>` into the text where the image goes (Phi-3-V markup).
_IMAGE_PLACEHOLDER = re.compile(r"<\|image_\d+\|>\s*")
BUILTIN_TASK_DIR = Path(__file__).parent / "tasks"


class DataError(ValueError):
    """Bad input data. The message names the file, the line/row, the field and a fix."""


@dataclass
class TrainRow:
    """One contrastive training example: a query, its positive and an optional hard negative."""
    id: str
    qry: TTEInput
    pos: TTEInput
    neg: TTEInput | None = None
    task: str = ""
    trace: str | None = None          # ECR trace for `qry`, when one is attached
    meta: dict = field(default_factory=dict)


@dataclass
class EvalRow:
    """One eval query with its candidate list; `positive` indexes the correct candidate."""
    id: str
    query: TTEInput
    candidates: list[TTEInput]
    positive: int = 0
    meta: dict = field(default_factory=dict)


@dataclass
class EvalTask:
    """A named eval task. `modality_group` is what results are averaged over: a modality pair
    ("I2T", "T2I", "I2I", "T2T") or an MMEB meta-task ("classification", "vqa", "retrieval",
    "grounding")."""
    name: str
    modality_group: str
    rows: list[EvalRow]
    needs_reasoning: bool = False
    task_type: str = "retrieval"      # picks the ECR prompt, see traces.ECR_PROMPTS


class LoadedRows(list):
    """A list of rows that also carries what was skipped: `skipped` is a list of reasons."""

    def __init__(self, rows=(), skipped=None):
        super().__init__(rows)
        self.skipped: list[str] = list(skipped or [])


# ----------------------------------------------------------------------------- reading records

def iter_records(path: str | os.PathLike, skipped: list[str] | None = None) -> Iterator[tuple[str, int, dict]]:
    """Yield `(where, number, record)` for each record of a .jsonl/.json/.parquet file.

    `where` reads like "data.jsonl line 12" for error messages; `number` is the line (1-based,
    .jsonl) or row index (0-based, .json/.parquet). Blank lines are skipped. A .jsonl line that is
    not a JSON object raises DataError naming file and line, or, when a `skipped` list is given,
    is noted there and passed over.
    """
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: file not found. Check the path (relative paths are taken from "
                        f"the current folder, or from the registry file's folder).")
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        with open(path, encoding="utf-8") as f:
            for line_no, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                where = f"{path} line {line_no}"
                try:
                    record = json.loads(line)
                    problem = None if isinstance(record, dict) else (
                        f"{where}: expected a JSON object, got {type(record).__name__}. "
                        "Each line must be one object.")
                except json.JSONDecodeError as e:
                    problem = (f"{where}: not valid JSON ({e.msg} at column {e.colno}). "
                               "Fix or delete that line.")
                if problem is None:
                    yield where, line_no, record
                elif skipped is None:
                    raise DataError(problem)
                else:
                    skipped.append(problem)
    elif suffix == ".json":
        with open(path, encoding="utf-8") as f:
            try:
                records = json.load(f)
            except json.JSONDecodeError as e:
                raise DataError(f"{path} line {e.lineno}: not valid JSON ({e.msg}).") from None
        if not isinstance(records, list):
            raise DataError(f"{path}: a .json data file must hold a list of objects; "
                            f"use .jsonl for one object a line.")
        for i, record in enumerate(records):
            if not isinstance(record, dict):
                raise DataError(f"{path} row {i}: expected an object, got {type(record).__name__}.")
            yield f"{path} row {i}", i, record
    elif suffix == ".parquet":
        import pyarrow.parquet as pq

        for i, record in enumerate(pq.read_table(path).to_pylist()):
            yield f"{path} row {i}", i, record
    else:
        raise DataError(f"{path}: unknown data format {suffix!r}; use .jsonl, .json or .parquet.")


def clean_text(text: Any) -> str:
    """Text with MMEB's `<|image_N|>` placeholders removed (the model places images itself)."""
    if text is None:
        return ""
    return _IMAGE_PLACEHOLDER.sub("", str(text)).strip()


def _resolve_image(value: Any, image_root: Path, where: str, fld: str) -> list[str]:
    """[] for no image, else [path] after checking that the file exists."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return []
    if not isinstance(value, (str, os.PathLike)):
        raise DataError(f"{where}: field {fld!r} must be an image path string, got "
                        f"{type(value).__name__}.")
    p = Path(value)
    if not p.is_absolute():
        p = image_root / p
    if not p.exists():
        raise DataError(f"{where}: field {fld!r}: image not found: {p}. Pass the folder the "
                        f"paths are relative to as image_root (--image-root), or skip bad rows "
                        f"with --skip-bad.")
    return [str(p)]


def _row_id(record: dict, path: Path, number: int) -> str:
    rid = record.get("id")
    return str(rid) if rid is not None and str(rid) != "" else f"{path.stem}:{number}"


def _image_root(path: Path, image_root) -> Path:
    return Path(image_root) if image_root is not None else path.parent


# ----------------------------------------------------------------------------- train rows

def load_train_rows(path: str | os.PathLike, image_root: str | os.PathLike | None = None,
                    skip_bad: bool = False, task: str | None = None) -> LoadedRows:
    """Read MMEB-train rows. Returns a list of TrainRow with `.skipped` (reasons, one per row
    skipped; empty unless `skip_bad`). `task` defaults to the row's `task` field or the file stem.
    With `skip_bad`, rows with bad JSON, missing fields or missing images are skipped; without
    it the first one raises DataError."""
    path = Path(path)
    root = _image_root(path, image_root)
    rows, skipped = LoadedRows(), []
    for where, number, rec in iter_records(path, skipped if skip_bad else None):
        try:
            rows.append(_train_row(rec, where, path, number, root, task))
        except DataError as e:
            if not skip_bad:
                raise
            skipped.append(str(e))
    rows.skipped = skipped
    return rows


def _train_row(rec: dict, where: str, path: Path, number: int, root: Path,
               task: str | None) -> TrainRow:
    for fld in ("qry", "pos_text"):
        if fld not in rec:
            raise DataError(f"{where}: missing field {fld!r}. MMEB-train rows need qry, "
                            f"qry_image_path, pos_text, pos_image_path (neg_* optional).")
    qry = TTEInput(text=clean_text(rec.get("qry")),
                   images=_resolve_image(rec.get("qry_image_path"), root, where, "qry_image_path"))
    pos = TTEInput(text=clean_text(rec.get("pos_text")),
                   images=_resolve_image(rec.get("pos_image_path"), root, where, "pos_image_path"))
    if not (qry.text or qry.images):
        raise DataError(f"{where}: the query is empty (no 'qry' text, no 'qry_image_path').")
    if not (pos.text or pos.images):
        raise DataError(f"{where}: the positive is empty (no 'pos_text', no 'pos_image_path').")
    neg = None
    neg_images = _resolve_image(rec.get("neg_image_path"), root, where, "neg_image_path")
    neg_text = clean_text(rec.get("neg_text"))
    if neg_text or neg_images:
        neg = TTEInput(text=neg_text, images=neg_images)
    return TrainRow(id=_row_id(rec, path, number), qry=qry, pos=pos, neg=neg,
                    task=task or str(rec.get("task") or path.stem))


# ----------------------------------------------------------------------------- eval tasks

def load_eval_task(path: str | os.PathLike, image_root: str | os.PathLike | None = None,
                   name: str | None = None, group: str = "retrieval",
                   needs_reasoning: bool = False, task_type: str | None = None,
                   max_rows: int | None = None) -> EvalTask:
    """Read one MMEB-eval task file (see the module docstring for the fields; the first
    candidate is the positive unless the row says otherwise)."""
    path = Path(path)
    root = _image_root(path, image_root)
    name = name or path.stem
    rows = []
    for where, number, rec in iter_records(path):
        if max_rows is not None and len(rows) >= max_rows:
            break
        rows.append(_eval_row(rec, where, path, number, root, name))
    task = EvalTask(name=name, modality_group=group, rows=rows, needs_reasoning=needs_reasoning,
                    task_type=task_type or task_type_for(name))
    validate_eval_task(task)
    return task


def _as_list(value, where: str, fld: str) -> list:
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    if isinstance(value, (list, tuple)):
        return list(value)
    if hasattr(value, "tolist"):
        return list(value.tolist())
    raise DataError(f"{where}: field {fld!r} must be a list, got {type(value).__name__}.")


def _eval_row(rec: dict, where: str, path: Path, number: int, root: Path, task: str) -> EvalRow:
    rid = _row_id(rec, path, number)
    query = TTEInput(text=clean_text(rec.get("qry_text")),
                     images=_resolve_image(rec.get("qry_img_path"), root, where, "qry_img_path"))
    if not (query.text or query.images):
        raise DataError(f"{where}: task {task!r} row {rid!r}: the query is empty "
                        f"(no 'qry_text', no 'qry_img_path').")
    texts = _as_list(rec.get("tgt_text"), where, "tgt_text")
    imgs = _as_list(rec.get("tgt_img_path"), where, "tgt_img_path")
    if texts and imgs and len(texts) != len(imgs):
        raise DataError(f"{where}: task {task!r} row {rid!r}: 'tgt_text' has {len(texts)} "
                        f"entries but 'tgt_img_path' has {len(imgs)}; they pair up into "
                        f"candidates, so they must be the same length (use \"\" for none).")
    n = max(len(texts), len(imgs))
    texts = texts or [""] * n
    imgs = imgs or [""] * n
    cands = [TTEInput(text=clean_text(t),
                      images=_resolve_image(im, root, where, f"tgt_img_path[{i}]"))
             for i, (t, im) in enumerate(zip(texts, imgs))]
    positive = 0
    if rec.get("positive") is not None:
        positive = rec["positive"]
        if not isinstance(positive, int) or isinstance(positive, bool):
            raise DataError(f"{where}: task {task!r} row {rid!r}: 'positive' must be an integer "
                            f"index into the candidates, got {positive!r}.")
    elif "pos_text" in rec or "pos_img_path" in rec:
        want_text = clean_text(rec.get("pos_text"))
        want_imgs = _resolve_image(rec.get("pos_img_path"), root, where, "pos_img_path")
        matches = [i for i, c in enumerate(cands) if c.text == want_text and c.images == want_imgs]
        if not matches:
            raise DataError(f"{where}: task {task!r} row {rid!r}: the positive "
                            f"(pos_text={want_text!r}, pos_img_path={rec.get('pos_img_path')!r}) "
                            f"is not among the {len(cands)} candidates. Add it to "
                            f"tgt_text/tgt_img_path.")
        positive = matches[0]
    row = EvalRow(id=rid, query=query, candidates=cands, positive=positive)
    _check_eval_row(row, task, where)
    return row


def _check_eval_row(row: EvalRow, task: str, where: str | None = None) -> None:
    at = f"{where}: " if where else ""
    if not row.candidates:
        raise DataError(f"{at}task {task!r} row {row.id!r}: empty candidate list. Every eval "
                        f"query needs its candidates (tgt_text / tgt_img_path), positive first.")
    if not 0 <= row.positive < len(row.candidates):
        raise DataError(f"{at}task {task!r} row {row.id!r}: the positive (index {row.positive}) "
                        f"is not among the {len(row.candidates)} candidates.")


def validate_eval_task(task: EvalTask) -> None:
    """Raise DataError naming the task and row for an empty task, an empty candidate list, or a
    positive index outside the candidates."""
    if not task.rows:
        raise DataError(f"task {task.name!r}: no rows.")
    for row in task.rows:
        _check_eval_row(row, task.name)


# ----------------------------------------------------------------------------- task types

# MMEB dataset -> task type (picks the ECR prompt). Names as in MMEB-train / MMEB-eval.
MMEB_TASK_TYPES = {
    **dict.fromkeys(["ImageNet_1K", "ImageNet-1K", "N24News", "HatefulMemes", "VOC2007",
                     "SUN397", "Place365", "ImageNet-A", "ImageNet-R", "ObjectNet",
                     "Country211"], "classification"),
    **dict.fromkeys(["OK-VQA", "A-OKVQA", "DocVQA", "InfographicsVQA", "ChartQA", "Visual7W",
                     "ScienceQA", "VizWiz", "GQA", "TextVQA"], "qa"),
    **dict.fromkeys(["MSCOCO", "RefCOCO", "RefCOCO-Matching", "Visual7W-Pointing"], "grounding"),
}


def task_type_for(name: str) -> str:
    """The ECR task type of a task name: a digits sub-task keeps its own name
    ("digits/plus_two"), MMEB datasets map by name, anything else is "retrieval"."""
    if name.startswith("digits/"):
        return name
    return MMEB_TASK_TYPES.get(name, "retrieval")


# ----------------------------------------------------------------------------- traces

def load_traces(path: str | os.PathLike, valid_only: bool = False) -> dict[str, str]:
    """`{id: trace}` from a traces JSONL file. The first row of an id wins. With `valid_only`,
    rows flagged `"valid": false` (not in the `<think>...</think> answer` shape) are left out."""
    path = Path(path)
    out: dict[str, str] = {}
    for where, _, rec in iter_records(path):
        if "id" not in rec or "trace" not in rec:
            raise DataError(f"{where}: a trace row needs 'id' and 'trace' fields, got "
                            f"{sorted(rec)}.")
        if not isinstance(rec["trace"], str):
            raise DataError(f"{where}: field 'trace' must be a string.")
        if valid_only and rec.get("valid") is False:
            continue
        out.setdefault(str(rec["id"]), rec["trace"])
    return out


def attach_traces(rows: Sequence[TrainRow], traces: dict[str, str],
                  missing: str = "error") -> list[TrainRow]:
    """Set `row.trace` from `traces` by id. `missing`: "error" (DataError naming the first ids
    without a trace), "drop" (leave those rows out) or "keep" (keep them with trace None)."""
    if missing not in ("error", "drop", "keep"):
        raise ValueError(f"missing must be 'error', 'drop' or 'keep', got {missing!r}")
    out, absent = [], []
    for row in rows:
        trace = traces.get(row.id)
        if trace is None:
            absent.append(row.id)
            if missing == "drop":
                continue
        else:
            row.trace = trace
        out.append(row)
    if absent and missing == "error":
        raise DataError(f"{len(absent)} of {len(rows)} rows have no trace (first: "
                        f"{absent[:3]}). Run `tte traces` for them, or drop them.")
    return out


# ----------------------------------------------------------------------------- registry

@dataclass
class TaskSpec:
    """One registry entry: a local eval file, or a built-in generated task."""
    name: str
    path: Path | None = None
    image_root: Path | None = None
    group: str = "retrieval"
    needs_reasoning: bool = False
    task_type: str | None = None
    builtin: str | None = None        # e.g. "digits": generated, see digits.py
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
    if spec.builtin == "digits":
        from .digits import build_digits

        options = {**spec.options, **overrides}
        if max_rows is not None:
            options["max_eval_per_task"] = max_rows
        return build_digits(**options).eval_tasks
    if spec.builtin:
        raise DataError(f"task {spec.name!r}: unknown builtin {spec.builtin!r}; known: digits.")
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
                            f"registry YAML (see unified_tte/tasks/digits.yaml for the schema).")
    names = [t.name for t in tasks]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise DataError(f"task(s) {dupes} named more than once; task names must be unique.")
    return tasks
