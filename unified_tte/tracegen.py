"""`tte traces`: run a reasoner over a dataset and write ECR traces, `{"id", "trace", "valid"}` rows
(the format, the prompts and how trace files are read and joined: data/traces.py).

    tte traces --model tiny --data train.jsonl --image-root images/ --out traces.jsonl
    tte traces --model checkpoints/run1 --data digits --out digits_traces.jsonl --limit 200
    tte traces --model smollm2 --data knowledge --task-option seed=1 --out knowledge_traces.jsonl

    torchrun --nproc_per_node 8 -m unified_tte.cli traces --model REASONER --data MMEB-train/ --out traces.jsonl

`--model` is a checkpoint dir, a local Hugging Face model dir, or a built-in name (`tiny`,
`smollm2`), resolved by `unified_tte.model.zoo.load`; anything with
`think(inputs, max_new_tokens=, do_sample=) -> .traces` works from Python (generate_traces).
`--data` is an MMEB-train file, subset folder or folder of subsets (mmeb.py), or a built-in task.

Sharded (torchrun): rank r generates global batches r, r + world, ... into its own part file
`OUT.rank<r>` (resumable like OUT); when every rank is done, rank 0 appends the parts' rows to
OUT in row order and removes them. Ids already in OUT or in a part are skipped, so a run
killed anywhere loses no finished batch, and no id is ever written twice.

The output file is append-only and resumable: ids already in it are skipped, each batch is
flushed to disk as it finishes, and an id is never written twice. A run killed mid-write can
leave a truncated last line; the next run cuts that one partial line (its row is generated
again) and keeps every complete row before it. A malformed line elsewhere is an error naming
the file and line, never silently dropped.

Settings: every row records what it was generated under (`"gen"`: the reasoner's weight hash,
max_new_tokens, greedy decoding, the prompt, the image size range; generation_settings), and a
resume whose settings differ from a row's is refused naming the line and both values
(`--force-mix` appends anyway). One process writes a file at a time: `OUT.lock` (locks.py)
refuses a second one at once. Each row records the fingerprint of its query ("fp", see
data/traces.py join_traces).

Every trace is checked for the ECR shape `<think>reasoning</think> short answer`. Traces that
fail are kept (so a resumed run does not retry them forever) but flagged `"valid": false` and
counted in the report.
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from .data.mmeb import load_train_rows, task_type_for
from .data.registry import BUILTIN_TASKS, build_builtin, task_options
from .data.schema import EvalRow, TrainRow
from .data.traces import check_ecr_shape, ecr_input, normalize_trace
from .distributed import Ranks, barrier, gather, init_ranks, my_batches
from .errors import DataError, command, positive_int, write_failed
from .locks import lock_file
from .model import UnifiedTTE, zoo
from .model.checkpoint import CONFIG_FILE
from .model.inputs import TTEInput

# ----------------------------------------------------------------------------- the output file

@dataclass
class TraceStats:
    """What a generate_traces call did."""
    total: int = 0             # distinct rows considered (after `limit`)
    written: int = 0           # new rows appended this call
    skipped_existing: int = 0  # rows whose id was already in the file
    invalid: int = 0           # new rows not in the ECR shape (written with valid=false)
    duplicate_ids_in_file: int = 0   # repeated ids found in the existing file (left as they are)
    repaired_tail: bool = False      # a truncated last line was cut
    unrecorded_settings: int = 0     # rows of the existing file without a "gen" record (older files)


# Every row records the settings it was generated under (generation_settings) in this field.
SETTINGS_KEY = "gen"


def reasoner_hash(reasoner) -> str | None:
    """A short hash of what decides a UnifiedTTE's traces: base weights (with the invocation rows),
    the think adapter's weights and the prompt settings; None for another reasoner."""
    peft_model = getattr(reasoner, "peft_model", None)
    if peft_model is None:
        return None
    from .model.backbones import weight_hash

    h = hashlib.sha256(weight_hash(peft_model).encode())
    for adapter in reasoner.think_adapters:
        for name, p in sorted(reasoner.adapter_params(adapter).items()):
            h.update(name.encode())
            h.update(p.detach().float().cpu().contiguous().numpy().tobytes())
    c = reasoner.config
    h.update(repr((c.think, c.prompt_format, c.system_prompt, c.max_length)).encode())
    return h.hexdigest()[:16]


