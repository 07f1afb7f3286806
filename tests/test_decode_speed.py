"""`tte bench`'s decode columns: tokens/s of the think loop, against Hugging Face generate on the
same reasoner and against the memory-bandwidth bound; `--decode` picks the loop."""
import json

import pytest

from unified_tte import TTEInput, UnifiedTTE
from unified_tte.model.zoo import tiny_llama
from unified_tte.tools.decode_speed import add_decode_speed, decode_weight_bytes, generate_decode_ms, generate_times_ms

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_decode_speed_columns_follow_their_definitions():
    row = add_decode_speed({"batch": 2, "trace_len": 11, "decode_p50_ms": 500.0, "generate_decode_ms": 1000.0,
                            "copy_bandwidth_gb_s": 10.0, "decode_weights_bytes": 10**9})
    assert row["decode_tok_s"] == pytest.approx(40.0)       # 2 rows x 10 one-token steps in 0.5 s
    assert row["generate_tok_s"] == pytest.approx(20.0)
    assert row["decode_vs_generate"] == pytest.approx(2.0)
    assert row["bandwidth_bound_tok_s"] == pytest.approx(20.0)  # 2 x 10 GB/s / 1 GB per step
    assert row["decode_vs_bound"] == pytest.approx(2.0)
    one = add_decode_speed({"batch": 1, "trace_len": 1, "decode_p50_ms": 1.0, "copy_bandwidth_gb_s": 1.0,
                            "decode_weights_bytes": 1})
    assert one["decode_tok_s"] is None and one["decode_vs_generate"] is None  # no one-token step at T = 1


def test_generate_timing_and_the_bytes_a_decode_step_reads():
    tte = UnifiedTTE(tiny_llama())
    inputs = [TTEInput("the number seven"), TTEInput("three")]
    pair = generate_times_ms(tte, inputs, new_tokens=6, device="cpu")  # raises unless 6 tokens came out
    assert pair["full"] > 0 and pair["first"] > 0
    pairs = [{"full": 10.0, "first": 2.0}, {"full": 14.0, "first": 4.0}, {"full": 12.0, "first": 3.0}]
    assert generate_decode_ms(pairs)["generate_decode_ms"] == 9.0  # median(T) - median(1)
    embed_lora = sum(p.numel() * 4 for p in tte.adapter_params("embed").values())
    everything = sum(p.numel() * 4 for p in tte.peft_model.parameters())
    assert embed_lora > 0 and decode_weight_bytes(tte) == everything - embed_lora  # untied Llama, no vision


@pytest.mark.slow
def test_quick_bench_reports_decode_speed_of_the_chosen_loop(tmp_path):
    from unified_tte.tools.bench import bench_main

    out = tmp_path / "bench"
    assert bench_main(["--quick", "--decode", "static", "--modes", "activated,two_model", "--out", str(out)]) == 0
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    for r in rows:
        assert r["decode"] == r["decode_loop"] == "static"
        assert r["decode_tok_s"] > 0 and r["generate_tok_s"] > 0 and r["bandwidth_bound_tok_s"] > 0
        assert r["decode_vs_generate"] == pytest.approx(r["decode_tok_s"] / r["generate_tok_s"])
    table = (out / "table.md").read_text()
    assert "| decode tok/s | vs generate | of bound |" in table
    assert "| activated | static |" in table and "| two_model | static |" in table  # the loop column
