"""Two ranks over gloo, launched by torchrun as subprocesses (DS_ACCELERATOR=cpu, fp32):

* negatives gathered across 2 ranks give the gradients of one process holding the whole batch;
* `tte train recipes/tiny_cpu.yaml` runs both stages on ZeRO-3 with 2 ranks, wandb offline.

This file is also the torchrun worker: `python -m torch.distributed.run --nproc_per_node 2
tests/test_train_dist.py OUT` writes rank 0's view of the gradients to OUT.
"""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
ZERO2 = str(REPO / "recipes" / "deepspeed" / "zero2.json")
GLOBAL_BATCH = 8


def _recipe(run_dir):
    from unified_tte.train.recipe import recipe_from_dict

    return recipe_from_dict({
        "run_dir": str(run_dir), "backbone": "tiny", "deepspeed": ZERO2,
        "data": {"train": "digits", "digits": {"max_train_per_task": 4}},
        "embed": {"batch_size": GLOBAL_BATCH, "gradcache_chunk": 2},
        "progress_bar": False, "wandb": {"mode": "disabled"},
    }, "test recipe")


def _rows():
    from unified_tte.data.digits import build_digits

    rows = build_digits(max_train_per_task=4).train_rows  # images, text queries, image targets
    return [rows[i] for i in (0, 4, 8, 12, 16, 1, 13, 17)]


def _embed_grads(rows):
    """One embed step's backward on this rank's rows; (loss averaged over ranks, full grads)."""
    from deepspeed.utils import safe_get_full_grad

    from unified_tte import train as T
    from unified_tte.distributed import all_reduce
    from unified_tte.testing import randomize_adapters
    from unified_tte.train.engine import init_distributed, make_engine
    from unified_tte.train.recipe import load_deepspeed_json
    from unified_tte.train.steps import embed_backward

    d = init_distributed()
    recipe = _recipe(Path("unused"))
    tte = T.build_model(recipe, torch.float32)
    randomize_adapters(tte, std=0.05, seed=0)
    engine = make_engine(recipe, "embed", tte, load_deepspeed_json(ZERO2), world=d.world, bf16=False)
    e = recipe.embed
    local = GLOBAL_BATCH // d.world
    mine = rows[d.rank * local:(d.rank + 1) * local]
    loss, _, finite = embed_backward(engine, mine, e.gradcache_chunk, e.temperature, e.use_traces,
                                       e.hard_negatives, e.gather_negatives)
    assert finite
    mean_loss = all_reduce([loss])[0] / d.world
    grads = {n: safe_get_full_grad(p).clone() for n, p in tte.adapter_params("embed").items()}
    engine.destroy()
    return mean_loss, grads


def _worker(out: str) -> None:
    torch.set_num_threads(1)
    loss, grads = _embed_grads(_rows())
    if int(os.environ["RANK"]) == 0:
        torch.save({"loss": loss, "grads": grads}, out)


def _torchrun(args, timeout=300):
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)  # an in-process test may have made a one-rank group in this process
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--standalone"] + args
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)



def test_two_ranks_with_gathered_negatives_match_one_process_with_the_whole_batch(tmp_path, one_torch_thread):
    out = tmp_path / "rank0.pt"
    proc = _torchrun([str(Path(__file__).resolve()), str(out)])
    assert proc.returncode == 0, proc.stderr[-4000:]
    two = torch.load(out)
    loss, one = _embed_grads(_rows())  # this process: a one-rank group, all 8 rows
    assert two["loss"] == pytest.approx(loss, rel=1e-6)
    assert one.keys() == two["grads"].keys() and len(one) > 0
    for name, g in one.items():
        scale = float(g.abs().max())
        diff = float((two["grads"][name] - g).abs().max())
        assert diff <= 1e-5 * max(scale, 1.0), f"{name}: max abs diff {diff:.2e} at scale {scale:.2f}"


def test_tiny_cpu_recipe_runs_both_stages_on_zero3_with_two_ranks(tmp_path):
    run = tmp_path / "z3"
    proc = _torchrun(["-m", "unified_tte.cli", "train", "recipes/tiny_cpu.yaml", f"run_dir={run}",
                      "deepspeed=recipes/deepspeed/zero3.json", "think.steps=2", "embed.steps=2",
                      "think.batch_size=8", "embed.batch_size=8", "embed.gradcache_chunk=2",
                      "data.digits.max_train_per_task=8", "checkpoint_every=0", "progress_bar=false"])
    assert proc.returncode == 0, proc.stderr[-4000:]
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["stage"]) for r in records] == [(1, "think"), (2, "think"), (3, "embed"), (4, "embed")]
    assert all(math.isfinite(r["loss"]) and r["loss"] > 0 for r in records)
    for f in ("think/adapter_model.safetensors", "embed/adapter_model.safetensors", "tte_config.json",
              "checkpoints/step_2/trainer_state.json", "checkpoints/step_4/trainer_state.json"):
        assert (run / f).is_file(), f
    state = json.loads((run / "checkpoints/step_4/trainer_state.json").read_text())
    assert sorted(state["rng"]) == ["0", "1"]  # every rank's RNG
    assert list((run / "wandb").glob("offline-run-*")), "the recipe logs to wandb offline"
    assert "think: loss" in proc.stdout and "embed: loss" in proc.stdout


if __name__ == "__main__":
    _worker(sys.argv[1])
