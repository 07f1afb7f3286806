"""`tte plan RECIPE [key=value ...] [--gpus N --nodes M --gpu-mem 80]`: the memory each stage of a
recipe needs per GPU, before you book the GPUs, and which knob to turn when it does not fit.

    tte plan recipes/qwen2vl_7b.yaml --gpus 8                          # 8 x 80 GB, the recipe as written
    tte plan recipes/qwen2vl_2b.yaml --gpus 8 --gpu-mem 40 embed.gradcache_chunk=16
    tte plan recipes/tiny_cpu.yaml --device cpu --measure              # plan vs one measured step per stage here

What is counted and how, and when a stage fits: plan_estimate.py; the table and the advice:
plan_render.py; `--measure`, one step per stage measured on this CPU: plan_measure.py.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

from ..errors import RecipeError, command
from .plan_estimate import Lengths, Setup, image_tokens, plan, shape_of, usable_bytes
from .plan_measure import measure
from .plan_render import advice, render


def build(args) -> tuple:
    """(recipe, model shape, row lengths, setup) as the command line describes them."""
    from ..train.recipe import load_deepspeed_json, load_recipe

    recipe = load_recipe(args.recipe, args.overrides)
    if not Path(recipe.deepspeed).is_file():
        raise RecipeError(f"{args.recipe}: deepspeed: {recipe.deepspeed} not found (relative paths start at "
                          f"the current folder, {Path.cwd()}).")
    ds = load_deepspeed_json(recipe.deepspeed)
    shape = shape_of(recipe.backbone)
    cap = recipe.model.max_pixels or shape.image_cap
    lengths = Lengths(text=args.text_tokens, trace=args.trace_tokens,
                      images=args.images if shape.is_vl else 0,
                      image_tokens=image_tokens(cap) if shape.is_vl else 0,
                      invocation=len(recipe.model.invocation))
    device = args.device
    setup = Setup(gpus_per_node=args.gpus, nodes=args.nodes, gpu_mem_gib=args.gpu_mem, device=device, ds=ds,
                  ds_name=str(recipe.deepspeed))
    for stage in recipe.stages:
        if recipe.stage(stage).batch_size % setup.world:
            raise RecipeError(f"{args.recipe}: {stage}.batch_size={recipe.stage(stage).batch_size} does not "
                              f"split over {setup.world} GPUs; use a multiple of {setup.world}.")
    return recipe, shape, lengths, setup


@command("plan")
def plan_main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="tte plan", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="What is counted and how: unified_tte/tools/plan_estimate.py's docstring.")
    p.add_argument("recipe", nargs="?", help="YAML recipe, e.g. recipes/qwen2vl_7b.yaml")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="recipe overrides, as `tte train` takes them")
    p.add_argument("--gpus", type=int, default=8, help="GPUs per node (default 8)")
    p.add_argument("--nodes", type=int, default=1, help="nodes (default 1)")
    p.add_argument("--gpu-mem", type=float, default=80.0, help="memory per GPU in GiB (default 80)")
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                   help="cuda: plan for GPUs (bf16 under precision auto); cpu: plan for this CPU (fp32), "
                        "the check against --measure")
    p.add_argument("--text-tokens", type=int, default=64, help="text tokens per query / target (default 64)")
    p.add_argument("--trace-tokens", type=int, default=128, help="ECR trace tokens per query (default 128)")
    p.add_argument("--images", type=int, default=1, help="images per query / target, each at max_pixels (default 1)")
    p.add_argument("--measure", action="store_true",
                   help="also run one step per stage on this CPU and print the measured peaks (implies --device cpu, one GPU)")
    p.add_argument("--json", default=None, metavar="PATH", help="also write the plan as JSON")
    args = p.parse_intermixed_args(argv)
    if not args.recipe:
        p.error("the following arguments are required: recipe")
    if min(args.gpus, args.nodes) < 1 or args.gpu_mem <= 0:
        p.error("--gpus and --nodes must be >= 1 and --gpu-mem > 0")
    if args.measure:
        args.device, args.gpus, args.nodes = "cpu", 1, 1
    recipe, shape, lengths, setup = build(args)
    plans = plan(recipe, shape, lengths, setup)
    measured = measure(args.recipe, args.overrides, lengths, recipe.stages) if args.measure else None
    print(render(args.recipe, shape, lengths, setup, plans, recipe, measured))
    tips = advice(recipe, shape, lengths, setup, plans)
    if tips:
        print("\n" + "\n".join(tips))
    if args.json:
        Path(args.json).write_text(json.dumps({
            "recipe": args.recipe, "shape": dataclasses.asdict(shape), "lengths": dataclasses.asdict(lengths),
            "setup": {k: v for k, v in dataclasses.asdict(setup).items() if k != "ds"},
            "stages": {pl.stage: {"total_bytes": pl.total, "parts": pl.parts, "notes": pl.notes,
                                  "fits": pl.total <= usable_bytes(setup)} for pl in plans},
            "measured_bytes": measured, "advice": tips}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(plan_main())