def generation_settings(reasoner, max_new_tokens: int, use_prompt: bool, task_type: str | None) -> dict:
    """What decides a trace besides its query, as every row records it (SETTINGS_KEY): the
    reasoner (reasoner_hash), the token budget, greedy decoding, the prompt and the image size
    range. A resume under other settings is refused (`tte traces --force-mix` allows it)."""
    encoder = getattr(reasoner, "encoder", None)
    return {"model": reasoner_hash(reasoner), "max_new_tokens": max_new_tokens, "do_sample": False,
            "prompt": "ecr" if use_prompt else "none", "task_type": task_type,
            "pixels": [getattr(encoder, "min_pixels", None), getattr(encoder, "max_pixels", None)]}


def _check_settings(where: str, recorded, wanted: dict, stats: TraceStats) -> None:
    if recorded is None:
        stats.unrecorded_settings += 1
        return
    if recorded == wanted:
        return
    keys = [k for k in wanted if not isinstance(recorded, dict) or recorded.get(k) != wanted[k]]
    was = ", ".join(f"{k}={recorded.get(k)!r}" for k in keys) if isinstance(recorded, dict) else repr(recorded)
    now = ", ".join(f"{k}={wanted[k]!r}" for k in keys)
    raise DataError(f"{where}: written with other generation settings ({was}) than this run's ({now}); the "
                    "file is left as it is. Resume with the settings it was written with, write to another "
                    "--out, or pass --force-mix to add rows of these settings to it knowingly.")


# Every row this module writes starts so (json.dumps of a dict whose first key is "id").
_ROW_PREFIX = b'{"id": '


def _prepare_output(path: Path, stats: TraceStats, settings: dict | None = None) -> set[str]:
    """Ids already written to `path`, after repairing a line a crash cut short; with `settings`,
    after checking that every row was written under them (see generation_settings).

    The file is touched only once it is proven to be this command's own output: every complete
    line must be a trace row, and an unterminated last line must start as the rows this module
    writes. Anything else (the data file given as --out, a training JSONL without its final
    newline, another program's file) is refused with nothing changed."""
    if not path.exists():
        return set()
    if not path.is_file():
        raise DataError(f"{path}: --out is not a file (a folder?); give the trace file to write.")
    data = path.read_bytes()
    cut = len(data) if not data or data.endswith(b"\n") else data.rfind(b"\n") + 1
    complete, tail = data[:cut], data[cut:]
    try:
        text = complete.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text (byte {e.start}); it is not a trace file, so it is left as "
                        "it is. Is --out pointing at the right file?") from None
    ids: set[str] = set()
    for line_no, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path} line {line_no}: not valid JSON ({e.msg} at column {e.colno}); the "
                            "file is left as it is. Fix or delete that line, or check that --out is the "
                            "trace file, then run again.") from None
        if not isinstance(rec, dict) or "id" not in rec or "trace" not in rec:
            raise DataError(f"{path} line {line_no}: not a trace row (needs 'id' and 'trace'); the file is "
                            "left as it is. Is --out pointing at the right file (not the data)?")
        rid = str(rec["id"])
        if rid in ids:
            stats.duplicate_ids_in_file += 1
        ids.add(rid)
        if settings is not None:
            _check_settings(f"{path} line {line_no}", rec.get(SETTINGS_KEY), settings, stats)
    if tail:
        try:
            rec = json.loads(tail.decode("utf-8"))
            whole = isinstance(rec, dict) and "id" in rec and "trace" in rec
        except (UnicodeDecodeError, json.JSONDecodeError):
            whole = False
        if whole:                                # a whole row, only the newline missing
            with open(path, "ab") as f:
                f.write(b"\n")
            ids.add(str(rec["id"]))
        elif tail.startswith(_ROW_PREFIX):       # our row, cut by a crash: it is generated again
            warnings.warn(f"{path}: the last line is truncated (an interrupted run?); cutting "
                          f"that one line ({len(tail)} bytes), its row will be generated again.")
            with open(path, "r+b") as f:
                f.truncate(cut)
            stats.repaired_tail = True
        else:
            raise DataError(f"{path} line {text.count(chr(10)) + 1}: not a trace row and not a cut one; the "
                            "file is left as it is. Is --out pointing at the right file (not the data)?")
    if stats.unrecorded_settings and settings is not None:
        warnings.warn(f"{path}: {stats.unrecorded_settings} row(s) record no generation settings (written "
                      "before `tte traces` recorded them); they are kept, unchecked against this run's.")
    return ids


