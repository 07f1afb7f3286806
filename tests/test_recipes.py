"""Every recipe in recipes/ loads, validates and fits its launch command; recipe errors name the
key and the file; bad input fails before any work."""
import json
import re
from pathlib import Path

import pytest

from unified_tte import train as T
from unified_tte.train.engine import stage_shape
from unified_tte.train.recipe import (Recipe, RecipeError, absolute_paths, check_inputs, deepspeed_config, dump_yaml,
                                      load_deepspeed_json, load_recipe, recipe_from_dict)

REPO = Path(__file__).resolve().parents[1]
RECIPES = sorted((REPO / "recipes").rglob("*.yaml"))
DEEPSPEED_JSONS = sorted((REPO / "recipes" / "deepspeed").glob("*.json"))


def launch_ranks(text: str) -> int:
    """Ranks of the first launch command in a recipe's opening comment."""
    m = re.search(r"--(?:nproc_per_node|num_gpus)[ =](\d+)", text)
    return int(m.group(1)) if m else 1


def test_there_are_recipes_for_the_tiny_cpu_run_and_both_qwen2vl_sizes():
    names = {p.name for p in RECIPES}
    assert {"tiny_cpu.yaml", "qwen2vl_2b.yaml", "qwen2vl_7b.yaml"} <= names
    stages = {json.loads(p.read_text()).get("zero_optimization", {}).get("stage") for p in DEEPSPEED_JSONS}
    assert stages == {0, 1, 2, 3}
    assert any("offload_param" in p.read_text() for p in DEEPSPEED_JSONS)


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_every_recipe_loads_validates_and_opens_with_its_launch_command(path, monkeypatch):
    monkeypatch.chdir(REPO)  # recipes name their paths from the repository root
    text = path.read_text()
    header = text.split("\n\n")[0]
    assert header.startswith("#") and re.search(r"(torchrun|deepspeed|tte) .*train recipes/" + path.name, header), \
        f"{path.name} must open with the command that runs it"
    recipe = load_recipe(path)
    ds = load_deepspeed_json(recipe.deepspeed)
    world = launch_ranks(header)
    for stage in recipe.training_stages:   # the DeepSpeed stages (a gate stage has no engine)
        local, micro, accumulation = stage_shape(recipe, stage, world)
        cfg = deepspeed_config(ds, recipe.stage(stage), micro, accumulation, world, bf16=False)
        assert cfg["train_batch_size"] >= recipe.stage(stage).batch_size
    assert recipe_from_dict(recipe.to_dict(), "round trip") == recipe
    assert "PLACEHOLDER" in text or recipe.backbone in ("tiny", "tiny-llama", "smollm2")
    if "PLACEHOLDER" not in text:
        check_inputs(recipe, str(path))  # built-in backbone and data: nothing to edit


def test_the_published_tte_settings_are_in_the_qwen2vl_recipes(monkeypatch):
    monkeypatch.chdir(REPO)
    for name in ("qwen2vl_2b.yaml", "qwen2vl_7b.yaml"):
        r = load_recipe(REPO / "recipes" / name)
        assert (r.model.lora_r, r.model.lora_alpha, r.model.pooling) == (16, 64, "last")
        assert r.embed.temperature == 0.02 and r.embed.batch_size == 8192
        assert r.embed.gradcache_chunk is not None and r.embed.gather_negatives


def test_an_unknown_key_names_the_key_and_the_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("backbone: tiny\nembed:\n  stepz: 3\n")
    with pytest.raises(RecipeError, match=r"bad\.yaml.*unknown key 'embed\.stepz'"):
        load_recipe(bad)
    bad.write_text("backbone: tiny\nlearning_rate: 3\n")
    with pytest.raises(RecipeError, match=r"bad\.yaml.*'learning_rate'"):
        load_recipe(bad)


def test_overrides_are_typed_and_checked(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    r = load_recipe("recipes/tiny_cpu.yaml", ["embed.steps=7", "think.lr=3e-4", "stages=[embed]",
                                              "model.mode=top_k", "data.digits.seed=2"])
    assert (r.embed.steps, r.think.lr, r.stages, r.model.mode, r.data.digits.seed) == (7, 3e-4, ["embed"], "top_k", 2)
    assert isinstance(r.think.lr, float)
    with pytest.raises(RecipeError, match=r"override 'embed\.stepz=3'.*unknown key"):
        load_recipe("recipes/tiny_cpu.yaml", ["embed.stepz=3"])
    with pytest.raises(RecipeError, match=r"'embed\.steps' must be an integer"):
        load_recipe("recipes/tiny_cpu.yaml", ["embed.steps=many"])
    with pytest.raises(RecipeError, match=r"'model\.mode' must be one of"):
        load_recipe("recipes/tiny_cpu.yaml", ["model.mode=sideways"])
    with pytest.raises(RecipeError, match="expected key=value"):
        load_recipe("recipes/tiny_cpu.yaml", ["embed.steps"])


def test_inconsistent_recipes_are_refused_with_the_fix(tmp_path):
    with pytest.raises(RecipeError, match="set model.think: none"):
        recipe_from_dict({"think": {"method": "full"}})
    with pytest.raises(RecipeError, match="order think, embed"):
        recipe_from_dict({"stages": ["embed", "think"]})
    with pytest.raises(RecipeError, match="temperature"):
        recipe_from_dict({"embed": {"temperature": 0}})
    with pytest.raises(RecipeError, match=r"embed\.trace_noise.*must be in \[0, 1\), got 1\.0"):
        recipe_from_dict({"embed": {"trace_noise": 1.0}})


def test_trace_noise_reaches_the_embed_rows_only(tmp_path):
    """The embed stage trains on swapped answers; the think stage on the same rows' true traces."""
    from unified_tte.train.batches import load_rows, stage_rows

    recipe = recipe_from_dict({"data": {"train": "digits", "max_rows": 40}, "embed": {"trace_noise": 0.5}})
    rows = load_rows(recipe)
    truth = [r.trace for r in rows]
    think, embed = stage_rows(recipe, "think", rows), stage_rows(recipe, "embed", rows)
    assert [r.trace for r in think] == truth
    changed = [(a, b) for a, b in zip(rows, embed) if a.trace != b.trace]
    assert len(changed) >= 15 and all(a.id == b.id and a.pos is b.pos for a, b in changed)
    quiet = recipe_from_dict({"data": {"train": "digits", "max_rows": 40}})
    assert [r.trace for r in stage_rows(quiet, "embed", rows)] == truth


def test_a_deepspeed_json_may_not_set_what_the_recipe_owns(tmp_path):
    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps({"zero_optimization": {"stage": 2}, "train_batch_size": 64}))
    with pytest.raises(RecipeError, match=r"ds\.json.*train_batch_size.*recipe owns"):
        load_deepspeed_json(ds)
    ds.write_text("{not json")
    with pytest.raises(RecipeError, match="not valid JSON"):
        load_deepspeed_json(ds)


