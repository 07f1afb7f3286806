"""Training: `tte train RECIPE.yaml [key=value ...] [--resume]` — the `think` SFT stage and the
`embed` contrastive stage on a DeepSpeed ZeRO engine (stage 0-3 from the recipe's JSON), in one
process or many (torchrun or the deepspeed launcher; gloo on CPU, NCCL on GPU).

    tte train recipes/tiny_cpu.yaml                                      # one process
    DS_ACCELERATOR=cpu torchrun --nproc_per_node 2 -m unified_tte.cli train recipes/tiny_cpu.yaml
    deepspeed --num_gpus 8 --module unified_tte.train recipes/qwen2vl_2b.yaml  # DeepSpeed's launcher
    tte train recipes/tiny_cpu.yaml embed.steps=50 --resume               # continue from the newest checkpoint

Stages run in the recipe's order, each on a fresh model and engine (earlier stages' weights
are read back from the run folder, which is also how `--resume` restores them):

* think: mean cross-entropy on the trace tokens and the closing end-of-turn token only
  (`UnifiedTTE.sft_loss`); the `think` LoRA, or the whole language model (`think.method: full`,
  vision tower frozen by default). Micro-batches are accumulated into the global batch.
* embed: InfoNCE (`tte_kernels.info_nce`, temperature 0.02 by default) of query (+ trace)
  embeddings against positives and optional hard negatives, with `think` and the base frozen,
  through `UnifiedTTE.embed_with_grad` — the function `embed` serves, so what is trained is
  what is served (activated or top_k). Targets are gathered from every rank with gradient
  (losses.py). GradCache (`embed.gradcache_chunk`): embeddings of the whole batch without grad,
  chunk by chunk; the loss and its gradient w.r.t. the embeddings; then each chunk re-run with
  grad and backpropagated with those cached gradients. Its plain twin (`gradcache_chunk: null`)
  is one forward with grad; tests hold their gradients equal.

Every optimizer step: warmup + cosine learning rate, gradient clipping, bf16 on GPU and fp32 on
CPU, a non-finite loss check before the update (the run stops with a message and the last good
checkpoint stays), logging to wandb (offline unless configured), metrics.jsonl and a progress bar
on rank 0.

Run folder (RUN_DIR = the recipe's run_dir):

    recipe.yaml               the resolved recipe: overrides applied, absolute paths
    tte_config.json           TTEConfig.to_dict() + "backbone" (the recipe's spec: tiny | smollm2 |
                              a folder) + "backbone_name"
    metrics.jsonl             one JSON object per logged step (rank 0)
    checkpoints/step_N/       DeepSpeed engine state (trainable weights, optimizer, LR scheduler)
                              + trainer_state.json {step, stage, stage_step, samples, rng: {rank: ..}};
                              N counts optimizer steps over all stages, think first; a checkpoint
                              is complete once trainer_state.json exists
    think/                    PEFT adapter folder: adapter_config.json, adapter_model.safetensors
                              (think.method full: model.safetensors, the trained language model
                              weights under their PEFT-wrapped names)
    embed/                    PEFT adapter folder
    wandb/                    the wandb run (offline: `wandb sync RUN_DIR/wandb/offline-run-*`)
"""
from __future__ import annotations

import argparse
import base64
import functools
import gc
import json
import logging
import math
import os
import random
import socket
import sys
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .recipe import (BUILTIN_BACKBONES, Recipe, RecipeError, StageConfig, check_inputs,
                     deepspeed_config, dump_yaml, load_recipe)


class TrainError(RuntimeError):
    """The run cannot go on; the message says why and what to do."""


class NonFiniteLoss(TrainError):
    pass


# ----------------------------------------------------------------------------- processes

@dataclass
class Dist:
    rank: int
    world: int
    local_rank: int
    device: torch.device


def setup_environment() -> None:
    """Before DeepSpeed is imported: pick its CPU accelerator where there is no GPU."""
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # Deprecation notices DeepSpeed triggers inside torch / transformers on every step.
    for pattern in (r"`torch\.distributed\.\w+` is deprecated", r"`is_gradient_checkpointing` is deprecated"):
        warnings.filterwarnings("ignore", message=pattern, category=FutureWarning)


