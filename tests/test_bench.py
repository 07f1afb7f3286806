"""The benchmark harness: forced lengths, the memory probe, and a --quick run that writes sane outputs.
Never asserts speed: timings on a shared 2-core machine are not a unit-test property."""
import json
import time

import pytest
import torch

from unified_tte import UnifiedTTE
from unified_tte.tools.bench import MODES, _Runner, bench_main, parse_args, prompt_of_length, resolve_device
from unified_tte.model.zoo import tiny_llama, tiny_qwen2vl


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.mark.parametrize("builder", [tiny_qwen2vl, tiny_llama], ids=["qwen2vl", "llama"])
@pytest.mark.parametrize("n", [40, 64, 257])
def test_prompt_of_length_encodes_to_exactly_n_tokens(builder, n):
    tte = UnifiedTTE(builder())
    prompt = prompt_of_length(tte, n)
    assert len(tte.encoder.encode([prompt])[0].ids) == n


def test_prompt_shorter_than_the_chat_markup_is_refused():
    with pytest.raises(ValueError, match="chat markup"):
        prompt_of_length(UnifiedTTE(tiny_qwen2vl()), 3)


FIXED = MODES[:3]   # the modes without the think gate (auto has its own test)
DEFAULT = [m for m in MODES if m != "auto"]   # what a bench runs without --think-rate


@pytest.mark.parametrize("mode", FIXED)
def test_runner_decodes_exactly_the_trace_length_and_times_every_phase(mode):
    runner = _Runner(mode, "tiny", "fp32", "cpu", None)
    inputs = [prompt_of_length(runner.tte, 48)] * 2
    # The prefill time must be taken between the prompt's forward and the first decoded token:
    # a spy on the engine records when decoding starts.
    decode_started = []
    real_decode = runner.tte.engine.decode
    def spy(*args, **kwargs):
        decode_started.append(time.perf_counter())
        return real_decode(*args, **kwargs)
    runner.tte.engine.decode = spy
    before = time.perf_counter()
    times = runner.step(inputs, 7)  # raises if any row decoded another length
    assert set(times) == {"prefill", "decode", "embed", "e2e"}
    assert all(v > 0 for v in times.values())
    assert len(decode_started) == 1 and times["prefill"] <= decode_started[0] - before
    assert times["prefill"] + times["decode"] + times["embed"] == pytest.approx(times["e2e"], rel=1e-6)
    if mode == "two_model":
        assert runner.embedder is not None and not runner.tte.adapter_params("embed")
        # the embedder is a second copy of the weights, not a view of the reasoner's
        a = runner.tte.stack.lm.embed_tokens.weight
        assert a.data_ptr() != runner.embedder.stack.lm.embed_tokens.weight.data_ptr()


def test_the_merged_runner_serves_activated_mode_with_think_in_the_weights():
    runner = _Runner("merged", "tiny", "fp32", "cpu", None)
    tte = runner.tte
    assert tte.config.think == "none" and tte.config.mode == "activated" and not tte.adapter_params("think")
    assert tte.adapter_params("embed")
    times = runner.step([prompt_of_length(tte, 48)] * 2, 6)
    assert all(v > 0 for v in times.values())


@pytest.mark.slow  # benchmark workers in child processes
def test_two_decode_loops_run_in_one_bench_each_against_its_own_two_model_row(tmp_path):
    out = tmp_path / "bench"
    assert bench_main(["--quick", "--modes", "activated,two_model", "--decode", "eager,static", "--no-generate",
                       "--out", str(out)]) == 0
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert sorted((r["mode"], r["decode_loop"]) for r in rows) == [
        ("activated", "eager"), ("activated", "static"), ("two_model", "eager"), ("two_model", "static")]
    assert {r["embed_loop"] for r in rows if r["mode"] == "activated"} == {"eager", "static"}
    for r in rows:
        two = next(t for t in rows if t["mode"] == "two_model" and t["decode"] == r["decode"])
        assert r["e2e_vs_two_model"] == pytest.approx(r["e2e_p50_ms"] / two["e2e_p50_ms"])
    table = (out / "table.md").read_text()
    assert "| activated | static | 1 | 64 | 16 |" in table and "| two_model | eager | 1 | 64 | 16 |" in table


# The memory probe (PeakMemory) is unified_tte.tools.measure's, held in tests/test_measure.py.


