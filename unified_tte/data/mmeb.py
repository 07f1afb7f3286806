"""MMEB-style data from local files: training rows and eval tasks with candidate lists.

    from unified_tte.data.mmeb import load_train_rows, load_eval_task
    rows = load_train_rows("mmeb_train/ImageNet_1K.jsonl", image_root="mmeb_images/")
    task = load_eval_task("mmeb_eval/ImageNet-1K.parquet", name="ImageNet-1K", group="classification")

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

import os
from pathlib import Path

from ..errors import DataError
from ..model.inputs import TTEInput
from .records import clean_text, image_root_of, iter_records, resolve_image, row_id
from .schema import EvalRow, EvalTask, LoadedRows, TrainRow


# ----------------------------------------------------------------------------- train rows

def load_train_rows(path: str | os.PathLike, image_root: str | os.PathLike | None = None,
                    skip_bad: bool = False, task: str | None = None) -> LoadedRows:
    """Read MMEB-train rows. Returns a list of TrainRow with `.skipped` (reasons, one per row
    skipped; empty unless `skip_bad`). `task` defaults to the row's `task` field or the file stem.
    With `skip_bad`, rows with bad JSON, missing fields or missing images are skipped; without
    it the first one raises DataError."""
    path = Path(path)
    root = image_root_of(path, image_root)
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
                   images=resolve_image(rec.get("qry_image_path"), root, where, "qry_image_path"))
    pos = TTEInput(text=clean_text(rec.get("pos_text")),
                   images=resolve_image(rec.get("pos_image_path"), root, where, "pos_image_path"))
    if not (qry.text or qry.images):
        raise DataError(f"{where}: the query is empty (no 'qry' text, no 'qry_image_path').")
    if not (pos.text or pos.images):
        raise DataError(f"{where}: the positive is empty (no 'pos_text', no 'pos_image_path').")
    neg = None
    neg_images = resolve_image(rec.get("neg_image_path"), root, where, "neg_image_path")
    neg_text = clean_text(rec.get("neg_text"))
    if neg_text or neg_images:
        neg = TTEInput(text=neg_text, images=neg_images)
    return TrainRow(id=row_id(rec, path, number), qry=qry, pos=pos, neg=neg,
                    task=task or str(rec.get("task") or path.stem))


# ----------------------------------------------------------------------------- eval tasks

def load_eval_task(path: str | os.PathLike, image_root: str | os.PathLike | None = None,
                   name: str | None = None, group: str = "retrieval",
                   needs_reasoning: bool = False, task_type: str | None = None,
                   max_rows: int | None = None) -> EvalTask:
    """Read one MMEB-eval task file (see the module docstring for the fields; the first
    candidate is the positive unless the row says otherwise)."""
    path = Path(path)
    root = image_root_of(path, image_root)
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
    rid = row_id(rec, path, number)
    query = TTEInput(text=clean_text(rec.get("qry_text")),
                     images=resolve_image(rec.get("qry_img_path"), root, where, "qry_img_path"))
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
                      images=resolve_image(im, root, where, f"tgt_img_path[{i}]"))
             for i, (t, im) in enumerate(zip(texts, imgs))]
    positive = 0
    if rec.get("positive") is not None:
        positive = rec["positive"]
        if not isinstance(positive, int) or isinstance(positive, bool):
            raise DataError(f"{where}: task {task!r} row {rid!r}: 'positive' must be an integer "
                            f"index into the candidates, got {positive!r}.")
    elif "pos_text" in rec or "pos_img_path" in rec:
        want_text = clean_text(rec.get("pos_text"))
        want_imgs = resolve_image(rec.get("pos_img_path"), root, where, "pos_img_path")
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