def import_deepspeed():
    setup_environment()
    try:
        import deepspeed
    except Exception as e:  # noqa: BLE001 - any import failure gets the same advice
        raise TrainError(f"DeepSpeed failed to import ({type(e).__name__}: {e}). Install it with "
                         "`pip install deepspeed`; on a machine without a GPU set "
                         "DS_ACCELERATOR=cpu.") from e
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    return deepspeed


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed() -> Dist:
    """Join the process group the launcher set up (torchrun / deepspeed set RANK, WORLD_SIZE, ...),
    or make a one-process group when launched plainly."""
    deepspeed = import_deepspeed()
    import torch.distributed as dist

    if "RANK" not in os.environ:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=os.environ.get("MASTER_PORT") or str(_free_port()))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo", auto_mpi_discovery=False,
                                   verbose=False)
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    return Dist(dist.get_rank(), dist.get_world_size(), local_rank, device)


def _all_reduce(values: list[float]) -> list[float]:
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64)
    if dist.is_initialized() and dist.get_world_size() > 1:
        if dist.get_backend() == "nccl":
            t = t.cuda()
        dist.all_reduce(t)
    return t.cpu().tolist()


def _barrier() -> None:
    import torch.distributed as dist

    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


# ----------------------------------------------------------------------------- RNG

def rng_state() -> dict:
    state = {"torch": base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode(),
             "python": _jsonable(random.getstate()), "numpy": _jsonable(np.random.get_state())}
    if torch.cuda.is_available():
        state["cuda"] = base64.b64encode(torch.cuda.get_rng_state().numpy().tobytes()).decode()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(torch.frombuffer(bytearray(base64.b64decode(state["torch"])), dtype=torch.uint8))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(torch.frombuffer(bytearray(base64.b64decode(state["cuda"])), dtype=torch.uint8))


def _jsonable(obj):
    if isinstance(obj, (tuple, list)):
        return [_jsonable(x) for x in obj]
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    return obj


def _torch_rng() -> tuple:
    return (torch.get_rng_state(), torch.cuda.get_rng_state() if torch.cuda.is_available() else None)


def _set_torch_rng(state: tuple) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)


# ----------------------------------------------------------------------------- data

def load_rows(recipe: Recipe) -> list:
    """Every train row of the recipe (with `.trace` where one is known), before any model work."""
    from .data import attach_traces, load_traces, load_train_rows

    data = recipe.data
    if data.train == "digits":
        from .digits import build_digits

        d = data.digits
        rows = build_digits(seed=d.seed, image_size=d.image_size, test_fraction=d.test_fraction,
                            max_train_per_task=d.max_train_per_task).train_rows
    else:
        rows = []
        for f in data.train:
            loaded = load_train_rows(f, image_root=data.image_root, skip_bad=data.skip_bad)
            for reason in loaded.skipped[:5]:
                warnings.warn(f"skipped: {reason}")
            if len(loaded.skipped) > 5:
                warnings.warn(f"... and {len(loaded.skipped) - 5} more skipped rows in {f}")
            rows.extend(loaded)
        traces: dict[str, str] = {}
        for f in data.traces:
            for k, v in load_traces(f, valid_only=True).items():
                traces.setdefault(k, v)
        if traces:
            rows = attach_traces(rows, traces, missing="keep")
    if data.max_rows is not None:
        rows = rows[:data.max_rows]
    if not rows:
        raise TrainError("the recipe's data has no rows.")
    return list(rows)


