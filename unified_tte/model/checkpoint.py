"""Reading what a trained model is stored as: an exported checkpoint folder or a training run
folder, verified before anything is loaded. `UnifiedTTE.from_checkpoint` is the user's entry;
writing checkpoints is `unified_tte.export`.

    src = open_source("checkpoints/NAME")        # or a training run dir (runs/NAME)
    tte = UnifiedTTE(zoo.load(src.backbone_spec), src.config)
    load_into(tte, src)

An exported checkpoint holds adapters, never the base model; the base is named and pinned by its
hash:

    checkpoints/NAME/
      tte_config.json                  TTEConfig fields, "backbone" spec, base name/type/dtype/weight hash,
                                       invocation token ids, export dtype, think_merged
      think/adapter_config.json        PEFT layout: `PeftModel.from_pretrained(base, NAME/think)` loads it
      think/adapter_model.safetensors
      embed/adapter_config.json        the embed LoRA; its gating (activated / top_k) is in tte_config.json
      embed/adapter_model.safetensors
      merged/model.safetensors         --merge-think only: the linear weights W + T that changed
      manifest.json                    sha256 and byte size of every file above

A training run folder (see `unified_tte/train/loop.py`) has tte_config.json (with "backbone")
and the finished stages' think/ and embed/ adapter folders; its resume checkpoints are not read.

Checks: every file of a checkpoint against the manifest (missing, truncated, altered files are
refused by name); no pickle file anywhere it reads (refused, never opened); safetensors only;
the base model's type, tokenizer (invocation token ids) and weight hash against the recorded ones
(`backbones.weight_hash`, LoRA excluded, taken after UnifiedTTE adds the mean-initialised
invocation-token rows).

The manifest guards against corruption (a truncated copy, a flipped byte), not against someone
who can rewrite the folder: they can rewrite the manifest too. Against that, set a secret in
TTE_CHECKPOINT_KEY when exporting: `manifest.sig` then holds an HMAC-SHA256 of the manifest under
that key, and loading with the key set refuses a checkpoint whose signature is missing or wrong.
Loading without the key skips the check (with a warning when a signature is present).
"""
from __future__ import annotations

import hashlib
import hmac
import json
import os
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import CheckpointError
from . import adapters
from .backbones import weight_hash
from .config import TTEConfig, value_errors

FORMAT = "unified_tte.checkpoint/1"
CONFIG_FILE = "tte_config.json"
MANIFEST_FILE = "manifest.json"
SIGNATURE_FILE = "manifest.sig"
KEY_ENV = "TTE_CHECKPOINT_KEY"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
MERGED_WEIGHTS = "merged/model.safetensors"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# Extensions of files that torch/pickle would deserialise (and so could run code on load).
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".npy", ".npz", ".joblib")


@dataclass
class Source:
    """A verified checkpoint or run folder, ready to load into a UnifiedTTE."""
    kind: str                      # "checkpoint" | "run"
    folder: Path
    config: TTEConfig
    backbone_spec: str | None
    info: dict = field(default_factory=dict)     # the saved tte_config.json
    files: dict = field(default_factory=dict)    # checkpoint: the manifest's file table


# ---------------------------------------------------------------------------------------- helpers
def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def config_from_dict(d: dict, where: Path) -> TTEConfig:
    """TTEConfig from a saved dict; keys that are not TTEConfig fields (backbone, hashes) are skipped."""
    try:
        config = TTEConfig.from_dict(d)
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{where}: not a valid TTEConfig ({exc})") from exc
    for key, problem in value_errors(config):   # found here, not at the first query
        raise CheckpointError(f"{where}: field '{key}' {problem} The file is altered: fix that field, "
                              "or export (or train) the checkpoint again.")
    return config


def read_json(path: Path) -> dict:
    if not path.is_file():
        raise CheckpointError(f"{path} is missing")
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path} is not valid JSON ({exc}); the file is altered or truncated") from exc
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} must hold a JSON object; the file is altered")
    return data


def load_safetensors(path: Path) -> dict[str, torch.Tensor]:
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


# How files that pickle, torch.save and numpy write begin (pickle protocol 2-5, a zip, .npy).
PICKLE_MAGIC = (b"\x80\x02", b"\x80\x03", b"\x80\x04", b"\x80\x05", b"PK\x03\x04", b"\x93NUMPY")


