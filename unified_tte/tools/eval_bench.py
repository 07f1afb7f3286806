"""Throughput of sharded evaluation: `tte eval` on 1 rank and on N ranks (torchrun, gloo on CPU,
NCCL on GPU), interleaved round by round so both see the same machine load.

    python -m unified_tte.tools.eval_bench                      # builds a tiny run folder, 1 vs 2 ranks
    python -m unified_tte.tools.eval_bench --run RUN_DIR --ranks 2 --queries 60 --rounds 2

Each run evaluates the digits tasks with thinking (`--max-new-tokens`) and reports the items
(queries + distinct candidates) per second that `tte eval` measures between the moment every
rank holds its model and the scores on rank 0 (model loading and process start excluded).
Prints one line per run (with the 1-minute load average before it: other processes on the
cores), then the median items/s per rank count and the ratio "N ranks / 1 rank"; writes
everything as JSON to --out. On CPU each rank uses one thread (OMP_NUM_THREADS=1), so N ranks
need N free cores for an N-fold rate.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from .bench import machine_name


def tiny_run(folder, seed: int = 0, std: float = 0.1) -> Path:
    """A run folder (think/ and embed/ adapters + tte_config.json) of the built-in tiny backbone
    with random adapter weights, as `tte eval RUN_DIR` / `tte traces --model RUN_DIR` load it."""
    import torch

    from ..model import UnifiedTTE, adapters, zoo

    folder = Path(folder)
    tte = UnifiedTTE(zoo.tiny_qwen2vl(), mode="activated")
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in tte.peft_model.named_parameters():
            if "lora_B" in name:   # a fresh LoRA has B = 0: no delta at all
                p.copy_(torch.randn(p.shape, generator=generator) * std)
    for name in tte.embed_adapters:
        adapters.save_adapter(tte.peft_model, name, folder / name)
    (folder / "tte_config.json").write_text(json.dumps({**tte.config.to_dict(), "backbone": "tiny"}))
    return folder



def run_eval(run_dir: str, ranks: int, args, out: Path) -> dict:
    cmd = ["-m", "unified_tte.cli", "eval", str(run_dir), "--tasks", args.tasks, "--max-queries", str(args.queries),
           "--max-new-tokens", str(args.max_new_tokens), "--batch-size", str(args.batch_size), "--no-progress",
           "--out", str(out)]
    if ranks == 1:
        cmd = [sys.executable] + cmd
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(ranks),
               "--standalone"] + cmd
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"eval on {ranks} rank(s) failed:\n{proc.stderr[-3000:]}")
    return json.loads(out.read_text())["timing"]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m unified_tte.tools.eval_bench", description=__doc__.split("\n")[0])
    p.add_argument("--run", default=None, help="a run or checkpoint folder (default: a tiny random one)")
    p.add_argument("--ranks", type=int, default=2, help="ranks of the sharded run (default 2)")
    p.add_argument("--tasks", default="digits", help="tasks to evaluate (default: the 5 digits tasks)")
    p.add_argument("--queries", type=int, default=40, help="queries per task")
    p.add_argument("--max-new-tokens", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--rounds", type=int, default=2, help="1-rank / N-rank pairs, interleaved")
    p.add_argument("--out", default="bench_out/eval_bench.json")
    args = p.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="eval_bench_"))
    run_dir = args.run
    if run_dir is None:
        run_dir = tiny_run(work / "run", seed=1)
    runs = []
    for r in range(args.rounds):
        for ranks in (1, args.ranks):
            load = os.getloadavg()[0]
            timing = run_eval(run_dir, ranks, args, work / f"res_{r}_{ranks}.json")
            timing["load_before"] = load   # 1-min load average: other users of the cores
            runs.append(timing)
            print(f"round {r + 1}: {ranks} rank(s): {timing['items']} items in {timing['seconds']:.1f} s = "
                  f"{timing['items_per_s']:.2f} items/s (load average before: {load:.1f})", flush=True)
    rate = {n: statistics.median(t["items_per_s"] for t in runs if t["ranks"] == n) for n in (1, args.ranks)}
    speedup = rate[args.ranks] / rate[1]
    machine = machine_name()
    print(f"median: 1 rank {rate[1]:.2f} items/s, {args.ranks} ranks {rate[args.ranks]:.2f} items/s; "
          f"{args.ranks} ranks / 1 rank = {speedup:.2f}x on {machine}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"machine": machine, "cores": os.cpu_count(), "ranks": args.ranks,
                               "tasks": args.tasks, "queries_per_task": args.queries,
                               "max_new_tokens": args.max_new_tokens, "batch_size": args.batch_size,
                               "runs": runs, "items_per_s": {str(k): v for k, v in rate.items()},
                               "speedup": speedup}, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
