"""Training in one process (DeepSpeed ZeRO-2 over a one-rank gloo group, fp32 CPU): GradCache
equals its plain twin, dropout re-runs are exact, resume is exact, a non-finite loss stops the
run and keeps the last good checkpoint, the run folder has the layout export reads."""
import json
import math
import random
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from unified_tte import train as T
from unified_tte.train.batches import batch_indices
from unified_tte.train.engine import StageModule, init_distributed, lr_lambda, make_engine, select_trainable
from unified_tte.train.recipe import load_deepspeed_json, recipe_from_dict
from unified_tte.train.steps import embed_backward
from unified_tte.testing import randomize_adapters

ZERO2 = str(Path(__file__).resolve().parents[1] / "recipes" / "deepspeed" / "zero2.json")


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # conftest: tiny models, one thread


def tiny_recipe(run_dir, **sections):
    """A recipe small enough for a few seconds a stage: 40 digits rows, batches of 4 and 8."""
    raw = {
        "run_dir": str(run_dir), "backbone": "tiny", "deepspeed": ZERO2,
        "data": {"train": "digits", "digits": {"max_train_per_task": 8}},
        "model": {"mode": "activated"},
        "think": {"steps": 2, "batch_size": 4, "micro_batch_size": 2, "lr": 2e-3, "warmup_steps": 1},
        "embed": {"steps": 4, "batch_size": 8, "gradcache_chunk": 3, "lr": 1e-3, "warmup_steps": 1},
        "checkpoint_every": 3, "keep_checkpoints": None, "progress_bar": False,
        "wandb": {"mode": "disabled"},
    }
    for key, value in sections.items():
        if isinstance(value, dict):
            raw.setdefault(key, {}).update(value)
        else:
            raw[key] = value
    return recipe_from_dict(raw, "test recipe")


def forget_process_caches():
    """Clear the package's in-process caches (e.g. the batch order's permutations), so that a
    second run in this process starts from what a run in a fresh process, a real resume, has;
    else the two runs share cached objects and cannot differ by them."""
    for name, module in list(sys.modules.items()):
        if name.startswith("unified_tte"):
            for obj in list(vars(module).values()):
                if callable(getattr(obj, "cache_clear", None)):
                    obj.cache_clear()


@pytest.fixture(scope="module")
def rows():
    from unified_tte.data.digits import build_digits

    all_rows = build_digits(max_train_per_task=4).train_rows  # 5 sub-tasks: images, text, I2I
    return [all_rows[i] for i in (0, 4, 8, 12, 16, 1, 13, 17)]


def embed_grads(recipe, rows, chunk, seed=0, dropout=None, keep_prefix=True):
    """Gradients of the embed adapter after one embed step's backward (before the update)."""
    from deepspeed.utils import safe_get_full_grad

    init_distributed()
    if dropout is not None:
        recipe.model.lora_dropout = dropout
    tte = T.build_model(recipe, torch.float32)
    randomize_adapters(tte, std=0.05, seed=seed)  # non-zero think and embed deltas
    recipe.embed.gradcache_chunk = chunk
    engine = make_engine(recipe, "embed", tte, load_deepspeed_json(ZERO2), world=1, bf16=False)
    e = recipe.embed
    loss, tokens, finite = embed_backward(engine, rows, chunk, e.temperature, e.use_traces,
                                            e.hard_negatives, e.gather_negatives, keep_prefix)
    grads = {n: safe_get_full_grad(p).clone() for n, p in tte.adapter_params("embed").items()}
    engine.destroy()
    return loss, grads, finite


