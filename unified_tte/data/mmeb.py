"""MMEB data from local files, in the layouts of the public releases: MMEB-train rows, MMEB-eval
V1 and MMEB-V2 tasks (image, video, visual documents), detected from their columns.

    from unified_tte.data.mmeb import load_train_rows, load_eval_task
    rows = load_train_rows("MMEB-train/")                       # every subset folder in it
    rows = load_train_rows(["MMEB-train/ImageNet_1K", "MMEB-train/OK-VQA"], image_root="MMEB-train/")
    task = load_eval_task("MMEB-eval/ImageNet-1K/", group="classification")
    task = load_eval_task("visdoc-tasks/ViDoRe_docvqa/", modality="visdoc")   # queries/corpus/qrels

Layouts (a path is a file, a folder of Hugging Face shards `<split>-00000-of-0000N.parquet`, a
folder of subset folders (train), or a list of those; .jsonl/.json/.parquet everywhere):

* MMEB-train: `qry`, `qry_image_path`, `pos_text`, `pos_image_path`, optional `neg_text`,
  `neg_image_path` (the release: `<Subset>/original-00000-of-00001.parquet`). `task` is the
  subset (the shard's folder, else the file stem); image paths are relative to `image_root`
  (default: the folder holding the subset folders, as the release's `images/...` paths are).
* MMEB-eval V1: `qry_text`, `qry_img_path`, `tgt_text: list`, `tgt_img_path: list` (they pair
  up into candidates, the FIRST is the positive unless the row says `positive: int` or gives
  `pos_text` / `pos_img_path`); the release: `<Task>/test-00000-of-00001.parquet`.
* MMEB-V2 image: V1 plus `qry_inst` and `tgt_inst`, which are put before the query and each
  candidate text (joined with a space, as VLM2Vec joins them).
* MMEB-V2 video (annotations as released, frames in `frame_root/<video id>/`):
  retrieval (MSR-VTT, MSVD, DiDeMo, VATEX, YouCook2): a caption (`caption` | `enCap` |
  `sentence`) and a video (`video_id` | `videoID` | `video` | `video_path` | `id`); the query is
  the caption, the task's corpus is every video, the row's own video the positive.
  classification (K700, HMDB51, UCF101, Breakfast; SmthSmthV2 with `neg_text`): `video_id`
  and `pos_text`; the video is the query, the corpus the dataset's class names (`labels`: the
  registry names a shipped label set, data/labels/; without one, with a warning, the `pos_text`s
  seen in the file) or, with `neg_text`, the row's own candidates.
  QA (NExTQA, EgoSchema, MVBench, Video-MME): `question`, options (`options` | `option` |
  `candidates`), `answer` (an index, a letter A-Z, or the option's text) and a video field.
  `qry_inst` / `tgt_inst` (registry keys) are the task's instructions, as VLM2Vec's code holds them.
* Visual documents (ViDoRe / VisRAG, BEIR style): a folder with `queries`, `corpus` and `qrels`
  (each a file or a folder of shards): queries `query-id`, `query`; corpus `corpus-id` and an
  `image` (Hugging Face image struct {bytes, path}, or a path) or `image_root/<corpus-id>.png`;
  qrels `query-id`, `corpus-id`, `score` (graded; several positives per query; a pair judged
  twice keeps its highest grade).

Conventions:
* Row ids: the row's `id` if present, else "{subset}:{n}" with n the 1-based line of a .jsonl
  file or the 0-based row of a .parquet/.json subset (counted across its shards), so ids are
  distinct across subsets and traces written for a row join back to it (train rows also carry a
  content fingerprint that trace files record; see traces.py).
* MMEB's Phi-3-V image placeholders (`<|image_1|>`) are removed from the text: the collator puts
  a TTEInput's images before its text itself.
* `max_pixels` (a registry key) caps the images of one task, e.g. document pages.

Every problem raises `DataError` naming the file, the row, the field and what to do (a candidate
with neither text nor image is one: it would tie every other empty candidate). With
`skip_bad=True` the train loader skips bad rows instead and reports them in `.skipped`.
"""
from __future__ import annotations

import io
import os
import warnings
from dataclasses import replace
from pathlib import Path
from typing import Sequence

from ..errors import DataError
from ..model.inputs import TTEInput
from .records import (clean_text, data_files, is_shard, iter_records, resolve_frames,
                      resolve_image, row_id, subset_of)
from .schema import EvalRow, EvalTask, LoadedRows, TrainRow, row_fingerprint


