"""Compact checkpoints: export a trained UnifiedTTE (or a training run dir) and load it back.

    tte export runs/digits --out checkpoints/digits [--dtype bf16|fp16|fp32] [--merge-think]

    from unified_tte import backbones
    from unified_tte.export import export_model, load_checkpoint
    export_model(tte, "checkpoints/digits", dtype="bf16", backbone_spec="tiny")
    tte = load_checkpoint("checkpoints/digits", backbone=backbones.load_reasoner("tiny"))

A checkpoint holds adapters, never the base model; the base is named and pinned by its hash:

    checkpoints/NAME/
      tte_config.json                  TTEConfig fields, "backbone" spec, base name/type/dtype/weight hash,
                                       invocation token ids, export dtype, think_merged
      think/adapter_config.json        PEFT layout: `PeftModel.from_pretrained(base, NAME/think)` loads it
      think/adapter_model.safetensors
      embed/adapter_config.json        the embed LoRA; its gating (activated / top_k) is in tte_config.json
      embed/adapter_model.safetensors
      merged/model.safetensors         --merge-think only: the linear weights W + T that changed
      manifest.json                    sha256 and byte size of every file above

The base weight hash (`backbones.weight_hash`, LoRA excluded) is taken over the base as UnifiedTTE
sees it: the pretrained weights plus the mean-initialised invocation-token embedding rows that
UnifiedTTE adds. `prepare_base` reproduces that base for plain PEFT / transformers users.

`--merge-think` folds the think LoRA into the base for serving: `merged/model.safetensors` holds
every changed linear weight (plain Hugging Face parameter names, in the export dtype), `think/`
is not written, the saved config says think="none" (the merged base is the reasoner) and
`merged_weight_hash` pins the base after the merged weights are loaded into it (in the base
dtype). Loading still needs the original base (its hash is checked first).

Loading verifies every file against the manifest (missing, truncated, altered files are refused
by name), refuses pickle files anywhere in the folder, reads safetensors only, and checks the
base model's type, tokenizer and weight hash against the recorded ones.
"""
from __future__ import annotations

import argparse
import copy
import hashlib
import json
import os
import shutil
import sys
import warnings
from dataclasses import fields
from pathlib import Path

import torch

from .backbones import Backbone, load_reasoner, weight_hash
from .model import TTEConfig, UnifiedTTE, add_invocation_tokens

FORMAT = "unified_tte.checkpoint/1"
CONFIG_FILE = "tte_config.json"
MANIFEST_FILE = "manifest.json"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
MERGED_WEIGHTS = "merged/model.safetensors"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# Extensions of files that torch/pickle would deserialise (and so could run code on load).
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".npy", ".npz", ".joblib")


class CheckpointError(ValueError):
    """A checkpoint or run dir that cannot be used; the message names the file and what to do."""


# ---------------------------------------------------------------------------------------- helpers
def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _config_from_dict(d: dict, where: Path) -> TTEConfig:
    """TTEConfig from a saved dict; keys that are not TTEConfig fields (backbone, hashes) are skipped."""
    names = {f.name for f in fields(TTEConfig)}
    try:
        return TTEConfig(**{k: v for k, v in d.items() if k in names})
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{where}: not a valid TTEConfig ({exc})") from exc


def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise CheckpointError(f"{path} is missing")
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path} is not valid JSON ({exc}); the file is altered or truncated") from exc


def _load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    if path.suffix != ".safetensors":
        raise CheckpointError(f"{path}: only .safetensors files are read (pickle formats are refused)")
    if not path.is_file():
        raise CheckpointError(f"{path} is missing")
    try:
        return load_file(str(path))
    except Exception as exc:  # noqa: BLE001 - safetensors raises several types for a bad header
        raise CheckpointError(f"{path} is not a readable safetensors file ({exc}); "
                              "it is truncated or altered: re-export the checkpoint") from exc