@pytest.mark.parametrize("mode,keep_prefix", [("activated", True), ("activated", False), ("top_k", True)])
def test_gradcache_gives_the_gradients_of_the_unchunked_batch(tmp_path, rows, mode, keep_prefix):
    recipe = tiny_recipe(tmp_path, model={"mode": mode, "embed_layers": 2})
    loss_plain, plain, ok = embed_grads(recipe, rows, chunk=None)
    loss_chunked, chunked, _ = embed_grads(recipe, rows, chunk=3, keep_prefix=keep_prefix)  # 3, 3, 2 rows
    assert ok and math.isfinite(loss_plain)
    assert loss_chunked == pytest.approx(loss_plain, rel=1e-6)  # padding widths differ per chunk
    assert plain.keys() == chunked.keys() and len(plain) > 0
    total = sum(float(g.abs().sum()) for g in plain.values())
    assert total > 0
    # fp32, 1e-5 relative to each gradient's scale: the gradients reach ~5 (1/temperature = 50),
    # and chunks pad to their own widths and sum in another order (seen: <= 3.2e-6).
    for name in plain:
        scale = float(plain[name].abs().max())
        diff = float((chunked[name] - plain[name]).abs().max())
        assert diff <= 1e-5 * max(scale, 1.0), f"{name}: max abs diff {diff:.2e} at scale {scale:.2f}"


def test_gradcache_rerun_reproduces_dropout_masks(tmp_path, rows, monkeypatch):
    """With LoRA dropout on, each chunk's re-run with grad sees the same dropout masks as its
    pass without grad, so the cached gradients belong to the embeddings being backpropagated."""
    outputs, dropout_on = [], []
    forward = StageModule.forward

    def recording(self, kind, *args, **kwargs):
        out = forward(self, kind, *args, **kwargs)
        if kind == "from_state":
            outputs.append(out.detach().clone())
            # Equal passes prove nothing if no mask is drawn: the embed LoRA's dropout must be on here.
            dropout_on.append(any(m.training and m.p > 0 for n, m in self.tte.peft_model.named_modules()
                                  if n.endswith("lora_dropout.embed")))
        return out

    monkeypatch.setattr(StageModule, "forward", recording)
    recipe = tiny_recipe(tmp_path, embed={"batch_size": 6})
    _, grads, ok = embed_grads(recipe, rows[:6], chunk=3, dropout=0.3)
    assert ok
    first, second = outputs[:4], outputs[4:]  # 2 chunks x (queries, targets), twice
    assert len(second) == 4 and dropout_on == [True] * 8
    for a, b in zip(first, second):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    # ... and dropout is really on: the same chunk without the RNG restore differs.
    outputs.clear()
    tte = T.build_model(recipe, torch.float32)
    randomize_adapters(tte, std=0.05)
    select_trainable(tte, recipe, "embed")
    x, tr = [r.qry for r in rows[:3]], [r.trace for r in rows[:3]]
    assert not torch.equal(tte.embed_with_grad(x, tr), tte.embed_with_grad(x, tr))


def read_metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_resume_is_exact_and_the_run_folder_has_the_export_layout(tmp_path):
    # think: steps 1-2, embed: steps 3-6 (GradCache chunks of 3, 3, 2)
    straight = T.train(tiny_recipe(tmp_path / "straight"))
    forget_process_caches()
    first = T.train(tiny_recipe(tmp_path / "resumed", stop_after=3))
    assert first["stopped"] and [s for s, _ in first["losses"]["embed"]] == [3]
    forget_process_caches()
    second = T.train(tiny_recipe(tmp_path / "resumed"), resume=True)
    assert not second["stopped"]

    def losses(*results):
        out = {}
        for r in results:
            for stage in r["losses"].values():
                out.update(dict(stage))
        return out

    a, b = losses(straight), losses(first, second)
    assert sorted(a) == sorted(b) == [1, 2, 3, 4, 5, 6]
    assert [a[s] for s in range(1, 7)] == [b[s] for s in range(1, 7)]  # identical, not close

    run = tmp_path / "straight"
    for f in ("recipe.yaml", "tte_config.json", "metrics.jsonl", "think/adapter_config.json",
              "think/adapter_model.safetensors", "embed/adapter_config.json",
              "embed/adapter_model.safetensors", "checkpoints/step_3/trainer_state.json",
              "checkpoints/step_6/trainer_state.json"):
        assert (run / f).is_file(), f
    assert not (run / "README.md").exists()
    config = json.loads((run / "tte_config.json").read_text())
    assert config["backbone"] == "tiny" and config["mode"] == "activated"
    state = json.loads((run / "checkpoints/step_3/trainer_state.json").read_text())
    assert state["step"] == 3 and state["stage"] == "embed" and state["stage_step"] == 1
    assert state["samples"] == 8 and "0" in state["rng"]
    records = read_metrics(run)
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
    for r in records:
        assert {"loss", "lr", "grad_norm", "samples_per_s", "tokens_per_s", "peak_memory_gb"} <= r.keys()
        assert r["tokens_per_s"] > 0 and r["grad_norm"] is not None
    # each stage: one warmup step, then cosine from its own lr
    assert [r["lr"] for r in records] == pytest.approx(
        [2e-3 * lr_lambda(1, 2, 0.0)(s) for s in range(2)] + [1e-3 * lr_lambda(1, 4, 0.0)(s) for s in range(4)])

    from unified_tte.model.checkpoint import read_run
    cfg, spec = read_run(run)  # export's reader accepts the run folder as written
    assert spec == "tiny" and cfg.mode == "activated"


