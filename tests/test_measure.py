"""unified_tte.tools.measure, the measurement module of the package's benchmarks: percentiles,
peak memory, the machine's name and fresh-process workers; and the CUDA-only branches the CLIs
reach (GPU name, CUDA peak memory, synchronisation, the kernels' launch guard), held on a CPU
machine by standing in for torch.cuda.

    pytest tests/test_measure.py -q
"""
import ast
import contextlib
import os
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from tte_kernels.constants import device_guard
from unified_tte.tools import measure
from unified_tte.tools.measure import (PeakMemory, Worker, WorkerError, current_memory_mb, machine_name, percentile,
                                       read_commands, reply, run_in_fresh_process, summary, sync, trim)

ROOT = Path(__file__).resolve().parents[1]
KERNELS = ROOT / "kernels" / "tte_kernels"


def _no_cuda_call(*args, **kwargs):
    raise AssertionError("a CUDA function was called on the CPU path")


# ---------------------------------------------------------------------------------------- statistics
@pytest.mark.parametrize("xs", [[3.0], [2.0, 1.0], [5.0, 1.0, 4.0, 2.0, 3.0], list(np.linspace(0, 7, 11) ** 2)])
@pytest.mark.parametrize("p", [0, 20, 50, 80, 90, 100])
def test_percentile_matches_numpys_linear_interpolation(xs, p):
    assert percentile(xs, p) == pytest.approx(float(np.percentile(xs, p)), rel=1e-12)


def test_summary_reports_p20_p50_p80_p90():
    assert summary([4.0, 1.0, 3.0, 2.0, 5.0]) == pytest.approx({"p20": 1.8, "p50": 3.0, "p80": 4.2, "p90": 4.6})


def test_percentile_refuses_no_values_and_a_p_outside_0_100():
    with pytest.raises(ValueError, match="empty"):
        percentile([], 50)
    with pytest.raises(ValueError, match="outside"):
        percentile([1.0], 150)


# ---------------------------------------------------------------------------------------- machine and device
def test_machine_name_on_cpu_counts_the_cores(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "get_device_name", _no_cuda_call)
    assert machine_name().startswith(f"{os.cpu_count()}-core ")
    assert machine_name("cpu") == machine_name()


def test_machine_name_on_a_gpu_machine_is_the_gpus_name(monkeypatch):
    asked = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: asked.append(device) or
                        "NVIDIA H100 80GB HBM3")
    assert machine_name() == "NVIDIA H100 80GB HBM3"
    assert machine_name("cuda:1") == "NVIDIA H100 80GB HBM3"
    assert asked == ["cuda", "cuda:1"]  # the device asked about, not always GPU 0
    assert machine_name("cpu") != "NVIDIA H100 80GB HBM3"


def test_sync_waits_for_the_gpu_only_on_cuda(monkeypatch):
    synced = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: synced.append(device))
    sync("cpu")
    sync(torch.device("cpu"))
    assert synced == []
    sync("cuda")
    sync(torch.device("cuda", 1))
    assert synced == ["cuda", torch.device("cuda", 1)]


# ---------------------------------------------------------------------------------------- memory
def test_peak_memory_on_cpu_sees_a_torch_allocation():
    trim()
    baseline = current_memory_mb("cpu")
    with PeakMemory("cpu", baseline) as mem:
        x = torch.ones(64 * 2**20 // 4)  # 64 MiB, touched
        del x
    assert mem.method in ("VmHWM after clear_refs", "RSS sampled every 1 ms")
    assert 60 <= mem.peak_mb <= 200


def test_peak_memory_falls_back_to_sampling_the_rss(monkeypatch):
    monkeypatch.setattr(measure, "_reset_hwm", lambda: False)  # clear_refs not writable
    trim()
    with PeakMemory("cpu", current_memory_mb("cpu")) as mem:
        x = torch.ones(64 * 2**20 // 4)
        time.sleep(0.1)  # the sampler runs every 1 ms; give it time on a loaded machine
        del x
    assert mem.method == "RSS sampled every 1 ms"
    assert 60 <= mem.peak_mb <= 200


def test_peak_memory_on_cuda_is_max_allocated_since_the_reset_minus_the_baseline(monkeypatch):
    calls = []
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda device=None: calls.append(("reset", device)))
    monkeypatch.setattr(torch.cuda, "max_memory_allocated",
                        lambda device=None: calls.append(("max", device)) or 3 * 2**30)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: 1000 * 2**20)
    baseline = current_memory_mb("cuda")
    assert baseline == 1000.0
    mem = PeakMemory("cuda", baseline)
    assert calls == []  # nothing is reset before the block starts
    with mem:
        assert calls == [("reset", "cuda")]
    assert calls == [("reset", "cuda"), ("max", "cuda")]
    assert mem.method == "cuda.max_memory_allocated"
    assert mem.peak_mb == 3 * 1024 - 1000


def test_peak_memory_on_cpu_makes_no_cuda_call(monkeypatch):
    for name in ("reset_peak_memory_stats", "max_memory_allocated", "memory_allocated", "synchronize"):
        monkeypatch.setattr(torch.cuda, name, _no_cuda_call)
    with PeakMemory("cpu", current_memory_mb("cpu")) as mem:
        sync("cpu")
    assert mem.peak_mb is not None


