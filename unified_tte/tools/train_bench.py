"""Embed-stage training throughput and memory: the unified model (activated / top_k) against the
two-model baseline's embedder, at the same batch, through the same training step.

    python -m unified_tte.train_bench                          # SmolLM2-135M real weights, CPU
    python -m unified_tte.train_bench --backbone tiny --quick  # seconds; a smoke test
    python -m unified_tte.train_bench --variants activated two-model --batch 16 --json out.json

What runs is `train.embed_backward` + the optimizer step of a DeepSpeed engine (one rank,
recipes/deepspeed/zero2.json), exactly the embed stage of `tte train`:

* activated: the unified model; the prefix (query + trace) runs once without grad under the
  frozen `think` adapter, only the invocation tokens carry grad through the `embed` adapter.
* top_k: the unified model's top-K variant (K = L/4): the lower L-K layers without grad.
* two-model: `UnifiedTTE.separate_embedder`, the baseline's embedder: one LoRA over every layer
  and position re-encodes query + trace with grad.

Each variant runs in its own process (fresh peak memory), variants interleaved round by round,
the best round kept (the machine may be shared). Samples/s counts query rows per second (each
with its positive and hard negative); peak memory is the process's peak RSS on CPU, over the
RSS once model and engine are built ("training peak"), or CUDA's max allocated on GPU.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

VARIANTS = ("activated", "top_k", "two-model")


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


def _rss_gb() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2 ** 30


def _peak_gb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20


def worker(args) -> dict:
    """One variant in this process: build, warm up, time `steps` embed-stage steps."""
    import torch

    from .. import train as T
    from ..model import UnifiedTTE
    from ..train.recipe import load_deepspeed_json, recipe_from_dict

    torch.set_num_threads(args.threads)
    T.init_distributed()
    d = T.Dist(0, 1, 0, torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    ds_path = os.path.join(os.path.dirname(__file__), "..", "..", "recipes", "deepspeed", "zero2.json")
    recipe = recipe_from_dict({
        "backbone": args.backbone, "deepspeed": ds_path,
        "model": {"lora_r": 16, "lora_alpha": 64},
        "embed": {"batch_size": args.batch, "gradcache_chunk": args.chunk, "lr": 1e-5,
                  "hard_negatives": True, "use_traces": True},
    }, "bench")
    dtype = torch.bfloat16 if d.device.type == "cuda" else torch.float32
    backbone = T.load_backbone(args.backbone, dtype)
    if args.variant == "two-model":
        tte = UnifiedTTE.separate_embedder(backbone, lora_r=16, lora_alpha=64)
    else:
        tte = UnifiedTTE(backbone, mode=args.variant, lora_r=16, lora_alpha=64)
    recipe.model = tte.config
    engine = T.make_engine(recipe, "embed", tte, load_deepspeed_json(ds_path), world=1,
                           bf16=d.device.type == "cuda")
    rows = bench_rows(args.batch * (args.steps + args.warmup), args.query_words)
    batches = [rows[i * args.batch:(i + 1) * args.batch] for i in range(args.steps + args.warmup)]
    base_rss = _rss_gb()
    if d.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times, tokens = [], 0
    for k, batch in enumerate(batches):
        t0 = time.perf_counter()
        _, n_tokens, _ = T.embed_backward(engine, batch, args.chunk, 0.02)
        engine.step()
        if d.device.type == "cuda":
            torch.cuda.synchronize()
        if k >= args.warmup:
            times.append(time.perf_counter() - t0)
            tokens += n_tokens
    total = sum(times)
    out = {"variant": args.variant, "backbone": backbone.name, "layers": tte.num_layers,
           "trainable_params": sum(p.numel() for p in tte.peft_model.parameters() if p.requires_grad),
           "batch": args.batch, "chunk": args.chunk, "steps": args.steps,
           "samples_per_s": args.batch * len(times) / total, "tokens_per_s": tokens / total,
           "step_s": total / len(times), "device": str(d.device), "threads": args.threads}
    if d.device.type == "cuda":
        out["peak_memory_gb"] = torch.cuda.max_memory_allocated() / 2 ** 30
    else:
        out["peak_rss_gb"] = _peak_gb()
        out["peak_memory_gb"] = out["peak_rss_gb"] - base_rss  # the training peak over the built model
    engine.destroy()
    return out


def machine() -> str:
    import torch

    from .bench import machine_name
    return f"{machine_name()}, torch {torch.__version__}"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m unified_tte.train_bench", description=__doc__.split("\n\n")[0])
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
        args.variant = args.worker
        print("RESULT " + json.dumps(worker(args)), flush=True)
        return 0

    results: dict[str, dict] = {}
    for _ in range(args.rounds):
        for variant in args.variants:
            cmd = [sys.executable, "-m", "unified_tte.tools.train_bench", "--worker", variant,
                   "--backbone", args.backbone, "--batch", str(args.batch), "--steps", str(args.steps),
                   "--warmup", str(args.warmup), "--query-words", str(args.query_words),
                   "--threads", str(args.threads)] + (["--chunk", str(args.chunk)] if args.chunk else [])
            env = {k: v for k, v in os.environ.items()
                   if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
            lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
            if proc.returncode or not lines:
                print(proc.stderr[-3000:], file=sys.stderr)
                raise SystemExit(f"train_bench: the {variant} worker failed (exit {proc.returncode})")
            r = json.loads(lines[-1][7:])
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
