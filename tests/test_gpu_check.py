"""The one-shot GPU check script runs end to end in its --cpu-smoke mode (every section, tiny
sizes, on this CPU), so it cannot rot between the rare runs on a GPU machine."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow


def test_gpu_check_cpu_smoke_runs_every_section(tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "PYTHON": sys.executable, "TTE_GPU_SITE": str(tmp_path / "site"),
           "TMPDIR": str(tmp_path), "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(["bash", str(ROOT / "tests/gpu/run_gpu_check.sh"), "--cpu-smoke", "--out", str(out)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    # pip without network or build isolation, or (no setuptools here) the tree with a tte_kernels link
    assert ("installed unified_tte and tte_kernels from the working tree" in proc.stdout
            or "using the tree with a tte_kernels link" in proc.stdout), proc.stdout[-2000:]
    files = sorted(p.name for p in out.iterdir())
    assert files == ["doctor.txt", "env.txt", "kernels_bench.md", "log.txt", "pytest_gpu.txt", "summary.json",
                     "tte_bench.md"]  # flat and at most 8: what a device call brings back
    summary = json.loads((out / "summary.json").read_text())
    assert {name: s["status"] for name, s in summary["sections"].items()} == dict.fromkeys(
        ["env", "doctor", "pytest", "kernels", "bench"], "ok")
    assert summary["doctor"]["verdict"].startswith("tte doctor: OK")
    assert "skipped" in summary["pytest"] and "error" not in summary["pytest"]  # the gpu tests collect
    assert {r["backend"] for r in summary["kernels"]} == {"ref", "chunked"}
    loops = {(r["mode"], r["decode_loop"]) for r in summary["bench"]}
    # the fast loop for every mode (static is the CPU twin of the graph loop), the compiled loop beside
    # it in one run, and the eager loop
    assert loops == {("activated", "static"), ("merged", "static"), ("two_model", "static"),
                     ("activated", "compiled"), ("activated", "eager")}
    assert all(r["decode_tok_s"] > 0 for r in summary["bench"])
    bench = (out / "tte_bench.md").read_text()
    for title in ("activated, merged and two_model: the fast loop", "activated: the graph and the compiled loop, one run",
                  "activated, the eager loop"):
        assert f"## {title}" in bench and "(did not finish)" not in bench, title