def stage_rows(recipe: Recipe, stage: str, rows: list) -> list:
    """The rows a stage trains on; a stage that cannot use the data fails here, before any work."""
    if stage == "think":
        usable = [r for r in rows if r.trace]
        if not usable:
            raise TrainError("stage think needs ECR traces and no row has one: write them with "
                             "`tte traces` and list the files in data.traces.")
        return usable
    e = recipe.embed
    if e.use_traces:
        missing = [r.id for r in rows if not r.trace]
        if missing and e.missing_traces == "drop" and len(missing) < len(rows):
            warnings.warn(f"embed: {len(missing)} of {len(rows)} rows have no trace and are left out "
                          f"(first: {missing[:3]}).")
            rows = [r for r in rows if r.trace]
        elif missing:
            raise TrainError(f"embed.use_traces is true but {len(missing)} of {len(rows)} rows have no "
                             f"trace (first: {missing[:3]}); add trace files to data.traces, set "
                             "embed.missing_traces=drop, or embed.use_traces=false.")
    if e.hard_negatives:
        missing = [r.id for r in rows if r.neg is None]
        if missing:
            raise TrainError(f"embed.hard_negatives is true but {len(missing)} of {len(rows)} rows have "
                             f"no neg_text / neg_image_path (first: {missing[:3]}); set "
                             "embed.hard_negatives=false or add negatives.")
    return rows


@functools.lru_cache(maxsize=4)
def _permutation(n: int, seed: int, stage_index: int, epoch: int) -> np.ndarray:
    return np.random.default_rng([seed, stage_index, epoch]).permutation(n)


def batch_indices(n: int, batch: int, seed: int, stage_index: int, step: int) -> list[int]:
    """Rows of global batch `step` (0-based) of a stage: a fresh seeded permutation each epoch,
    the tail that does not fill a batch dropped. Depends on its arguments only, so the data
    position of a run is its step."""
    per_epoch = n // batch
    epoch, k = divmod(step, per_epoch)
    return _permutation(n, seed, stage_index, epoch)[k * batch:(k + 1) * batch].tolist()


def encode_prompts(tte, inputs, traces=None) -> tuple[list, int]:
    """Encode once per step (images processed once, also for GradCache's second pass), with the
    room reserved after each prompt that `embed_with_grad` / `sft_loss` reserve themselves.
    Returns the prompts and the tokens the step will run (prompt + trace + EOS + invocation)."""
    # One batched encode (errors name the item's index in the batch), the model's own tails.
    reserves = [len(t) + len(tte.invocation_ids) for t in tte._tails(len(inputs), traces)]
    prompts = tte.encoder.encode(inputs, reserve=reserves)
    return prompts, sum(len(p.ids) + r for p, r in zip(prompts, reserves))


# ----------------------------------------------------------------------------- model

def load_backbone(spec: str, dtype: torch.dtype):
    from . import backbones

    if spec in BUILTIN_BACKBONES:
        bb = backbones.load_reasoner(spec)
        bb.model.to(dtype)
        return bb
    return backbones.load(spec, dtype=dtype)


def build_model(recipe: Recipe, dtype: torch.dtype):
    from .model import TTEConfig, UnifiedTTE

    # A copy: UnifiedTTE fills in defaults (embed_layers) on the config it is given.
    return UnifiedTTE(load_backbone(recipe.backbone, dtype), TTEConfig(**recipe.model.to_dict()))


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
    from peft import set_peft_model_state_dict

    path = folder / "adapter_model.safetensors"
    if not path.is_file():
        raise TrainError(f"{path} not found: the {stage} adapter of an earlier stage or run is needed.")
    result = set_peft_model_state_dict(tte.peft_model, load_file(str(path)), adapter_name=stage)
    unexpected = getattr(result, "unexpected_keys", [])
    if unexpected:
        raise TrainError(f"{path} does not fit this model ({len(unexpected)} unexpected weights, "
                         f"first {unexpected[0]}); was it trained with another backbone or LoRA rank?")


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
    for name, module in tte.peft_model.named_modules():
        if name.endswith(f"lora_dropout.{stage}"):
            module.train()
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
        _keep_vision_out_of_zero3(tte)
    engine, *_ = deepspeed.initialize(
        model=StageModule(tte), model_parameters=params, config=cfg,
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, fn))
    return engine


