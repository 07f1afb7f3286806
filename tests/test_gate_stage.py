"""The recipe's gate stage and what it stands on: held-out rows never trained on, queries mixed
without their trace, and a fitted gate in the run folder that loads with the run, decides
deterministically, and is refused when it does not fit the model."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from unified_tte import UnifiedTTE
from unified_tte.errors import CheckpointError, RecipeError, TrainError
from unified_tte.train.batches import load_rows, split_holdout, without_traces
from unified_tte.train.gate import cross_fit, fallback_threshold, fit_logistic, labels
from unified_tte.train.recipe import recipe_from_dict

from test_train import tiny_recipe

pytestmark = pytest.mark.usefixtures("one_torch_thread")


KNOWLEDGE = {"train": "knowledge", "options": {"max_train_per_task": 30, "max_eval_per_task": 4},
             "holdout": 0.25, "holdout_by": "entities"}


def test_holdout_by_entity_keeps_every_row_of_a_held_out_entity_out_of_training(tmp_path):
    recipe = tiny_recipe(tmp_path / "r", data=KNOWLEDGE)
    rows = load_rows(recipe)
    fit, held = split_holdout(recipe, rows)
    assert len(fit) + len(held) == len(rows) and fit and held
    trained = {e for r in fit for e in r.meta["entities"]}
    held_entities = {e for r in held for e in r.meta["entities"]} - trained
    assert held_entities, "some entity occurs only in held-out rows"
    for r in fit:   # no training row mentions an entity held out (a comparison's second one too)
        assert not set(r.meta["entities"]) & held_entities
    again = split_holdout(recipe, load_rows(recipe))
    assert [r.id for r in again[1]] == [r.id for r in held]          # seeded: the same rows each run
    other = split_holdout(tiny_recipe(tmp_path / "s", seed=1, data=KNOWLEDGE), rows)[1]
    assert [r.id for r in other] != [r.id for r in held]


def test_holdout_and_gate_settings_are_checked(tmp_path):
    with pytest.raises(RecipeError, match="data.holdout: must be in"):
        tiny_recipe(tmp_path, data={"holdout": 1.5})
    with pytest.raises(RecipeError, match="gate stage fits on held-out train rows"):
        tiny_recipe(tmp_path, stages=["think", "embed", "gate"])
    with pytest.raises(RecipeError, match=r"gate.target_think_rate: must be in \[0, 1\]"):
        tiny_recipe(tmp_path, stages=["think", "embed", "gate"], data={"holdout": 0.2},
                    gate={"target_think_rate": 1.2})
    with pytest.raises(RecipeError, match="list embed before gate"):
        tiny_recipe(tmp_path, stages=["think", "gate"], data={"holdout": 0.2})
    with pytest.raises(RecipeError, match="no_trace_fraction: must be in"):
        tiny_recipe(tmp_path, embed={"no_trace_fraction": 1.0})
    recipe = tiny_recipe(tmp_path, data={"holdout": 0.2, "holdout_by": "nope"})
    with pytest.raises(TrainError, match="have no meta key 'nope'"):
        split_holdout(recipe, load_rows(recipe))


def test_no_trace_mixing_is_seeded_per_step_and_row_and_keeps_the_rest():
    from unified_tte.data.digits import build_digits

    rows = build_digits(max_train_per_task=20).train_rows[:80]
    mixed = without_traces(rows, 0.4, seed=0, step=3)
    dropped = [r.trace is None for r in mixed]
    assert 0.2 < np.mean(dropped) < 0.6
    assert all(m.trace == r.trace for m, r in zip(mixed, rows) if m.trace is not None)
    assert [r.trace is None for r in without_traces(rows, 0.4, seed=0, step=3)] == dropped
    assert [r.trace is None for r in without_traces(rows, 0.4, seed=0, step=4)] != dropped
    # a row's draw does not depend on the other rows of its batch (ranks split batches)
    assert [r.trace is None for r in without_traces(rows[:10], 0.4, seed=0, step=3)] == dropped[:10]
    assert without_traces(rows, 0.0, seed=0, step=3) is rows


def test_labels_follow_rank_then_margin():
    m = {"rank_direct": np.array([3, 1, 2, 2.]), "rank_tte": np.array([1, 2, 2, 2.]),
         "margin_direct": np.array([0., 0, 0.1, 0.3]), "margin_tte": np.array([0., 0, 0.3, 0.2])}
    y, w = labels(m)
    assert y.tolist() == [1, 0, 1, 0] and w[0] == w[1] == 1.0 and 0 < w[2] <= 1


def test_logistic_fit_separates_a_separable_signal_and_cross_fitting_is_deterministic():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(60, 5))
    y = (x[:, 0] > 0).astype(float)
    params = fit_logistic(x, y, np.ones(60), l2=0.01)
    logits = ((torch.as_tensor(x).float() - params[2]) / params[3]) @ params[0] + params[1]
    assert ((logits > 0).numpy() == (y > 0)).mean() >= 0.95   # L2 may leave a border point
    a, l2a = cross_fit(x, y, np.ones(60), folds=5, seed=0)
    b, l2b = cross_fit(x, y, np.ones(60), folds=5, seed=0)
    assert np.array_equal(a, b) and l2a == l2b
    assert ((a > 0.5) == (y > 0)).mean() > 0.9             # out of fold, still right


def test_the_fallback_threshold_is_where_direct_beats_an_unsure_answer():
    think = np.array([True, True, True, False])
    logprob = np.array([-3.0, -0.1, -2.0, -5.0])
    hit_direct, hit_tte = np.array([1., 0, 1, 1]), np.array([0., 1, 0, 0])
    assert fallback_threshold(think, logprob, hit_direct, hit_tte) == -0.1   # rows 0 and 2 fall back
    assert fallback_threshold(think, logprob, hit_tte, hit_tte) is None


@pytest.mark.slow
def test_a_gate_stage_run_fits_saves_and_reloads_a_gate(tmp_path):
    from unified_tte import train as T

    run = tmp_path / "run"
    recipe = tiny_recipe(run, stages=["think", "embed", "gate"],
                         data={"digits": {"max_train_per_task": 24}, "holdout": 0.3},
                         embed={"no_trace_fraction": 0.5},
                         gate={"max_new_tokens": 6, "batch_size": 16, "folds": 3, "token_budget": 0.5})
    out = T.train(recipe)
    gate_dir = run / "gate"
    assert (gate_dir / "gate.safetensors").is_file() and out["gate"]["rows"] >= 6
    info = json.loads((gate_dir / "gate_config.json").read_text())
    assert set(info["operating_points"]) == {"quality", "compute"}
    assert info["operating_points"]["compute"]["token_fraction"] <= 0.5 + 1e-9
    assert info["operating_points"]["quality"]["hit@1"] >= max(out["gate"]["never"]["hit@1"],
                                                               out["gate"]["always"]["hit@1"]) - 1e-9
    # the held-out rows were never trained on
    held = {r["task"] for r in json.loads((gate_dir / "heldout.json").read_text())["rows"]}
    assert held
    tte = UnifiedTTE.from_checkpoint(run)
    assert tte.gate is not None
    from unified_tte.data.digits import build_digits

    queries = [r.query for t in build_digits(max_train_per_task=4, max_eval_per_task=4).eval_tasks for r in t.rows]
    emb1, tr1 = tte.think_then_embed(queries, max_new_tokens=6, think="auto")
    emb2, tr2 = UnifiedTTE.from_checkpoint(run).think_then_embed(queries, max_new_tokens=6, think="auto")
    assert [t.thought for t in tr1] == [t.thought for t in tr2] and torch.equal(emb1, emb2)
    # the same gate on a model with other embed weights is refused
    other = UnifiedTTE.from_checkpoint(run)
    with torch.no_grad():
        next(iter(other.adapter_params("embed").values())).add_(0.01)
    with pytest.raises(CheckpointError, match="other think/embed adapter weights"):
        other.set_gate(tte.gate)
    # tte eval: the policy's think rate and tokens per query, and the frontier files
    from unified_tte.cli import main

    out = tmp_path / "eval" / "results.json"
    assert main(["eval", str(run), "--tasks", "digits", "--task-option", "max_eval_per_task=4",
                 "--max-new-tokens", "6", "--think", "auto", "--frontier", "--out", str(out), "--no-progress"]) == 0
    results = json.loads(out.read_text())
    assert {"think_rate", "decoded_tokens_per_query"} <= set(next(iter(results["tasks"].values())))
    frontier = json.loads((out.parent / "frontier.json").read_text())
    assert frontier["curve"][0]["think_rate"] == 0.0 and frontier["curve"][-1]["think_rate"] == 1.0
    assert set(frontier["points"]) == {"quality", "compute"}
    assert frontier["oracle"]["metric"] >= max(frontier["never"]["overall"]["metric"],
                                               frontier["always"]["overall"]["metric"])
    assert (out.parent / "frontier.png").stat().st_size > 0
    # a run without its gate cannot serve think auto: one error line, exit 2, before any work
    import shutil

    bare = tmp_path / "bare"
    shutil.copytree(run, bare, ignore=shutil.ignore_patterns("gate", "checkpoints"))
    assert main(["eval", str(bare), "--tasks", "digits", "--think", "auto", "--out", str(tmp_path / "x.json")]) == 2
