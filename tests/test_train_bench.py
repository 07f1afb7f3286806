"""The embed-stage training benchmark runs end to end (tiny backbone) and prints its figures."""
import json

from unified_tte.tools import train_bench


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