# ----------------------------------------------------------------------------- train rows

def train_sources(source, image_root=None) -> list[tuple[str, list[Path], Path]]:
    """(subset, its files in order, its image root) for a file, a folder of shards, a folder of
    subset folders or of files, or a list of any of those."""
    if isinstance(source, (list, tuple)):
        return [s for item in source for s in train_sources(item, image_root)]
    path = Path(source)
    if not path.exists():
        raise DataError(f"{path}: file not found (nor a folder). Pass an MMEB-train file, a subset folder "
                        f"(<Subset>/original-00000-of-00001.parquet) or the folder holding them.")
    if path.is_file():
        root = path.parent.parent if is_shard(path) else path.parent
        return [(subset_of(path), [path], Path(image_root) if image_root is not None else root)]
    files = data_files(path)
    if files and all(is_shard(f) for f in files):           # one subset's shards
        return [(path.name, files, Path(image_root) if image_root is not None else path.parent)]
    out = [(f.stem, [f], Path(image_root) if image_root is not None else path) for f in files]
    for sub in sorted(p for p in path.iterdir() if p.is_dir()):
        shards = data_files(sub)
        if shards:
            out.append((sub.name, shards, Path(image_root) if image_root is not None else path))
    if not out:
        raise DataError(f"{path}: no data files (.jsonl/.json/.parquet) in it or in its subset folders.")
    return out


def load_train_rows(path, image_root: str | os.PathLike | None = None, skip_bad: bool = False,
                    task: str | None = None) -> LoadedRows:
    """Read MMEB-train rows from a file, a subset folder, a folder of subsets, or a list of those
    (see the module docstring). Returns a list of TrainRow with `.skipped` (reasons, one per row
    skipped; empty unless `skip_bad`). `task` defaults to the row's `task` field or the subset.
    With `skip_bad`, rows with bad JSON, missing fields or missing images are skipped; without
    it the first one raises DataError. Ids repeated across the sources are an error."""
    rows, skipped, seen = LoadedRows(), [], {}
    for subset, files, root in train_sources(path, image_root):
        offset = 0
        for f in files:
            count = 0
            for where, number, rec in iter_records(f, skipped if skip_bad else None):
                count = max(count, number + 1)
                index = number + offset if is_shard(f) else number
                try:
                    row = _train_row(rec, where, index, subset, root, task)
                except DataError as e:
                    if not skip_bad:
                        raise
                    skipped.append(str(e))
                    continue
                if row.id in seen:
                    raise DataError(f"{where}: row id {row.id!r} was already used by {seen[row.id]}; "
                                    "ids must be unique across subsets (give the rows distinct 'id' "
                                    "fields, or drop the 'id' column to use subset:row ids).")
                seen[row.id] = where
                rows.append(row)
            offset += count
    rows.skipped = skipped
    return rows


def _train_row(rec: dict, where: str, number: int, subset: str, root: Path,
               task: str | None) -> TrainRow:
    for fld in ("qry", "pos_text"):
        if fld not in rec:
            raise DataError(f"{where}: missing field {fld!r}. MMEB-train rows need qry, "
                            f"qry_image_path, pos_text, pos_image_path (neg_* optional).")
    qry = TTEInput(text=clean_text(rec.get("qry"), where, "qry"),
                   images=resolve_image(rec.get("qry_image_path"), root, where, "qry_image_path"))
    pos = TTEInput(text=clean_text(rec.get("pos_text"), where, "pos_text"),
                   images=resolve_image(rec.get("pos_image_path"), root, where, "pos_image_path"))
    if not (qry.text or qry.images):
        raise DataError(f"{where}: the query is empty (no 'qry' text, no 'qry_image_path').")
    if not (pos.text or pos.images):
        raise DataError(f"{where}: the positive is empty (no 'pos_text', no 'pos_image_path').")
    neg = None
    neg_images = resolve_image(rec.get("neg_image_path"), root, where, "neg_image_path")
    neg_text = clean_text(rec.get("neg_text"), where, "neg_text")
    if neg_text or neg_images:
        neg = TTEInput(text=neg_text, images=neg_images)
    rid = row_id(rec, Path(where), number, subset)
    task = task or str(rec.get("task") or subset)
    meta = {"fingerprint": row_fingerprint(task, rec.get("qry"), rec.get("qry_image_path")),
            "where": where}
    return TrainRow(id=rid, qry=qry, pos=pos, neg=neg, task=task, meta=meta)


