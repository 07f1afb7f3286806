"""`tte demo --quick` end to end (the README's main job, small) and `tte demo --backbone smollm2
--quick` (the two-adapter design on real weights): every stage runs and writes its outputs. The
numbers of a quick run are not meaningful; the full demos' are in docs/results/."""
import json
import re

import pytest
import torch

from unified_tte.cli import main
from unified_tte.data.knowledge import SUBTASKS
from unified_tte.testing import third_party_lines
from unified_tte.tools.demo import GATE_ROWS, SYSTEMS

pytestmark = pytest.mark.slow


def test_quick_demo_trains_evaluates_exports_and_benches(tmp_path, capfd, monkeypatch):
    monkeypatch.delenv("TTE_VERBOSE", raising=False)
    out, ckpt = tmp_path / "demo", tmp_path / "ckpt"
    assert main(["demo", "--quick", "--out", str(out), "--checkpoint", str(ckpt)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert list(summary["results"]) == list(SYSTEMS) + list(GATE_ROWS)
    for system, result in summary["results"].items():
        assert len(result["tasks"]) == 5
        assert all(0.0 <= m["hit@1"] <= 1.0 for m in result["tasks"].values())
        assert ("answer_accuracy" in result) == (system in SYSTEMS[1:])
    # the think gate: fitted on held-out train rows, its rows and claims, the frontier plot
    assert (out / "unified_activated" / "gate" / "gate.safetensors").is_file()
    assert (out / "frontier.png").is_file() and summary["frontier"]["points"]
    assert all(m["think_rate"] == 0.0 for m in summary["results"]["unified TTE (direct)"]["tasks"].values())
    assert any("auto (quality point)" in c["claim"] for c in summary["claims"])
    assert summary["export_round_trip_max_diff"] == 0.0
    assert (ckpt / "manifest.json").is_file() and (ckpt / "embed" / "adapter_model.safetensors").is_file()
    assert (out / "think" / "think" / "model.safetensors").is_file()  # full fine-tuning
    assert (out / "reasoner" / "config.json").is_file()                # the backbone all start from
    for run in ("unified_activated", "unified_top_k", "two_model_embedder", "no_think_embedder"):
        assert (out / run / "embed" / "adapter_model.safetensors").is_file(), run
    assert (out / "bench" / "table.md").is_file() and (out / "bench" / "bench.png").is_file()
    captured = capfd.readouterr()   # file descriptors: child processes and C++ prints too
    printed = captured.out
    assert "| unified TTE (activated) |" in printed and "| two_model |" in printed
    # quiet by default: no third-party progress bar or info line, one line per phase
    assert third_party_lines(captured.out + captured.err) == []
    phase_lines = [line for line in printed.splitlines() if re.match(r"\[demo [\d:]+\] \d+/11 ", line)]
    assert [int(line.split()[2].split("/")[0]) for line in phase_lines] == list(range(1, 12)), phase_lines


# ----------------------------------------------------------------------------- SmolLM2, two adapters
@pytest.fixture(scope="module")
def smollm2_demo(tmp_path_factory):
    """`tte demo --backbone smollm2 --quick`, once for the module: (out, checkpoint, summary)."""
    tmp = tmp_path_factory.mktemp("smollm2_demo")
    out, ckpt = tmp / "demo", tmp / "ckpt"
    assert main(["demo", "--backbone", "smollm2", "--quick", "--out", str(out), "--checkpoint", str(ckpt)]) == 0
    return out, ckpt, json.loads((out / "summary.json").read_text())


def test_smollm2_quick_demo_trains_a_think_and_an_embed_lora_evaluates_exports_and_benches(smollm2_demo):
    out, ckpt, summary = smollm2_demo
    assert list(summary["results"])[:len(SYSTEMS)] == list(SYSTEMS) and summary["backbone"] == "smollm2"
    tasks = {f"knowledge/{s}" for s in SUBTASKS}   # every sub-task, none dropped
    for system, result in summary["results"].items():
        assert set(result["tasks"]) == tasks
        assert ("answer_accuracy" in result) == (system in SYSTEMS[1:])
    assert list(summary["teacher_results"]) == list(SYSTEMS[1:]) and set(summary["answers_right"]) == tasks
    assert len(summary["claims"]) >= 6 and all(isinstance(c["holds"], bool) for c in summary["claims"])
    # think is a LoRA on the shipped base, not full fine-tuning; unified runs carry both adapters
    assert (out / "think" / "think" / "adapter_model.safetensors").is_file()
    assert not (out / "think" / "think" / "model.safetensors").exists()
    for run in ("unified_activated", "unified_top_k"):
        assert json.loads((out / run / "tte_config.json").read_text())["think"] == "lora"
    for run in ("two_model_embedder", "no_think_embedder"):
        assert json.loads((out / run / "tte_config.json").read_text())["think"] == "none"
    assert summary["same_traces"]   # unified top_k decodes exactly unified activated's traces
    export = summary["export"]
    assert export["round_trip_max_diff"] == 0.0
    assert export["peft_same_traces"] == export["peft_queries"] > 0
    info = json.loads((ckpt / "tte_config.json").read_text())
    assert info["backbone"] == "smollm2" and info["adapters"] == ["embed", "think"]
    assert "SmolLM2" in (out / "bench" / "table.md").read_text()
    assert "Claims" in (out / "summary.md").read_text()


def test_exported_think_adapter_in_plain_peft_generates_the_traces_of_unified_think(smollm2_demo):
    """The export's think/ folder on the plain Hugging Face SmolLM2, PEFT's own loader and
    `generate` (greedy), one query at a time: the traces UnifiedTTE.think writes for held-out
    reasoning queries, batched."""
    from peft import PeftModel

    from unified_tte import UnifiedTTE
    from unified_tte.data.knowledge import build_knowledge
    from unified_tte.export import prepare_base
    from unified_tte.model.zoo import smollm2_135m

    _, ckpt, summary = smollm2_demo
    options = {**summary["settings"]["task_options"], "seed": summary["seed"]}
    tasks = [t for t in build_knowledge(**options).eval_tasks if t.needs_reasoning]
    queries = [r.query for t in tasks for r in t.rows[:3]]
    ours = UnifiedTTE.from_checkpoint(ckpt).think(queries, max_new_tokens=40).traces
    base = prepare_base(smollm2_135m(), ckpt)   # the plain HF model + the invocation-token row
    model = PeftModel.from_pretrained(base.model, str(ckpt / "think")).eval()
    for query, trace in zip(queries, ours):
        prompt = base.tokenizer.apply_chat_template([{"role": "user", "content": query.text}],
                                                    tokenize=False, add_generation_prompt=True)
        ids = base.tokenizer(prompt, return_tensors="pt", add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=40,
                                 do_sample=False)[0, ids.shape[1]:].tolist()
        if out and out[-1] == base.tokenizer.eos_token_id:
            out = out[:-1]
        assert out == trace.token_ids, (query.text, trace.text, base.tokenizer.decode(out))