def refuse_pickles(folder: Path) -> None:
    """Refuse any file named as torch and pickle files are (PICKLE_SUFFIXES), opened for at most
    its first bytes, never loaded: the reason says whether it begins like a pickle."""
    for path in sorted(folder.rglob("*")):
        if path.is_file() and path.name.lower().endswith(PICKLE_SUFFIXES):
            with open(path, "rb") as f:
                head = f.read(8)
            what = "pickle files are refused (loading one can run arbitrary code)" if head.startswith(PICKLE_MAGIC) \
                else (f"refused by its name: it does not begin like a pickle, torch or numpy file, but torch and "
                      f"pickle load files named *{path.suffix}, so a checkpoint never holds one")
            raise CheckpointError(
                f"{path}: {what}; checkpoints hold safetensors only — remove or rename that file, "
                "or re-export with `tte export`.")


# ---------------------------------------------------------------------------------------- manifest
def write_manifest(folder: str | Path) -> dict:
    folder = Path(folder)
    files = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and p.name not in (MANIFEST_FILE, SIGNATURE_FILE)):
        rel = path.relative_to(folder).as_posix()
        files[rel] = {"sha256": sha256(path), "bytes": path.stat().st_size}
    manifest = {"format": FORMAT, "files": files}
    (folder / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def _signature(manifest: bytes, key: str) -> str:
    return hmac.new(key.encode(), manifest, hashlib.sha256).hexdigest()


def sign_manifest(folder: str | Path) -> bool:
    """Write manifest.sig when TTE_CHECKPOINT_KEY is set; returns whether it signed."""
    key = os.environ.get(KEY_ENV)
    if not key:
        return False
    folder = Path(folder)
    (folder / SIGNATURE_FILE).write_text(_signature((folder / MANIFEST_FILE).read_bytes(), key) + "\n")
    return True


def check_signature(folder: Path) -> None:
    key = os.environ.get(KEY_ENV)
    sig_path = folder / SIGNATURE_FILE
    if not key:
        if sig_path.is_file():
            warnings.warn(f"{folder} is signed but {KEY_ENV} is not set: the signature was not checked",
                          stacklevel=3)
        return
    if not sig_path.is_file():
        raise CheckpointError(f"{sig_path} is missing but {KEY_ENV} is set: this checkpoint was not "
                              "signed with your key; re-export it with the key set, or unset the key")
    want = _signature((folder / MANIFEST_FILE).read_bytes(), key)
    if not hmac.compare_digest(sig_path.read_text().strip(), want):
        raise CheckpointError(f"{sig_path}: the signature does not match the manifest under {KEY_ENV}: "
                              "the checkpoint was changed after export, or signed with another key")


def verify_checkpoint(folder: str | Path) -> dict:
    """Check every file against manifest.json; refuse pickles. Returns the manifest's file table."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"{folder} is not a checkpoint folder (it does not exist)")
    refuse_pickles(folder)
    manifest = read_json(folder / MANIFEST_FILE)
    if manifest.get("format") != FORMAT or not isinstance(manifest.get("files"), dict):
        raise CheckpointError(f"{folder / MANIFEST_FILE}: not a {FORMAT} manifest; re-export with `tte export`")
    check_signature(folder)
    files = manifest["files"]
    for rel, entry in files.items():
        path = folder / rel
        if Path(rel).is_absolute() or ".." in Path(rel).parts:
            raise CheckpointError(f"{folder / MANIFEST_FILE} lists {rel!r}, outside the checkpoint folder")
        if rel.lower().endswith(PICKLE_SUFFIXES):
            raise CheckpointError(f"{folder / MANIFEST_FILE} lists {rel!r}, a name torch and pickle load; "
                                  "checkpoints hold safetensors only: re-export the checkpoint")
        if not isinstance(entry, dict) or not {"bytes", "sha256"} <= set(entry) \
                or isinstance(entry["bytes"], bool) or not isinstance(entry["bytes"], int) or entry["bytes"] < 0 \
                or not isinstance(entry["sha256"], str) or not re.fullmatch(r"[0-9a-f]{64}", entry["sha256"]):
            raise CheckpointError(f"{folder / MANIFEST_FILE}: the entry for {rel!r} is malformed ({entry!r}; "
                                  "an entry holds 'bytes', a whole number >= 0, and 'sha256', 64 lowercase hex "
                                  "digits); re-export the checkpoint")
        if not path.is_file():
            raise CheckpointError(f"{path} is missing (listed in {MANIFEST_FILE}); the checkpoint is incomplete")
        size = path.stat().st_size
        if size != entry["bytes"]:
            raise CheckpointError(f"{path} is truncated or altered: {size} bytes, {MANIFEST_FILE} "
                                  f"records {entry['bytes']}; re-export or re-copy the checkpoint")
        digest = sha256(path)
        if digest != entry["sha256"]:
            raise CheckpointError(f"{path} is altered: sha256 {digest[:16]}…, {MANIFEST_FILE} records "
                                  f"{entry['sha256'][:16]}…; re-export or re-copy the checkpoint")
    unlisted = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*")
                      if p.is_file() and p.name not in (MANIFEST_FILE, SIGNATURE_FILE)
                      and p.relative_to(folder).as_posix() not in files)
    if unlisted:
        warnings.warn(f"{folder}: files not in {MANIFEST_FILE} are ignored: {unlisted}", stacklevel=2)
    if CONFIG_FILE not in files:
        raise CheckpointError(f"{folder / MANIFEST_FILE} does not list {CONFIG_FILE}; re-export the checkpoint")
    return files


def read_checkpoint_config(folder: Path) -> dict:
    info = read_json(folder / CONFIG_FILE)
    if info.get("format") != FORMAT:
        raise CheckpointError(f"{folder / CONFIG_FILE}: not a {FORMAT} config (format={info.get('format')!r})")
    digest = lambda v: isinstance(v, str) and re.fullmatch(r"[0-9a-f]{64}", v) is not None  # noqa: E731
    required = [   # what loading reads, checked before any model is built
        ("invocation_ids", lambda v: isinstance(v, list) and v and all(type(i) is int and i >= 0 for i in v),
         "a list of token ids"),
        ("base_weight_hash", digest, "64 lowercase hex digits"),
        ("base_model_type", lambda v: isinstance(v, str) and v, "a model type such as 'qwen2_vl'"),
        ("think_merged", lambda v: isinstance(v, bool), "true or false"),
    ]
    if info.get("think_merged") is True:
        required.append(("merged_weight_hash", digest, "64 lowercase hex digits"))
    for key, ok, what in required:
        if key not in info:
            raise CheckpointError(f"{folder / CONFIG_FILE} has no {key!r} (it should hold {what}); the file is "
                                  "altered or was not written by `tte export`: export the checkpoint again")
        if not ok(info[key]):
            raise CheckpointError(f"{folder / CONFIG_FILE}: field {key!r} must be {what}, got {info[key]!r}; the "
                                  "file is altered: export the checkpoint again")
    return info


# ---------------------------------------------------------------------------------------- sources
# What a training run folder holds (train/loop.py's layout, metrics.jsonl.N included): its own
# files and folders, which an export never writes into.
RUN_ENTRIES = (".tte.lock", "recipe.yaml", CONFIG_FILE, "metrics.jsonl", "checkpoints", "think", "embed", "gate",
               "wandb", "wandb_run_id")


def is_run_folder(folder: Path) -> bool:
    """A training run folder: a tte_config.json that is not an export's (no manifest, no format)."""
    if not (folder / CONFIG_FILE).is_file() or (folder / MANIFEST_FILE).is_file():
        return False
    try:
        return json.loads((folder / CONFIG_FILE).read_text()).get("format") != FORMAT
    except (OSError, ValueError, AttributeError):
        return True   # unreadable: a run's own file all the same, never an export to replace


def run_entry(name: str) -> bool:
    """True for the name of a file or folder a run folder owns (RUN_ENTRIES)."""
    return name in RUN_ENTRIES or name.startswith("metrics.jsonl.")


def read_run(run_dir: str | Path) -> tuple[TTEConfig, str]:
    """The TTEConfig and backbone spec of a training run dir, after checking its files exist."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise CheckpointError(f"run dir {run_dir} does not exist")
    saved = read_json(run_dir / CONFIG_FILE)
    config = config_from_dict(saved, run_dir / CONFIG_FILE)
    spec = saved.get("backbone")
    if not spec:
        raise CheckpointError(f"{run_dir / CONFIG_FILE} has no \"backbone\" entry (tiny, smollm2 or a "
                              "local folder); add it or pass --backbone")
    names = ["think", "embed"] if config.think == "lora" else ["embed"]
    for adapter in names:
        for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
            if not (run_dir / adapter / name).is_file():
                raise CheckpointError(f"{run_dir / adapter / name} is missing: a run dir holds {CONFIG_FILE} "
                                      f"and {', '.join(a + '/' for a in names)} PEFT adapter folders "
                                      f"({ADAPTER_CONFIG} + {ADAPTER_WEIGHTS}), written when a stage "
                                      "finishes; finish the run (tte train ... --resume) first")
    for adapter in names:
        refuse_pickles(run_dir / adapter)
    return config, spec


def open_source(path: str | Path) -> Source:
    """An exported checkpoint (tte_config.json says its format; manifest.json) or a training run
    folder (tte_config.json without a format, adapter folders), verified; anything else is a
    CheckpointError naming both layouts."""
    folder = Path(path)
    if not folder.exists():
        raise CheckpointError(f"{folder} does not exist: pass an exported checkpoint folder "
                              "(tte export) or a training run folder (tte train's run_dir)")
    if not folder.is_dir():
        raise CheckpointError(f"{folder} is a file: pass a checkpoint or run folder")
    exported = (folder / CONFIG_FILE).is_file() and read_json(folder / CONFIG_FILE).get("format") == FORMAT
    if exported or (folder / MANIFEST_FILE).is_file():
        files = verify_checkpoint(folder)
        info = read_checkpoint_config(folder)
        return Source("checkpoint", folder, config_from_dict(info, folder / CONFIG_FILE),
                      info.get("backbone"), info, files)
    if (folder / CONFIG_FILE).is_file():
        config, spec = read_run(folder)
        return Source("run", folder, config, spec, read_json(folder / CONFIG_FILE))
    raise CheckpointError(f"{folder} is neither an exported checkpoint ({MANIFEST_FILE} + {CONFIG_FILE}) "
                          f"nor a training run folder ({CONFIG_FILE} + think/, embed/)")


# ---------------------------------------------------------------------------------------- loading
def load_adapter(tte, adapter: str, folder: str | Path) -> None:
    """Load `folder/adapter_model.safetensors` (PEFT layout) into the model's `adapter`, strictly:
    the keys and shapes must be exactly the adapter's, so a checkpoint for another wiring
    (rank, mode, K, backbone) is refused instead of half-loaded."""
    folder = Path(folder)
    path = folder / ADAPTER_WEIGHTS
    if not (folder / ADAPTER_CONFIG).is_file():
        raise CheckpointError(f"{folder / ADAPTER_CONFIG} is missing; an adapter folder holds "
                              f"{ADAPTER_CONFIG} and {ADAPTER_WEIGHTS} (PEFT's layout)")
    state = load_safetensors(path)
    expected = adapters.adapter_state(tte.peft_model, adapter)
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
    adapters.load_adapter_state(tte.peft_model, adapter, state)


def apply_merged(model: torch.nn.Module, weights: dict[str, torch.Tensor], where: Path) -> None:
    """Copy merged linear weights into a (PEFT-wrapped or plain) model, cast to its dtype."""
    params = {adapters.base_name(n): p for n, p in model.named_parameters() if "lora_" not in n}
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


def check_base(info: dict, actual_hash: str, model: torch.nn.Module, where: Path,
               key: str = "base_weight_hash") -> None:
    if actual_hash == info[key]:
        return
    dtype = dtype_name(next(model.parameters()).dtype)
    hint = ""
    if dtype != info.get("base_dtype"):
        hint = (f" The base is {dtype} but was {info.get('base_dtype')} at export: load it in "
                f"{info.get('base_dtype')} and pass dtype= to load_checkpoint to cast after the check.")
    raise CheckpointError(
        f"base model weight hash {actual_hash[:16]}… differs from the one recorded in {where} "
        f"({info[key][:16]}…): this checkpoint was exported from '{info.get('base_model')}' "
        f"(backbone spec {info.get('backbone')!r}); pass that exact base model.{hint}")


def check_backbone_type(src: Source, model_type: str) -> None:
    want = src.info.get("base_model_type")
    if src.kind == "checkpoint" and model_type != want:
        raise CheckpointError(f"{src.folder / CONFIG_FILE} records a '{want}' base "
                              f"('{src.info.get('base_model')}'), got a '{model_type}' backbone")


def load_into(tte, src: Source) -> None:
    """Load a source's adapters (and merged weights) into a UnifiedTTE built from its config,
    checking the base first."""
    if src.kind == "run":
        for adapter in tte.embed_adapters:
            load_adapter(tte, adapter, src.folder / adapter)
        return
    folder, info, files = src.folder, src.info, src.files
    if list(tte.invocation_ids) != info["invocation_ids"]:
        raise CheckpointError(f"the tokenizer maps the invocation tokens {list(tte.config.invocation)} to "
                              f"{tte.invocation_ids}, {folder / CONFIG_FILE} records {info['invocation_ids']}: "
                              "a different tokenizer than at export")
    check_base(info, weight_hash(tte.peft_model), tte.peft_model, folder / CONFIG_FILE)
    if info.get("think_merged"):
        if MERGED_WEIGHTS not in files:
            raise CheckpointError(f"{folder / MANIFEST_FILE} does not list {MERGED_WEIGHTS}, "
                                  "but the checkpoint says think_merged")
        apply_merged(tte.peft_model, load_safetensors(folder / MERGED_WEIGHTS), folder / MERGED_WEIGHTS)
        check_base(info, weight_hash(tte.peft_model), tte.peft_model, folder / CONFIG_FILE,
                   "merged_weight_hash")
    for adapter in tte.embed_adapters:
        for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
            if f"{adapter}/{name}" not in files:
                raise CheckpointError(f"{folder / MANIFEST_FILE} does not list {adapter}/{name}; "
                                      "the checkpoint is incomplete")
        load_adapter(tte, adapter, folder / adapter)
