"""The `tte` console script: one command, subcommands mapped to the modules that implement them.

    tte demo [--quick]                 the main job: digits task end to end on the CPU default
    tte train RECIPE.yaml [key=value]  think SFT / embed contrastive training (DeepSpeed ZeRO)
    tte traces --model M --data D --out traces.jsonl
    tte eval CHECKPOINT --tasks digits
    tte export RUN_DIR --out checkpoints/NAME [--dtype bf16] [--merge-think]
    tte bench [--backbone tiny|smollm2]

Each subcommand's `--help` lists its options. Modules are imported only when their subcommand
runs, so `tte --help` is instant.
"""
from __future__ import annotations

import importlib
import sys

SUBCOMMANDS = {
    "demo": ("unified_tte.tools.demo", "demo_main", "train, evaluate, export and bench on the built-in digits task"),
    "train": ("unified_tte.train.loop", "train_main", "train a stage from a YAML recipe"),
    "traces": ("unified_tte.data.traces", "traces_main", "write ECR reasoning traces for a dataset"),
    "eval": ("unified_tte.eval.evaluate", "eval_main", "evaluate a checkpoint or run folder on registered tasks"),
    "export": ("unified_tte.export", "export_main", "export a run to a compact safetensors checkpoint"),
    "bench": ("unified_tte.tools.bench", "bench_main", "latency and memory: unified vs two-model"),
}


def usage() -> str:
    lines = ["usage: tte <command> [options]", "", "commands:"]
    lines += [f"  {name:<8} {desc}" for name, (_, _, desc) in SUBCOMMANDS.items()]
    lines += ["", "Run `tte <command> --help` for a command's options."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # The deepspeed launcher puts --local_rank=N before the subcommand; ranks come from the env.
    argv = [a for a in argv if not a.startswith(("--local_rank", "--local-rank"))]
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in SUBCOMMANDS:
        print(f"tte: unknown command '{name}'\n\n{usage()}", file=sys.stderr)
        return 2
    module, func, _ = SUBCOMMANDS[name]
    result = getattr(importlib.import_module(module), func)(rest)
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
