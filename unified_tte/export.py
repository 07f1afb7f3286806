"""`tte export`: write a trained UnifiedTTE (or a training run folder) as a compact checkpoint.

    tte export runs/digits --out checkpoints/digits [--dtype bf16|fp16|fp32] [--merge-think]

    from unified_tte.export import export_model, load_checkpoint
    export_model(tte, "checkpoints/digits", dtype="bf16", backbone_spec="tiny")
    tte = load_checkpoint("checkpoints/digits")          # = UnifiedTTE.from_checkpoint

The folder layout, what loading verifies and what the manifest does not guarantee are in
`unified_tte/model/checkpoint.py` (the reader, part of the core install).

`--merge-think` folds the think LoRA into the base for serving: `merged/model.safetensors` holds
every changed linear weight (plain Hugging Face parameter names, in the export dtype), `think/`
is not written, the saved config says think="none" (the merged base is the reasoner) and
`merged_weight_hash` pins the base after the merged weights are loaded into it (in the base
dtype). Loading still needs the original base (its hash is checked first). In activated mode the
merged export's `embed/adapter_config.json` declares an activated LoRA (`alora_invocation_tokens`
= the invocation ids, task_type CAUSAL_LM), so plain PEFT serves it: `prepare_base`, then
`PeftModel.from_pretrained(base.model, NAME/embed)`, one forward over prompt + trace + end-of-turn +
invocation, the last hidden state (after the final norm) L2-normalised is the embedding
(tests/test_alora_export.py).
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import shutil
import sys
from pathlib import Path

import torch
from safetensors import SafetensorError

from .errors import CheckpointError, TTEError, command, write_failed
from .locks import lock_folder
from .model import UnifiedTTE, adapters, zoo
from .model.backbones import Backbone, add_invocation_tokens, weight_hash
from .model.checkpoint import (ADAPTER_WEIGHTS, CONFIG_FILE, DTYPES, FORMAT, MANIFEST_FILE, MERGED_WEIGHTS,
                               SIGNATURE_FILE, apply_merged, check_base, dtype_name, is_run_folder,
                               load_safetensors, read_checkpoint_config, read_run, run_entry, sign_manifest,
                               verify_checkpoint, write_manifest)

__all__ = ["export_model", "export_run", "load_checkpoint", "prepare_base", "export_main", "CheckpointError"]


def load_checkpoint(path: str | Path, backbone: Backbone | None = None, dtype: torch.dtype | str | None = None,
                    device: str | torch.device | None = None) -> UnifiedTTE:
    """`UnifiedTTE.from_checkpoint`: an exported checkpoint or a training run folder."""
    return UnifiedTTE.from_checkpoint(path, backbone=backbone, dtype=dtype, device=device)


def _write_adapter(tte: UnifiedTTE, adapter: str, folder: Path, dtype: torch.dtype, base_ref: str,
                   alora_invocation_tokens: list[int] | None = None) -> None:
    """One adapter in PEFT's layout. With `alora_invocation_tokens` its config declares an
    activated LoRA: PEFT then applies it from the last occurrence of those ids on, and only in
    its causal-LM model's forward (which computes the offsets), hence task_type CAUSAL_LM."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True)
    state = {k: v.detach().to("cpu", dtype).contiguous()
             for k, v in adapters.adapter_state(tte.peft_model, adapter).items()}
    save_file(state, str(folder / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    cfg = copy.deepcopy(adapters.adapter_config(tte.peft_model, adapter))
    cfg.base_model_name_or_path = base_ref
    cfg.inference_mode = True
    if alora_invocation_tokens is not None:
        cfg.alora_invocation_tokens = list(alora_invocation_tokens)
        cfg.task_type = "CAUSAL_LM"
    cfg.save_pretrained(str(folder))


def _merged_hash(tte: UnifiedTTE, stored: dict[str, torch.Tensor]) -> str:
    """weight_hash of the base after `stored` is loaded into it in the base dtype (swap in, hash, swap back)."""
    params = {adapters.base_name(n): p for n, p in tte.peft_model.named_parameters() if "lora_" not in n}
    saved = {k: params[k].data for k in stored}
    try:
        for k, v in stored.items():
            params[k].data = v.to(saved[k].dtype)
        return weight_hash(tte.peft_model)
    finally:
        for k, v in saved.items():
            params[k].data = v


def _write_gate(tte: UnifiedTTE, folder: Path, store: torch.dtype, info: dict, config: dict) -> None:
    """The think gate, its fingerprint stamped for the model as exported: the adapters as stored
    (cast to `store` and back), and with a merged think its merged base, think="none" and the
    embed adapter alone."""
    from .model.adapters import adapter_state
    from .model.gate import FINGERPRINT_FIELDS, ThinkGate, adapters_sha256

    kept = ["embed"] if info["think_merged"] else list(tte.embed_adapters)
    states = {a: {k: v.to(store).to(v.dtype) for k, v in adapter_state(tte.peft_model, a).items()} for a in kept}
    fingerprint = {**tte.fingerprint(), "config": {k: config[k] for k in FINGERPRINT_FIELDS},
                   "adapters_sha256": adapters_sha256(states)}
    if info["think_merged"]:
        fingerprint["base_weight_hash"] = info["merged_weight_hash"]
    gate = tte.gate
    ThinkGate(gate.weight, gate.bias, gate.mean, gate.std, {**gate.info, "fingerprint": fingerprint}).save(folder)


def _owned_files(out_dir: Path) -> set[str]:
    """Files in `out_dir` that an earlier export wrote: its manifest's list and the manifest itself
    (and its signature). Nothing, when there is no readable manifest."""
    try:
        files = json.loads((out_dir / MANIFEST_FILE).read_text()).get("files", {})
    except (OSError, ValueError, AttributeError):
        return set()
    return {rel for rel in files if isinstance(rel, str)} | {MANIFEST_FILE, SIGNATURE_FILE}


def check_out(out_dir: Path) -> None:
    """Refuse an --out that is a training run folder or lies in one of its own files or folders
    (think/, checkpoints/, ...): an export there replaces the run's tte_config.json and adds a
    manifest that makes the run unreadable to eval and export. A new subfolder of a run folder
    (runs/x/export) is an export's own folder and is fine."""
    out = out_dir.resolve()
    for folder in (out, *out.parents):
        if not is_run_folder(folder):
            continue
        inside = out.relative_to(folder).parts
        if not inside or run_entry(inside[0]):
            where = "is the training run folder" if not inside else \
                f"is inside the training run folder {folder}, in its own {inside[0]}"
            raise CheckpointError(f"--out {out_dir} {where}; an export there would replace or mix in with the "
                                  "run's files (with or without --overwrite). Export to a folder of its own, e.g. "
                                  f"{folder / 'export'} or checkpoints/NAME")


def _refuse_links(out_dir: Path, rels: set[str]) -> None:
    """Export writes only regular files inside `out_dir`: refuse before touching anything when a
    path it would write or remove passes through a symbolic link (say think/ -> ../../userdir)."""
    for rel in sorted(rels):
        path = out_dir
        for part in Path(rel).parts:
            path = path / part
            if path.is_symlink():
                raise CheckpointError(f"{path} is a symbolic link (to {os.readlink(path)}); export writes only "
                                      f"regular files inside --out {out_dir}, never through a link: remove the "
                                      "link, or choose another --out")
            if not path.exists():
                break


def _place(tmp: Path, out_dir: Path, overwrite: bool) -> None:
    """Move a finished export from `tmp` into `out_dir`, touching only files exports own.

    A missing or empty `out_dir` is replaced in one rename. Otherwise files an earlier export
    wrote are replaced and the ones this export no longer writes removed; any other file is a
    user's: without `overwrite` the export is refused, with it they are kept. The old manifest
    goes first and the new one comes last, so a kill in between leaves a folder that loading
    refuses (no manifest) rather than a mix that looks whole."""
    if not out_dir.exists() or (out_dir.is_dir() and not any(out_dir.iterdir())):
        if out_dir.exists():
            out_dir.rmdir()
        tmp.rename(out_dir)
        return
    if not out_dir.is_dir():
        raise CheckpointError(f"{out_dir} is a file; --out must be a folder")
    owned = _owned_files(out_dir)
    present = {p.relative_to(out_dir).as_posix() for p in out_dir.rglob("*") if p.is_file() or p.is_symlink()}
    foreign = sorted(present - owned)
    if foreign and not overwrite:
        what = "is not a checkpoint" if not owned else "holds files that export did not write"
        raise CheckpointError(f"{out_dir} {what} ({len(foreign)} file(s), e.g. {foreign[:3]}); choose "
                              "another --out, or pass --overwrite to write the checkpoint's files there "
                              "and keep every other file")
    new = {p.relative_to(tmp).as_posix() for p in tmp.rglob("*") if p.is_file()}
    _refuse_links(out_dir, new | (owned & present))
    for rel in (MANIFEST_FILE, SIGNATURE_FILE):
        (out_dir / rel).unlink(missing_ok=True)
    for rel in sorted(owned & (present - new)):
        (out_dir / rel).unlink()
    for rel in sorted(new - {MANIFEST_FILE, SIGNATURE_FILE}) + [r for r in (MANIFEST_FILE, SIGNATURE_FILE) if r in new]:
        (out_dir / rel).parent.mkdir(parents=True, exist_ok=True)
        os.replace(tmp / rel, out_dir / rel)
    for folder in sorted((p for p in out_dir.rglob("*") if p.is_dir() and not p.is_symlink()), reverse=True):
        if not any(folder.iterdir()):
            folder.rmdir()  # emptied by this export (e.g. think/ after --merge-think)


def export_model(tte: UnifiedTTE, out_dir: str | Path, dtype: str = "fp32", merge_think: bool = False,
                 backbone_spec: str | None = None, overwrite: bool = False) -> Path:
    """Write `tte` as a compact checkpoint folder (see model/checkpoint.py); returns the folder.

    Args:
        dtype: adapter (and merged weight) storage dtype: "fp32", "bf16" or "fp16".
        merge_think: fold the think LoRA into the base; the checkpoint then serves with think="none".
        backbone_spec: how to rebuild the base ("tiny", "smollm2", a local folder), recorded so that
            `load_checkpoint(path)` works without a backbone argument.

    The checkpoint is written to a temporary folder first; an earlier export at `out_dir` is
    replaced. A folder holding files export did not write is refused, or with `overwrite` the
    checkpoint's files are written beside them (they are never deleted). With TTE_CHECKPOINT_KEY
    set, the manifest is also signed (model/checkpoint.py).
    """
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    if merge_think and tte.config.think != "lora":
        raise ValueError("merge_think needs a think adapter, but this model has think='none'")
    out_dir = Path(out_dir)
    check_out(out_dir)
    store = DTYPES[dtype]
    base_ref = backbone_spec or tte.backbone.name
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    written = False   # the temporary folder is whole: what fails after this is _place's own error
    try:
        config = tte.config.to_dict()
        info = {
            "format": FORMAT,
            "backbone": backbone_spec,
            "base_model": tte.backbone.name,
            "base_model_type": tte.stack.model_type,
            "base_dtype": dtype_name(tte.stack.dtype),
            "base_num_layers": tte.num_layers,
            "base_weight_hash": weight_hash(tte.peft_model),
            "invocation_ids": list(tte.invocation_ids),
            "dtype": dtype,
            "think_merged": merge_think,
        }
        if merge_think:
            from safetensors.torch import save_file

            merged = adapters.merged_weights(tte.peft_model, "think")
            stored = {k: v.detach().to("cpu", store).contiguous() for k, v in merged.items()}
            (tmp / "merged").mkdir()
            save_file(stored, str(tmp / MERGED_WEIGHTS), metadata={"format": "pt"})
            info["merged_weight_hash"] = _merged_hash(tte, stored)
            config["think"] = "none"  # the merged base is the reasoner
        else:
            for adapter in tte.think_adapters:
                _write_adapter(tte, adapter, tmp / adapter, store, base_ref)
        # Activated mode on a merged-think base is exactly PEFT's activated LoRA (aLoRA): say so in
        # embed/'s config, and plain PEFT (or an engine that serves aLoRA) reproduces the embedding.
        alora = list(tte.invocation_ids) if merge_think and tte.config.mode == "activated" else None
        _write_adapter(tte, "embed", tmp / "embed", store, base_ref, alora_invocation_tokens=alora)
        info["adapters"] = sorted(p.name for p in tmp.iterdir() if (p / ADAPTER_WEIGHTS).is_file())
        if tte.gate is not None:
            _write_gate(tte, tmp / "gate", store, info, config)
        (tmp / CONFIG_FILE).write_text(json.dumps({**config, **info}, indent=2) + "\n")
        write_manifest(tmp)
        sign_manifest(tmp)
        written = True
        _place(tmp, out_dir, overwrite)
    except (OSError, RuntimeError, SafetensorError) as exc:
        if written or isinstance(exc, TTEError):
            raise
        raise write_failed(exc, tmp, f"{out_dir} was not touched. Free space on that disk (or fix its "
                           "permissions), then export again.") from exc
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def export_run(run_dir: str | Path, out_dir: str | Path, dtype: str = "fp32", merge_think: bool = False,
               backbone: Backbone | str | None = None, overwrite: bool = False) -> Path:
    """Export a training run dir (tte_config.json with "backbone", think/ and embed/ adapters).

    `backbone` overrides the run's recorded spec (a Backbone or a spec string)."""
    _, spec = read_run(run_dir)
    check_out(Path(out_dir))   # before the model loads
    spec_override = backbone if isinstance(backbone, str) else None
    with lock_folder(run_dir, "tte export", read_only=True):   # never a run that is still training
        bb = zoo.load(backbone) if isinstance(backbone, str) else backbone
        tte = UnifiedTTE.from_checkpoint(run_dir, backbone=bb)
        return export_model(tte, out_dir, dtype=dtype, merge_think=merge_think,
                            backbone_spec=spec_override or spec, overwrite=overwrite)


def prepare_base(backbone: Backbone, checkpoint: str | Path) -> Backbone:
    """Make a plain base match a checkpoint for plain PEFT / transformers use, then verify its hash:
    add the invocation tokens exactly as UnifiedTTE does (tokenizer + mean-initialised rows; with a
    tied head they matter for generation too) and, for a merged checkpoint, load the merged weights.

        base = prepare_base(zoo.load("tiny"), "checkpoints/NAME")
        think = PeftModel.from_pretrained(base.model, "checkpoints/NAME/think")
    """
    folder = Path(checkpoint)
    verify_checkpoint(folder)
    info = read_checkpoint_config(folder)
    # The function UnifiedTTE itself calls, so the rows are bit-identical; the hash check below
    # would catch any drift.
    add_invocation_tokens(backbone, info["invocation"])
    check_base(info, weight_hash(backbone.model), backbone.model, folder / CONFIG_FILE)
    if info.get("think_merged"):
        apply_merged(backbone.model, load_safetensors(folder / MERGED_WEIGHTS), folder / MERGED_WEIGHTS)
        check_base(info, weight_hash(backbone.model), backbone.model, folder / CONFIG_FILE, "merged_weight_hash")
    return backbone


# ---------------------------------------------------------------------------------------- CLI
@command("export")
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
    parser.add_argument("--overwrite", action="store_true",
                        help="write into a folder that holds other files too (they are kept, never deleted)")
    args = parser.parse_args(argv)
    out = export_run(args.run_dir, args.out, dtype=args.dtype, merge_think=args.merge_think,
                     backbone=args.backbone, overwrite=args.overwrite)
    manifest = json.loads((out / MANIFEST_FILE).read_text())
    info = json.loads((out / CONFIG_FILE).read_text())
    print(f"wrote {out} ({info['dtype']}, mode={info['mode']}, think_merged={info['think_merged']}, "
          f"base {info['base_model']} sha256 {info['base_weight_hash'][:16]}…)")
    for rel, entry in manifest["files"].items():
        print(f"  {rel:<36} {entry['bytes'] / 1e6:9.2f} MB  {entry['sha256'][:16]}…")
    return 0


if __name__ == "__main__":
    sys.exit(export_main())