# ---------------------------------------------------------------------------------------- workers
FAKE_WORKER = '''
import json, os, sys, time
TAG = {tag!r}
job = json.loads(sys.argv[sys.argv.index("--worker") + 1])
print("noise a library printed", flush=True)
print("worker starting", file=sys.stderr, flush=True)
if job.get("crash"):
    print("Traceback: boom", file=sys.stderr, flush=True)
    sys.exit(3)
time.sleep(job.get("sleep", 0))
if not job.get("silent"):
    print(TAG + json.dumps({{"env": {{k: os.environ.get(k) for k in job.get("env", [])}}}}), flush=True)
if job.get("serve"):
    for line in sys.stdin:
        command = json.loads(line)
        if command["cmd"] == "quit":
            break
        print(TAG + json.dumps({{"echo": command}}), flush=True)
sys.exit(job.get("exit", 0))
'''


@pytest.fixture
def fake_worker(tmp_path):
    """A stdlib-only worker module speaking measure's protocol, and the env that finds it."""
    (tmp_path / "fake_worker.py").write_text(FAKE_WORKER.format(tag=measure.REPLY_TAG))
    return {"PYTHONPATH": str(tmp_path)}


def test_a_long_lived_worker_answers_commands_and_quits(fake_worker, tmp_path, monkeypatch):
    monkeypatch.setenv("TTE_DROPPED", "from the parent")
    log = tmp_path / "worker_serve.log"
    worker = Worker("fake_worker", {"serve": True, "env": ["TTE_SET", "TTE_DROPPED"]}, name="serve", log=log,
                    env={**fake_worker, "TTE_SET": 1, "TTE_DROPPED": None})
    try:
        assert worker.read() == {"env": {"TTE_SET": "1", "TTE_DROPPED": None}}  # untagged noise skipped
        assert worker.ask(cmd="step", n=2) == {"echo": {"cmd": "step", "n": 2}}
        assert worker.ask(cmd="step", n=3) == {"echo": {"cmd": "step", "n": 3}}
    finally:
        worker.close()
    assert worker.proc.returncode == 0  # it left on the quit command, not killed
    assert "worker starting" in log.read_text()


def test_a_crashed_worker_raises_with_the_end_of_its_stderr(fake_worker, tmp_path):
    log = tmp_path / "worker_crash.log"
    with pytest.raises(WorkerError, match=r"the crash worker exited with code 3; the end of .*worker_crash.log") as err:
        with Worker("fake_worker", {"crash": True}, name="crash", log=log, env=fake_worker) as worker:
            worker.read()
    assert "Traceback: boom" in err.value.tail and "Traceback: boom" in str(err.value)
    assert err.value.why == "exited with code 3"


def test_a_one_shot_worker_returns_its_reply(fake_worker):
    assert run_in_fresh_process("fake_worker", {"env": ["PYTHONPATH"]}, env=fake_worker) == \
        {"env": {"PYTHONPATH": fake_worker["PYTHONPATH"]}}


@pytest.mark.parametrize("job, why", [
    ({"crash": True}, "exited with code 3"),
    ({"exit": 2}, "exited with code 2"),  # replied, then failed: the reply is not trusted
    ({"silent": True}, "exited without a reply"),
])
def test_a_one_shot_worker_that_fails_raises(fake_worker, job, why):
    with pytest.raises(WorkerError) as err:
        run_in_fresh_process("fake_worker", job, env=fake_worker, name="one-shot")
    assert err.value.why == why
    assert "worker starting" in err.value.tail  # stderr kept in a temporary file when no log is named


def test_a_worker_past_its_timeout_is_killed(fake_worker):
    start = time.perf_counter()
    with pytest.raises(WorkerError, match="timed out after 1 s"):
        run_in_fresh_process("fake_worker", {"sleep": 60}, timeout=1, env=fake_worker)
    assert time.perf_counter() - start < 30


def test_reply_and_read_commands_speak_the_protocol(capsys):
    reply({"a": 1})
    line = capsys.readouterr().out
    assert line == measure.REPLY_TAG + '{"a": 1}\n'
    assert list(read_commands(['{"cmd": "step"}\n', "\n", '{"cmd": "quit"}\n'])) == [{"cmd": "step"}, {"cmd": "quit"}]


def test_measure_imports_nothing_but_the_stdlib_and_torch():
    tree = ast.parse((ROOT / "unified_tte" / "tools" / "measure.py").read_text())
    names = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    names |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    assert all(name == "torch" or name in sys.stdlib_module_names for name in names), names


# ---------------------------------------------------------------------------------------- kernel launches
def test_device_guard_makes_no_cuda_call_for_a_cpu_tensor(monkeypatch):
    monkeypatch.setattr(torch.cuda, "device", _no_cuda_call)
    with device_guard(torch.ones(2)):
        pass


def test_device_guard_switches_to_the_tensors_gpu(monkeypatch):
    entered = []
    monkeypatch.setattr(torch.cuda, "device", lambda device: entered.append(device) or contextlib.nullcontext())
    with device_guard(SimpleNamespace(device=torch.device("cuda", 1))):  # a CUDA tensor, as far as it looks
        pass
    assert entered == [torch.device("cuda", 1)]


@pytest.mark.parametrize("name", ["pooling_triton.py", "infonce_triton.py"])
def test_every_triton_launch_runs_under_the_device_guard(name):
    tree = ast.parse((KERNELS / name).read_text())
    parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}

    def guarded(node):
        while node in parents:
            node = parents[node]
            if isinstance(node, ast.With) and any(
                    isinstance(item.context_expr, ast.Call) and getattr(item.context_expr.func, "id", "") ==
                    "device_guard" for item in node.items):
                return True
        return False

    launches = [n for n in ast.walk(tree) if isinstance(n, ast.Call) and isinstance(n.func, ast.Subscript)
                and getattr(n.func.value, "id", "").endswith("_kernel")]
    assert len(launches) >= 2
    assert [ast.unparse(n.func.value) for n in launches if not guarded(n)] == []
