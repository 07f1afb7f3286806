"""Training: `tte train RECIPE.yaml` (see loop.py for the stages, the run folder and resume).

    from unified_tte.train import train, load_recipe
    result = train(load_recipe("recipes/tiny_cpu.yaml", ["embed.steps=5"]))

The public API is what this module exports: running a recipe (train, train_main), the recipe
(Recipe, load_recipe, recipe_from_dict; its keys are documented in recipe.py), a recipe's model and
a run's trained weights (build_model, load_stage_weights, checkpoints) and the errors. The loop
(loop.py) stands on its plumbing, imported from its own module where needed: recipe_loader,
batches, steps, engine (DeepSpeed), checkpointing, run_log, rng, losses. DeepSpeed is imported
only when a run starts, so the recipe types import without the [train] extra.
"""
from ..errors import NonFiniteLoss, TrainError
from .checkpointing import checkpoints, load_stage_weights
from .loop import build_model, train, train_main
from .recipe import Recipe, RecipeError, load_recipe, recipe_from_dict

__all__ = ["train", "train_main", "Recipe", "RecipeError", "load_recipe", "recipe_from_dict", "build_model",
           "load_stage_weights", "checkpoints", "TrainError", "NonFiniteLoss"]
