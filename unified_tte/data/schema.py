"""The row schema every loader produces and every job consumes: train rows, eval rows and tasks.

    from unified_tte.data.schema import TrainRow, EvalRow, EvalTask
    row = TrainRow(id="ImageNet_1K:0", qry=TTEInput("..."), pos=TTEInput("a tench"), task="ImageNet_1K")

This module names no dataset: loaders (mmeb.py, digits.py) build these rows, the registry maps
task names to loaders.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace

from ..model.inputs import TTEInput


def _sourced(item, source: str):
    """`item` named by its row (a copy: loaders may share one TTEInput between rows)."""
    return item if not isinstance(item, TTEInput) or item.source else replace(item, source=source)


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

    def __post_init__(self):   # warnings about an input name its row, not only its batch index
        self.qry = _sourced(self.qry, f"row {self.id} query")
        self.pos = _sourced(self.pos, f"row {self.id} positive")
        self.neg = _sourced(self.neg, f"row {self.id} negative")


@dataclass
class EvalRow:
    """One eval query, ranked either against its own candidate list (`positive` indexes the
    correct candidate) or, in a corpus task, against the task's whole corpus (`relevance`:
    corpus id -> graded gain, several positives allowed; `candidates` is then empty)."""
    id: str
    query: TTEInput
    candidates: list[TTEInput]
    positive: int = 0
    meta: dict = field(default_factory=dict)
    relevance: dict[str, float] | None = None

    def __post_init__(self):
        self.query = _sourced(self.query, f"row {self.id} query")


@dataclass
class EvalTask:
    """A named eval task. `modality_group` is what results are averaged over: a modality pair
    ("I2T", "T2I", "I2I", "T2T") or an MMEB meta-task ("classification", "vqa", "retrieval",
    "grounding"). MMEB tasks also name their `modality` ("image", "video", "visdoc") and the
    `primary` metric MMEB averages (Hit@1 for image and video, NDCG@5 for visdoc); MMEB-V1 tasks
    their `distribution` ("IND": a dataset MMEB-train holds, "OOD": one it does not)."""
    name: str
    modality_group: str
    rows: list[EvalRow]
    needs_reasoning: bool = False
    task_type: str = "retrieval"      # picks the ECR prompt, see traces.ECR_PROMPTS
    corpus: dict[str, TTEInput] | None = None   # corpus id -> item, for rows ranked by relevance
    modality: str | None = None
    primary: str = "hit@1"
    distribution: str | None = None


def row_fingerprint(*parts) -> str:
    """A short content hash of a row's query as its file states it (task, text, media paths as
    written): trace files record it, so a trace joins only to the row it was written for."""
    import hashlib
    import json

    return hashlib.sha1(json.dumps([str(p) for p in parts]).encode()).hexdigest()[:16]


class LoadedRows(list):
    """A list of rows that also carries what was skipped: `skipped` is a list of reasons."""

    def __init__(self, rows=(), skipped=None):
        super().__init__(rows)
        self.skipped: list[str] = list(skipped or [])