def _keep_vision_out_of_zero3(tte) -> None:
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
    import deepspeed

    with deepspeed.zero.GatheredParameters(list(params), modifier_rank=None):
        yield


# ----------------------------------------------------------------------------- the two steps

def think_backward(engine, rows: list, micro: int) -> tuple[float, int, bool]:
    """Backward of one think step over this rank's rows, micro-batch by micro-batch.
    Calls engine.step() after every micro-batch but the last: the caller checks the loss and
    takes the optimizer step. Returns (mean loss, tokens, finite)."""
    tte = engine.module.tte
    losses, tokens, finite = [], 0, True
    chunks = [rows[i:i + micro] for i in range(0, len(rows), micro)]
    for k, chunk in enumerate(chunks):
        inputs, traces = [r.qry for r in chunk], [r.trace for r in chunk]
        prompts, n = encode_prompts(tte, inputs, traces)
        tokens += n - len(chunk) * len(tte.invocation_ids)  # sft runs no invocation
        loss = engine("sft", inputs, traces, prompts)
        finite &= bool(torch.isfinite(loss.detach()))
        engine.backward(loss)
        losses.append(float(loss.detach()))
        if k < len(chunks) - 1:
            engine.step()
    return sum(losses) / len(losses), tokens, finite


def embed_backward(engine, rows: list, chunk: int | None, temperature: float, use_traces: bool = True,
                   hard_negatives: bool = True, gather: bool = True,
                   keep_prefix: bool = True) -> tuple[float, int, bool]:
    """Backward of one embed step over this rank's rows (GradCache when `chunk` is set).
    Like think_backward, the last engine.step() is the caller's. Returns (loss, tokens, finite).

    GradCache with `keep_prefix`: the pass without grad keeps each chunk's prefix state, so the
    pass with grad runs only the embed step (activated: the invocation tokens; top_k: the top K
    layers). Without it the pass with grad recomputes the prefix (less memory: one chunk's KV
    cache at a time instead of the whole batch's)."""
    import copy

    from .losses import contrastive_loss

    tte = engine.module.tte
    B = len(rows)
    q_in = [r.qry for r in rows]
    traces = [r.trace for r in rows] if use_traces else None
    t_in = [r.pos for r in rows] + ([r.neg for r in rows] if hard_negatives else [])
    q_prompts, q_tokens = encode_prompts(tte, q_in, traces)
    t_prompts, t_tokens = encode_prompts(tte, t_in)
    tokens = q_tokens + t_tokens

    def groups(a: int, b: int):
        """Rows [a, b) as two forwards: queries (with traces), then positives + hard negatives."""
        idx = list(range(a, b)) + ([B + i for i in range(a, b)] if hard_negatives else [])
        return [(q_in[a:b], traces[a:b] if traces else None, q_prompts[a:b]),
                ([t_in[i] for i in idx], None, [t_prompts[i] for i in idx])]

    def split(q, t, n_rows):
        return q, t[:n_rows], (t[n_rows:] if hard_negatives else None)

    if chunk is None:  # the plain twin: one forward with grad over the whole batch
        q, t = (engine("embed", *g) for g in groups(0, B))
        q, p, n = split(q, t, B)
        loss = contrastive_loss(q, p, n, temperature, gather)
        finite = bool(torch.isfinite(loss.detach()))
        engine.backward(loss, scale_wrt_gas=False)
        return float(loss.detach()), tokens, finite

    bounds = [(a, min(a + chunk, B)) for a in range(0, B, chunk)]
    if len(bounds) != engine.gradient_accumulation_steps():
        raise TrainError(f"{B} rows in chunks of {chunk} are {len(bounds)} backward passes, but the "
                         f"engine accumulates {engine.gradient_accumulation_steps()}; build it for this "
                         "batch (make_engine with the same batch_size and gradcache_chunk).")
    # 1. embeddings without grad, chunk by chunk. The RNG state before each embed step is kept,
    #    so its re-run draws the same dropout masks and reproduces these embeddings exactly.
    kept, parts = [], []
    with torch.no_grad():
        for a, b in bounds:
            out, keep = [], []
            for g in groups(a, b):
                state = engine("prefix", *g)
                rng = _torch_rng()
                out.append(engine("from_state", state=copy.deepcopy(state) if keep_prefix else state))
                keep.append((rng, state if keep_prefix else g))
            parts.append(split(*out, b - a))
            kept.append(keep)
    after = _torch_rng()
    q = torch.cat([x[0] for x in parts]).requires_grad_()
    p = torch.cat([x[1] for x in parts]).requires_grad_()
    n = torch.cat([x[2] for x in parts]).requires_grad_() if hard_negatives else None
    del parts
    # 2. the loss over the whole batch (all ranks' targets) and its gradient w.r.t. embeddings
    loss = contrastive_loss(q, p, n, temperature, gather)
    finite = bool(torch.isfinite(loss.detach()))
    loss.backward()
    # 3. each chunk's embed step again, with grad; backprop the cached embedding gradients
    for k, (a, b) in enumerate(bounds):
        out = []
        for rng, saved in kept[k]:
            state = saved if keep_prefix else engine("prefix", *saved)
            _set_torch_rng(rng)
            out.append(engine("from_state", state=state))
        kept[k] = None  # this chunk's KV cache can go
        qk, pk, nk = split(*out, b - a)
        surrogate = (qk * q.grad[a:b]).sum() + (pk * p.grad[a:b]).sum()
        if nk is not None:
            surrogate = surrogate + (nk * n.grad[a:b]).sum()
        engine.backward(surrogate, scale_wrt_gas=False)
        if k < len(bounds) - 1:
            engine.step()
    _set_torch_rng(after)
    return float(loss.detach()), tokens, finite