def _query_of(row, task_type: str | None) -> tuple[str, TTEInput, str]:
    if isinstance(row, TrainRow):
        return row.id, row.qry, task_type or task_type_for(row.task)
    if isinstance(row, EvalRow):
        return row.id, row.query, task_type or "retrieval"
    raise TypeError(f"expected TrainRow or EvalRow, got {type(row).__name__}")


def _part(out_path: Path, rank: int) -> Path:
    return out_path.with_name(f"{out_path.name}.rank{rank}")


def _parts(out_path: Path) -> list[Path]:
    return sorted(out_path.parent.glob(f"{out_path.name}.rank*"))


def generate_traces(reasoner, rows: Sequence[TrainRow | EvalRow], out_path: str | os.PathLike,
                    batch_size: int = 8, max_new_tokens: int = 128, limit: int | None = None,
                    use_prompt: bool = True, task_type: str | None = None,
                    progress: bool = True, ranks: Ranks | None = None, force_mix: bool = False) -> TraceStats:
    """Append ECR traces for `rows` to the JSONL file `out_path`, skipping ids already there,
    holding its lock (`out_path`.lock, locks.py) while it writes.

    Args:
        reasoner: has `think(inputs: list[TTEInput], max_new_tokens=, do_sample=False)`
            returning an object with `.traces` (items with `.text`, or strings).
        rows: TrainRows (query: `.qry`, task type from `.task`) or EvalRows (`.query`).
        limit: only the first `limit` distinct rows of `rows` are considered, so rerunning with
            the same limit finishes that same set and then does nothing.
        use_prompt: add the task type's ECR prompt after the query text (for instruct models);
            False sends the query as it is (a `think` adapter trained on bare queries).
        task_type: overrides the task type of every row (picks the prompt).
        ranks: the ranks of a torchrun launch (see the module docstring); every rank calls this
            with the same rows.
        force_mix: append to a file written under other generation settings (generation_settings;
            refused otherwise).
    Returns: TraceStats (rank 0's totals over all ranks). Decoding is greedy (deterministic).
    """
    ranks = ranks or Ranks()
    with lock_file(out_path, "tte traces") if ranks.main else contextlib.nullcontext():
        return _generate_traces(reasoner, rows, Path(out_path), batch_size, max_new_tokens, limit, use_prompt,
                                task_type, progress, ranks, force_mix)


