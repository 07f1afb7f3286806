"""The recipe loader and validator: the config engine under train/recipe.py's dataclasses, which
is where a recipe's keys are documented. Use it through recipe.py (`load_recipe`,
`recipe_from_dict`); this module never imports it.

    YAML mapping (or a dict) -> key=value overrides -> the dataclasses, each value checked against
    its annotation (_build, _coerce) -> validate (values in range and consistent with each other)
    -> check_inputs (every file the run reads exists; the DeepSpeed JSON is valid), before any work.

The rules it enforces are recipe.py's docstring; the DeepSpeed keys a recipe owns are
RECIPE_OWNED_DS_KEYS / RECIPE_OWNED_OPTIMIZER_KEYS.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import math
import types
import typing
from pathlib import Path
from typing import Any, Literal

from ..data.records import read_yaml_mapping
from ..data.registry import BUILTIN_TASKS, builder_options
from ..data.sampling import SubsetSpec
from ..errors import RecipeError
from ..model import zoo
from ..model.config import value_errors

BUILTIN_BACKBONES = tuple(zoo.BUILTIN)
STAGES = ("think", "embed", "gate")     # the stages a recipe may list, in the order they run
# DeepSpeed keys the recipe fills in; a JSON config that sets them would be silently overridden.
RECIPE_OWNED_DS_KEYS = ("train_batch_size", "train_micro_batch_size_per_gpu",
                        "gradient_accumulation_steps", "gradient_clipping", "bf16", "fp16",
                        "scheduler")
RECIPE_OWNED_OPTIMIZER_KEYS = ("lr", "betas", "weight_decay")


# ----------------------------------------------------------------------------- loading

def load(root: type, path: str | Path, overrides: list[str] | None = None):
    """`root` (the Recipe dataclass) from a YAML file with `key=value` overrides (dotted keys, YAML
    values) applied, validated: recipe.load_recipe."""
    path = Path(path)
    raw = read_yaml_mapping(path, RecipeError, "recipe")
    if not raw:
        raise RecipeError(f"{path}: the recipe is empty; a recipe sets at least run_dir, backbone, data "
                          "and stages, and the sections of its stages (see recipes/tiny_cpu.yaml).")
    _normalise(raw)
    _build(root, raw, str(path), "")  # file errors name the file, before overrides apply
    for text in overrides or []:
        _apply_override(root, raw, text)
    _normalise(raw)
    recipe = _build(root, raw, f"{path} (with overrides {overrides})" if overrides else str(path), "")
    validate(recipe, str(path))
    return recipe


def from_dict(root: type, raw: dict, source: str = "<dict>"):
    """`root` from a mapping, validated: recipe.recipe_from_dict."""
    raw = json.loads(json.dumps(raw))
    _normalise(raw)
    recipe = _build(root, raw, source, "")
    validate(recipe, source)
    return recipe


def _normalise(raw: dict) -> None:
    if isinstance(raw.get("data"), str):
        raw["data"] = {"train": raw["data"]}


def _apply_override(root: type, raw: dict, text: str) -> None:
    """Set the dotted key of `text` (key=value, a YAML value) in `raw`, a mapping of `root`."""
    import yaml

    if "=" not in text:
        raise RecipeError(f"command-line override {text!r}: expected key=value, e.g. embed.steps=10.")
    key, value = text.split("=", 1)
    parts = key.strip().split(".")
    cls, node = root, raw
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


# ----------------------------------------------------------------------------- validation

def validate(recipe, source: str) -> None:
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


def check_inputs(recipe, source: str = "recipe") -> dict:
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


def deepspeed_config(ds: dict, stage, micro_batch: int, accumulation: int,
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


def dump_yaml(recipe) -> str:
    import yaml

    return yaml.safe_dump(recipe.to_dict(), sort_keys=False)


def absolute_paths(recipe):
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