# ----------------------------------------------------------------------------- run folder

def checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints (trainer_state.json written last), oldest first."""
    root = run_dir / "checkpoints"
    found = []
    for p in root.glob("step_*") if root.is_dir() else []:
        if (p / "trainer_state.json").is_file() and p.name[5:].isdigit():
            found.append((int(p.name[5:]), p))
    return sorted(found)


def save_checkpoint(engine, run_dir: Path, state: dict, keep: int | None, d: Dist) -> Path:
    import shutil

    import torch.distributed as dist

    tag = f"step_{state['step']}"
    engine.save_checkpoint(str(run_dir / "checkpoints"), tag=tag, save_latest=False,
                           exclude_frozen_parameters=True)
    rngs = [None] * d.world
    dist.all_gather_object(rngs, rng_state())
    path = run_dir / "checkpoints" / tag
    if d.rank == 0:
        tmp = path / "trainer_state.json.tmp"
        tmp.write_text(json.dumps({**state, "rng": {str(r): s for r, s in enumerate(rngs)}}))
        tmp.replace(path / "trainer_state.json")
        if keep is not None:
            for _, old in checkpoints(run_dir)[:-keep]:
                shutil.rmtree(old, ignore_errors=True)
    _barrier()
    return path


def save_stage(tte, run_dir: Path, stage: str, full: bool, d: Dist) -> None:
    """RUN_DIR/<stage>/: the PEFT adapter folder, or model.safetensors for full fine-tuning."""
    trained = [p for p in tte.peft_model.parameters() if p.requires_grad]
    with gathered(trained):
        if d.rank == 0:
            out = run_dir / stage
            out.mkdir(parents=True, exist_ok=True)
            if full:
                from safetensors.torch import save_file

                state = {n: p.detach().cpu().contiguous().clone()
                         for n, p in tte.peft_model.named_parameters() if p.requires_grad}
                save_file(state, str(out / "model.safetensors"))
            else:
                import shutil
                import tempfile

                # PEFT writes a non-default adapter to <dir>/<name>/ (plus a model card in <dir>).
                with tempfile.TemporaryDirectory(dir=run_dir) as tmp:
                    tte.peft_model.save_pretrained(tmp, selected_adapters=[stage], save_embedding_layers=False)
                    shutil.rmtree(out)
                    shutil.move(str(Path(tmp) / stage), str(out))
    _barrier()


def write_run_files(recipe: Recipe, tte, run_dir: Path) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "recipe.yaml").write_text(dump_yaml(recipe))
    config = {**tte.config.to_dict(), "backbone": recipe.backbone, "backbone_name": tte.backbone.name}
    (run_dir / "tte_config.json").write_text(json.dumps(config, indent=2) + "\n")


def absolute_paths(recipe: Recipe) -> Recipe:
    """The recipe with its relative paths made absolute (the resolved recipe.yaml and resume
    then work from any folder)."""
    import copy

    r = copy.deepcopy(recipe)
    absolute = lambda p: str(Path(p).expanduser().resolve())  # noqa: E731
    r.run_dir = absolute(r.run_dir)
    r.deepspeed = absolute(r.deepspeed)
    if r.backbone not in BUILTIN_BACKBONES:
        r.backbone = absolute(r.backbone)
    if r.data.train != "digits":
        r.data.train = [absolute(f) for f in r.data.train]
    r.data.traces = [absolute(f) for f in r.data.traces]
    if r.data.image_root is not None:
        r.data.image_root = absolute(r.data.image_root)
    if r.think_adapter is not None:
        r.think_adapter = absolute(r.think_adapter)
    return r


# ----------------------------------------------------------------------------- logging

def memory_gb(device: torch.device) -> float:
    """Peak memory so far: CUDA's max allocated on GPU, the process's peak RSS on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 30
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20  # Linux reports KiB