def test_on_a_gpu_machine_the_bench_defaults_to_cuda_in_bf16(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    args = parse_args(["--quick"])
    resolve_device(args)
    assert (args.device, args.dtype) == ("cuda", "bf16")
    args = parse_args(["--quick", "--dtype", "fp16"])
    resolve_device(args)
    assert (args.device, args.dtype) == ("cuda", "fp16")


def test_without_a_gpu_the_bench_defaults_to_cpu_in_fp32(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    args = parse_args(["--quick"])
    resolve_device(args)
    assert (args.device, args.dtype) == ("cpu", "fp32")
    args = parse_args(["--quick", "--device", "cuda:1"])  # asked for: kept, with the GPU's dtype
    resolve_device(args)
    assert (args.device, args.dtype) == ("cuda:1", "bf16")


@pytest.mark.slow  # benchmark workers in child processes
def test_quick_bench_writes_jsonl_table_and_plot(tmp_path, capsys):
    out = tmp_path / "bench"
    assert bench_main(["--quick", "--out", str(out)]) == 0
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert sorted(r["mode"] for r in rows) == sorted(DEFAULT)
    for r in rows:
        assert (r["backbone"], r["batch"], r["query_len"], r["trace_len"]) == ("tiny", 1, 64, 16)
        assert r["device"] == "cpu" and r["repeats"] == 2
        for phase in ("prefill", "decode", "embed", "e2e"):
            assert 0 < r[f"{phase}_p50_ms"] <= r[f"{phase}_p90_ms"] < 600_000
        assert r["e2e_p50_ms"] >= r["embed_p50_ms"]
        assert 0 < r["peak_mem_mb"] < 4096 and r["weights_mb"] < r["peak_mem_mb"] + 1
    two = next(r for r in rows if r["mode"] == "two_model")
    for r in rows:   # each ratio is that row's figure over the two-model row's
        for name, field in (("embed", "embed_p50_ms"), ("e2e", "e2e_p50_ms"), ("mem", "peak_mem_mb")):
            assert r[f"{name}_vs_two_model"] == pytest.approx(r[field] / two[field])
    table = (out / "table.md").read_text()
    assert all(f"| {m} | eager | 1 | 64 | 16 |" in table for m in DEFAULT)
    for r in rows:   # the embed step in decode steps of its own row
        assert r["embed_decode_steps"] == pytest.approx(r["embed_p50_ms"] / (r["decode_p50_ms"] / 15))
    assert (out / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "two_model" in capsys.readouterr().out


@pytest.mark.parametrize("rate", [0.0, 0.3, 1.0])
def test_the_auto_runner_thinks_on_its_rate_of_a_block(rate, monkeypatch):
    from unified_tte.tools.bench import AUTO_BLOCK

    runner = _Runner("auto", "tiny", "fp32", "cpu", None)
    runner.think_rate = rate
    decoded = []
    real = runner.tte.think_then_embed
    def spy(inputs, **kwargs):
        emb, traces = real(inputs, **kwargs)
        decoded.append(all(t.thought for t in traces))
        return emb, traces
    monkeypatch.setattr(runner.tte, "think_then_embed", spy)
    times = runner.step([prompt_of_length(runner.tte, 40)], 5)   # raises on a wrong trace length
    assert len(decoded) == AUTO_BLOCK and sum(decoded) == round(rate * AUTO_BLOCK)
    assert times["e2e"] > 0 and times["prefill"] is None


@pytest.mark.slow  # benchmark workers in child processes
def test_quick_bench_with_a_think_rate_adds_the_auto_row_against_always_and_two_model(tmp_path):
    out = tmp_path / "bench"
    assert bench_main(["--quick", "--think-rate", "0.5", "--out", str(out)]) == 0
    rows = {r["mode"]: r for r in map(json.loads, (out / "results.jsonl").read_text().splitlines())}
    assert set(rows) == set(MODES) and rows["auto"]["think_rate"] == 0.5
    auto, always, two = rows["auto"], rows["activated"], rows["two_model"]
    assert auto["e2e_vs_activated"] == pytest.approx(auto["e2e_p50_ms"] / always["e2e_p50_ms"])
    assert auto["e2e_vs_two_model"] == pytest.approx(auto["e2e_p50_ms"] / two["e2e_p50_ms"])
    assert "| auto | eager | 1 | 64 | 16 |" in (out / "table.md").read_text()


@pytest.mark.parametrize("args, message", [
    (["--think-rate", "1.5"], "--think-rate is a fraction of queries in [0, 1]"),
    (["--modes", "activated,auto"], "mode auto needs --think-rate"),
    (["--modes", "activated,three_model"], "unknown mode"),
    (["--query-lens", "0"], "--query-lens must be positive"),
    (["--repeats", "0"], "--repeats must be >= 1"),
    (["--batch-sizes", ""], "--batch-sizes must be positive"),
    (["--decode", "eager,fast"], "unknown decode loop(s) ['fast']"),
])
def test_bad_arguments_are_refused_before_any_worker_starts(args, message, tmp_path, capsys):
    assert bench_main(["--quick", "--out", str(tmp_path / "out"), *args]) == 2
    assert f"tte bench: error: {message}" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()   # nothing left behind
