"""The run folder on disk: resume checkpoints (engine state, data position, RNG of every rank),
finished stages' weights, and the run's own config files. Layout: train/loop.py's docstring.

    found = checkpoints(run_dir)                 # [(step, path)], complete ones, oldest first
"""
from __future__ import annotations

import contextlib
import json
import shutil
from pathlib import Path

from ..errors import TrainError, TTEError, write_failed
from ..model import adapters
from ..distributed import Ranks, barrier
from .engine import gathered
from .recipe import Recipe, dump_yaml
from .rng import rng_state


STATE_FILE = "trainer_state.json"
PENDING_FILE = "trainer_state.pending.json"


def checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    """Good checkpoints (trainer_state.json written last, after the weights were checked),
    oldest first. A checkpoint that is still pending or was cut by a crash is not listed."""
    root = run_dir / "checkpoints"
    found = []
    for p in root.glob("step_*") if root.is_dir() else []:
        if (p / STATE_FILE).is_file() and p.name[5:].isdigit():
            found.append((int(p.name[5:]), p))
    return sorted(found)


def discard_unfinished(run_dir: Path) -> None:
    """Delete checkpoint folders that never became good (pending, or cut by a crash or a full
    disk). Called by the lock's holder before it trains: whatever wrote them is gone, --resume
    never reads them, and a later save of the same step must not land among their files."""
    good = {p for _, p in checkpoints(run_dir)}
    root = run_dir / "checkpoints"
    for p in sorted(root.glob("step_*")) if root.is_dir() else []:
        if p.is_dir() and p not in good:
            shutil.rmtree(p, ignore_errors=True)


@contextlib.contextmanager
def writing(path: Path):
    """Turn a failed write under the run folder (a full disk: torch's "iostream error" or
    "unexpected pos", safetensors' SafetensorError, OSError) into one RunError naming `path`."""
    from safetensors import SafetensorError

    try:
        yield
    except TTEError:
        raise
    except (OSError, RuntimeError, SafetensorError) as exc:
        raise write_failed(exc, path, "the run stopped. Free space on that disk (or fix its permissions), "
                           "then resume with --resume from the newest good checkpoint.") from exc


def save_checkpoint(engine, run_dir: Path, state: dict, d: Ranks) -> Path:
    """Write the engine state, data position and every rank's RNG as a *pending* checkpoint:
    `promote` makes it one that --resume uses, once the weights it holds are known to be good."""
    import torch.distributed as dist

    tag = f"step_{state['step']}"
    path = run_dir / "checkpoints" / tag
    with writing(path):
        engine.save_checkpoint(str(run_dir / "checkpoints"), tag=tag, save_latest=False,
                               exclude_frozen_parameters=True)
    rngs = [None] * d.world
    dist.all_gather_object(rngs, rng_state())
    if d.rank == 0:
        tmp = path / (PENDING_FILE + ".tmp")
        with writing(tmp):
            tmp.write_text(json.dumps({**state, "rng": {str(r): s for r, s in enumerate(rngs)}}))
        tmp.replace(path / PENDING_FILE)
    barrier(d)
    return path


def promote(path: Path, run_dir: Path, keep: int | None, d: Ranks) -> Path:
    """Mark a pending checkpoint good (the rename is atomic) and drop the oldest beyond `keep`."""
    if d.rank == 0:
        (path / PENDING_FILE).replace(path / STATE_FILE)
        if keep is not None:
            for _, old in checkpoints(run_dir)[:-keep]:
                shutil.rmtree(old, ignore_errors=True)
    barrier(d)
    return path


def discard(path: Path | None, d: Ranks) -> None:
    """Delete a pending checkpoint whose weights turned out bad (never a promoted one)."""
    if path is not None and d.rank == 0 and not (path / STATE_FILE).exists():
        shutil.rmtree(path, ignore_errors=True)


def save_stage(tte, run_dir: Path, stage: str, full: bool, d: Ranks) -> None:
    """RUN_DIR/<stage>/: the PEFT adapter folder, or model.safetensors for full fine-tuning."""
    trained = [p for p in tte.peft_model.parameters() if p.requires_grad]
    with gathered(trained):
        if d.rank == 0:
            out = run_dir / stage
            with writing(out):
                out.mkdir(parents=True, exist_ok=True)
                if full:
                    from safetensors.torch import save_file

                    state = {n: p.detach().cpu().contiguous().clone()
                             for n, p in tte.peft_model.named_parameters() if p.requires_grad}
                    save_file(state, str(out / "model.safetensors"))
                else:
                    adapters.save_adapter(tte.peft_model, stage, out)
    barrier(d)


def write_recipe(recipe: Recipe, run_dir: Path) -> None:
    """RUN_DIR/recipe.yaml, replaced whole (a crash leaves the old one or the new one)."""
    tmp = run_dir / "recipe.yaml.tmp"
    with writing(tmp):
        tmp.write_text(dump_yaml(recipe))
    tmp.replace(run_dir / "recipe.yaml")


def write_run_files(recipe: Recipe, tte, run_dir: Path) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    write_recipe(recipe, run_dir)
    config = {**tte.config.to_dict(), "backbone": recipe.backbone, "backbone_name": tte.backbone.name}
    with writing(run_dir / "tte_config.json"):
        (run_dir / "tte_config.json").write_text(json.dumps(config, indent=2) + "\n")


def load_stage_weights(tte, folder: Path, stage: str, full: bool = False) -> None:
    """Load a finished stage's weights (a PEFT adapter folder, or model.safetensors of full FT)."""
    from safetensors.torch import load_file

    if full:
        state = load_file(str(folder / "model.safetensors"))
        result = tte.peft_model.load_state_dict(state, strict=False)
        if result.unexpected_keys:
            raise TrainError(f"{folder}/model.safetensors has weights this model lacks: "
                             f"{result.unexpected_keys[:3]}")
        return
    path = folder / "adapter_model.safetensors"
    if not path.is_file():
        raise TrainError(f"{path} not found: the {stage} adapter of an earlier stage or run is needed.")
    unexpected = adapters.load_adapter_state(tte.peft_model, stage, load_file(str(path)))
    if unexpected:
        raise TrainError(f"{path} does not fit this model ({len(unexpected)} unexpected weights, "
                         f"first {unexpected[0]}); was it trained with another backbone or LoRA rank?")