def _refuse_pickles(folder: Path) -> None:
    for path in sorted(folder.rglob("*")):
        if path.is_file() and path.name.lower().endswith(PICKLE_SUFFIXES):
            raise CheckpointError(
                f"{path}: pickle files are refused (loading one can run arbitrary code); "
                "checkpoints hold safetensors only — delete the file or re-export with `tte export`.")


def _base_name(name: str) -> str:
    """A parameter name as in the plain Hugging Face model (what weight_hash hashes)."""
    return name.replace("base_model.model.", "").replace(".base_layer", "")


def _lora_layers(tte: UnifiedTTE, adapter: str):
    from peft.tuners.lora import LoraLayer

    for name, module in tte.peft_model.named_modules():
        if isinstance(module, LoraLayer) and adapter in module.lora_A:
            yield name, module


def _adapter_state(tte: UnifiedTTE, adapter: str) -> dict[str, torch.Tensor]:
    """The adapter's weights keyed as PEFT saves them (adapter name stripped)."""
    from peft.utils import get_peft_model_state_dict

    # save_embedding_layers=False: "auto" may look the base config up on the hub.
    return get_peft_model_state_dict(tte.peft_model, adapter_name=adapter, save_embedding_layers=False)


def load_adapter(tte: UnifiedTTE, adapter: str, folder: str | Path) -> None:
    """Load `folder/adapter_model.safetensors` (PEFT layout) into the model's `adapter`, strictly:
    the keys and shapes must be exactly the adapter's, so a checkpoint for another wiring
    (rank, mode, K, backbone) is refused instead of half-loaded."""
    from peft.utils import set_peft_model_state_dict

    folder = Path(folder)
    path = folder / ADAPTER_WEIGHTS
    if not (folder / ADAPTER_CONFIG).is_file():
        raise CheckpointError(f"{folder / ADAPTER_CONFIG} is missing; an adapter folder holds "
                              f"{ADAPTER_CONFIG} and {ADAPTER_WEIGHTS} (PEFT's layout)")
    state = _load_safetensors(path)
    expected = _adapter_state(tte, adapter)
    missing, unexpected = sorted(expected.keys() - state.keys()), sorted(state.keys() - expected.keys())
    if missing or unexpected:
        raise CheckpointError(
            f"{path} does not match the '{adapter}' adapter of this model: {len(missing)} missing "
            f"tensors (e.g. {missing[:2]}), {len(unexpected)} unexpected (e.g. {unexpected[:2]}). "
            "It was saved for a different backbone, mode or embed_layers; check tte_config.json.")
    for key, value in state.items():
        if value.shape != expected[key].shape:
            raise CheckpointError(f"{path}: tensor {key} has shape {tuple(value.shape)}, the model "
                                  f"expects {tuple(expected[key].shape)} (different lora_r?)")
    set_peft_model_state_dict(tte.peft_model, state, adapter_name=adapter)


