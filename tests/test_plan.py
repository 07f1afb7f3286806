"""`tte plan`: a per-stage memory table for a recipe from the model's config alone (meta device),
DeepSpeed's own estimators for the trained parameters, the knob that makes a stage fit, and (slow)
the plan within 25% of the peak memory measured on this CPU for the tiny model. The 2B shape's
measurement is a benchmark (docs/guide.md, "GPUs"; figures in docs/results/log.md):
`tte plan recipes/qwen2vl_2b.yaml --measure ...`.
"""
import json

import pytest

from unified_tte.tools import plan as P
from unified_tte.tools.plan import plan_main

pytestmark = pytest.mark.usefixtures("one_torch_thread")

GIB = 2 ** 30


def run_plan(tmp_path, capsys, *argv) -> tuple[str, dict]:
    out = tmp_path / "plan.json"
    assert plan_main([*argv, "--json", str(out)]) == 0
    return capsys.readouterr().out, json.loads(out.read_text())


def test_qwen2vl_7b_recipe_on_8_gpus_prints_a_per_stage_table(tmp_path, capsys):
    text, report = run_plan(tmp_path, capsys, "recipes/qwen2vl_7b.yaml", "--gpus", "8")
    shape = report["shape"]
    # the published Qwen2-VL-7B config, found by the placeholder folder's name
    assert (shape["layers"], shape["hidden"], shape["heads"], shape["kv_heads"], shape["vocab"]) == (28, 3584, 28, 4, 152064)
    assert 8.2e9 < shape["params"] < 8.4e9 and "published qwen2vl-7b config" in shape["source"]
    assert report["lengths"]["image_tokens"] == 35 * 35  # model.max_pixels 1003520: the largest square image
    header = next(line for line in text.splitlines() if line.startswith("| per GPU, GiB"))
    assert "| think | embed |" in header
    for row in ("| weights |", "| trained params + grads + Adam |", "| activations |", "| KV cache kept |",
                "| **total** |", "| fits |"):
        assert row in text, row
    stages = report["stages"]
    assert stages["think"]["fits"] and not stages["embed"]["fits"]  # GradCache keeps 1024 rows' KV caches
    assert any(line.startswith("embed does not fit") and "embed.gradcache_keep_prefix=false" in line
               for line in report["advice"])
    # ZeRO-3 (the recipe's): the frozen base sharded over the 8 GPUs, the vision tower kept whole,
    # the largest module (the 152064 x 3584 embedding) and the 5e7-parameter prefetch bucket gathered
    vision, rest = shape["vision_params"], shape["params"] - shape["vision_params"]
    gathered = 152064 * 3584 + 50_000_000
    assert stages["think"]["parts"]["weights"] == vision * 2 + rest * 2 // 8 + gathered * 2


def test_the_knob_the_plan_names_makes_the_stage_fit(tmp_path, capsys):
    _, before = run_plan(tmp_path, capsys, "recipes/qwen2vl_7b.yaml", "--gpus", "8")
    _, after = run_plan(tmp_path, capsys, "recipes/qwen2vl_7b.yaml", "--gpus", "8", "embed.gradcache_keep_prefix=false")
    assert after["stages"]["embed"]["fits"] and not after["advice"]
    kept = lambda r: r["stages"]["embed"]["parts"]["KV cache kept"]  # noqa: E731
    assert kept(after) * 1024 // 32 == kept(before)  # the whole rank's batch -> one chunk of 32 rows


def test_knobs_that_keep_the_results_come_first_and_combine(tmp_path, capsys):
    _, r = run_plan(tmp_path, capsys, "recipes/qwen2vl_7b.yaml", "--gpus", "8", "--gpu-mem", "40",
                    "deepspeed=recipes/deepspeed/zero2.json")
    (line,) = [a for a in r["advice"] if a.startswith("embed")]
    assert "Turn embed.gradcache_keep_prefix=false" in line and "then embed.gradcache_chunk=16" in line
    assert line.endswith(": fits.") and "max_pixels" not in line  # changing the images is the last resort
    _, after = run_plan(tmp_path, capsys, "recipes/qwen2vl_7b.yaml", "--gpus", "8", "--gpu-mem", "40",
                        "deepspeed=recipes/deepspeed/zero2.json", "embed.gradcache_keep_prefix=false",
                        "embed.gradcache_chunk=16")
    assert after["stages"]["embed"]["fits"]


def test_components_follow_the_recipe(tmp_path, capsys):
    """Weights: every parameter x 2 B under ZeRO-2 in bf16; activations grow with the micro-batch;
    more GPUs leave fewer rows (and KV caches) per GPU."""
    base = ["recipes/qwen2vl_2b.yaml", "--gpus", "8"]
    _, r = run_plan(tmp_path, capsys, *base)
    assert r["stages"]["think"]["parts"]["weights"] == r["shape"]["params"] * 2
    _, doubled = run_plan(tmp_path, capsys, *base, "think.micro_batch_size=8", "think.batch_size=128")
    assert doubled["stages"]["think"]["parts"]["activations"] == pytest.approx(
        2 * r["stages"]["think"]["parts"]["activations"], rel=0.01)
    _, wide = run_plan(tmp_path, capsys, "recipes/qwen2vl_2b.yaml", "--gpus", "16")
    assert wide["stages"]["embed"]["parts"]["KV cache kept"] * 2 == r["stages"]["embed"]["parts"]["KV cache kept"]


def test_trained_states_come_from_deepspeeds_estimator(tmp_path, capsys, monkeypatch):
    from deepspeed.runtime.zero import stage_1_and_2

    seen = []

    def estimator(total_params, num_gpus_per_node=1, num_nodes=1, cpu_offload=True, additional_buffer_factor=1.5):
        seen.append((total_params, num_gpus_per_node, num_nodes, cpu_offload))
        return 0, 12345
    monkeypatch.setattr(stage_1_and_2, "estimate_zero2_model_states_mem_needs", estimator)
    _, r = run_plan(tmp_path, capsys, "recipes/qwen2vl_2b.yaml", "--gpus", "4", "--nodes", "2")
    assert r["stages"]["think"]["parts"]["trained params + grads + Adam"] == 12345
    lora = 16 * 28 * (1536 * 4 + 1536 + 256 + 256 + 1536 + 2 * (1536 + 8960) + (8960 + 1536))  # r x (in + out)
    assert seen[0] == (lora, 4, 2, False)


def test_a_placeholder_backbone_that_matches_no_published_shape_is_refused(tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("backbone: /models/SomethingElse\ndeepspeed: recipes/deepspeed/zero2.json\n")
    from unified_tte.cli import main
    assert main(["plan", str(recipe)]) == 2
    assert "matches no published shape" in capsys.readouterr().err


@pytest.mark.slow
def test_cpu_plan_is_within_25_percent_of_the_measured_peak_for_the_tiny_model(tmp_path, capsys):
    """One step of each stage measured on this CPU (fp32, one process) against the plan for it."""
    _, r = run_plan(tmp_path, capsys, "recipes/tiny_cpu.yaml", "--measure", "think.batch_size=8",
                    "think.micro_batch_size=8", "embed.batch_size=16", "embed.gradcache_chunk=8",
                    "--text-tokens", "1000", "--trace-tokens", "500")
    for stage in ("think", "embed"):
        planned, measured = r["stages"][stage]["total_bytes"], r["measured_bytes"][stage]
        assert measured > 50 * 2**20, f"{stage}: the measured step should hold real data ({measured} bytes)"
        assert abs(planned / measured - 1) <= 0.25, f"{stage}: plan {planned / GIB:.3f} GiB vs measured {measured / GIB:.3f}"
