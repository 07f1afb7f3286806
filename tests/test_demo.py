"""`tte demo --quick` end to end (the README's main job, small): every stage runs and writes its
outputs. The numbers of a quick run are not meaningful; the full demo's are in the README."""
import json

import pytest

from unified_tte.cli import main
from unified_tte.tools.demo import SYSTEMS

pytestmark = pytest.mark.slow


def test_quick_demo_trains_evaluates_exports_and_benches(tmp_path, capsys):
    out, ckpt = tmp_path / "demo", tmp_path / "ckpt"
    assert main(["demo", "--quick", "--out", str(out), "--checkpoint", str(ckpt)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert list(summary["results"]) == list(SYSTEMS)
    for system, result in summary["results"].items():
        assert len(result["tasks"]) == 5
        assert all(0.0 <= m["hit@1"] <= 1.0 for m in result["tasks"].values())
        assert ("answer_accuracy" in result) == (system != "no-think embedder")
    assert summary["export_round_trip_max_diff"] == 0.0
    assert (ckpt / "manifest.json").is_file() and (ckpt / "embed" / "adapter_model.safetensors").is_file()
    assert (out / "think" / "think" / "model.safetensors").is_file()  # full fine-tuning
    assert (out / "reasoner" / "config.json").is_file()                # the backbone all start from
    for run in ("unified_activated", "unified_top_k", "two_model_embedder", "no_think_embedder"):
        assert (out / run / "embed" / "adapter_model.safetensors").is_file(), run
    assert (out / "bench" / "table.md").is_file() and (out / "bench" / "bench.png").is_file()
    printed = capsys.readouterr().out
    assert "| unified TTE (activated) |" in printed and "| two_model |" in printed