def test_a_non_finite_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    from unified_tte.model import UnifiedTTE

    calls = {"n": 0}
    sft_loss = UnifiedTTE.sft_loss

    def poisoned(self, *args, **kwargs):
        calls["n"] += 1
        loss = sft_loss(self, *args, **kwargs)
        return loss * float("nan") if calls["n"] == 5 else loss  # step 3, first micro-batch

    monkeypatch.setattr(UnifiedTTE, "sft_loss", poisoned)
    recipe = tiny_recipe(tmp_path, stages=["think"], think={"steps": 4}, checkpoint_every=1)
    with pytest.raises(T.NonFiniteLoss) as err:
        T.train(recipe)
    message = str(err.value)
    # step 2's weights gave the non-finite loss of step 3: its checkpoint is not vouched for and
    # goes; step 1's weights gave the finite loss of step 2, so it is the last good one.
    assert "step 3" in message and "checkpoints/step_1" in message
    assert [p.name for _, p in T.checkpoints(tmp_path)] == ["step_1"]
    assert not (tmp_path / "checkpoints" / "step_2").exists()
    assert not (tmp_path / "think").exists()
    # As the message says: lower the lr and resume; the new lr takes effect from step 2.
    result = T.train(tiny_recipe(tmp_path, stages=["think"], think={"steps": 4, "lr": 5e-4},
                                 checkpoint_every=1), resume=True)
    assert [s for s, _ in result["losses"]["think"]] == [2, 3, 4]
    lrs = {r["step"]: r["lr"] for r in read_metrics(tmp_path)}
    assert sorted(lrs) == [1, 2, 3, 4]
    assert lrs[2] == pytest.approx(5e-4 * lr_lambda(1, 4, 0.0)(1))
    assert (tmp_path / "think" / "adapter_model.safetensors").is_file()


def test_an_exploding_update_is_never_kept_as_the_good_checkpoint(tmp_path):
    """A huge learning rate makes finite but enormous weights that poison the next step: the
    checkpoint holding them must not be the one --resume is sent back to."""
    recipe = lambda lr, **kw: tiny_recipe(tmp_path, stages=["think"], checkpoint_every=1,  # noqa: E731
                                          think={"steps": 5, "lr": lr, "warmup_steps": 0}, **kw)
    T.train(recipe(2e-3, stop_after=2))
    with pytest.raises(T.NonFiniteLoss) as err:
        T.train(recipe(1e30), resume=True)
    message = str(err.value)
    assert "checkpoints/step_2" in message and "--resume" in message
    assert [p.name for _, p in T.checkpoints(tmp_path)] == ["step_1", "step_2"]
    # It really resumes: back to a sane lr, from step 2, to the end of the stage.
    result = T.train(recipe(2e-3), resume=True)
    assert [s for s, _ in result["losses"]["think"]] == [3, 4, 5]
    assert all(math.isfinite(loss) for _, loss in result["losses"]["think"])
    assert (tmp_path / "think" / "adapter_model.safetensors").is_file()


def test_a_metrics_line_cut_by_a_crash_does_not_block_resume(tmp_path):
    T.train(tiny_recipe(tmp_path, stages=["think"], checkpoint_every=1, think={"steps": 3}, stop_after=2))
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text(metrics.read_text() + '{"step": 3, "stage": "thi')   # killed mid-write
    with pytest.warns(UserWarning, match="dropped 1 line"):
        result = T.train(tiny_recipe(tmp_path, stages=["think"], checkpoint_every=1, think={"steps": 3}),
                         resume=True)
    assert [s for s, _ in result["losses"]["think"]] == [3]
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2, 3]