# ----------------------------------------------------------------------------- eval tasks

V1_COLUMNS = ("qry_text", "qry_img_path", "tgt_text", "tgt_img_path")
V2_IMAGE_COLUMNS = ("qry_inst", "qry_text", "qry_img_path", "tgt_inst", "tgt_text", "tgt_img_path")
CAPTION_FIELDS = ("caption", "enCap", "sentence")
VIDEO_FIELDS = ("video_id", "videoID", "video", "video_path", "video_name", "video_idx", "id")
OPTION_FIELDS = ("options", "option", "candidates")
VISDOC_PARTS = ("queries", "corpus", "qrels")


def detect_layout(columns, where: str) -> str:
    """The layout of an eval file from its columns: "v1", "v2-image", "video-ret", "video-cls",
    "video-qa"; DataError naming the file and the missing column otherwise."""
    cols = set(columns)
    if {"qry_inst", "tgt_inst"} & cols:
        missing = [c for c in V2_IMAGE_COLUMNS if c not in cols]
        if missing:
            raise DataError(f"{where}: an MMEB-V2 image file (it has qry_inst/tgt_inst) is missing column(s) "
                            f"{missing}; V2 image files have {', '.join(V2_IMAGE_COLUMNS)}.")
        return "v2-image"
    if {"qry_text", "tgt_text", "tgt_img_path", "qry_img_path"} & cols:
        missing = [a for a, b in (("qry_text", "qry_img_path"), ("tgt_text", "tgt_img_path"))
                   if a not in cols and b not in cols]
        if missing:   # a text-only or image-only side may leave out the other column
            raise DataError(f"{where}: an MMEB-eval V1 file is missing column(s) {missing}; "
                            f"V1 files have {', '.join(V1_COLUMNS)}.")
        return "v1"
    video = [f for f in VIDEO_FIELDS if f in cols]
    if "question" in cols and video:
        missing = [c for c in ("answer",) if c not in cols] + \
            ([] if any(f in cols for f in OPTION_FIELDS) else ["options"])
        if missing:
            raise DataError(f"{where}: a video QA file needs question, options (or option / candidates), "
                            f"answer and a video field; missing {missing}.")
        return "video-qa"
    if "pos_text" in cols and video:
        return "video-cls"
    if any(f in cols for f in CAPTION_FIELDS) and video:
        return "video-ret"
    raise DataError(f"{where}: columns {sorted(cols)} match no MMEB layout. Expected MMEB-eval V1 "
                    f"({', '.join(V1_COLUMNS)}), MMEB-V2 image ({', '.join(V2_IMAGE_COLUMNS)}), a V2 video "
                    f"task (a caption, pos_text or question with a video field: {', '.join(VIDEO_FIELDS)}), "
                    f"or a visdoc folder with {', '.join(VISDOC_PARTS)}.")


def eval_files(path: Path) -> list[Path]:
    """A task's data files: the file itself, or the (shard) files of its folder."""
    if path.is_file():
        return [path]
    if not path.exists():
        raise DataError(f"{path}: file not found. Check the path (relative paths are taken from the "
                        f"current folder, or from the registry's data root).")
    files = data_files(path)
    if not files:
        raise DataError(f"{path}: no data files (.jsonl/.json/.parquet) in this folder.")
    return files


def _records(files: list[Path]):
    """(where, row number across the files, record) over a task's files."""
    offset = 0
    for f in files:
        count = 0
        for where, number, rec in iter_records(f):
            count = max(count, number + 1)
            yield where, number + offset if is_shard(f) else number, f, rec
        offset += count


