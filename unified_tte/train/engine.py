"""The DeepSpeed engine of a stage: what it wraps, what it trains, its batch shape and schedule,
and the process group it runs in. The only module that reaches into DeepSpeed (and into the
model's module tree for ZeRO-3).

    d = init_distributed()      # Ranks(rank, world, local_rank), a DeepSpeed group joined
    engine = make_engine(recipe, "embed", tte, ds_json, world=d.world, bf16=False)
    loss = engine("embed", inputs, traces, prompts); engine.backward(loss); engine.step()
"""
from __future__ import annotations

import logging
import math
import os
import warnings
from contextlib import contextmanager

import torch
from torch import nn

from .. import console
from ..distributed import Ranks, init_ranks
from ..errors import MissingExtra, RunError, TrainError
from ..model import adapters
from .recipe import Recipe, StageConfig, deepspeed_config


def setup_environment() -> None:
    """Before DeepSpeed is imported: pick its CPU accelerator where there is no GPU (every command
    already did, console.quiet_third_party; this is for the library used without the CLI)."""
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # Deprecation notices DeepSpeed triggers inside torch / transformers on every step.
    for pattern in (r"`torch\.distributed\.\w+` is deprecated", r"`is_gradient_checkpointing` is deprecated"):
        warnings.filterwarnings("ignore", message=pattern, category=FutureWarning)


def require_deepspeed() -> None:
    """Fail fast, before any data or model work, when the [train] extra is not installed."""
    import importlib.util

    if importlib.util.find_spec("deepspeed") is None:
        raise MissingExtra("train", "deepspeed", "training (tte train)")


def import_deepspeed():
    setup_environment()
    try:
        import deepspeed
    except ImportError as e:
        raise MissingExtra("train", "deepspeed", "training (tte train)") from e
    except Exception as e:  # noqa: BLE001 - a broken install: its own error, with advice
        raise RunError(f"DeepSpeed failed to import ({type(e).__name__}: {e}). Reinstall it with "
                       "`pip install 'unified_tte[train]'`; on a machine without a GPU set "
                       "DS_ACCELERATOR=cpu.") from e
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    return deepspeed


def init_distributed() -> Ranks:
    """Join the process group the launcher set up (torchrun / deepspeed set RANK, WORLD_SIZE, ...)
    through DeepSpeed, or a one-process group when launched plainly (distributed.init_ranks)."""
    deepspeed = import_deepspeed()
    import torch.distributed as dist

    def join(backend: str) -> None:
        if not dist.is_initialized() or not deepspeed.comm.is_initialized():
            with console.quiet_stdout():   # it prints "DeepSpeed ... built successfully" per op it loads
                deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False, verbose=False)

    return init_ranks(join=join, alone_too=True)


def select_trainable(tte, recipe: Recipe, stage: str) -> list[nn.Parameter]:
    """Exactly what the stage trains, and train mode only where it matters (its LoRA dropout)."""
    tte.eval()  # frozen parts stay deterministic: the frozen think adapter's dropout is off in embed
    if stage == "think" and recipe.think.method == "full":
        tte.set_trainable(None)
        params = []
        for name, p in tte.peft_model.named_parameters():
            if "lora_" in name or (recipe.think.freeze_vision and ".visual." in name):
                continue
            p.requires_grad_(True)
            params.append(p)
        return params
    adapters.dropout_train_mode(tte.peft_model, stage)
    return tte.set_trainable(stage)


class StageModule(nn.Module):
    """What the engine wraps: one forward entry point, so DeepSpeed (ZeRO-3 in particular) sees
    every pass through the model.

    kinds: "sft" -> think loss; "embed" -> `embed_with_grad`; and its two halves, which GradCache
    uses to run the prefix once: "prefix" -> the state after query + trace (KV cache; top_k's
    residuals), computed without grad under the frozen think adapter, and "from_state" ->
    `embed_from_state`, the embed step that serving runs on the decode's cache."""

    def __init__(self, tte):
        super().__init__()
        self.tte = tte

    def forward(self, kind: str, inputs=None, traces=None, prompts=None, state=None):
        tte = self.tte
        if kind == "sft":
            return tte.sft_loss(inputs, traces, prompts=prompts)
        if kind == "embed":
            return tte.embed_with_grad(inputs, traces, prompts=prompts)
        if kind == "prefix":
            return tte.prefix_state(inputs, traces, prompts)
        if kind == "from_state":
            return tte.embed_from_state(state)
        raise ValueError(f"unknown StageModule kind {kind!r}")


