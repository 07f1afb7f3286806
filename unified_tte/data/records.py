"""Reading records from local files (.jsonl, .json, .parquet) with errors that name the file,
line and field, and the field conventions MMEB uses (image placeholders, relative image paths).

    from unified_tte.data.records import iter_records
    for where, number, record in iter_records("train.jsonl"):   # where: "train.jsonl line 12"
        ...
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any, Iterator

from ..errors import DataError, require

# MMEB writes `<|image_1|>` into the text where the image goes (Phi-3-V markup).
_IMAGE_PLACEHOLDER = re.compile(r"<\|image_\d+\|>\s*")
# Hugging Face dataset shards: `original-00000-of-00001.parquet`, `test-00000-of-00002.parquet`.
HF_SHARD = re.compile(r"^(?P<split>[\w.]+)-(?P<index>\d{5})-of-(?P<count>\d{5})$")
DATA_SUFFIXES = (".jsonl", ".json", ".parquet")
FRAME_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


def is_shard(path: Path) -> bool:
    """True for a Hugging Face shard file name (its subset is its folder, not its stem)."""
    return HF_SHARD.match(Path(path).stem) is not None


def subset_of(path: Path) -> str:
    """The subset a data file holds: its folder for a Hugging Face shard
    (`ImageNet_1K/original-00000-of-00001.parquet` -> "ImageNet_1K"), else its stem."""
    path = Path(path)
    return path.parent.name if is_shard(path) else path.stem


def data_files(folder: Path) -> list[Path]:
    """The data files directly in `folder`, shards in shard order."""
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in DATA_SUFFIXES)

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
    if path.is_dir():
        raise DataError(f"{path}: a folder where a data file is expected; give a .jsonl, .json or .parquet "
                        "file (or an MMEB folder where the command takes one).")
    if suffix == ".jsonl":
        with open(path, "rb") as f:
            for line_no, raw in enumerate(f, start=1):
                where = f"{path} line {line_no}"
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    problem = (f"{where}: not UTF-8 text (byte {e.start} of the line); save the file as "
                               "UTF-8.")
                    if skipped is None:
                        raise DataError(problem) from None
                    skipped.append(problem)
                    continue
                if not line.strip():
                    continue
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
        try:
            records = json.loads(path.read_bytes().decode("utf-8"))
        except UnicodeDecodeError as e:
            raise DataError(f"{path}: not UTF-8 text (byte {e.start}); save the file as UTF-8.") from None
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
        pq = require("pyarrow.parquet", "mmeb", "reading .parquet data (MMEB's files)")
        try:
            table = pq.read_table(path)
        except Exception as e:  # noqa: BLE001 - pyarrow raises several types for a bad file
            first = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise DataError(f"{path}: not a readable parquet file ({first}); re-download or re-export "
                            "it.") from None
        for i, record in enumerate(table.to_pylist()):
            yield f"{path} row {i}", i, record
    else:
        raise DataError(f"{path}: unknown data format {suffix!r}; use .jsonl, .json or .parquet.")


def clean_text(text: Any, where: str = "", fld: str = "") -> str:
    """Text with MMEB's `<|image_N|>` placeholders removed (the model places images itself).

    A text field holds a string, or null/nothing for no text. Anything else (a number, a NaN that
    a parquet float column gives, a list, a mapping) is a DataError naming `where` and `fld`,
    never silently turned into the text "12345" or "[1, 2]"."""
    if text is None:
        return ""
    if not isinstance(text, str):
        shown = repr(text)
        shown = shown if len(shown) <= 40 else shown[:37] + "..."
        at = f"{where}: " if where else ""
        name = f"field {fld!r}" if fld else "a text field"
        raise DataError(f"{at}{name} must be text (a string), got {type(text).__name__} {shown}. Fix the "
                        "row (quote numbers as text), or skip bad rows with --skip-bad.")
    return _IMAGE_PLACEHOLDER.sub("", text).strip()


def resolve_image(value: Any, image_root: Path, where: str, fld: str) -> list[str]:
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
    problem = image_header_problem(p)
    if problem:
        raise DataError(f"{where}: field {fld!r}: {p}: {problem}. Replace the file, or skip bad rows "
                        "with --skip-bad.")
    return [str(p)]


def image_header_problem(path: Path) -> str | None:
    """Why an image file cannot be an image, from its header only (cheap: the pixels are decoded
    later, by the model's collator): not a file, not an image format PIL reads, no pixels."""
    from PIL import Image, UnidentifiedImageError

    if not path.is_file():
        return "not a file"
    try:
        with Image.open(path) as im:
            width, height = im.size
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        return f"not a readable image ({type(e).__name__}: {e})"
    except Image.DecompressionBombError as e:
        return f"too large to decode safely ({e})"
    if width == 0 or height == 0:
        return f"the image has no pixels ({width}x{height})"
    return None


def row_id(record: dict, path: Path, number: int, subset: str | None = None) -> str:
    """The row's own `id`, else "{subset}:{number}" (subset: the file stem, or the folder of a
    Hugging Face shard, so ids stay distinct across subsets)."""
    rid = record.get("id")
    return str(rid) if rid is not None and str(rid) != "" else f"{subset or subset_of(path)}:{number}"


def resolve_frames(value: Any, frame_root: Path, where: str, fld: str) -> str:
    """The folder of a video's frames (`frame_root/<value>`, a trailing video suffix dropped),
    after checking it holds frame images."""
    if value is None or (isinstance(value, str) and not value.strip()):
        raise DataError(f"{where}: field {fld!r} is empty; a video row names its video.")
    p = Path(str(value))
    if p.suffix.lower() in (".mp4", ".avi", ".mkv", ".mov", ".webm", ".m4v"):
        p = p.with_suffix("")
    if not p.is_absolute():
        p = frame_root / p
    if not p.is_dir():
        raise DataError(f"{where}: field {fld!r}: frame folder not found: {p}. MMEB-V2 keeps each "
                        f"video's frames in <frame_root>/<video id>/; set the task's frame_root.")
    if not any(f.suffix.lower() in FRAME_SUFFIXES for f in p.iterdir()):
        raise DataError(f"{where}: field {fld!r}: video folder {p} holds no frames "
                        f"({', '.join(FRAME_SUFFIXES)}); extract the frames or drop the row.")
    return str(p)


def image_root_of(path: Path, image_root) -> Path:
    return Path(image_root) if image_root is not None else path.parent


def read_yaml_mapping(path: str | os.PathLike, error: type[Exception], what: str) -> dict:
    """A YAML file that must hold a mapping (a recipe, a task registry); `error` names the file.
    An empty file is an empty mapping."""
    import yaml

    path = Path(path)
    if path.is_dir():
        raise error(f"{path}: a folder where a {what} file is expected.")
    if not path.is_file():
        raise error(f"{path}: {what} file not found.")
    try:
        doc = yaml.safe_load(path.read_bytes().decode("utf-8")) or {}
    except UnicodeDecodeError as e:
        raise error(f"{path}: not UTF-8 text (byte {e.start}); save the {what} as UTF-8.") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise error(f"{path}: not valid YAML ({problem}{at}).") from None
    if not isinstance(doc, dict):
        raise error(f"{path}: a {what} is a mapping of keys to values, got {type(doc).__name__}.")
    return doc
