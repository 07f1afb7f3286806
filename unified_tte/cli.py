"""The `tte` console script: one command, subcommands mapped to the modules that implement them.

    tte demo [--quick]                 the main job: digits task end to end on the CPU default
    tte train RECIPE.yaml [key=value]  think SFT / embed contrastive training (DeepSpeed ZeRO)
    tte traces --model M --data D --out traces.jsonl
    tte eval CHECKPOINT_OR_RUN_DIR --tasks digits
    tte export RUN_DIR --out checkpoints/NAME [--dtype bf16] [--merge-think]
    tte bench [--backbone tiny|smollm2] [--decode auto|eager|static|graph]
    tte doctor [--device cpu|cuda]     versions, devices, self-test; exit 1 names what failed
    tte plan RECIPE.yaml --gpus 8      per-GPU memory of each stage, and whether it fits

Each subcommand's `--help` lists its options. Modules are imported only when their subcommand
runs, so `tte --help` is instant and a command whose optional dependencies are missing says
which extra to install. Errors are reported by `unified_tte.errors` (one line, exit codes).
"""
from __future__ import annotations

import importlib
import os
import sys

from .console import VERBOSE_ENV
from .errors import BAD_INPUT, DEBUG_ENV, RUN_FAILED, report_errors

SUBCOMMANDS = {
    "demo": ("unified_tte.tools.demo", "demo_main", "train, evaluate, export and bench on the built-in digits task"),
    "train": ("unified_tte.train.loop", "train_main", "train a stage from a YAML recipe"),
    "traces": ("unified_tte.tracegen", "traces_main", "write ECR reasoning traces for a dataset"),
    "eval": ("unified_tte.eval.evaluate", "eval_main", "evaluate a checkpoint or run folder on registered tasks"),
    "export": ("unified_tte.export", "export_main", "export a run to a compact safetensors checkpoint"),
    "bench": ("unified_tte.tools.bench", "bench_main", "latency and memory: unified vs two-model"),
    "doctor": ("unified_tte.tools.doctor", "doctor_main", "versions, devices and a self-test: run it first on a new machine"),
    "plan": ("unified_tte.tools.plan", "plan_main", "per-GPU memory of a recipe's stages before you book GPUs"),
}


def usage() -> str:
    lines = ["usage: tte [--debug] [--verbose] <command> [options]", "", "commands:"]
    lines += [f"  {name:<8} {desc}" for name, (_, _, desc) in SUBCOMMANDS.items()]
    lines += ["", "Run `tte <command> --help` for a command's options.", "",
              "Errors are one line on stderr, `tte <command>: error: <what, where, what to do>`, and",
              f"the exit code says which kind: {BAD_INPUT} = bad input (arguments, recipe, data, checkpoint,",
              f"a missing extra: fix it and run again), {RUN_FAILED} = a run that started and failed",
              f"(e.g. a non-finite loss). --debug (or {DEBUG_ENV}=1) also prints the traceback.", "",
              "Third-party progress bars and info logs are hidden; --verbose (or",
              f"{VERBOSE_ENV}=1) shows them."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # The deepspeed launcher puts --local_rank=N before the subcommand; ranks come from the env.
    argv = [a for a in argv if not a.startswith(("--local_rank", "--local-rank"))]
    for flag, env in (("--debug", DEBUG_ENV), ("--verbose", VERBOSE_ENV)):
        if flag in argv[:1]:
            previous = os.environ.get(env)
            os.environ[env] = "1"   # the environment, so the command's child processes see it too
            try:
                return main(argv[1:])
            finally:
                if previous is None:
                    del os.environ[env]
                else:
                    os.environ[env] = previous
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in SUBCOMMANDS:
        print(f"tte: error: unknown command '{name}'\n\n{usage()}", file=sys.stderr)
        return BAD_INPUT
    module, func, _ = SUBCOMMANDS[name]
    outcome: dict = {}
    with report_errors(name, outcome):   # e.g. an extra whose import fails at module level
        command = getattr(importlib.import_module(module), func)
        return int(command(rest) or 0)
    return outcome["code"]


if __name__ == "__main__":
    sys.exit(main())