def test_a_missing_data_file_fails_before_any_work(tmp_path, monkeypatch):
    def no_work(*args, **kwargs):
        raise AssertionError("work started before the input check")

    monkeypatch.setattr("unified_tte.train.loop.load_backbone", no_work)
    monkeypatch.setattr("unified_tte.train.loop.init_distributed", no_work)
    monkeypatch.chdir(REPO)
    recipe = load_recipe("recipes/tiny_cpu.yaml", [f"data.train=[{tmp_path / 'missing.jsonl'}]",
                                                   f"run_dir={tmp_path / 'run'}"])
    with pytest.raises(RecipeError, match=r"data\.train\[0\].*missing\.jsonl"):
        T.train(recipe)
    recipe = load_recipe("recipes/tiny_cpu.yaml", [f"data.traces=[{tmp_path / 'traces.jsonl'}]"])
    with pytest.raises(RecipeError, match=r"data\.traces\[0\].*traces\.jsonl"):
        T.train(recipe)
    recipe = load_recipe("recipes/tiny_cpu.yaml", ["backbone=/nowhere/Qwen2-VL-2B"])
    with pytest.raises(RecipeError, match=r"backbone.*/nowhere/Qwen2-VL-2B/config\.json"):
        T.train(recipe)
    assert not (tmp_path / "run").exists()


def test_the_command_line_reports_recipe_errors_without_a_traceback(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("backbone: tiny\nthink:\n  lr: 1e-3\n  warmup: 3\n")
    assert T.train_main([str(bad)]) == 2  # bad input: exit code 2 (errors.py)
    err = capsys.readouterr().err
    assert "unknown key 'think.warmup'" in err and str(bad) in err and "Traceback" not in err


def test_the_resolved_recipe_round_trips_through_yaml(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    r = absolute_paths(load_recipe("recipes/tiny_cpu.yaml"))
    path = tmp_path / "recipe.yaml"
    path.write_text(dump_yaml(r))
    again = load_recipe(path)
    assert again == r and Path(again.deepspeed).is_absolute()
    assert isinstance(again, Recipe)


@pytest.mark.parametrize("override, message", [
    ("think.lr=.nan", "think.lr' must be a finite number"),
    ("embed.temperature=.inf", "embed.temperature' must be a finite number"),
    ("embed.weight_decay=-0.1", "embed.weight_decay: must be >= 0"),
    ("think.betas=[0.9, 1.5]", r"think.betas: each must be in \[0, 1\)"),
    ("model.lora_dropout=1.0", r"model.lora_dropout: must be in \[0, 1\)"),
    ("model.lora_r=0", "model.lora_r"),
    ("data.digits.test_fraction=0", r"test_fraction: must be in \(0, 1\)"),
])
def test_out_of_range_numbers_are_refused_by_key(override, message):
    with pytest.raises(RecipeError, match=message):
        load_recipe(REPO / "recipes" / "tiny_cpu.yaml", [override])


def test_an_empty_recipe_says_what_a_recipe_needs(tmp_path):
    empty = tmp_path / "empty.yaml"
    empty.write_text("# nothing yet\n")
    with pytest.raises(RecipeError, match=r"empty.yaml: the recipe is empty; a recipe sets at least run_dir, backbone"):
        load_recipe(empty)


def test_optimizer_settings_in_the_deepspeed_json_are_refused(tmp_path):
    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps({"zero_optimization": {"stage": 2},
                              "optimizer": {"type": "AdamW", "params": {"lr": 0.1, "weight_decay": 0.5}}}))
    with pytest.raises(RecipeError, match=r"optimizer.params.lr.*optimizer.params.weight_decay.*recipe owns"):
        load_deepspeed_json(ds)
    ds.write_text(json.dumps({"optimizer": {"type": "AdamW", "params": {"eps": 1e-6}}}))
    assert load_deepspeed_json(ds)["optimizer"]["params"] == {"eps": 1e-6}
