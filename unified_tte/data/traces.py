"""ECR trace generation: run a reasoner over a dataset and write `{"id", "trace", "valid"}` rows.

    tte traces --model tiny --data train.jsonl --image-root images/ --out traces.jsonl
    tte traces --model checkpoints/run1 --data digits --out digits_traces.jsonl --limit 200
    tte traces --model smollm2 --data knowledge --task-option seed=1 --out knowledge_traces.jsonl

`--model` is a checkpoint dir, a local Hugging Face model dir, or a built-in name (`tiny`,
`smollm2`), resolved by `unified_tte.backbones.load_reasoner`; anything with
`think(inputs, max_new_tokens=, do_sample=) -> .traces` works from Python.

The output file is append-only and resumable: ids already in it are skipped, each batch is
flushed to disk as it finishes, and an id is never written twice. A run killed mid-write can
leave a truncated last line; the next run cuts that one partial line (its row is generated
again) and keeps every complete row before it. A malformed line elsewhere is an error naming
the file and line, never silently dropped.

Every trace is checked for the ECR shape `<think>reasoning</think> short answer`. Traces that
fail are kept (so a resumed run does not retry them forever) but flagged `"valid": false` and
counted in the report; `load_traces(path, valid_only=True)` leaves them out, e.g. for SFT.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from ..errors import DataError, command
from ..model import UnifiedTTE, zoo
from ..model.checkpoint import CONFIG_FILE
from ..model.inputs import TTEInput
from .mmeb import load_train_rows, task_type_for
from .records import iter_records
from .registry import BUILTIN_TASKS, build_builtin
from .schema import EvalRow, TrainRow

_FORMAT = ("First reason briefly inside <think> and </think>, then write the short final answer "
           "(a few words) after </think>.")

# One prompt per task type (classification / retrieval / qa / grounding as in MMEB, plus the
# digits sub-tasks). The reasoning is "embedding-centric": it names what the embedding should
# capture, and the answer is the target a candidate would match.
ECR_PROMPTS = {
    "classification": "Think about what the input shows and which category it belongs to. " + _FORMAT,
    "retrieval": "Think about the key content a matching item must have: objects, attributes, "
                 "relations, the text's intent. " + _FORMAT,
    "qa": "Think about what the question asks and find the evidence in the input. " + _FORMAT,
    "grounding": "Think about which region or object the query refers to and describe it. " + _FORMAT,
    "digits/classify": "Read the handwritten digit. " + _FORMAT,
    "digits/plus_two": "Read the handwritten digit, then add two. " + _FORMAT,
    "digits/double_last": "Read the handwritten digit, double it, and keep the last digit. " + _FORMAT,
    "digits/next_number": "Work out which number the text asks for and describe the image "
                          "that shows it. " + _FORMAT,
    "digits/same_digit": "Read the handwritten digit that another image must show. " + _FORMAT,
}

_ECR = re.compile(r"\A\s*<think>(?P<think>.*?)</think>(?P<answer>.*)\Z", re.DOTALL)


def ecr_prompt(task_type: str) -> str:
    """The ECR prompt of a task type or task name (unknown ones get the retrieval prompt)."""
    if task_type in ECR_PROMPTS:
        return ECR_PROMPTS[task_type]
    return ECR_PROMPTS.get(task_type_for(task_type), ECR_PROMPTS["retrieval"])


def ecr_input(query: TTEInput, task_type: str) -> TTEInput:
    """The reasoner's input: the query's images and text, followed by the ECR prompt."""
    text = f"{query.text}\n\n{ecr_prompt(task_type)}" if query.text else ecr_prompt(task_type)
    return TTEInput(text=text, images=list(query.images))


def normalize_trace(text: str) -> str:
    """Strip whitespace, and restore an opening `<think>` the generation prompt may have
    supplied (the decoded text then starts inside the think block)."""
    text = text.strip()
    if "</think>" in text and not text.startswith("<think>") and "<think>" not in text:
        text = "<think>" + text
    return text


def check_ecr_shape(trace: str, max_answer_words: int = 16) -> bool:
    """True for `<think>non-empty reasoning</think> non-empty answer` with the answer at most
    `max_answer_words` words and no further think tags."""
    m = _ECR.match(trace)
    if not m:
        return False
    think, ans = m["think"].strip(), m["answer"].strip()
    if not think or not ans or "<think>" in think:
        return False
    if "<think>" in ans or "</think>" in ans:
        return False
    return len(ans.split()) <= max_answer_words


# ----------------------------------------------------------------------------- trace files

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


def _prepare_output(path: Path, stats: TraceStats) -> set[str]:
    """Ids already written to `path`, after repairing a truncated last line."""
    if not path.exists():
        return set()
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        cut = data.rfind(b"\n") + 1              # start of the last, unterminated line
        tail = data[cut:]
        try:
            rec = json.loads(tail.decode("utf-8"))
            complete = isinstance(rec, dict) and "id" in rec and "trace" in rec
        except (UnicodeDecodeError, json.JSONDecodeError):
            complete = False
        if complete:                             # whole row, only the newline missing
            with open(path, "ab") as f:
                f.write(b"\n")
            data += b"\n"
        else:
            warnings.warn(f"{path}: the last line is truncated (an interrupted run?); cutting "
                          f"that one line ({len(tail)} bytes), its row will be generated again.")
            with open(path, "r+b") as f:
                f.truncate(cut)
            data = data[:cut]
            stats.repaired_tail = True
    ids: set[str] = set()
    for line_no, line in enumerate(data.decode("utf-8").split("\n"), start=1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path} line {line_no}: not valid JSON ({e.msg} at column "
                            f"{e.colno}). Fix or delete that line, then run again.") from None
        if not isinstance(rec, dict) or "id" not in rec:
            raise DataError(f"{path} line {line_no}: not a trace row (needs 'id' and 'trace'). "
                            f"Is --out pointing at the right file?")
        rid = str(rec["id"])
        if rid in ids:
            stats.duplicate_ids_in_file += 1
        ids.add(rid)
    return ids


def _query_of(row, task_type: str | None) -> tuple[str, TTEInput, str]:
    if isinstance(row, TrainRow):
        return row.id, row.qry, task_type or task_type_for(row.task)
    if isinstance(row, EvalRow):
        return row.id, row.query, task_type or "retrieval"
    raise TypeError(f"expected TrainRow or EvalRow, got {type(row).__name__}")


def generate_traces(reasoner, rows: Sequence[TrainRow | EvalRow], out_path: str | os.PathLike,
                    batch_size: int = 8, max_new_tokens: int = 128, limit: int | None = None,
                    use_prompt: bool = True, task_type: str | None = None,
                    progress: bool = True) -> TraceStats:
    """Append ECR traces for `rows` to the JSONL file `out_path`, skipping ids already there.

    Args:
        reasoner: has `think(inputs: list[TTEInput], max_new_tokens=, do_sample=False)`
            returning an object with `.traces` (items with `.text`, or strings).
        rows: TrainRows (query: `.qry`, task type from `.task`) or EvalRows (`.query`).
        limit: only the first `limit` distinct rows of `rows` are considered, so rerunning with
            the same limit finishes that same set and then does nothing.
        use_prompt: add the task type's ECR prompt after the query text (for instruct models);
            False sends the query as it is (a `think` adapter trained on bare queries).
        task_type: overrides the task type of every row (picks the prompt).
    Returns: TraceStats. Decoding is greedy (deterministic).
    """
    from tqdm.auto import tqdm

    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    stats = TraceStats()
    done = _prepare_output(out_path, stats)
    todo, seen = [], set()
    for row in rows:
        rid, query, ttype = _query_of(row, task_type)
        if rid in seen:
            continue
        if limit is not None and len(seen) >= limit:
            break
        seen.add(rid)
        if rid in done:
            stats.skipped_existing += 1
        else:
            todo.append((rid, ecr_input(query, ttype) if use_prompt else query))
    stats.total = len(seen)
    with open(out_path, "a", encoding="utf-8") as f, \
            tqdm(total=len(todo), desc="traces", unit="row", disable=not progress) as bar:
        for start in range(0, len(todo), batch_size):
            batch = todo[start:start + batch_size]
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
                lines.append(json.dumps({"id": rid, "trace": text, "valid": valid},
                                        ensure_ascii=False) + "\n")
            # One write per batch, then to disk: a crash loses at most the batch in flight.
            f.write("".join(lines))
            f.flush()
            os.fsync(f.fileno())
            stats.written += len(batch)
            bar.update(len(batch))
    return stats


# ----------------------------------------------------------------------------- CLI

def _load_reasoner(spec: str):
    """--model: an exported checkpoint or run folder (has tte_config.json) loads with its think
    adapter; a built-in name or a local Hugging Face folder is the backbone itself as the
    reasoner (think="none")."""
    if (Path(spec) / CONFIG_FILE).is_file():
        return UnifiedTTE.from_checkpoint(spec)
    return UnifiedTTE(zoo.load(spec), think="none")


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
    p.add_argument("--data", required=True, help="MMEB-train file (.jsonl/.json/.parquet) or a "
                   f"built-in task's train rows ({', '.join(sorted(BUILTIN_TASKS))})")
    p.add_argument("--out", required=True, help="output JSONL; appended to if it exists")
    p.add_argument("--image-root", default=None, help="folder image paths are relative to "
                   "(default: the data file's folder)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--limit", type=int, default=None, help="only the first N rows of --data")
    p.add_argument("--skip-bad", action="store_true", help="skip rows with bad JSON or missing "
                   "images (counted) instead of stopping")
    p.add_argument("--prompt", choices=["ecr", "none"], default="ecr", help="'ecr': add the "
                   "task type's ECR prompt (instruct models); 'none': the bare query (a trained "
                   "think adapter)")
    p.add_argument("--task-option", action="append", default=[], metavar="KEY=VALUE",
                   help="an option of the built-in task's builder, e.g. seed=1 (repeatable)")
    p.add_argument("--digits-seed", type=int, default=0, help="seed of the digits split")
    p.add_argument("--image-size", type=int, default=56, help="digits image size in pixels")
    p.add_argument("--no-progress", action="store_true")
    return p


@command("traces")
def traces_main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `tte traces`."""
    args = build_parser().parse_args(argv)
    rows = _load_rows(args)
    reasoner = _load_reasoner(args.model)
    stats = generate_traces(reasoner, rows, args.out, batch_size=args.batch_size,
                            max_new_tokens=args.max_new_tokens, limit=args.limit,
                            use_prompt=args.prompt == "ecr", progress=not args.no_progress)
    print(f"{args.out}: wrote {stats.written} trace(s); {stats.skipped_existing} already there; "
          f"{stats.invalid} of the new ones not in the <think>...</think> answer shape "
          f"(kept, flagged valid=false)"
          + ("; repaired a truncated last line" if stats.repaired_tail else "")
          + (f"; {stats.duplicate_ids_in_file} duplicate id(s) already in the file (left as they "
             f"are; load_traces keeps the first)" if stats.duplicate_ids_in_file else ""))
    return 0


if __name__ == "__main__":
    sys.exit(traces_main())