def load_eval_task(path: str | os.PathLike, image_root: str | os.PathLike | None = None,
                   name: str | None = None, group: str = "retrieval",
                   needs_reasoning: bool = False, task_type: str | None = None,
                   max_rows: int | None = None, *, frame_root: str | os.PathLike | None = None,
                   qry_inst: str = "", tgt_inst: str = "", labels: Sequence[str] | None = None,
                   max_pixels: int | None = None, modality: str | None = None,
                   primary: str | None = None, distribution: str | None = None) -> EvalTask:
    """Read one eval task in any layout of the module docstring (detected from the columns, or
    a visdoc folder from its queries/corpus/qrels parts). Returns a validated EvalTask."""
    path = Path(path)
    if path.is_dir() and any((path / part).exists() or list(path.glob(f"{part}.*")) for part in VISDOC_PARTS):
        task = _load_visdoc(path, image_root, name or path.name, group, qry_inst, tgt_inst, max_rows)
    else:
        files = eval_files(path)
        root = Path(image_root) if image_root is not None else (files[0].parent.parent if is_shard(files[0])
                                                                else files[0].parent)
        name = name or (path.name if path.is_dir() else subset_of(path))
        records = _records(files)
        first = next(records, None)
        if first is None:
            raise DataError(f"task {name!r}: {path} holds no rows.")
        layout = detect_layout(first[3], first[0])
        frames = Path(frame_root) if frame_root is not None else root
        task = EvalTask(name=name, modality_group=group, rows=[])
        rows = []
        for where, number, f, rec in _chain([first], records):
            if max_rows is not None and len(rows) >= max_rows:
                break
            if layout in ("v1", "v2-image"):
                missing = [c for c in (V2_IMAGE_COLUMNS if layout == "v2-image" else ()) if c not in rec]
                if missing:
                    raise DataError(f"{where}: missing field(s) {missing} (an MMEB-V2 image file).")
                rows.append(_eval_row(rec, where, f, number, root, name, layout == "v2-image"))
            else:
                rows.append(_video_row(rec, where, f, number, frames, name, layout, qry_inst))
        task.rows = rows
        if layout == "video-ret":
            task.corpus = {r.meta["video"]: TTEInput(tgt_inst, videos=[r.meta["frames"]]) for r in rows}
        elif layout == "video-cls":
            seen = list(dict.fromkeys(r.meta["label"] for r in rows))
            unknown = sorted(set(seen) - set(labels or seen))
            if unknown:
                raise DataError(f"task {name!r}: label(s) {unknown[:3]} of {path} are not among the task's "
                                f"{len(labels)} labels; fix the rows' pos_text or the registry's labels.")
            if any(r.relevance is not None for r in rows):
                if not labels:
                    warnings.warn(f"task {name!r}: no label set (registry key `labels`), so its videos rank "
                                  f"against the {len(seen)} labels seen in {path} only; name the dataset's "
                                  "label set to rank against all of its classes.", stacklevel=2)
                task.corpus = {label: TTEInput(label) for label in (labels or seen)}
    task.modality_group, task.needs_reasoning = group, needs_reasoning
    task.task_type = task_type or task_type_for(task.name)
    task.modality, task.distribution = modality, distribution
    task.primary = primary or ("ndcg@5" if modality == "visdoc" else "hit@1")
    if max_pixels is not None:
        _cap_images(task, max_pixels)
    validate_eval_task(task)
    return task


def _chain(*iterables):
    for it in iterables:
        yield from it


def _cap_images(task: EvalTask, max_pixels: int) -> None:
    """Give the task's rows and corpus inputs capped at `max_pixels` (copies: the rows' inputs may
    be shared between rows)."""
    def cap(item: TTEInput) -> TTEInput:
        return replace(item, max_pixels=max_pixels)

    task.rows = [replace(r, query=cap(r.query), candidates=[cap(c) for c in r.candidates]) for r in task.rows]
    if task.corpus is not None:
        task.corpus = {key: cap(item) for key, item in task.corpus.items()}


def _join(*parts, where: str = "", fields: Sequence[str] = ()) -> str:
    """The non-empty texts joined by spaces (an instruction, then the text)."""
    names = list(fields) + [""] * (len(parts) - len(fields))
    return " ".join(p for p in (clean_text(x, where, f) for x, f in zip(parts, names)) if p)


def _first(rec: dict, fields: Sequence[str]):
    return next(((f, rec[f]) for f in fields if rec.get(f) not in (None, "")), (None, None))


