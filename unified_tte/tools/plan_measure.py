"""`tte plan --measure`: one training step of each stage on this machine (fp32 CPU, one process,
rows of exactly the planned lengths, each stage in a fresh process), and its measured peak memory
to print beside the plan (peak RSS above the process's RSS after imports: the weights count).

    measured = measure("recipes/tiny_cpu.yaml", ["think.batch_size=8"], lengths, ["think", "embed"])
    python -m unified_tte.tools.plan_measure --worker JSON     # one stage, as measure() starts it
"""
from __future__ import annotations

import copy
import dataclasses
import json
import math
import sys

from ..errors import RunError
from .measure import PeakMemory, WorkerError, current_memory_mb, reply, run_in_fresh_process, trim
from .plan_estimate import Lengths, shape_of


def measure(recipe_path: str, overrides: list[str], lengths: Lengths, stages: list[str]) -> dict:
    """One training step per stage on this CPU (fp32, one process, world 1), each in a fresh
    process; returns {stage: peak bytes above the process's RSS after imports}."""
    out = {}
    for stage in stages:
        job = {"recipe": recipe_path, "overrides": overrides, "lengths": dataclasses.asdict(lengths), "stage": stage}
        # glibc keeps freed blocks below its (growing) mmap threshold in its heap; pinned low, freed
        # tensors leave the resident set, so the peak RSS follows the live tensors.
        env = {"TOKENIZERS_PARALLELISM": "false", "DS_ACCELERATOR": "cpu", "MALLOC_MMAP_THRESHOLD_": "65536"}
        try:
            out[stage] = run_in_fresh_process("unified_tte.tools.plan_measure", job, name=f"measure {stage}",
                                              env=env)["peak_bytes"]
        except WorkerError as exc:
            raise RunError(f"measuring {stage} failed: {exc}") from exc
    return out


def _rows_of(lengths: Lengths, n: int, with_images: bool) -> list:
    """n TrainRows whose prompts, traces and targets have the planned token counts."""
    from PIL import Image

    from ..data.schema import TrainRow
    from ..model import TTEInput

    word = " the"
    side = math.isqrt(lengths.image_tokens) * 28
    image = Image.linear_gradient("L").convert("RGB").resize((side, side)) if side else None
    images = [image] * lengths.images if with_images and image is not None else []
    text = (word * lengths.text).strip()
    trace = (word * lengths.trace).strip()
    return [TrainRow(id=str(i), qry=TTEInput(text, images), pos=TTEInput(text, images), neg=TTEInput(text, images),
                     trace=trace) for i in range(n)]


WARM_UP_BACKBONE = {"qwen2_vl": "tiny", "qwen2_5_vl": "tiny-qwen25vl"}   # else tiny-llama


def _one_step(recipe, stage: str, lengths: Lengths, world: int, measure_from: float | None = None):
    """Build the recipe's model and stage engine, run one training step on rows of `lengths`.
    With `measure_from` (MB), returns the PeakMemory of the step above it."""
    import torch

    from ..train import build_model
    from ..train.engine import make_engine, stage_shape
    from ..train.steps import embed_backward, think_backward
    from ..train.recipe import load_deepspeed_json

    tte = build_model(recipe, torch.float32)
    engine = make_engine(recipe, stage, tte, load_deepspeed_json(recipe.deepspeed), world, bf16=False)
    local, micro, _ = stage_shape(recipe, stage, world)
    rows = _rows_of(lengths, local, with_images=tte.stack.is_vl)
    mem = PeakMemory("cpu", measure_from) if measure_from is not None else None
    if mem is not None:
        mem.__enter__()
    if stage == "think":
        think_backward(engine, rows, micro)
    else:
        e = recipe.embed
        embed_backward(engine, rows, e.gradcache_chunk, e.temperature, e.use_traces, e.hard_negatives,
                       e.gather_negatives, e.gradcache_keep_prefix)
    engine.step()
    if mem is not None:
        mem.__exit__(None, None, None)
    engine.destroy()
    return mem


def measure_worker(job: dict) -> None:
    """One stage's step in this process. The baseline is the RSS after a warm-up step of the same
    stage on the tiny model of the same family (imports, thread pools, allocator arenas, which
    are code and runtime rather than data), so the figure counts what CUDA's
    max_memory_allocated would: weights, states, activations, caches."""
    import gc

    import torch

    from ..train.engine import init_distributed
    from ..train.recipe import load_recipe

    torch.manual_seed(0)
    recipe = load_recipe(job["recipe"], job["overrides"])
    stage = job["stage"]
    d = init_distributed()
    warm = copy.deepcopy(recipe)
    warm.backbone = WARM_UP_BACKBONE.get(shape_of(recipe.backbone).model_type, "tiny-llama")
    warm.model = dataclasses.replace(warm.model, max_pixels=None, min_pixels=None)   # the tiny model's own
    warm.think.batch_size = warm.think.micro_batch_size = 1
    warm.embed.batch_size, warm.embed.gradcache_chunk = 2, 1
    _one_step(warm, stage, Lengths(text=8, trace=4, images=1, image_tokens=4,
                                   invocation=len(recipe.model.invocation)), d.world)
    gc.collect()
    trim()
    baseline = current_memory_mb("cpu")
    mem = _one_step(recipe, stage, Lengths(**job["lengths"]), d.world, measure_from=baseline)
    reply({"stage": stage, "peak_bytes": int(mem.peak_mb * 2**20), "method": mem.method})


if __name__ == "__main__":   # the worker measure() starts: --worker JSON
    measure_worker(json.loads(sys.argv[sys.argv.index("--worker") + 1]))
