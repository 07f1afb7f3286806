"""Training: `tte train RECIPE.yaml` (see loop.py for the stages, the run folder and resume).

    from unified_tte.train import train, load_recipe
    result = train(load_recipe("recipes/tiny_cpu.yaml", ["embed.steps=5"]))

The loop (loop.py) stands on its plumbing: recipe, batches, steps, engine (DeepSpeed),
checkpointing, run_log, rng, losses. DeepSpeed is imported only when a run starts,
so the recipe types import without the [train] extra.
"""
from ..distributed import all_reduce
from ..errors import NonFiniteLoss, TrainError
from .batches import batch_indices, encode_prompts, load_rows, stage_rows
from .checkpointing import checkpoints, load_stage_weights
from .engine import StageModule, init_distributed, lr_lambda, make_engine, select_trainable, stage_shape
from .loop import StageRun, build_model, load_backbone, train, train_main
from .recipe import Recipe, RecipeError, absolute_paths, load_recipe, recipe_from_dict
from .steps import embed_backward, think_backward

__all__ = ["train", "train_main", "StageRun", "build_model", "load_backbone", "Recipe", "RecipeError",
           "load_recipe", "recipe_from_dict", "absolute_paths", "TrainError", "NonFiniteLoss", "init_distributed",
           "all_reduce", "make_engine", "select_trainable", "stage_shape", "lr_lambda", "StageModule",
           "batch_indices", "encode_prompts", "load_rows", "stage_rows", "checkpoints",
           "load_stage_weights", "embed_backward", "think_backward"]
