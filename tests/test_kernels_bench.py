"""The InfoNCE benchmark runs end to end and shows the chunked path's memory advantage.

    pytest tests/test_kernels_bench.py -q
"""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tte_kernels import bench
from tte_kernels.bench import CaseError, build_parser, markdown, memory_method, resolve

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow  # benchmark workers in child processes
def test_bench_writes_json_lines_and_a_table_and_chunked_needs_less_memory(tmp_path):
    # N = 2048, chunks of 128 rows: the reference holds ~3 x 16 MiB of scores, the chunked path
    # ~2 x 1 MiB, both beside 2 x 0.5 MiB of gradients.
    cmd = [sys.executable, "-m", "tte_kernels.bench", "--device", "cpu", "--sizes", "2048", "--dim", "64",
           "--repeats", "2", "--warmup", "0", "--chunk-size", "128", "--out", str(tmp_path)]
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


def test_on_a_gpu_machine_auto_benchmarks_triton_in_bf16_up_to_32768(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve(build_parser().parse_args([])) == ("cuda", [1024, 4096, 16384, 32768], ["ref", "triton"], "bfloat16")
    args = build_parser().parse_args(["--device", "cuda", "--sizes", "64", "--dtype", "float16"])
    assert resolve(args) == ("cuda", [64], ["ref", "triton"], "float16")
    assert memory_method("cuda", "cuda.max_memory_allocated").startswith(
        "torch.cuda.max_memory_allocated above memory_allocated")


def test_without_a_gpu_auto_benchmarks_chunked_and_cuda_is_refused(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve(build_parser().parse_args([])) == ("cpu", [1024, 4096, 16384], ["ref", "chunked"], "float32")
    with pytest.raises(SystemExit) as err:
        bench.main(["--device", "cuda"])
    assert err.value.code == 2 and "torch sees no GPU" in capsys.readouterr().err


def test_a_failed_case_becomes_an_error_row_and_the_child_pins_the_mmap_threshold(monkeypatch):
    seen = {}

    def fail(module, spec, timeout=None, **options):
        seen.update(module=module, timeout=timeout, **options)
        raise CaseError(options["name"], "was killed (exit -9, out of memory?)", "MemoryError\n")

    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_", raising=False)
    monkeypatch.setattr(bench, "run_in_fresh_process", fail)
    spec = dict(size=16, dim=4, backend="ref", dtype="float32")
    row = bench._spawn(spec, 5.0)
    assert row == {"op": "info_nce_fwd_bwd", "backend": "ref", "B": 16, "N": 16, "D": 4, "dtype": "float32",
                   "error": "was killed (exit -9, out of memory?): MemoryError"}
    assert seen == {"module": "tte_kernels.bench", "timeout": 5.0, "name": "ref",
                    "env": {"MALLOC_MMAP_THRESHOLD_": "65536"}}


CASE_PROCESS = '''import json, os, sys, time
job = json.loads(sys.argv[sys.argv.index("--worker") + 1])
print("noise before the answer", flush=True)
print("case stderr line", file=sys.stderr, flush=True)
time.sleep(job.get("sleep", 0))
if job.get("answer"):
    print({tag!r} + json.dumps({{"env": os.environ.get("TTE_CASE")}}), flush=True)
if job.get("kill"):
    os.kill(os.getpid(), 9)
sys.exit(job.get("exit", 0))
'''


@pytest.mark.parametrize("job, why", [({"answer": True, "exit": 3}, "exited with code 3"),
                                      ({}, "exited without an answer"),
                                      ({"kill": True}, "was killed (exit -9, out of memory?)"),
                                      ({"sleep": 60}, "timed out after 2 s")])
def test_a_case_process_answers_once_or_fails_with_why_and_its_stderr(tmp_path, job, why):
    (tmp_path / "case_process.py").write_text(CASE_PROCESS.format(tag=bench.ANSWER_TAG))
    env = {"PYTHONPATH": str(tmp_path), "TTE_CASE": "set"}
    assert bench.run_in_fresh_process("case_process", {"answer": True}, name="ref", env=env) == {"env": "set"}
    with pytest.raises(CaseError) as err:
        bench.run_in_fresh_process("case_process", job, timeout=2, name="ref", env=env)
    assert err.value.why == why and "case stderr line" in err.value.tail