class RunLog:
    """Rank 0's outputs: metrics.jsonl, a progress bar and wandb (offline unless configured)."""

    def __init__(self, recipe: Recipe, run_dir: Path, d: Dist, initial: int):
        self.active = d.rank == 0
        self.file = self.bar = self.wandb = None
        if not self.active:
            return
        self.file = open(run_dir / "metrics.jsonl", "a", encoding="utf-8")
        if recipe.progress_bar:
            from tqdm import tqdm

            # Redrawn at most every 30 s when stderr is a log file, not a terminal.
            self.bar = tqdm(total=recipe.total_steps, initial=initial, desc="train", dynamic_ncols=True,
                            mininterval=0.5 if sys.stderr.isatty() else 30.0)
        self.wandb = _init_wandb(recipe, run_dir)

    def log(self, record: dict) -> None:
        if not self.active:
            return
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

    def message(self, text: str) -> None:
        if not self.active:
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


def _truncate_metrics(run_dir: Path, step: int) -> None:
    path = run_dir / "metrics.jsonl"
    if path.is_file():
        kept = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= step]
        path.write_text("".join(line + "\n" for line in kept))


def _netrc_has(host: str) -> bool:
    import netrc

    try:
        return netrc.netrc().authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


# ----------------------------------------------------------------------------- the run