def test_full_fine_tuning_trains_the_language_model_and_keeps_the_vision_tower(tmp_path):
    recipe = tiny_recipe(tmp_path, stages=["think"], think={"steps": 1, "method": "full", "lr": 1e-3},
                         model={"think": "none"})
    tte = T.build_model(recipe, torch.float32)
    params = select_trainable(tte, recipe, "think")
    names = {n for n, p in tte.peft_model.named_parameters() if p.requires_grad}
    assert len(params) == len(names) > 0
    assert not any(".visual." in n or "lora_" in n for n in names)
    assert any("layers.0.self_attn.q_proj" in n for n in names)
    T.train(recipe)
    from safetensors.torch import load_file
    saved = load_file(str(tmp_path / "think" / "model.safetensors"))
    assert set(saved) == names


def test_warmup_then_cosine_schedule():
    f = lr_lambda(warmup=4, total=14, min_ratio=0.1)
    assert [f(s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    values = [f(s) for s in range(4, 14)]
    assert values == sorted(values, reverse=True) and values[0] == 1.0
    assert f(14) == pytest.approx(0.1) and f(9) == pytest.approx(0.55)
    assert lr_lambda(0, 10, 0.0)(0) == 1.0


def test_batches_depend_on_the_step_only_and_cover_each_epoch_once():
    n, batch = 50, 8  # 6 full batches an epoch, 2 rows dropped
    epoch = [i for s in range(6) for i in batch_indices(n, batch, seed=3, stage_index=1, step=s)]
    assert len(set(epoch)) == 48
    # The same step again as a fresh process (a resumed run) computes it: no cache, other global RNG states.
    again = []
    for seed in (1, 2):
        forget_process_caches()
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)
        again.append(batch_indices(n, batch, 3, 1, 4))
    assert again[0] == again[1] == epoch[32:40]
    assert batch_indices(n, batch, 3, 1, 6) != batch_indices(n, batch, 3, 1, 0)  # a new epoch order


def test_bad_batch_shapes_and_data_fail_before_any_work(tmp_path, monkeypatch):
    def no_model(*a, **k):
        raise AssertionError("the model was built before the input check failed")

    monkeypatch.setattr("unified_tte.train.loop.load_backbone", no_model)
    with pytest.raises(T.TrainError, match="micro_batch_size"):
        T.train(tiny_recipe(tmp_path, think={"batch_size": 6, "micro_batch_size": 4}))
    with pytest.raises(T.TrainError, match="more than the 40 rows"):
        T.train(tiny_recipe(tmp_path, embed={"batch_size": 64}))
    with pytest.raises(T.TrainError, match="no neg_text"):
        rows = tmp_path / "rows.jsonl"
        rows.write_text(json.dumps({"qry": "a cat", "pos_text": "a photo of a cat"}) + "\n")
        T.train(tiny_recipe(tmp_path, data={"train": [str(rows)]}, stages=["embed"],
                            embed={"use_traces": False}))


def test_resume_refuses_a_recipe_that_changes_what_the_run_is(tmp_path):
    T.train(tiny_recipe(tmp_path, stages=["think"], checkpoint_every=1, think={"steps": 3}, stop_after=1))
    before = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    with pytest.raises(T.TrainError, match=r"--resume: backbone was 'tiny' .* is 'tiny-llama' now"):
        T.train(tiny_recipe(tmp_path, backbone="tiny-llama", stages=["think"], checkpoint_every=1,
                            think={"steps": 3}), resume=True)
    with pytest.raises(T.TrainError, match=r"model was .*'lora_r': 16.* is .*'lora_r': 8"):
        T.train(tiny_recipe(tmp_path, stages=["think"], checkpoint_every=1, think={"steps": 3},
                            model={"lora_r": 8}), resume=True)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == before
    # what may change on resume, changes: a longer schedule
    result = T.train(tiny_recipe(tmp_path, stages=["think"], checkpoint_every=1, think={"steps": 4}), resume=True)
    assert [s for s, _ in result["losses"]["think"]] == [2, 3, 4]
