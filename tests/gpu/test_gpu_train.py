"""Training steps on CUDA in bf16 (precision auto, as the GPU recipes run): both stages step, the
loss stays finite and the adapters move. Needs DeepSpeed (the GPU check carries its wheel);
skipped without CUDA.
"""
import math
from pathlib import Path

import pytest

pytestmark = pytest.mark.gpu

ROOT = Path(__file__).resolve().parents[2]


def test_both_stages_train_in_bf16_on_cuda(tmp_path):
    pytest.importorskip("deepspeed")
    import torch

    from unified_tte import train as T
    from unified_tte.train.recipe import recipe_from_dict

    recipe = recipe_from_dict({
        "run_dir": str(tmp_path), "backbone": "tiny", "deepspeed": str(ROOT / "recipes/deepspeed/zero2.json"),
        "data": {"train": "digits", "digits": {"max_train_per_task": 8}}, "model": {"mode": "activated"},
        "think": {"steps": 2, "batch_size": 4, "micro_batch_size": 2, "lr": 2e-3, "warmup_steps": 1},
        "embed": {"steps": 2, "batch_size": 8, "gradcache_chunk": 4, "lr": 1e-3, "warmup_steps": 1},
        "checkpoint_every": 0, "progress_bar": False, "wandb": {"mode": "disabled"}}, "gpu test recipe")
    result = T.train(recipe)
    for stage in ("think", "embed"):
        losses = [loss for _, loss in result["losses"][stage]]
        assert len(losses) == 2 and all(math.isfinite(x) for x in losses), (stage, losses)
    assert torch.cuda.max_memory_allocated() > 0
    from safetensors.torch import load_file
    for stage in ("think", "embed"):
        weights = load_file(str(tmp_path / stage / "adapter_model.safetensors"))
        assert any(w.float().abs().sum() > 0 for name, w in weights.items() if "lora_B" in name), stage
