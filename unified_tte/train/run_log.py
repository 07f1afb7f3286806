"""Rank 0's record of a run: metrics.jsonl, a progress bar, and wandb (offline unless configured).

    log = RunLog(recipe, run_dir, dist, initial=0)
    log.log({"step": 1, "stage": "embed", "loss": 2.3, "lr": 1e-4})
"""
from __future__ import annotations

import json
import os
import sys
import warnings
from pathlib import Path

import torch

from ..distributed import Ranks
from .checkpointing import writing
from .recipe import Recipe


def memory_gb(device: torch.device) -> float:
    """Peak memory so far: CUDA's max allocated on GPU, the process's peak RSS on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 30
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20  # Linux reports KiB


class RunLog:
    """Rank 0's outputs: metrics.jsonl, a progress bar and wandb (offline unless configured)."""

    def __init__(self, recipe: Recipe, run_dir: Path, d: Ranks, initial: int, progress=None):
        self.active = d.rank == 0
        self.file = self.bar = self.wandb = None
        self.progress = progress    # a caller's progress line: it gets the steps and the messages
        if not self.active:
            return
        self.file = open(run_dir / "metrics.jsonl", "a", encoding="utf-8")
        if recipe.progress_bar and progress is None:
            from tqdm import tqdm

            # Redrawn at most every 30 s when stderr is a log file, not a terminal.
            self.bar = tqdm(total=recipe.total_steps, initial=initial, desc="train", dynamic_ncols=True,
                            mininterval=0.5 if sys.stderr.isatty() else 30.0)
        self.wandb = _init_wandb(recipe, run_dir)

    def log(self, record: dict) -> None:
        if not self.active:
            return
        with writing(Path(self.file.name)):
            self.file.write(json.dumps(record) + "\n")
            self.file.flush()
        if self.wandb is not None:
            self.wandb.log({f"{record['stage']}/{k}": v for k, v in record.items()
                            if isinstance(v, (int, float)) and k != "step"}, step=record["step"])
        if self.bar is not None:
            self.bar.set_postfix(stage=record["stage"], loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}")

    def advance(self) -> None:
        if self.bar is not None:
            self.bar.update(1)
        if self.progress is not None and self.active:
            self.progress.update(1)

    def message(self, text: str) -> None:
        if not self.active:
            return
        if self.progress is not None:
            self.progress.note = text
            return
        (self.bar.write if self.bar is not None else print)(text)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.file is not None:
            self.file.close()
        if self.wandb is not None:
            self.wandb.finish()


def _init_wandb(recipe: Recipe, run_dir: Path):
    w = recipe.wandb
    mode = w.mode or os.environ.get("WANDB_MODE") or "offline"
    if mode == "disabled":
        return None
    if mode == "online" and not (os.environ.get("WANDB_API_KEY") or _netrc_has("api.wandb.ai")):
        warnings.warn("wandb.mode is online but no wandb credentials are configured (WANDB_API_KEY or "
                      "`wandb login`); logging offline instead. Sync later with `wandb sync`.")
        mode = "offline"
    os.environ["WANDB_MODE"] = mode  # no login prompt in offline mode
    os.environ.setdefault("WANDB_SILENT", "true")
    id_file = run_dir / "wandb_run_id"
    try:
        import secrets

        import wandb

        run_id = id_file.read_text().strip() if id_file.is_file() else secrets.token_hex(4)
        id_file.write_text(run_id)
        return wandb.init(project=w.project, entity=w.entity, name=w.name or run_dir.name,
                          tags=w.tags, dir=str(run_dir), config=recipe.to_dict(), mode=mode,
                          id=run_id, resume="allow")
    except Exception as e:  # noqa: BLE001 - logging must never stop training
        warnings.warn(f"wandb could not start ({type(e).__name__}: {e}); training goes on without it "
                      "(metrics.jsonl still has every step).")
        return None


def truncate_metrics(run_dir: Path, step: int) -> None:
    """Keep the records up to `step` (the steps after the checkpoint run again). A log never
    stops a resume: a line cut by a crash, or any line that is not a record, is dropped with a
    warning; the file is rewritten through a temporary file."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return
    kept, dropped = [], 0
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            keep = int(record["step"]) <= step
        except (json.JSONDecodeError, KeyError, TypeError, ValueError):
            dropped += 1
            continue
        if keep:
            kept.append(line)
    if dropped:
        warnings.warn(f"{path}: dropped {dropped} line(s) that are not metric records (a line cut by "
                      "a crash?); the steps after the checkpoint are logged again.")
    tmp = path.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
    tmp.replace(path)


def set_aside_log(run_dir: Path) -> Path | None:
    """Before a fresh start (no good checkpoint) in a folder an earlier run logged into: move its
    metrics.jsonl to metrics.jsonl.N (the first free N) and forget its wandb run id, so each log
    holds one run. Returns where the old log went (None when there was none)."""
    path = run_dir / "metrics.jsonl"
    (run_dir / "wandb_run_id").unlink(missing_ok=True)
    if not path.is_file() or path.stat().st_size == 0:
        return None
    n = 1
    while path.with_name(f"{path.name}.{n}").exists():
        n += 1
    target = path.with_name(f"{path.name}.{n}")
    path.rename(target)
    return target


def _netrc_has(host: str) -> bool:
    import netrc

    try:
        return netrc.netrc().authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False
