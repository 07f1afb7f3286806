"""The embed-stage training benchmark runs end to end (tiny backbone) and prints its figures."""
import json

import pytest
import torch

from unified_tte.tools.measure import PeakMemory, WorkerError, current_memory_mb
from unified_tte.tools import train_bench


@pytest.mark.slow  # benchmark workers in child processes
def test_train_bench_quick_prints_both_variants_and_their_ratio(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert train_bench.main(["--quick", "--variants", "activated", "two-model", "--threads", "1",
                             "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "activated vs two-model:" in text and "samples/s" in text and "machine:" in text
    results = json.loads(out.read_text())["results"]
    assert set(results) == {"activated", "two-model"}
    for r in results.values():
        assert r["samples_per_s"] > 0 and r["peak_memory_gb"] >= 0 and r["trainable_params"] > 0


def test_bench_rows_have_traces_and_hard_negatives():
    rows = train_bench.bench_rows(5, query_words=30)
    assert len(rows) == 5 and all(r.trace and r.neg is not None for r in rows)
    assert len(rows[0].qry.text.split()) > 30


def test_on_a_gpu_machine_the_worker_trains_in_bf16_on_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert train_bench.train_device() == ("cuda", torch.bfloat16)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert train_bench.train_device() == ("cpu", torch.float32)


def _no_cuda_call(*args, **kwargs):
    raise AssertionError("a CUDA function was called")


def test_cuda_peak_counts_the_weights_and_the_cpu_peak_is_over_the_built_model(monkeypatch):
    monkeypatch.setattr(torch.cuda, "memory_allocated", _no_cuda_call)
    assert train_bench.memory_baseline_mb(torch.device("cuda")) == 0.0
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda device=None: None)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: 3 * 2**30)
    with PeakMemory(torch.device("cuda"), 0.0) as mem:
        pass
    assert train_bench.memory_report(mem) == {"peak_memory_gb": 3.0, "memory_method": "cuda.max_memory_allocated"}

    base = train_bench.memory_baseline_mb(torch.device("cpu"))
    assert base == pytest.approx(current_memory_mb("cpu"), rel=0.05)
    with PeakMemory(torch.device("cpu"), base) as mem:
        x = torch.ones(64 * 2**20 // 4)
        del x
    report = train_bench.memory_report(mem)
    assert 60 / 1024 <= report["peak_memory_gb"] <= 200 / 1024
    assert report["peak_rss_gb"] == pytest.approx(report["peak_memory_gb"] + base / 1024)


def test_workers_run_as_one_rank_and_a_failed_one_stops_the_bench(monkeypatch):
    seen = {}

    def fail(module, job, **options):
        seen.update(module=module, job=job, **options)
        raise WorkerError(options["name"], "exited with code 1", "Traceback: no backbone here")

    monkeypatch.setattr(train_bench, "run_in_fresh_process", fail)
    with pytest.raises(SystemExit, match="the activated worker exited with code 1") as err:
        train_bench.main(["--quick", "--variants", "activated", "--threads", "1"])
    assert "Traceback: no backbone here" in str(err.value)
    assert seen["module"] == "unified_tte.tools.train_bench"
    assert seen["job"] == {"variant": "activated", "backbone": "tiny", "batch": 8, "chunk": None, "steps": 2,
                           "warmup": 1, "query_words": 20, "threads": 1}
    assert seen["env"] == dict.fromkeys(("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"))
