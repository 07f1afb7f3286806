"""The InfoNCE benchmark runs end to end and shows the chunked path's memory advantage.

    pytest tests/test_kernels_bench.py -q
"""
import json
import subprocess
import sys
from pathlib import Path

from tte_kernels.bench import markdown

ROOT = Path(__file__).resolve().parents[1]


def test_bench_writes_json_lines_and_a_table_and_chunked_needs_less_memory(tmp_path):
    # N = 2048, chunks of 128 rows: the reference holds ~3 x 16 MiB of scores, the chunked path
    # ~2 x 1 MiB, both beside 2 x 0.5 MiB of gradients.
    cmd = [sys.executable, "-m", "tte_kernels.bench", "--sizes", "2048", "--dim", "64", "--repeats", "2",
           "--warmup", "0", "--chunk-size", "128", "--out", str(tmp_path)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "infonce.jsonl").read_text().splitlines()]
    assert [r["backend"] for r in rows] == ["ref", "chunked"]
    ref, chunked = rows
    for r in rows:
        assert r["time_p20_s"] <= r["time_median_s"] <= r["time_p80_s"]
        assert "peak RSS" in r["memory_method"]
    assert abs(ref["loss"] - chunked["loss"]) < 1e-4
    assert chunked["peak_mem_bytes"] < ref["peak_mem_bytes"] / 3
    table = (tmp_path / "infonce.md").read_text()
    assert "| 2048 | 64 | float32 | chunked |" in table and "Peak memory:" in table


def test_bench_table_reports_failed_cases_and_ratios():
    ok = dict(B=8, D=4, dtype="float32", time_median_s=2.0, time_p20_s=1.0, time_p80_s=3.0, peak_mem_bytes=800,
              peak_mem_mib=0.0, memory_method="m")
    rows = [dict(ok, backend="ref", times_s=[1.0, 2.0, 4.0]),
            dict(ok, backend="chunked", time_median_s=3.0, peak_mem_bytes=100, times_s=[1.5, 1.0, 8.0]),
            dict(B=16, D=4, dtype="float32", backend="ref", error="killed (out of memory?)")]
    table = markdown(rows)
    assert "| 0.125 | 1.50 | 1.50 |" in table  # paired: median of 1.5, 0.5, 2.0
    assert "error: killed" in table