def _generate_traces(reasoner, rows, out_path: Path, batch_size: int, max_new_tokens: int, limit: int | None,
                     use_prompt: bool, task_type: str | None, progress: bool, ranks: Ranks,
                     force_mix: bool) -> TraceStats:
    """generate_traces, with the lock on `out_path` held by the caller (rank 0)."""
    from tqdm.auto import tqdm

    out_path.parent.mkdir(parents=True, exist_ok=True)
    settings = generation_settings(reasoner, max_new_tokens, use_prompt, task_type)
    stats = TraceStats()
    if ranks.main:       # one writer repairs truncated tails (and checks the settings) before anyone reads
        for f in [out_path] + _parts(out_path):
            _prepare_output(f, stats if f == out_path else TraceStats(), None if force_mix else settings)
    barrier(ranks)
    done = _prepare_output(out_path, TraceStats()) if out_path.exists() else set()
    for f in _parts(out_path):
        done |= _prepare_output(f, TraceStats())
    barrier(ranks)       # every rank has read the same done set: the batches agree
    todo, seen, fingerprints = [], set(), {}
    for row in rows:
        rid, query, ttype = _query_of(row, task_type)
        if rid in seen:
            continue
        if limit is not None and len(seen) >= limit:
            break
        seen.add(rid)
        fingerprints[rid] = row.meta.get("fingerprint") if isinstance(row.meta, dict) else None
        if rid in done:
            stats.skipped_existing += 1
        else:
            todo.append((rid, ecr_input(query, ttype) if use_prompt else query))
    stats.total = len(seen)
    batches = [todo[i:i + batch_size] for i in range(0, len(todo), batch_size)]
    target = out_path if ranks.world == 1 else _part(out_path, ranks.rank)
    created = not target.exists()
    with open(target, "ab", buffering=0) as f, \
            tqdm(total=len(todo), desc="traces", unit="row", dynamic_ncols=True,
                 disable=not (progress and ranks.main)) as bar:
        for b in my_batches(len(batches), ranks):
            batch = batches[b]
            out = reasoner.think([x for _, x in batch], max_new_tokens=max_new_tokens,
                                 do_sample=False)
            traces = list(getattr(out, "traces", out))
            if len(traces) != len(batch):
                raise RuntimeError(f"the reasoner returned {len(traces)} traces for a batch of "
                                   f"{len(batch)} inputs")
            lines = []
            for (rid, _), t in zip(batch, traces):
                text = normalize_trace(getattr(t, "text", t))
                valid = check_ecr_shape(text)
                stats.invalid += not valid
                record = {"id": rid, "trace": text, "valid": valid}
                if fingerprints.get(rid):
                    record["fp"] = fingerprints[rid]
                record[SETTINGS_KEY] = settings
                lines.append(json.dumps(record, ensure_ascii=False) + "\n")
            # One write per batch, then to disk: a crash loses at most the batch in flight.
            _append(f.fileno(), target, "".join(lines).encode("utf-8"), created)
            stats.written += len(batch)
            bar.update(len(batch) * ranks.world)
    if ranks.world > 1:
        counts = gather((stats.written, stats.invalid), ranks)
        barrier(ranks)
        if ranks.main:
            stats.written, stats.invalid = (sum(c[0] for c in counts), sum(c[1] for c in counts))
            _merge_parts(out_path, [rid for rid, _ in todo])
        barrier(ranks)
    return stats


def _append(fd: int, path: Path, data: bytes, created: bool) -> None:
    """Append one batch's rows and fsync them. A write that fails (a full disk) leaves no part of
    the batch behind: the file is cut back to where the batch began, and removed when this run
    created it and it is still empty; the error names the file."""
    start = os.fstat(fd).st_size
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    except OSError as exc:
        os.ftruncate(fd, start)
        if created and start == 0:
            path.unlink(missing_ok=True)
        raise write_failed(exc, path, "it holds only whole rows. Free space on that disk, then run the same "
                           "command again: the rows already there are kept and skipped.") from exc


def _merge_parts(out_path: Path, order: list[str]) -> None:
    """Append the part files' rows to OUT in `order` (ids already in OUT skipped), then remove
    the parts. Safe to repeat after a crash: what reached OUT is skipped the next time."""
    have = _prepare_output(out_path, TraceStats()) if out_path.exists() else set()
    lines: dict[str, str] = {}
    for part in _parts(out_path):
        for line in part.read_text(encoding="utf-8").splitlines():
            if line.strip():
                rid = str(json.loads(line)["id"])
                lines.setdefault(rid, line)
    with open(out_path, "a", encoding="utf-8") as f:
        f.write("".join(lines[rid] + "\n" for rid in order if rid in lines and rid not in have))
        f.flush()
        os.fsync(f.fileno())
    for part in _parts(out_path):
        part.unlink()


# ----------------------------------------------------------------------------- the command

def _load_reasoner(spec: str):
    """--model: an exported checkpoint or run folder (has tte_config.json) loads with its think
    adapter; a built-in name or a local Hugging Face folder is the backbone itself as the
    reasoner (think="none")."""
    if (Path(spec) / CONFIG_FILE).is_file():
        return UnifiedTTE.from_checkpoint(spec)
    return UnifiedTTE(zoo.load(spec), think="none")