def train(recipe: Recipe, resume: bool = False) -> dict:
    """Run the recipe's stages. Returns {"run_dir", "losses": {stage: [(step, loss), ...]},
    "stopped": True if stop_after ended the run early}."""
    recipe = absolute_paths(recipe)
    ds_json = check_inputs(recipe)
    rows = load_rows(recipe)
    per_stage = {s: stage_rows(recipe, s, rows) for s in recipe.stages}
    d = init_distributed()
    for s in recipe.stages:
        stage_shape(recipe, s, d.world)  # batch shapes that do not split fail here
        if len(per_stage[s]) < recipe.stage(s).batch_size:
            raise TrainError(f"{s}.batch_size={recipe.stage(s).batch_size} is more than the "
                             f"{len(per_stage[s])} rows the stage can use.")
    run_dir = Path(recipe.run_dir)
    found = checkpoints(run_dir)
    if found and not resume:
        raise TrainError(f"{run_dir} already holds checkpoints (newest {found[-1][1].name}); pass "
                         "--resume to continue that run, or set another run_dir.")
    state = None
    if resume and found:
        state = json.loads((found[-1][1] / "trainer_state.json").read_text())
    bf16 = recipe.precision == "bf16" or (recipe.precision == "auto" and d.device.type == "cuda")
    dtype = torch.bfloat16 if bf16 else torch.float32

    seed_everything(recipe.seed)
    run_dir.mkdir(parents=True, exist_ok=True)
    if state and d.rank == 0:
        _truncate_metrics(run_dir, state["step"])  # steps after the checkpoint run again
    log = RunLog(recipe, run_dir, d, initial=state["step"] if state else 0)
    if state:
        log.message(f"resuming {run_dir} from step {state['step']} ({state['stage']} step {state['stage_step']})")
    elif resume:
        log.message(f"no checkpoint in {run_dir}: starting from the beginning")
    losses: dict[str, list] = {s: [] for s in recipe.stages}
    step_offset = 0
    stopped = False
    try:
        for index, stage in enumerate(recipe.stages):
            spec = recipe.stage(stage)
            resumed_index = recipe.stages.index(state["stage"]) if state else -1
            if index < resumed_index:  # finished before the checkpoint: its weights are in RUN_DIR
                step_offset += spec.steps
                continue
            start = state["stage_step"] if state and index == resumed_index else 0
            stopped = _run_stage(recipe, stage, index, per_stage[stage], ds_json, d, dtype, bf16,
                                 run_dir, step_offset, start,
                                 state if state and index == resumed_index else None, log, losses)
            step_offset += spec.steps
            if stopped:
                break
    finally:
        log.close()
    return {"run_dir": str(run_dir), "losses": losses, "stopped": stopped}


def _run_stage(recipe, stage, index, rows, ds_json, d, dtype, bf16, run_dir, step_offset, start,
               state, log, losses) -> bool:
    spec = recipe.stage(stage)
    full = stage == "think" and recipe.think.method == "full"
    tte = build_model(recipe, dtype)
    if d.rank == 0 and index == 0 and start == 0:
        write_run_files(recipe, tte, run_dir)
    # Earlier stages' weights: this run's, or an adapter the recipe starts from.
    if recipe.think_adapter and "think" not in recipe.stages:
        load_stage_weights(tte, Path(recipe.think_adapter), "think")
    for earlier in recipe.stages[:index]:
        load_stage_weights(tte, run_dir / earlier, earlier, full=earlier == "think" and recipe.think.method == "full")
    engine = make_engine(recipe, stage, tte, ds_json, d.world, bf16)
    if state is not None:
        tag = f"step_{state['step']}"
        engine.load_checkpoint(str(run_dir / "checkpoints"), tag=tag, load_module_strict=False)
        set_rng_state(state["rng"][str(d.rank)])
        # The schedule follows the recipe as given now (a lower lr after a non-finite loss takes
        # effect); unchanged, this recomputes exactly the values the checkpoint holds.
        sched, factor = engine.lr_scheduler, lr_lambda(spec.warmup_steps, spec.steps, spec.min_lr_ratio)
        sched.base_lrs = [spec.lr for _ in sched.base_lrs]
        for group in engine.optimizer.param_groups:
            group["lr"] = spec.lr * factor(sched.last_epoch)
        sched._last_lr = [group["lr"] for group in engine.optimizer.param_groups]
    local, micro, _ = stage_shape(recipe, stage, d.world)
    ckpt_every = recipe.checkpoint_every
    last_good = checkpoints(run_dir)[-1][1] if checkpoints(run_dir) else None
    try:
        for s in range(start, spec.steps):
            step = step_offset + s + 1
            t0 = time.perf_counter()
            idx = batch_indices(len(rows), spec.batch_size, recipe.seed, index, s)
            mine = [rows[i] for i in idx[d.rank * local:(d.rank + 1) * local]]
            lr = engine.lr_scheduler.get_last_lr()[0]
            if stage == "think":
                loss, tokens, finite = think_backward(engine, mine, micro)
            else:
                e = recipe.embed
                loss, tokens, finite = embed_backward(engine, mine, e.gradcache_chunk, e.temperature,
                                                      e.use_traces, e.hard_negatives, e.gather_negatives,
                                                      e.gradcache_keep_prefix)
            loss_sum, tokens, bad = _all_reduce([loss if finite else 0.0, tokens, 0.0 if finite else 1.0])
            if bad:
                where = f"the last good checkpoint is {last_good}" if last_good else "no checkpoint was saved yet"
                raise NonFiniteLoss(
                    f"non-finite loss at step {step} ({stage} step {s + 1}) on {int(bad)} rank(s); the "
                    f"update was not applied and the run stopped; {where}. Lower {stage}.lr, raise "
                    f"{stage}.warmup_steps or check the data, then resume with --resume.")
            engine.step()  # the optimizer step (clipping, LR schedule) of the accumulated batch
            dt = time.perf_counter() - t0
            norm = engine.get_global_grad_norm()
            record = {"step": step, "stage": stage, "stage_step": s + 1, "loss": loss_sum / d.world,
                      "lr": lr, "grad_norm": None if norm is None else float(norm),
                      "samples_per_s": spec.batch_size / dt, "tokens_per_s": tokens / dt,
                      "peak_memory_gb": memory_gb(d.device), "step_time_s": dt}
            losses[stage].append((step, record["loss"]))
            if (s + 1) % recipe.log_every == 0 or s == 0 or s + 1 == spec.steps:
                log.log(record)
            log.advance()
            stop = recipe.stop_after is not None and step >= recipe.stop_after
            if (ckpt_every and step % ckpt_every == 0) or s + 1 == spec.steps or stop:
                last_good = save_checkpoint(engine, run_dir, {"step": step, "stage": stage, "stage_step": s + 1,
                                                              "samples": (s + 1) * spec.batch_size},
                                            recipe.keep_checkpoints, d)
            if stop and s + 1 < spec.steps:
                log.message(f"stopped after step {step} (stop_after); continue with --resume")
                return True
        save_stage(tte, run_dir, stage, full, d)
        log.message(f"stage {stage} done: {run_dir / stage}")
        return recipe.stop_after is not None and step_offset + spec.steps >= recipe.stop_after \
            and stage != recipe.stages[-1]
    finally:
        engine.destroy()
        del engine, tte
        gc.collect()


