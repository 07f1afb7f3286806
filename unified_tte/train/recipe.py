"""Training recipes: typed dataclasses loaded from YAML, with `key=value` overrides.

    from unified_tte.train.recipe import load_recipe
    recipe = load_recipe("recipes/tiny_cpu.yaml", ["embed.steps=5", "deepspeed=recipes/deepspeed/zero3.json"])

A recipe says what to train (backbone, data, the `think` and `embed` stages) and how (the
DeepSpeed JSON for the engine shape: ZeRO stage, offload, communication). The recipe owns the
numbers that depend on the run — batch sizes, learning rate, clipping, precision — and writes
them into the DeepSpeed config (`deepspeed_config`), so a JSON config may not set them itself.

Rules:
* Unknown keys are errors that name the key and the file (or the command-line override).
* Relative paths (run_dir, deepspeed, data files, a backbone folder) are taken from the current
  folder: launch from the repository root, as the recipes' first lines show.
* `data: digits` is short for `data: {train: digits}`; any built-in task name works the same way
  (`data: knowledge`), its builder's options under `data.options` (digits: `data.digits`);
  `data.train` lists MMEB-train files, subset folders or the folder holding the subset folders
  (the released layout).
* `check_inputs(recipe)` verifies every file the run will read, before any work.

This module is the recipe's schema, a dataclass per section with a docstring under each key, and
its two entry points; loading, overrides and the checks are recipe_loader.py's.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from ..errors import RecipeError
from ..model import TTEConfig
from . import recipe_loader
from .recipe_loader import (BUILTIN_BACKBONES, RECIPE_OWNED_DS_KEYS, RECIPE_OWNED_OPTIMIZER_KEYS, STAGES,
                            absolute_paths, check_inputs, deepspeed_config, dump_yaml, load_deepspeed_json,
                            validate, zero_stage)

TRAINING_STAGES = ("think", "embed")    # the DeepSpeed stages; `gate` fits a small head after them

__all__ = ["Recipe", "DataConfig", "DigitsData", "StageConfig", "ThinkConfig", "EmbedConfig", "GateConfig",
           "WandbConfig", "RecipeError", "load_recipe", "recipe_from_dict", "validate", "check_inputs",
           "load_deepspeed_json", "zero_stage", "deepspeed_config", "dump_yaml", "absolute_paths",
           "STAGES", "TRAINING_STAGES", "BUILTIN_BACKBONES", "RECIPE_OWNED_DS_KEYS", "RECIPE_OWNED_OPTIMIZER_KEYS"]


@dataclass
class DigitsData:
    """Options of the built-in digits task (unified_tte.digits.build_digits)."""
    seed: int = 0
    test_fraction: float = 0.3
    """Evaluation must use the same seed and test_fraction, or test images leak into train."""
    image_size: int = 56
    max_train_per_task: int | None = 256


@dataclass
class DataConfig:
    train: str | list[str] = "digits"
    """A built-in task ("digits", "knowledge": data/registry.py BUILTIN_TASKS) or MMEB-train files
    (.jsonl/.json/.parquet: qry, qry_image_path, pos_text, pos_image_path, optional neg_text,
    neg_image_path)."""
    image_root: str | None = None
    """Folder the image paths of the train files are relative to (default: each file's folder)."""
    traces: list[str] = field(default_factory=list)
    """ECR trace files (JSONL {"id", "trace"}) joined to the rows by id; digits carries its own."""
    skip_bad: bool = False
    """Skip rows with bad fields or missing images instead of stopping at the first."""
    max_rows: int | None = None
    """Use at most this many train rows (after loading; for smoke runs)."""
    subsets: dict = field(default_factory=dict)
    """Per subset (a row's task: the MMEB-train subset): {max_rows, weight, max_pixels}, e.g.
    `ImageNet_1K: {max_rows: 100000, weight: 1}` (see unified_tte/data/sampling.py). The size
    cap of every image is the model's (`model.max_pixels`, saved with the checkpoint)."""
    digits: DigitsData = field(default_factory=DigitsData)
    options: dict = field(default_factory=dict)
    """Options of a built-in task's builder, e.g. {seed: 0, max_train_per_task: 64} for knowledge
    (data/knowledge.py build_knowledge); for digits they override the digits block."""
    holdout: float = 0.0
    """Fraction of the train rows (seeded by the recipe's seed) held out of the think and embed
    stages; the `gate` stage fits the think gate on them. Every run that shares a think gate's
    adapters must hold out the same rows (same data, seed, holdout and holdout_by)."""
    holdout_by: str | None = None
    """Hold rows out by a group instead of one by one: the name of a row `meta` key whose value
    (or list of values) names the row's entities; a row is held out when any of its entities is
    (knowledge rows: `entities`, so held-out countries never occur in think or embed training)."""

    @property
    def builtin(self) -> bool:
        """True when `train` names a built-in task rather than files."""
        return isinstance(self.train, str)

    def builtin_options(self) -> dict:
        """The keyword options the built-in task's builder gets."""
        base = dataclasses.asdict(self.digits) if self.train == "digits" else {}
        return {**base, **self.options}


@dataclass
class StageConfig:
    """What both stages share: steps, global batch, the optimiser and its schedule."""
    steps: int = 100
    """Optimizer steps in this stage."""
    batch_size: int = 32
    """Global batch: rows per optimizer step over all ranks."""
    lr: float = 1e-4
    warmup_steps: int = 0
    """Linear warmup from 0, then cosine decay to min_lr_ratio * lr at the last step."""
    min_lr_ratio: float = 0.0
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    grad_clip: float = 1.0
    """Clip the global gradient norm to this (0: no clipping)."""


@dataclass
class ThinkConfig(StageConfig):
    """Stage `think`: SFT on (query, trace), loss on the trace tokens and the closing EOS only."""
    micro_batch_size: int = 4
    """Rows per rank per forward/backward; batch_size / (micro_batch_size * ranks) micro-steps
    are accumulated into each optimizer step."""
    method: Literal["lora", "full"] = "lora"
    """lora: train the `think` adapter. full: fine-tune the language model itself (needs
    model.think: none, so the backbone is the reasoner)."""
    freeze_vision: bool = True
    """Keep the vision tower frozen in full fine-tuning (LoRA never touches it)."""


@dataclass
class EmbedConfig(StageConfig):
    """Stage `embed`: InfoNCE through the serving fast path with `think` frozen."""
    temperature: float = 0.02
    hard_negatives: bool = True
    """Add each row's hard negative (neg_text / neg_image_path) to the targets."""
    use_traces: bool = True
    """Embed each query with its ECR trace (Think-Then-Embed); false embeds the query alone."""
    missing_traces: Literal["error", "drop"] = "error"
    """With use_traces, rows without a (valid) trace stop the run (error) or are left out (drop,
    counted in a warning)."""
    trace_noise: float = 0.0
    """With use_traces, the fraction of rows (seeded, fixed for the run) whose trace ends in
    another row's answer (data/traces.py swap_answers) while the positive stays right: a
    reasoner is sometimes wrong, and an embedder trained only on right traces copies the
    trace's answer even when no candidate matches it; with noise it learns to weigh the query."""
    no_trace_fraction: float = 0.0
    """With use_traces, the fraction of queries embedded without their trace in each step
    (seeded per step and row): one embed adapter then serves the direct embedding (no trace,
    what the think gate falls back on) and the TTE embedding."""
    gradcache_chunk: int | None = 8
    """GradCache: rows per rank per forward. Embeddings are computed without grad chunk by chunk,
    the loss on the whole batch, then each chunk is re-run with grad. null: one forward with grad
    over the rank's whole batch (the plain twin; memory grows with the batch)."""
    gradcache_keep_prefix: bool = True
    """GradCache keeps each chunk's prefix state (KV cache of query + trace; top_k: also the
    residuals entering the top K layers) from the pass without grad, so the pass with grad runs
    only the embed step: activated re-runs just the invocation tokens. Costs the KV cache of the
    rank's whole batch in memory; false recomputes the prefix chunk by chunk instead."""
    gather_negatives: bool = True
    """Use every rank's targets as negatives (all-gather with gradient)."""
    batching: Literal["mixed", "same_task"] = "mixed"
    """mixed: rows of all subsets in one batch; same_task: every global batch from one subset
    (drawn by data.subsets weights), so all in-batch and gathered negatives share its task."""


@dataclass
class GateConfig:
    """Stage `gate`, after embed: the think gate (model/gate.py) on the rows `data.holdout` kept
    out of training, each embedded directly and after the think adapter's greedy trace, labelled
    by whether the trace raised the query's rank (margin on a tie) among its task's held-out
    candidates."""
    operating_point: Literal["quality", "compute"] = "quality"
    """The gate's default decision rule: quality (the best held-out Hit@1) or compute (the best
    Hit@1 within token_budget); both are stored, `tte eval --gate-point` picks either."""
    token_budget: float = 0.6
    """The compute point's decoded tokens, as a fraction of thinking on every query."""
    target_think_rate: float | None = None
    """Instead of the operating points' own rule: think on this fraction of held-out queries."""
    threshold: float | None = None
    """Instead of the operating points' own rule: this score threshold."""
    max_new_tokens: int = 64
    """Trace budget of the held-out decodes (use the serving budget)."""
    batch_size: int = 16
    folds: int = 5
    """Cross-fitting: thresholds are picked on out-of-fold scores."""
    max_rows: int | None = None
    """Fit on at most this many held-out rows (null: all)."""
    answer_key: str | None = None
    """A row meta key whose equal values are the same answer (digits: `answer`, the digit an image
    shows), so another held-out row's positive with this row's answer is no negative for it;
    null: equal content is the same answer (enough for text targets)."""


@dataclass
class WandbConfig:
    project: str = "unified-tte"
    entity: str | None = None
    name: str | None = None
    """Run name; default: the run folder's name."""
    mode: Literal["offline", "online", "disabled"] | None = None
    """null: $WANDB_MODE, else offline. online without credentials falls back to offline."""
    tags: list[str] = field(default_factory=list)


@dataclass
class Recipe:
    run_dir: str = "runs/tte"
    """Where checkpoints, adapters, the resolved recipe and logs go."""
    backbone: str = "tiny"
    """tiny | tiny-llama | smollm2 | qwen2vl-2b-shape (random weights, published shape; see
    model/zoo.py) | a local Hugging Face checkpoint folder."""
    data: DataConfig = field(default_factory=DataConfig)
    deepspeed: str = "recipes/deepspeed/zero2.json"
    """DeepSpeed JSON: ZeRO stage, offload, communication (see recipes/deepspeed/)."""
    stages: list[Literal["think", "embed", "gate"]] = field(default_factory=lambda: ["think", "embed"])
    seed: int = 0
    precision: Literal["auto", "bf16", "fp32"] = "auto"
    """auto: bf16 on GPU, fp32 on CPU."""
    model: TTEConfig = field(default_factory=TTEConfig)
    think: ThinkConfig = field(default_factory=ThinkConfig)
    embed: EmbedConfig = field(default_factory=EmbedConfig)
    gate: GateConfig = field(default_factory=GateConfig)
    checkpoint_every: int = 100
    """Save engine state, data position and RNG every N global steps (and at each stage's end);
    0: only at stage ends."""
    keep_checkpoints: int | None = 3
    """Keep the newest N checkpoints (null: all)."""
    log_every: int = 1
    progress_bar: bool = True
    wandb: WandbConfig = field(default_factory=WandbConfig)
    think_adapter: str | None = None
    """A think adapter folder (PEFT layout, e.g. an earlier run's RUN_DIR/think) to start from
    when stages leaves out think; without it an embed-only run uses a zero think delta."""
    stop_after: int | None = None
    """Stop after this global step, checkpointed (a preemption drill; resume with --resume)."""

    def to_dict(self) -> dict:
        return _plain(dataclasses.asdict(self))

    def stage(self, name: str) -> ThinkConfig | EmbedConfig:
        return getattr(self, name)

    @property
    def training_stages(self) -> list[str]:
        """The stages that take optimizer steps (think, embed), in order; `gate` runs after them."""
        return [s for s in self.stages if s in TRAINING_STAGES]

    @property
    def total_steps(self) -> int:
        return sum(self.stage(s).steps for s in self.training_stages)


# ----------------------------------------------------------------------------- loading

def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    """Read a YAML recipe, apply `key=value` overrides (dotted keys, YAML values), validate."""
    return recipe_loader.load(Recipe, path, overrides)


def recipe_from_dict(raw: dict, source: str = "<dict>") -> Recipe:
    return recipe_loader.from_dict(Recipe, raw, source)


def _plain(obj):
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    return obj