def lr_lambda(warmup: int, total: int, min_ratio: float):
    """Multiplier of step s (0-based): linear warmup to 1 over `warmup` steps, then cosine to
    `min_ratio` (reached after the last step)."""
    def f(s: int) -> float:
        if s < warmup:
            return (s + 1) / warmup
        progress = min(1.0, (s - warmup) / max(1, total - warmup))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    return f


def stage_shape(recipe: Recipe, stage: str, world: int) -> tuple[int, int, int]:
    """(rows per rank per step, rows per forward, forwards accumulated per step)."""
    spec = recipe.stage(stage)
    if spec.batch_size % world:
        raise TrainError(f"{stage}.batch_size={spec.batch_size} does not split over {world} ranks; "
                         f"use a multiple of {world}.")
    local = spec.batch_size // world
    if stage == "think":
        micro = recipe.think.micro_batch_size
        if local % micro:
            raise TrainError(f"think.batch_size={spec.batch_size} over {world} rank(s) is {local} rows "
                             f"per rank, not a multiple of think.micro_batch_size={micro}.")
        return local, micro, local // micro
    chunk = recipe.embed.gradcache_chunk
    if chunk is None:
        return local, local, 1
    return local, min(chunk, local), math.ceil(local / min(chunk, local))


def make_engine(recipe: Recipe, stage: str, tte, ds_json: dict, world: int, bf16: bool,
                total_steps: int | None = None):
    """A DeepSpeed engine over the stage's trainable parameters, with the recipe's schedule."""
    deepspeed = import_deepspeed()
    spec: StageConfig = recipe.stage(stage)
    params = select_trainable(tte, recipe, stage)
    if not params:
        raise TrainError(f"stage {stage} has no trainable parameters.")
    _, micro, accumulation = stage_shape(recipe, stage, world)
    cfg = deepspeed_config(ds_json, spec, micro, accumulation, world, bf16)
    fn = lr_lambda(spec.warmup_steps, total_steps or spec.steps, spec.min_lr_ratio)
    if cfg.get("zero_optimization", {}).get("stage", 0) == 3:
        keep_vision_out_of_zero3(tte)
    engine, *_ = deepspeed.initialize(
        model=StageModule(tte), model_parameters=params, config=cfg,
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, fn))
    return engine


def keep_vision_out_of_zero3(tte) -> None:
    """ZeRO-3 gathers a module's weights with collectives when the module runs, so every rank must
    run the same modules. The vision tower runs only where a batch has images, which differs
    across ranks and would hang them; a frozen tower is therefore kept whole on every rank,
    outside the engine (it is not trained and never saved by a stage)."""
    outer = tte.stack.outer
    visual = outer._modules.get("visual") if tte.stack.is_vl else None
    if visual is None:
        return
    if any(p.requires_grad for p in visual.parameters()):
        raise TrainError("ZeRO-3 with a trainable vision tower needs images on every rank in every "
                         "micro-batch; keep think.freeze_vision: true, or use ZeRO-2.")
    del outer._modules["visual"]
    object.__setattr__(outer, "visual", visual)  # still reachable as outer.visual, not a submodule
    if torch.cuda.is_available():
        visual.to(torch.device("cuda", torch.cuda.current_device()))


@contextmanager
def gathered(params):
    """Full parameters for the duration (ZeRO-3 partitions them); a no-op otherwise."""
    deepspeed = import_deepspeed()
    with deepspeed.zero.GatheredParameters(list(params), modifier_rank=None):
        yield


def update_is_finite(engine) -> bool:
    """This rank's view after an optimizer step: a finite global gradient norm and finite
    trainable weights (ZeRO-3: the rank's own partition of each)."""
    norm = engine.get_global_grad_norm()
    if norm is not None and not math.isfinite(float(norm)):
        return False
    for p in engine.module.parameters():
        if p.requires_grad:
            local = getattr(p, "ds_tensor", p)   # ZeRO-3 keeps only a partition on each rank
            if local.numel() and not bool(torch.isfinite(local).all()):
                return False
    return True