def _write_adapter(tte: UnifiedTTE, adapter: str, folder: Path, dtype: torch.dtype, base_ref: str) -> None:
    from safetensors.torch import save_file

    folder.mkdir(parents=True)
    state = {k: v.detach().to("cpu", dtype).contiguous() for k, v in _adapter_state(tte, adapter).items()}
    save_file(state, str(folder / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    cfg = copy.deepcopy(tte.peft_model.peft_config[adapter])
    cfg.base_model_name_or_path = base_ref
    cfg.inference_mode = True
    cfg.save_pretrained(str(folder))


def _merged_weights(tte: UnifiedTTE) -> dict[str, torch.Tensor]:
    """W + T for every linear the think LoRA touches, keyed by the plain HF parameter name."""
    out = {}
    with torch.no_grad():
        for name, layer in _lora_layers(tte, "think"):
            weight = layer.get_base_layer().weight
            out[_base_name(f"{name}.base_layer.weight")] = weight + layer.get_delta_weight("think").to(weight.dtype)
    return out


def _base_params(tte: UnifiedTTE) -> dict[str, torch.nn.Parameter]:
    return {_base_name(n): p for n, p in tte.peft_model.named_parameters() if "lora_" not in n}


def _apply_merged(tte_or_model, weights: dict[str, torch.Tensor], where: Path) -> None:
    """Copy merged linear weights into the base (cast to the base dtype)."""
    model = tte_or_model.peft_model if isinstance(tte_or_model, UnifiedTTE) else tte_or_model
    params = {_base_name(n): p for n, p in model.named_parameters() if "lora_" not in n}
    unknown = sorted(set(weights) - set(params))
    if unknown:
        raise CheckpointError(f"{where}: {len(unknown)} tensors are not parameters of this base "
                              f"(e.g. {unknown[:2]}); the checkpoint was merged on another model")
    with torch.no_grad():
        for key, value in weights.items():
            if value.shape != params[key].shape:
                raise CheckpointError(f"{where}: tensor {key} has shape {tuple(value.shape)}, "
                                      f"the base has {tuple(params[key].shape)}")
            params[key].copy_(value.to(params[key].dtype))


def _merged_hash(tte: UnifiedTTE, stored: dict[str, torch.Tensor]) -> str:
    """weight_hash of the base after `stored` is loaded into it in the base dtype (swap in, hash, swap back)."""
    params = _base_params(tte)
    saved = {k: params[k].data for k in stored}
    try:
        for k, v in stored.items():
            params[k].data = v.to(saved[k].dtype)
        return weight_hash(tte.peft_model)
    finally:
        for k, v in saved.items():
            params[k].data = v


# ---------------------------------------------------------------------------------------- manifest
def write_manifest(folder: str | Path) -> dict:
    folder = Path(folder)
    files = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST_FILE):
        rel = path.relative_to(folder).as_posix()
        files[rel] = {"sha256": _sha256(path), "bytes": path.stat().st_size}
    manifest = {"format": FORMAT, "files": files}
    (folder / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def verify_checkpoint(folder: str | Path) -> dict:
    """Check every file against manifest.json; refuse pickles. Returns the manifest's file table."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"{folder} is not a checkpoint folder (it does not exist)")
    _refuse_pickles(folder)
    manifest = _read_json(folder / MANIFEST_FILE)
    if manifest.get("format") != FORMAT or not isinstance(manifest.get("files"), dict):
        raise CheckpointError(f"{folder / MANIFEST_FILE}: not a {FORMAT} manifest; re-export with `tte export`")
    files = manifest["files"]
    for rel, entry in files.items():
        path = folder / rel
        if Path(rel).is_absolute() or ".." in Path(rel).parts:
            raise CheckpointError(f"{folder / MANIFEST_FILE} lists {rel!r}, outside the checkpoint folder")
        if rel.lower().endswith(PICKLE_SUFFIXES):
            raise CheckpointError(f"{path}: pickle files are refused; checkpoints hold safetensors only")
        if not path.is_file():
            raise CheckpointError(f"{path} is missing (listed in {MANIFEST_FILE}); the checkpoint is incomplete")
        size = path.stat().st_size
        if size != entry["bytes"]:
            raise CheckpointError(f"{path} is truncated or altered: {size} bytes, {MANIFEST_FILE} "
                                  f"records {entry['bytes']}; re-export or re-copy the checkpoint")
        digest = _sha256(path)
        if digest != entry["sha256"]:
            raise CheckpointError(f"{path} is altered: sha256 {digest[:16]}…, {MANIFEST_FILE} records "
                                  f"{entry['sha256'][:16]}…; re-export or re-copy the checkpoint")
    unlisted = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*")
                      if p.is_file() and p.name != MANIFEST_FILE
                      and p.relative_to(folder).as_posix() not in files)
    if unlisted:
        warnings.warn(f"{folder}: files not in {MANIFEST_FILE} are ignored: {unlisted}", stacklevel=2)
    if CONFIG_FILE not in files:
        raise CheckpointError(f"{folder / MANIFEST_FILE} does not list {CONFIG_FILE}; re-export the checkpoint")
    return files


# ---------------------------------------------------------------------------------------- export
def export_model(tte: UnifiedTTE, out_dir: str | Path, dtype: str = "fp32", merge_think: bool = False,
                 backbone_spec: str | None = None) -> Path:
    """Write `tte` as a compact checkpoint folder (see the module docstring); returns the folder.

    Args:
        dtype: adapter (and merged weight) storage dtype: "fp32", "bf16" or "fp16".
        merge_think: fold the think LoRA into the base; the checkpoint then serves with think="none".
        backbone_spec: how to rebuild the base ("tiny", "smollm2", a local folder), recorded so that
            `load_checkpoint(path)` works without a backbone argument.

    An existing checkpoint at `out_dir` is replaced; any other non-empty folder is refused.
    """
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    if merge_think and tte.config.think != "lora":
        raise ValueError("merge_think needs a think adapter, but this model has think='none'")
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()) and not (out_dir / MANIFEST_FILE).is_file():
        raise CheckpointError(f"{out_dir} exists and is not a checkpoint; choose another --out or empty it")
    store = DTYPES[dtype]
    base_ref = backbone_spec or tte.backbone.name
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        config = tte.config.to_dict()
        info = {
            "format": FORMAT,
            "backbone": backbone_spec,
            "base_model": tte.backbone.name,
            "base_model_type": tte.stack.model_type,
            "base_dtype": _dtype_name(tte.stack.dtype),
            "base_num_layers": tte.num_layers,
            "base_weight_hash": weight_hash(tte.peft_model),
            "invocation_ids": list(tte.invocation_ids),
            "dtype": dtype,
            "think_merged": merge_think,
        }
        if merge_think:
            from safetensors.torch import save_file

            stored = {k: v.detach().to("cpu", store).contiguous() for k, v in _merged_weights(tte).items()}
            (tmp / "merged").mkdir()
            save_file(stored, str(tmp / MERGED_WEIGHTS), metadata={"format": "pt"})
            info["merged_weight_hash"] = _merged_hash(tte, stored)
            config["think"] = "none"  # the merged base is the reasoner
        else:
            for adapter in tte.think_adapters:
                _write_adapter(tte, adapter, tmp / adapter, store, base_ref)
        _write_adapter(tte, "embed", tmp / "embed", store, base_ref)
        info["adapters"] = sorted(p.name for p in tmp.iterdir() if (p / ADAPTER_WEIGHTS).is_file())
        (tmp / CONFIG_FILE).write_text(json.dumps({**config, **info}, indent=2) + "\n")
        write_manifest(tmp)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        tmp.rename(out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def read_run(run_dir: str | Path) -> tuple[TTEConfig, str]:
    """The TTEConfig and backbone spec of a training run dir, after checking its files exist."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise CheckpointError(f"run dir {run_dir} does not exist")
    saved = _read_json(run_dir / CONFIG_FILE)
    config = _config_from_dict(saved, run_dir / CONFIG_FILE)
    spec = saved.get("backbone")
    if not spec:
        raise CheckpointError(f"{run_dir / CONFIG_FILE} has no \"backbone\" entry (tiny, smollm2 or a "
                              "local folder); add it or pass --backbone")
    adapters = ["think", "embed"] if config.think == "lora" else ["embed"]
    for adapter in adapters:
        for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
            if not (run_dir / adapter / name).is_file():
                raise CheckpointError(f"{run_dir / adapter / name} is missing: a run dir holds {CONFIG_FILE} "
                                      f"and {', '.join(a + '/' for a in adapters)} PEFT adapter folders "
                                      f"({ADAPTER_CONFIG} + {ADAPTER_WEIGHTS})")
    for adapter in adapters:
        _refuse_pickles(run_dir / adapter)
    return config, spec


def load_run(run_dir: str | Path, backbone: Backbone | None = None) -> tuple[UnifiedTTE, str]:
    """A UnifiedTTE with a training run's adapters loaded; returns it and the backbone spec."""
    run_dir = Path(run_dir)
    config, spec = read_run(run_dir)
    tte = UnifiedTTE(backbone or load_reasoner(spec), config)
    for adapter in tte.embed_adapters:
        load_adapter(tte, adapter, run_dir / adapter)
    return tte.eval(), spec


def export_run(run_dir: str | Path, out_dir: str | Path, dtype: str = "fp32", merge_think: bool = False,
               backbone: Backbone | str | None = None) -> Path:
    """Export a training run dir (tte_config.json with "backbone", think/ and embed/ adapters).

    `backbone` overrides the run's recorded spec (a Backbone or a spec string)."""
    spec_override = backbone if isinstance(backbone, str) else None
    bb = load_reasoner(backbone) if isinstance(backbone, str) else backbone
    tte, spec = load_run(run_dir, bb)
    return export_model(tte, out_dir, dtype=dtype, merge_think=merge_think, backbone_spec=spec_override or spec)


# ---------------------------------------------------------------------------------------- load
def _check_base(info: dict, actual_hash: str, backbone: Backbone, where: Path, key="base_weight_hash") -> None:
    if actual_hash == info[key]:
        return
    dtype = _dtype_name(next(backbone.model.parameters()).dtype)
    hint = ""
    if dtype != info.get("base_dtype"):
        hint = (f" The base is {dtype} but was {info.get('base_dtype')} at export: load it in "
                f"{info.get('base_dtype')} and pass dtype= to load_checkpoint to cast after the check.")
    raise CheckpointError(
        f"base model weight hash {actual_hash[:16]}… differs from the one recorded in {where} "
        f"({info[key][:16]}…): this checkpoint was exported from '{info.get('base_model')}' "
        f"(backbone spec {info.get('backbone')!r}); pass that exact base model.{hint}")


def _read_checkpoint_config(folder: Path) -> dict:
    info = _read_json(folder / CONFIG_FILE)
    if info.get("format") != FORMAT:
        raise CheckpointError(f"{folder / CONFIG_FILE}: not a {FORMAT} config (format={info.get('format')!r})")
    return info


def load_checkpoint(path: str | Path, backbone: Backbone | None = None, dtype: torch.dtype | str | None = None,
                    device: str | torch.device | None = None) -> UnifiedTTE:
    """Load a checkpoint folder onto its base model, verifying files and the base (the module docstring).

    Args:
        backbone: the base the checkpoint was exported from, in the dtype it had then; default: rebuilt
            from the recorded backbone spec. It is wrapped in place (tokens added, LoRA injected).
        dtype: cast the whole model after the checks (e.g. torch.bfloat16 for serving).
    """
    folder = Path(path)
    files = verify_checkpoint(folder)
    info = _read_checkpoint_config(folder)
    config = _config_from_dict(info, folder / CONFIG_FILE)
    if backbone is None:
        if not info.get("backbone"):
            raise CheckpointError(f"{folder / CONFIG_FILE} records no backbone spec; pass backbone=")
        backbone = load_reasoner(info["backbone"])
    if backbone.model_type != info["base_model_type"]:
        raise CheckpointError(f"{folder / CONFIG_FILE} records a '{info['base_model_type']}' base "
                              f"('{info['base_model']}'), got a '{backbone.model_type}' backbone")
    tte = UnifiedTTE(backbone, config)
    if list(tte.invocation_ids) != info["invocation_ids"]:
        raise CheckpointError(f"the tokenizer maps the invocation tokens {list(config.invocation)} to "
                              f"{tte.invocation_ids}, {folder / CONFIG_FILE} records {info['invocation_ids']}: "
                              "a different tokenizer than at export")
    _check_base(info, weight_hash(tte.peft_model), backbone, folder / CONFIG_FILE)
    if info.get("think_merged"):
        if MERGED_WEIGHTS not in files:
            raise CheckpointError(f"{folder / MANIFEST_FILE} does not list {MERGED_WEIGHTS}, "
                                  "but the checkpoint says think_merged")
        _apply_merged(tte, _load_safetensors(folder / MERGED_WEIGHTS), folder / MERGED_WEIGHTS)
        _check_base(info, weight_hash(tte.peft_model), backbone, folder / CONFIG_FILE, "merged_weight_hash")
    for adapter in tte.embed_adapters:
        for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
            if f"{adapter}/{name}" not in files:
                raise CheckpointError(f"{folder / MANIFEST_FILE} does not list {adapter}/{name}; "
                                      "the checkpoint is incomplete")
        load_adapter(tte, adapter, folder / adapter)
    if isinstance(dtype, str):
        dtype = DTYPES[dtype]
    if dtype is not None:
        tte.to(dtype=dtype)
    if device is not None:
        tte.to(device)
    return tte.eval()


def prepare_base(backbone: Backbone, checkpoint: str | Path) -> Backbone:
    """Make a plain base match a checkpoint for plain PEFT / transformers use, then verify its hash:
    add the invocation tokens exactly as UnifiedTTE does (tokenizer + mean-initialised rows; with a
    tied head they matter for generation too) and, for a merged checkpoint, load the merged weights.

        base = prepare_base(backbones.load_reasoner("tiny"), "checkpoints/NAME")
        think = PeftModel.from_pretrained(base.model, "checkpoints/NAME/think")
    """
    folder = Path(checkpoint)
    verify_checkpoint(folder)
    info = _read_checkpoint_config(folder)
    # The function UnifiedTTE itself calls, so the rows are bit-identical; the hash check below
    # would catch any drift.
    add_invocation_tokens(backbone, info["invocation"])
    _check_base(info, weight_hash(backbone.model), backbone, folder / CONFIG_FILE)
    if info.get("think_merged"):
        _apply_merged(backbone.model, _load_safetensors(folder / MERGED_WEIGHTS), folder / MERGED_WEIGHTS)
        _check_base(info, weight_hash(backbone.model), backbone, folder / CONFIG_FILE, "merged_weight_hash")
    return backbone


# ---------------------------------------------------------------------------------------- CLI
def export_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="tte export", description="Export a training run dir to a compact safetensors checkpoint.")
    parser.add_argument("run_dir", help="training run dir: tte_config.json (with \"backbone\"), think/, embed/")
    parser.add_argument("--out", required=True, help="checkpoint folder to write, e.g. checkpoints/NAME")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="adapter storage dtype")
    parser.add_argument("--merge-think", action="store_true",
                        help="fold the think LoRA into the base (writes merged/model.safetensors, no think/)")
    parser.add_argument("--backbone", default=None,
                        help="override the run's backbone spec (tiny | smollm2 | a local folder)")
    args = parser.parse_args(argv)
    try:
        out = export_run(args.run_dir, args.out, dtype=args.dtype, merge_think=args.merge_think,
                         backbone=args.backbone)
    except CheckpointError as exc:
        print(f"tte export: {exc}", file=sys.stderr)
        return 1
    manifest = json.loads((out / MANIFEST_FILE).read_text())
    info = json.loads((out / CONFIG_FILE).read_text())
    print(f"wrote {out} ({info['dtype']}, mode={info['mode']}, think_merged={info['think_merged']}, "
          f"base {info['base_model']} sha256 {info['base_weight_hash'][:16]}…)")
    for rel, entry in manifest["files"].items():
        print(f"  {rel:<36} {entry['bytes'] / 1e6:9.2f} MB  {entry['sha256'][:16]}…")
    return 0