def _video_row(rec, where, path: Path, number: int, frame_root: Path, task: str, layout: str,
               qry_inst: str) -> EvalRow:
    rid = row_id(rec, path, number, task) if layout != "video-ret" or "id" not in rec else f"{task}:{number}"
    fld, video = _first(rec, VIDEO_FIELDS)
    if video is None:
        raise DataError(f"{where}: task {task!r}: no video field ({', '.join(VIDEO_FIELDS)}) in this row.")
    frames = resolve_frames(video, frame_root, where, fld)
    video_name = Path(frames).name
    if layout == "video-ret":
        _, caption = _first(rec, CAPTION_FIELDS)
        if isinstance(caption, (list, tuple)):
            caption = caption[0] if caption else ""
        query = TTEInput(_join(qry_inst, caption))
        if not query.text:
            raise DataError(f"{where}: task {task!r}: empty caption ({', '.join(CAPTION_FIELDS)}).")
        return EvalRow(rid, query, [], relevance={video_name: 1.0},
                       meta={"video": video_name, "frames": frames})
    query_video = TTEInput(_join(qry_inst), videos=[frames])
    if layout == "video-cls":
        label = clean_text(rec.get("pos_text"), where, "pos_text")
        if not label:
            raise DataError(f"{where}: task {task!r}: field 'pos_text' (the class name) is empty.")
        negs = _as_list(rec.get("neg_text"), where, "neg_text")
        if negs:
            negatives = [TTEInput(_candidate_text(n, where, f"neg_text[{i}]")) for i, n in enumerate(negs)]
            return EvalRow(rid, query_video, [TTEInput(label)] + negatives, 0, meta={"label": label})
        return EvalRow(rid, query_video, [], relevance={label: 1.0}, meta={"label": label})
    ofld, options = _first(rec, OPTION_FIELDS)
    ofld = ofld or "options"
    options = [_candidate_text(o, where, f"{ofld}[{i}]") for i, o in enumerate(_as_list(options, where, ofld))]
    answer = rec.get("answer")
    positive = _answer_index(answer, options, where)
    query = TTEInput(_join(qry_inst, rec.get("question")), videos=[frames])
    return EvalRow(rid, query, [TTEInput(o) for o in options], positive)


def _candidate_text(value, where: str, fld: str) -> str:
    """A text-only candidate's text, refused when null or empty (it would tie every other empty one)."""
    text = clean_text(value, where, fld)
    if not text:
        raise DataError(f"{where}: field {fld!r} is {'null' if value is None else 'empty'}: a text candidate "
                        "needs its text; fill it in or drop the candidate.")
    return text


def _answer_index(answer, options: list[str], where: str) -> int:
    """An answer given as an index, a letter (A = the first option) or the option's text."""
    if isinstance(answer, bool) or answer is None:
        raise DataError(f"{where}: field 'answer' is missing or not an index, letter or option text.")
    if isinstance(answer, int) or (isinstance(answer, str) and answer.strip().isdigit()):
        return int(answer)
    text = clean_text(answer)
    letter = text.strip("() .").upper()
    if len(letter) == 1 and "A" <= letter <= "Z":
        return ord(letter) - ord("A")
    for i, o in enumerate(options):  # options may read "(A) a dog" / "A. a dog"
        if o == text or o.split(maxsplit=1)[-1] == text:
            return i
    raise DataError(f"{where}: field 'answer' {answer!r} is not an index, a letter or one of the "
                    f"{len(options)} options.")


def _visdoc_part(folder: Path, part: str) -> list[Path]:
    sub = folder / part
    if sub.is_dir():
        return eval_files(sub)
    found = sorted(p for p in folder.glob(f"{part}.*") if p.suffix.lower() in (".jsonl", ".json", ".parquet"))
    if not found:
        raise DataError(f"{folder}: a visdoc task folder needs '{part}' (a file {part}.parquet/.jsonl or a "
                        f"folder of shards) beside {', '.join(p for p in VISDOC_PARTS if p != part)}.")
    return found


def _corpus_image(rec: dict, where: str, corpus_id: str, image_root: Path, seen: dict) -> str:
    """A corpus page as a file path: the record's path, or its bytes written once to
    image_root/<corpus-id>.png (as VLM2Vec stores them), or an image already there. Pages whose
    bytes repeat an earlier page's share its file, so the evaluator sees one content."""
    image = rec.get("image")
    if isinstance(image, dict):
        if image.get("path") and (image_root / image["path"]).is_file():
            return str(image_root / image["path"])
        data = image.get("bytes")
        if data:
            import hashlib

            digest = hashlib.sha1(data).hexdigest()
            if digest in seen:
                return seen[digest]
            target = image_root / f"{corpus_id}.png"
            seen[digest] = str(target)
            if not target.is_file():
                from PIL import Image
                image_root.mkdir(parents=True, exist_ok=True)
                Image.open(io.BytesIO(data)).convert("RGB").save(target)
            return str(target)
    elif isinstance(image, str) and image:
        return resolve_image(image, image_root, where, "image")[0]
    target = image_root / f"{corpus_id}.png"
    if target.is_file():
        return str(target)
    raise DataError(f"{where}: corpus item {corpus_id!r} has no image: field 'image' is empty and "
                    f"{target} does not exist.")


