"""Embed-stage training throughput and memory: the unified model (activated / top_k) against the
two-model baseline's embedder, at the same batch, through the same training step.

    python -m unified_tte.tools.train_bench                          # SmolLM2-135M real weights, CPU
    python -m unified_tte.tools.train_bench --backbone tiny --quick  # seconds; a smoke test
    python -m unified_tte.tools.train_bench --variants activated two-model --batch 16 --json out.json

What runs is `train.embed_backward` + the optimizer step of a DeepSpeed engine (one rank,
recipes/deepspeed/zero2.json), exactly the embed stage of `tte train`:

* activated: the unified model; the prefix (query + trace) runs once without grad under the
  frozen `think` adapter, only the invocation tokens carry grad through the `embed` adapter.
* top_k: the unified model's top-K variant (K = L/4): the lower L-K layers without grad.
* two-model: `UnifiedTTE.separate_embedder`, the baseline's embedder: one LoRA over every layer
  and position re-encodes query + trace with grad.

Each variant runs in its own fresh process (tools/measure.py run_in_fresh_process, without
the launcher's RANK / WORLD_SIZE / ... so it is one rank of its own), variants interleaved round
by round, the best round kept (the machine may be shared). Samples/s counts query rows per second
(each with its positive and hard negative). Peak memory (tools/measure.py PeakMemory) is taken
over the timed and warm-up steps: on CPU the peak RSS over the RSS once model and engine are built
("training peak"), on GPU CUDA's max allocated, weights included.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

from .measure import (PeakMemory, WorkerError, current_memory_mb, default_device, is_cuda, machine_name, reply,
                      run_in_fresh_process, sync, trim)

VARIANTS = ("activated", "top_k", "two-model")
DIST_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")  # kept from the child


def bench_rows(n: int, query_words: int, seed: int = 0):
    """Text-only train rows with realistic lengths: an instruction with context, a teacher trace,
    a short positive and a hard negative (the digits task's wording, images described in words)."""
    import numpy as np

    from ..data import TrainRow
    from ..data.digits import WORDS, target_text, teacher_trace
    from ..model import TTEInput

    rng = np.random.default_rng(seed)
    filler = ("the handwritten digit is drawn in dark ink on a white square with a thick stroke that "
              "bends to the left near the top and closes into a small loop at the bottom").split()
    rows = []
    for i in range(n):
        d = int(rng.integers(0, 10))
        context = " ".join(filler[(i + k) % len(filler)] for k in range(query_words))
        qry = TTEInput(f"What number is two more than the digit described here? {context}")
        rows.append(TrainRow(id=f"bench/{i}", qry=qry, pos=TTEInput(target_text("plus_two", d + 2)),
                             neg=TTEInput(target_text("plus_two", (d + 5) % 10 + 2)),
                             trace=teacher_trace("plus_two", d), meta={"digit": WORDS[d]}))
    return rows


def train_device():
    """(device, dtype) the worker trains in: cuda in bf16 when torch sees a GPU (as `tte train`
    runs there), else cpu in fp32."""
    import torch

    device = default_device()
    return device, torch.bfloat16 if is_cuda(device) else torch.float32


def memory_baseline_mb(device) -> float:
    """What the peak is reported above: the RSS once model and engine are built on CPU (the
    process's own footprint would swamp the training peak), nothing on CUDA (max allocated counts
    only tensors, so the weights stay in)."""
    return 0.0 if is_cuda(device) else current_memory_mb(device)


def memory_report(mem: PeakMemory) -> dict:
    """The result's memory fields from a finished PeakMemory, in GB."""
    out = {"peak_memory_gb": mem.peak_mb / 1024, "memory_method": mem.method}
    if not is_cuda(mem.device):
        out["peak_rss_gb"] = (mem.peak_mb + mem.baseline) / 1024
    return out


def worker(job: dict) -> dict:
    """One variant in this process: build, warm up, time `steps` embed-stage steps."""
    import torch

    from ..model import UnifiedTTE
    from ..train.engine import init_distributed, make_engine
    from ..train.loop import load_backbone
    from ..train.recipe import load_deepspeed_json, recipe_from_dict
    from ..train.steps import embed_backward

    torch.set_num_threads(job["threads"])
    init_distributed()
    name, dtype = train_device()
    device = torch.device(name)
    ds_path = os.path.join(os.path.dirname(__file__), "..", "..", "recipes", "deepspeed", "zero2.json")
    recipe = recipe_from_dict({
        "backbone": job["backbone"], "deepspeed": ds_path,
        "model": {"lora_r": 16, "lora_alpha": 64},
        "embed": {"batch_size": job["batch"], "gradcache_chunk": job["chunk"], "lr": 1e-5,
                  "hard_negatives": True, "use_traces": True},
    }, "bench")
    backbone = load_backbone(job["backbone"], dtype)
    if job["variant"] == "two-model":
        tte = UnifiedTTE.separate_embedder(backbone, lora_r=16, lora_alpha=64)
    else:
        tte = UnifiedTTE(backbone, mode=job["variant"], lora_r=16, lora_alpha=64)
    recipe.model = tte.config
    engine = make_engine(recipe, "embed", tte, load_deepspeed_json(ds_path), world=1,
                           bf16=dtype == torch.bfloat16)
    batch, steps, warmup = job["batch"], job["steps"], job["warmup"]
    rows = bench_rows(batch * (steps + warmup), job["query_words"])
    batches = [rows[i * batch:(i + 1) * batch] for i in range(steps + warmup)]
    trim()
    times, tokens = [], 0
    with PeakMemory(device, memory_baseline_mb(device)) as mem:
        for k, rows_k in enumerate(batches):
            t0 = time.perf_counter()
            _, n_tokens, _ = embed_backward(engine, rows_k, job["chunk"], 0.02)
            engine.step()
            sync(device)
            if k >= warmup:
                times.append(time.perf_counter() - t0)
                tokens += n_tokens
    total = sum(times)
    out = {"variant": job["variant"], "backbone": backbone.name, "layers": tte.num_layers,
           "trainable_params": sum(p.numel() for p in tte.peft_model.parameters() if p.requires_grad),
           "batch": batch, "chunk": job["chunk"], "steps": steps,
           "samples_per_s": batch * len(times) / total, "tokens_per_s": tokens / total,
           "step_s": total / len(times), "device": str(device), "threads": job["threads"],
           **memory_report(mem)}
    engine.destroy()
    return out


def machine() -> str:
    import torch

    return f"{machine_name()}, torch {torch.__version__}"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m unified_tte.tools.train_bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--backbone", default="smollm2", help="smollm2 (real weights) | tiny | tiny-llama | a local folder")
    p.add_argument("--variants", nargs="+", default=["activated", "two-model"], choices=VARIANTS)
    p.add_argument("--batch", type=int, default=8, help="query rows per step (each with a positive and a hard negative)")
    p.add_argument("--chunk", type=int, default=None, help="GradCache chunk (default: none, one forward with grad)")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--rounds", type=int, default=1, help="interleaved repeats; the best round is kept")
    p.add_argument("--query-words", type=int, default=60, help="words of context in each query")
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--quick", action="store_true", help="tiny backbone, 2 steps: a smoke run")
    p.add_argument("--json", default=None, help="also write the results here")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        args.backbone, args.steps, args.warmup, args.query_words = "tiny", 2, 1, 20
    if args.worker:
        reply(worker(json.loads(args.worker)))
        return 0

    results: dict[str, dict] = {}
    for _ in range(args.rounds):
        for variant in args.variants:
            job = {"variant": variant, "backbone": args.backbone, "batch": args.batch, "chunk": args.chunk,
                   "steps": args.steps, "warmup": args.warmup, "query_words": args.query_words,
                   "threads": args.threads}
            try:
                r = run_in_fresh_process("unified_tte.tools.train_bench", job, name=variant,
                                         env=dict.fromkeys(DIST_ENV))
            except WorkerError as exc:
                raise SystemExit(f"train_bench: {exc}") from None
            if variant not in results or r["samples_per_s"] > results[variant]["samples_per_s"]:
                results[variant] = r
    where = machine()
    first = next(iter(results.values()))
    print(f"embed-stage training, {first['backbone']} ({first['layers']} layers), batch {args.batch} queries "
          f"(+ positives, hard negatives), GradCache chunk {args.chunk or 'none'}, {args.steps} timed steps, "
          f"best of {args.rounds} round(s)\nmachine: {where}, {args.threads} thread(s)")
    print(f"{'variant':<11} {'samples/s':>10} {'tokens/s':>10} {'step s':>8} {'peak GB':>8}  trainable")
    for r in results.values():
        print(f"{r['variant']:<11} {r['samples_per_s']:>10.2f} {r['tokens_per_s']:>10.0f} {r['step_s']:>8.2f} "
              f"{r['peak_memory_gb']:>8.3f}  {r['trainable_params']:,}")
    base = results.get("two-model")
    if base:
        for r in results.values():
            if r is not base:
                print(f"{r['variant']} vs two-model: {r['samples_per_s'] / base['samples_per_s']:.2f}x samples/s, "
                      f"{r['peak_memory_gb'] / base['peak_memory_gb']:.2f}x peak memory")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": where, "results": results}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