def _load_rows(args) -> list:
    if args.data in BUILTIN_TASKS:   # every train row of the built-in task
        options = {"max_train_per_task": None}
        if args.data == "digits":
            options.update(seed=args.digits_seed, image_size=args.image_size)
        return build_builtin(args.data, **{**options, **task_options(args.task_option)}).train_rows
    rows = load_train_rows(args.data, args.image_root, skip_bad=args.skip_bad)
    if rows.skipped:
        print(f"skipped {len(rows.skipped)} bad row(s) (--skip-bad); first: {rows.skipped[0]}",
              file=sys.stderr)
    return rows


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tte traces", description="Write ECR traces for a dataset "
                                "with a reasoner; resumable (ids already in --out are skipped).")
    p.add_argument("--model", required=True, help="checkpoint dir, local HF model dir, or a "
                   "built-in name (tiny, smollm2)")
    p.add_argument("--data", required=True, help="MMEB-train file (.jsonl/.json/.parquet), subset "
                   "folder or folder of subsets, or a built-in task's train rows "
                   f"({', '.join(sorted(BUILTIN_TASKS))})")
    p.add_argument("--out", required=True, help="output JSONL; appended to if it exists")
    p.add_argument("--image-root", default=None, help="folder image paths are relative to "
                   "(default: the data file's folder)")
    p.add_argument("--batch-size", type=positive_int, default=8)
    p.add_argument("--max-new-tokens", type=positive_int, default=128)
    p.add_argument("--limit", type=positive_int, default=None, help="only the first N rows of --data")
    p.add_argument("--skip-bad", action="store_true", help="skip rows with bad JSON or missing "
                   "images (counted) instead of stopping")
    p.add_argument("--prompt", choices=["ecr", "none"], default="ecr", help="'ecr': add the "
                   "task type's ECR prompt (instruct models); 'none': the bare query (a trained "
                   "think adapter)")
    p.add_argument("--max-pixels", type=int, default=None, help="cap on image / frame size in pixels "
                   "(default: the checkpoint's setting, else the processor's; VLM2Vec: 1003520 = 28*28*1280)")
    p.add_argument("--min-pixels", type=int, default=None, help="lower bound of image / frame size")
    p.add_argument("--task-option", action="append", default=[], metavar="KEY=VALUE",
                   help="an option of the built-in task's builder, e.g. seed=1 (repeatable)")
    p.add_argument("--digits-seed", type=int, default=0, help="seed of the digits split")
    p.add_argument("--image-size", type=int, default=56, help="digits image size in pixels")
    p.add_argument("--force-mix", action="store_true", help="append to an --out written under other "
                   "generation settings (model, --max-new-tokens, --prompt, pixels); refused otherwise")
    p.add_argument("--no-progress", action="store_true")
    return p


@command("traces")
def traces_main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `tte traces`."""
    args = build_parser().parse_args(argv)
    ranks = init_ranks()
    # A second `tte traces` onto the same --out is refused here, before any data or model loads.
    with lock_file(args.out, "tte traces") if ranks.main else contextlib.nullcontext():
        rows = _load_rows(args)
        reasoner = _load_reasoner(args.model)
        if args.max_pixels is not None or args.min_pixels is not None:
            reasoner.set_image_size(max_pixels=args.max_pixels, min_pixels=args.min_pixels)
        if ranks.device.type == "cuda":
            reasoner.to(ranks.device)
        stats = _generate_traces(reasoner, rows, Path(args.out), args.batch_size, args.max_new_tokens, args.limit,
                                 args.prompt == "ecr", None, not args.no_progress, ranks, args.force_mix)
    if not ranks.main:
        return 0
    print(f"{args.out}: wrote {stats.written} trace(s); {stats.skipped_existing} already there; "
          f"{stats.invalid} of the new ones not in the <think>...</think> answer shape "
          f"(kept, flagged valid=false)"
          + ("; repaired a truncated last line" if stats.repaired_tail else "")
          + (f"; {stats.duplicate_ids_in_file} duplicate id(s) already in the file (left as they "
             f"are; training refuses the file until one row of each is removed)" if stats.duplicate_ids_in_file else ""))
    return 0


if __name__ == "__main__":
    sys.exit(traces_main())