def _load_visdoc(folder: Path, image_root, name: str, group: str, qry_inst: str, tgt_inst: str,
                 max_rows: int | None) -> EvalTask:
    root = Path(image_root) if image_root is not None else folder / "images"
    corpus: dict[str, TTEInput] = {}
    seen: dict[str, str] = {}
    for where, _, _, rec in _records(_visdoc_part(folder, "corpus")):
        cid = rec.get("corpus-id")
        if cid is None:
            raise DataError(f"{where}: missing field 'corpus-id' (a visdoc corpus row).")
        corpus[str(cid)] = TTEInput(clean_text(tgt_inst), [_corpus_image(rec, where, str(cid), root, seen)])
    qrels: dict[str, dict[str, float]] = {}
    for where, _, _, rec in _records(_visdoc_part(folder, "qrels")):
        for fld in ("query-id", "corpus-id"):
            if rec.get(fld) is None:
                raise DataError(f"{where}: missing field {fld!r} (a qrels row: query-id, corpus-id, score).")
        cid = str(rec["corpus-id"])
        if cid not in corpus:
            raise DataError(f"{where}: field 'corpus-id': {cid!r} is not in the corpus of {folder} "
                            f"({len(corpus)} items); fix the qrels or supply the full corpus.")
        score = float(rec.get("score", 1) or 0)
        if score > 0:   # a pair judged twice keeps its highest grade, as VLM2Vec's load_qrels_mapping
            judged = qrels.setdefault(str(rec["query-id"]), {})
            judged[cid] = max(judged.get(cid, 0.0), score)
    rows = []
    for where, _, _, rec in _records(_visdoc_part(folder, "queries")):
        if max_rows is not None and len(rows) >= max_rows:
            break
        qid, text = rec.get("query-id"), rec.get("query")
        if qid is None or not text:
            raise DataError(f"{where}: a visdoc query row needs 'query-id' and 'query'.")
        if str(qid) not in qrels:
            continue  # a query with no relevant page is not scored (as in BEIR / VLM2Vec)
        rows.append(EvalRow(str(qid), TTEInput(_join(qry_inst, text)), [], relevance=qrels[str(qid)]))
    return EvalTask(name=name, modality_group=group, rows=rows, corpus=corpus)


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


def _eval_row(rec: dict, where: str, path: Path, number: int, root: Path, task: str,
              v2: bool = False) -> EvalRow:
    rid = row_id(rec, path, number, task if is_shard(path) else None)
    qry_text = (_join(rec.get("qry_inst"), rec.get("qry_text"), where=where, fields=("qry_inst", "qry_text"))
                if v2 else clean_text(rec.get("qry_text"), where, "qry_text"))
    query = TTEInput(text=qry_text,
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
    insts = _as_list(rec.get("tgt_inst"), where, "tgt_inst") if v2 else []
    insts = insts if len(insts) == n else (insts[:1] * n if insts else [""] * n)
    cands = []
    for i, (inst, text, im) in enumerate(zip(insts, texts, imgs)):
        own_text, images = clean_text(text, where, f"tgt_text[{i}]"), resolve_image(im, root, where, f"tgt_img_path[{i}]")
        if not (own_text or images):   # an empty candidate would tie every other empty one
            raise DataError(f"{where}: task {task!r} row {rid!r}: field 'tgt_text[{i}]' is "
                            f"{'null' if text is None else 'empty'} and 'tgt_img_path[{i}]' names no image, "
                            f"so candidate {i} has no content; give it a text or an image, or drop it "
                            f"from both lists.")
        cands.append(TTEInput(_join(inst, own_text, where=where, fields=("tgt_inst",)) if v2 else own_text, images))
    positive = 0
    if rec.get("positive") is not None:
        positive = rec["positive"]
        if not isinstance(positive, int) or isinstance(positive, bool):
            raise DataError(f"{where}: task {task!r} row {rid!r}: 'positive' must be an integer "
                            f"index into the candidates, got {positive!r}.")
    elif "pos_text" in rec or "pos_img_path" in rec:
        want_text = clean_text(rec.get("pos_text"), where, "pos_text")
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
    if row.relevance is not None:
        if not row.relevance:
            raise DataError(f"{at}task {task!r} row {row.id!r}: no relevant corpus item.")
        return
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
        if row.relevance is not None:
            unknown = [c for c in row.relevance if c not in (task.corpus or {})]
            if unknown:
                raise DataError(f"task {task.name!r} row {row.id!r}: relevant id(s) {unknown[:3]} are not "
                                f"in the task's corpus ({len(task.corpus or {})} items).")


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