# ----------------------------------------------------------------------------- command line

def train_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="tte train", description="Train the unified TTE model from a YAML recipe (think SFT, "
        "embed contrastive) on DeepSpeed ZeRO. Launch with torchrun or deepspeed for many ranks.",
        epilog="Overrides use the recipe's dotted keys, e.g. embed.steps=50 think.lr=2e-4 "
               "deepspeed=recipes/deepspeed/zero3.json. See recipes/*.yaml and unified_tte/recipe.py.")
    parser.add_argument("recipe", help="YAML recipe, e.g. recipes/tiny_cpu.yaml")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="recipe overrides")
    parser.add_argument("--resume", action="store_true",
                        help="continue from the newest complete checkpoint in run_dir")
    parser.add_argument("--print-recipe", action="store_true",
                        help="print the resolved recipe (overrides applied) and exit")
    # The deepspeed launcher appends --local_rank=N; the rank comes from the environment.
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_intermixed_args(argv)
    from .data import DataError

    try:
        recipe = load_recipe(args.recipe, args.overrides)
        if args.print_recipe:
            print(dump_yaml(absolute_paths(recipe)), end="")
            return 0
        result = train(recipe, resume=args.resume)
    except (RecipeError, TrainError, DataError) as e:
        rank = os.environ.get("RANK", "0")
        if rank == "0" or os.environ.get("WORLD_SIZE", "1") == "1" or not isinstance(e, NonFiniteLoss):
            print(f"tte train: error: {e}", file=sys.stderr)
        return 1
    for stage, values in result["losses"].items():
        if values and int(os.environ.get("RANK", "0")) == 0:
            print(f"{stage}: loss {values[0][1]:.4f} (step {values[0][0]}) -> {values[-1][1]:.4f} "
                  f"(step {values[-1][0]})")
    return 0


if __name__ == "__main__":
    sys.exit(train_main())
