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
"""
from __future__ import annotations

import copy
import dataclasses
import json
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from ..data.records import read_yaml_mapping
from ..data.registry import BUILTIN_TASKS, builder_options
from ..data.sampling import SubsetSpec
from ..errors import RecipeError
from ..model import TTEConfig, zoo
from ..model.config import value_errors

BUILTIN_BACKBONES = tuple(zoo.BUILTIN)
STAGES = ("think", "embed", "gate")
TRAINING_STAGES = ("think", "embed")    # the DeepSpeed stages; `gate` fits a small head after them
# DeepSpeed keys the recipe fills in; a JSON config that sets them would be silently overridden.
RECIPE_OWNED_DS_KEYS = ("train_batch_size", "train_micro_batch_size_per_gpu",
                        "gradient_accumulation_steps", "gradient_clipping", "bf16", "fp16",
                        "scheduler")
RECIPE_OWNED_OPTIMIZER_KEYS = ("lr", "betas", "weight_decay")


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
    path = Path(path)
    raw = read_yaml_mapping(path, RecipeError, "recipe")
    if not raw:
        raise RecipeError(f"{path}: the recipe is empty; a recipe sets at least run_dir, backbone, data "
                          "and stages, and the sections of its stages (see recipes/tiny_cpu.yaml).")
    _normalise(raw)
    _build(Recipe, raw, str(path), "")  # file errors name the file, before overrides apply
    for text in overrides or []:
        _apply_override(raw, text)
    _normalise(raw)
    recipe = _build(Recipe, raw, f"{path} (with overrides {overrides})" if overrides else str(path), "")
    validate(recipe, str(path))
    return recipe


def recipe_from_dict(raw: dict, source: str = "<dict>") -> Recipe:
    raw = json.loads(json.dumps(raw))
    _normalise(raw)
    recipe = _build(Recipe, raw, source, "")
    validate(recipe, source)
    return recipe


def _normalise(raw: dict) -> None:
    if isinstance(raw.get("data"), str):
        raw["data"] = {"train": raw["data"]}


def _apply_override(raw: dict, text: str) -> None:
    import yaml

    if "=" not in text:
        raise RecipeError(f"command-line override {text!r}: expected key=value, e.g. embed.steps=10.")
    key, value = text.split("=", 1)
    parts = key.strip().split(".")
    cls, node = Recipe, raw
    for depth, part in enumerate(parts):
        names = {f.name: f for f in dataclasses.fields(cls)}
        if part not in names:
            where = ".".join(parts[:depth]) or "the recipe"
            raise RecipeError(f"command-line override {text!r}: unknown key {key!r} "
                              f"({part!r} is not a key of {where}; known: {sorted(names)}).")
        if depth == len(parts) - 1:
            node[part] = yaml.safe_load(value) if value.strip() else None
            return
        sub = _dataclass_of(typing.get_type_hints(cls)[part])
        if sub is None:
            raise RecipeError(f"command-line override {text!r}: {'.'.join(parts[:depth + 1])!r} "
                              f"is a value, not a section.")
        if part == "data" and isinstance(node.get(part), str):
            node[part] = {"train": node[part]}
        if not isinstance(node.get(part), dict):
            node[part] = {}
        cls, node = sub, node[part]


def _dataclass_of(tp) -> type | None:
    if dataclasses.is_dataclass(tp):
        return tp
    for arg in typing.get_args(tp):
        if dataclasses.is_dataclass(arg):
            return arg
    return None


def _build(cls, data: Any, source: str, prefix: str):
    if not isinstance(data, dict):
        raise RecipeError(f"{source}: {prefix.rstrip('.') or 'the recipe'} must be a mapping, "
                          f"got {type(data).__name__} ({data!r}).")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls) if f.init}
    for key in data:
        if key not in known:
            raise RecipeError(f"{source}: unknown key {prefix + str(key)!r}. Known keys"
                              f"{' in ' + prefix.rstrip('.') if prefix else ''}: {sorted(known)}.")
    values = {k: _coerce(v, hints[k], source, prefix + k) for k, v in data.items()}
    try:
        return cls(**values)
    except (TypeError, ValueError) as e:
        raise RecipeError(f"{source}: {prefix.rstrip('.') or 'recipe'}: {e}") from None


def _coerce(value, tp, source: str, key: str):
    """Check `value` against the annotation `tp`, converting where YAML is loose (1e-3 is a str
    in YAML 1.1, ints where floats go, lists where tuples go)."""
    def bad(expected: str):
        return RecipeError(f"{source}: key {key!r} must be {expected}, got {value!r}.")

    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, arg, source, key)
            except RecipeError as e:
                errors.append(e)
        raise bad(" or ".join(_describe(a) for a in args))
    if origin is Literal:
        if value not in args:
            raise bad(f"one of {list(args)}")
        return value
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, source, key + ".")
    if origin in (list, tuple):
        if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
            raise bad(_describe(tp))
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise bad(_describe(tp))
            return tuple(_coerce(v, a, source, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
        item = args[0] if args else Any
        out = [_coerce(v, item, source, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(out) if origin is tuple else out
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise bad("a mapping")
        return value
    if tp in (bool, str):   # taken as written: no "yes" -> True, no 1 -> "1"
        if not isinstance(value, tp):
            raise bad("true or false" if tp is bool else "a string")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad("an integer")
        return value
    if tp is float:
        if isinstance(value, bool):
            raise bad("a number")
        number = None
        if isinstance(value, (int, float)):
            number = float(value)
        elif isinstance(value, str):
            try:
                number = float(value)
            except ValueError:
                raise bad("a number") from None
        if number is None or not math.isfinite(number):
            raise bad("a finite number")
        return number
    raise RecipeError(f"{source}: key {key!r}: unsupported annotation {tp!r}")  # a bug in this file


def _describe(tp) -> str:
    if tp is type(None):
        return "null"
    origin = typing.get_origin(tp)
    if origin is Literal:
        return f"one of {list(typing.get_args(tp))}"
    if origin in (list, tuple):
        return "a list"
    return getattr(tp, "__name__", str(tp))


def _plain(obj):
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    return obj


# ----------------------------------------------------------------------------- validation

def validate(recipe: Recipe, source: str) -> None:
    """Checks that need no files: values in range and consistent with each other."""
    def fail(key: str, msg: str):
        raise RecipeError(f"{source}: {key}: {msg}")

    if not recipe.stages:
        fail("stages", "name at least one stage: [think], [embed] or [think, embed].")
    if len(set(recipe.stages)) != len(recipe.stages) or list(recipe.stages) != [s for s in STAGES if s in recipe.stages]:
        fail("stages", f"each stage once, in the order think, embed, gate; got {recipe.stages}.")
    for name in recipe.training_stages:
        st = recipe.stage(name)
        for key in ("steps", "batch_size"):
            if getattr(st, key) < 1:
                fail(f"{name}.{key}", f"must be >= 1, got {getattr(st, key)}.")
        if st.lr <= 0:
            fail(f"{name}.lr", f"must be > 0, got {st.lr}.")
        if st.warmup_steps < 0:
            fail(f"{name}.warmup_steps", f"must be >= 0, got {st.warmup_steps}.")
        if not 0 <= st.min_lr_ratio <= 1:
            fail(f"{name}.min_lr_ratio", f"must be in [0, 1], got {st.min_lr_ratio}.")
        if st.grad_clip < 0:
            fail(f"{name}.grad_clip", f"must be >= 0, got {st.grad_clip}.")
        if st.weight_decay < 0:
            fail(f"{name}.weight_decay", f"must be >= 0, got {st.weight_decay}.")
        if not all(0 <= b < 1 for b in st.betas):
            fail(f"{name}.betas", f"each must be in [0, 1), got {list(st.betas)}.")
    if "think" in recipe.stages:
        t = recipe.think
        if t.micro_batch_size < 1:
            fail("think.micro_batch_size", f"must be >= 1, got {t.micro_batch_size}.")
        if t.method == "full" and recipe.model.think != "none":
            fail("think.method", "full fine-tuning trains the backbone itself as the reasoner; "
                 "set model.think: none (no think adapter), or use think.method: lora.")
        if t.method == "lora" and recipe.model.think == "none":
            fail("think.method", "model.think is none, so there is no think adapter to train; "
                 "use think.method: full, or drop think from stages.")
    if "embed" in recipe.stages:
        e = recipe.embed
        if e.temperature <= 0:
            fail("embed.temperature", f"must be > 0, got {e.temperature}.")
        if not 0.0 <= e.trace_noise < 1.0:
            fail("embed.trace_noise", f"must be in [0, 1), got {e.trace_noise}.")
        if e.gradcache_chunk is not None and e.gradcache_chunk < 1:
            fail("embed.gradcache_chunk", f"must be >= 1 or null, got {e.gradcache_chunk}.")
        if not 0.0 <= e.no_trace_fraction < 1.0:
            fail("embed.no_trace_fraction", f"must be in [0, 1), got {e.no_trace_fraction}.")
        if e.no_trace_fraction and not e.use_traces:
            fail("embed.no_trace_fraction", "mixes queries without their trace into a TTE embedder; with "
                 "embed.use_traces false every query already has none: leave it 0.")
    if not 0.0 <= recipe.data.holdout < 1.0:
        fail("data.holdout", f"must be in [0, 1), got {recipe.data.holdout}.")
    if recipe.data.holdout_by is not None and not recipe.data.holdout:
        fail("data.holdout_by", "groups the held-out rows; set data.holdout (a fraction) too.")
    if "gate" in recipe.stages:
        g = recipe.gate
        if "embed" not in recipe.stages:
            fail("stages", "the gate stage fits on the embed adapter of the same run: list embed before gate.")
        if not recipe.data.holdout:
            fail("data.holdout", "the gate stage fits on held-out train rows (never eval rows): set "
                 "data.holdout, e.g. 0.2, so think and embed training leave those rows out.")
        if recipe.model.think == "lora" and "think" not in recipe.stages and recipe.think_adapter is None:
            fail("gate", "the gate compares the direct embedding with the one after the think adapter's "
                 "trace: train think in this run or set think_adapter.")
        if not 0.0 <= g.token_budget <= 1.0:
            fail("gate.token_budget", f"must be in [0, 1], got {g.token_budget}.")
        if g.target_think_rate is not None and not 0.0 <= g.target_think_rate <= 1.0:
            fail("gate.target_think_rate", f"must be in [0, 1] (a fraction of queries), got {g.target_think_rate}.")
        if g.threshold is not None and g.target_think_rate is not None:
            fail("gate.threshold", "set either gate.threshold or gate.target_think_rate, not both.")
        if g.threshold is not None and not 0.0 <= g.threshold <= 1.0:
            fail("gate.threshold", f"is a score in [0, 1], got {g.threshold}.")
        for key in ("max_new_tokens", "batch_size"):
            if getattr(g, key) < 1:
                fail(f"gate.{key}", f"must be >= 1, got {getattr(g, key)}.")
        if g.folds < 2:
            fail("gate.folds", f"must be >= 2 (thresholds are picked on out-of-fold scores), got {g.folds}.")
        if g.max_rows is not None and g.max_rows < 2 * g.folds:
            fail("gate.max_rows", f"must be at least 2 x gate.folds ({2 * g.folds}) or null, got {g.max_rows}.")
    for key, problem in value_errors(recipe.model):
        fail(f"model.{key}", problem)
    if recipe.data.max_rows is not None and recipe.data.max_rows < 1:
        fail("data.max_rows", f"must be >= 1 or null, got {recipe.data.max_rows}.")
    if not 0 < recipe.data.digits.test_fraction < 1:
        fail("data.digits.test_fraction", f"must be in (0, 1), got {recipe.data.digits.test_fraction}.")
    if recipe.checkpoint_every < 0:
        fail("checkpoint_every", "must be >= 0.")
    if recipe.keep_checkpoints is not None and recipe.keep_checkpoints < 1:
        fail("keep_checkpoints", "must be >= 1 or null (keep all).")
    if recipe.log_every < 1:
        fail("log_every", "must be >= 1.")
    if recipe.stop_after is not None and recipe.stop_after < 1:
        fail("stop_after", "must be >= 1 or null.")
    known = {f.name for f in dataclasses.fields(SubsetSpec)}
    for name, spec in recipe.data.subsets.items():
        if not isinstance(spec, dict) or set(spec) - known:
            fail(f"data.subsets.{name}", f"must be a mapping with keys among {sorted(known)}, got {spec!r}.")
        for key, value in spec.items():
            ok = value is None or (isinstance(value, (int, float)) and not isinstance(value, bool) and value >= 0)
            if not ok or (key != "weight" and value is not None and not isinstance(value, int)):
                fail(f"data.subsets.{name}.{key}", f"must be a non-negative {'number' if key == 'weight' else 'integer'} "
                     f"or null, got {value!r}.")
    if isinstance(recipe.data.train, list) and not recipe.data.train:
        fail("data.train", f"name at least one train file, or a built-in task ({sorted(BUILTIN_TASKS)}).")
    if isinstance(recipe.data.train, str) and recipe.data.train not in BUILTIN_TASKS:
        recipe.data.train = [recipe.data.train]
    if recipe.data.options and not recipe.data.builtin:
        fail("data.options", "options are for a built-in task's builder; data.train names files.")
    if recipe.data.builtin:
        known = builder_options(recipe.data.train)
        unknown = sorted(set(recipe.data.options) - set(known))
        if unknown:
            fail("data.options", f"unknown option(s) {unknown} of the built-in task "
                 f"{recipe.data.train!r}; known: {sorted(known)}.")


def check_inputs(recipe: Recipe, source: str = "recipe") -> dict:
    """Verify every file the run reads exists and the DeepSpeed JSON is valid, before any work.
    Returns the DeepSpeed config as read."""
    def missing(key: str, path, what: str):
        raise RecipeError(f"{source}: {key}: {what} not found: {path} (relative paths are taken "
                          f"from the current folder, {Path.cwd()}).")

    run_dir = Path(recipe.run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise RecipeError(f"{source}: run_dir: {run_dir} is a file, not a folder; the run writes its "
                          "checkpoints and adapters into a folder: set run_dir to another path.")
    ds_path = Path(recipe.deepspeed)
    if not ds_path.is_file():
        missing("deepspeed", ds_path, "DeepSpeed config")
    ds = load_deepspeed_json(ds_path)
    if recipe.backbone not in BUILTIN_BACKBONES:
        folder = Path(recipe.backbone)
        if not (folder / "config.json").is_file():
            missing("backbone", folder / "config.json",
                    f"a local checkpoint folder (or one of {list(BUILTIN_BACKBONES)})")
    if not recipe.data.builtin:
        for i, f in enumerate(recipe.data.train):
            if not Path(f).exists():
                missing(f"data.train[{i}]", f, "train file or folder")
    for i, f in enumerate(recipe.data.traces):
        if not Path(f).is_file():
            missing(f"data.traces[{i}]", f, "trace file")
    if recipe.think_adapter is not None and not (Path(recipe.think_adapter) / "adapter_model.safetensors").is_file():
        missing("think_adapter", Path(recipe.think_adapter) / "adapter_model.safetensors", "think adapter")
    if recipe.data.image_root is not None and not Path(recipe.data.image_root).is_dir():
        missing("data.image_root", recipe.data.image_root, "image folder")
    return ds


def load_deepspeed_json(path: str | Path) -> dict:
    path = Path(path)
    try:
        ds = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise RecipeError(f"{path}: not valid JSON ({e.msg}, line {e.lineno}).") from None
    if not isinstance(ds, dict):
        raise RecipeError(f"{path}: a DeepSpeed config is a JSON object.")
    # The sections this package reads must be objects before anything looks inside them.
    for key in ("zero_optimization", "zero_optimization.offload_optimizer", "optimizer", "optimizer.params"):
        parent, _, child = key.rpartition(".")
        section = ds.get(parent, {}) if parent else ds
        if isinstance(section, dict) and child in section and not isinstance(section[child], dict):
            raise RecipeError(f"{path}: {key} must be a JSON object ({{...}}), got "
                              f"{json.dumps(section[child])}; fix it or leave the key out.")
    owned = [k for k in RECIPE_OWNED_DS_KEYS if k in ds]
    optimizer_params = ds.get("optimizer", {}).get("params", {})
    owned += [f"optimizer.params.{k}" for k in RECIPE_OWNED_OPTIMIZER_KEYS if k in optimizer_params]
    if owned:
        raise RecipeError(f"{path}: sets {owned}, which the recipe owns (batch_size, "
                          f"micro_batch_size / gradcache_chunk, grad_clip, precision, warmup_steps, "
                          f"lr, betas and weight_decay); remove them from the JSON and set them in the "
                          f"recipe.")
    stage = zero_stage(ds)
    if isinstance(stage, bool) or stage not in (0, 1, 2, 3):
        raise RecipeError(f"{path}: zero_optimization.stage must be 0, 1, 2 or 3, got {stage!r}.")
    return ds


def zero_stage(ds: dict) -> int:
    """The ZeRO stage of a DeepSpeed config as read (0 when it sets none)."""
    return ds.get("zero_optimization", {}).get("stage", 0)


def deepspeed_config(ds: dict, stage: StageConfig, micro_batch: int, accumulation: int,
                     world: int, bf16: bool, cpu_optimizer_ok: bool = True) -> dict:
    """The DeepSpeed config of one stage: the JSON's engine shape plus the recipe's numbers."""
    cfg = json.loads(json.dumps(ds))
    cfg["train_micro_batch_size_per_gpu"] = micro_batch
    cfg["gradient_accumulation_steps"] = accumulation
    cfg["train_batch_size"] = micro_batch * accumulation * world
    cfg["gradient_clipping"] = stage.grad_clip
    cfg["bf16"] = {"enabled": bool(bf16)}
    cfg.setdefault("steps_per_print", 10 ** 9)  # the trainer logs; DeepSpeed's own prints are noise
    cfg.setdefault("wall_clock_breakdown", False)
    opt = cfg.setdefault("optimizer", {"type": "AdamW", "params": {}})
    opt.setdefault("type", "AdamW")
    params = opt.setdefault("params", {})
    # Plain torch AdamW unless the JSON asks for DeepSpeed's own (needed for CPU offload):
    # DeepSpeed's FusedAdam is compiled on first use, which fails on machines without nvcc.
    offload = cfg.get("zero_optimization", {}).get("offload_optimizer", {}).get("device", "none")
    params.setdefault("torch_adam", offload in (None, "none"))
    params.update(lr=stage.lr, betas=list(stage.betas), weight_decay=stage.weight_decay)
    return cfg


def dump_yaml(recipe: Recipe) -> str:
    import yaml

    return yaml.safe_dump(recipe.to_dict(), sort_keys=False)


def absolute_paths(recipe: Recipe) -> Recipe:
    """The recipe with its relative paths made absolute (the resolved recipe.yaml and resume
    then work from any folder)."""
    r = copy.deepcopy(recipe)

    def absolute(path: str, key: str) -> str:
        try:
            return str(Path(path).expanduser().resolve())
        except (RuntimeError, OSError) as exc:   # a symlink loop is a RuntimeError before Python 3.13
            raise RecipeError(f"recipe: {key}: {path} cannot be resolved ({exc}); fix the symbolic "
                              "link loop on that path, or give another path.") from None

    r.run_dir = absolute(r.run_dir, "run_dir")
    r.deepspeed = absolute(r.deepspeed, "deepspeed")
    if r.backbone not in BUILTIN_BACKBONES:
        r.backbone = absolute(r.backbone, "backbone")
    if not r.data.builtin:
        r.data.train = [absolute(f, f"data.train[{i}]") for i, f in enumerate(r.data.train)]
    r.data.traces = [absolute(f, f"data.traces[{i}]") for i, f in enumerate(r.data.traces)]
    if r.data.image_root is not None:
        r.data.image_root = absolute(r.data.image_root, "data.image_root")
    if r.think_adapter is not None:
        r.think_adapter = absolute(r.think_adapter, "think_adapter")
    return r
