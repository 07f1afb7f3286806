"""The row schema every loader produces and every job consumes: train rows, eval rows and tasks.

    from unified_tte.data.schema import TrainRow, EvalRow, EvalTask
    row = TrainRow(id="ImageNet_1K:0", qry=TTEInput("..."), pos=TTEInput("a tench"), task="ImageNet_1K")

This module names no dataset: loaders (mmeb.py, digits.py) build these rows, the registry maps
task names to loaders.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from ..model.inputs import TTEInput

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
