"""ECR traces: the format (`<think>reasoning</think> short answer`, and the prompts that ask a
reasoner for it), trace files read and joined to training rows by id, and trace noise for embed
training. Writing trace files is `tte traces` (unified_tte/tracegen.py); this module runs no model.

    from unified_tte.data.traces import load_traces, join_traces
    traces = load_traces("traces.jsonl", valid_only=True)     # {id: trace}, valid ECR shape only
    rows = join_traces(rows, ["traces.jsonl"])                # TrainRows with .trace set by id

A trace file is JSONL, one row per id: `{"id", "trace", "valid"}`, plus "fp" (the query's
fingerprint) and "gen" (the generation settings) as `tte traces` writes them. A file read for
training holds each id once; a repeated id is an error naming both lines. Traces not in the ECR
shape are kept in the file flagged `"valid": false`; `load_traces(path, valid_only=True)` leaves
them out, e.g. for SFT.

Provenance: rows loaded from MMEB files carry a content fingerprint of their query (task, text,
image path as the file states them); each trace row records it as "fp", and `join_traces`
refuses a trace whose id names a row with another fingerprint, or a trace file none of whose ids
are rows of the data: a file written for another layout or dataset is an error, not a silent
mismatch.
"""
from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from ..errors import DataError
from ..model.inputs import TTEInput
from .mmeb import task_type_for
from .records import iter_records
from .schema import TrainRow

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
    """`{id: trace}` from a traces JSONL file (an id given twice is refused, see
    load_trace_records). With `valid_only`, rows flagged `"valid": false` (not in the
    `<think>...</think> answer` shape) are left out."""
    return {rid: rec.trace for rid, rec in load_trace_records(path).items() if rec.valid or not valid_only}


@dataclass
class TraceRecord:
    """One row of a trace file, with where it was read (for error messages)."""
    trace: str
    valid: bool
    fingerprint: str | None
    where: str


def load_trace_records(path: str | os.PathLike) -> dict[str, TraceRecord]:
    """`{id: TraceRecord}` from a traces JSONL file. An id given twice is a DataError naming both
    rows: which of the two traces would train is then anyone's guess (`tte traces` never writes
    an id twice; a file joined by hand can)."""
    out: dict[str, TraceRecord] = {}
    for where, _, rec in iter_records(Path(path)):
        if "id" not in rec or "trace" not in rec:
            raise DataError(f"{where}: a trace row needs 'id' and 'trace' fields, got {sorted(rec)}.")
        if not isinstance(rec["trace"], str):
            raise DataError(f"{where}: field 'trace' must be a string.")
        rid = str(rec["id"])
        if rid in out:
            raise DataError(f"{where}: id {rid!r} is given twice (first at {out[rid].where}); a trace file holds "
                            "one trace per id. Remove one of the two rows.")
        out[rid] = TraceRecord(rec["trace"], rec.get("valid") is not False, rec.get("fp"), where)
    return out


def join_traces(rows: Sequence[TrainRow], paths: Sequence[str | os.PathLike],
                valid_only: bool = True, missing: str = "keep") -> list[TrainRow]:
    """Attach the traces of `paths` (the first file naming an id wins) to `rows` by id, checking
    that each trace file was written for these rows: DataError when none of a file's ids is a
    row id, or when a trace's recorded fingerprint differs from its row's. `missing` as in
    attach_traces; `valid_only` leaves out traces flagged valid=false."""
    by_id = {r.id: r for r in rows}
    if not by_id and paths:
        raise DataError(f"the train data has no rows (an empty file?), so there is nothing to join the traces "
                        f"of {paths[0]} to; give the data its rows, or check data.train.")
    traces: dict[str, str] = {}
    for path in paths:
        records = load_trace_records(path)
        if records and not any(i in by_id for i in records):
            sample_trace, sample_row = next(iter(records)), next(iter(by_id), None)
            raise DataError(f"{path}: none of its {len(records)} trace ids is a row of the data (trace ids "
                            f"look like {sample_trace!r}, row ids like {sample_row!r}): it was written for "
                            f"other rows or another id layout. Regenerate it with `tte traces` for this data.")
        for rid, rec in records.items():
            row = by_id.get(rid)
            if row is None or rid in traces:
                continue
            mine = row.meta.get("fingerprint") if isinstance(row.meta, dict) else None
            if rec.fingerprint and mine and rec.fingerprint != mine:
                raise DataError(f"{rec.where}: field 'fp': the trace for id {rid!r} was written for another "
                                f"query than row {rid!r} ({row.meta.get('where', 'this data')}) has; the file "
                                f"belongs to another dataset or layout. Regenerate it with `tte traces`.")
            if valid_only and not rec.valid:
                continue
            traces[rid] = rec.trace
    return attach_traces(rows, traces, missing=missing)


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


def swap_answers(rows: Sequence[TrainRow], fraction: float, seed: int) -> list[TrainRow]:
    """Trace noise for embed training: a seeded `fraction` of the rows (the same rows for a given
    seed) get a trace whose final answer, and every standalone mention of it in the reasoning, is
    another row's answer of the same task, one that is neither the row's positive nor its hard
    negative; the positive is unchanged. The rows given are not modified (the think stage shares
    them); the others are returned as they are, and so are rows whose trace is not in the
    `<think>...</think> answer` shape or whose task offers no other answer."""
    rows = list(rows)
    answers: dict[str, dict[str, None]] = {}   # per task, its distinct answers in row order
    parsed = []
    for row in rows:
        m = _ECR.match(row.trace or "")
        answer = m.group("answer").strip() if m else ""
        parsed.append(answer)
        if answer:
            answers.setdefault(row.task, {})[answer] = None
    rng = np.random.default_rng([seed, 0x5A9])   # its own stream: the batch order is unchanged
    chosen = rng.permutation(len(rows))[:round(fraction * len(rows))]
    out = list(rows)
    for i in sorted(chosen.tolist()):
        row, answer = rows[i], parsed[i]
        taken = {t.casefold() for t in (answer, row.pos.text, row.neg.text if row.neg else None) if t}
        others = [a for a in answers.get(row.task, []) if a.casefold() not in taken]
        if not answer or not others:
            continue
        wrong = others[int(rng.integers(len(others)))]
        mention = re.compile(rf"(?<!\w){re.escape(answer)}(?!\w)")
        trace = mention.sub(lambda _: wrong, row.trace)
        out[i] = dataclasses.replace(row, trace=trace)
    return out
