"""The embedding cache: keyed by (model hash, task, item), complete-or-absent batch files, and
an evaluation that finds everything cached recomputes nothing and scores the same."""
import numpy as np
import torch

from unified_tte import UnifiedTTE
from unified_tte.data import resolve_tasks
from unified_tte.eval.cache import EmbeddingCache, model_key
from unified_tte.eval.evaluate import evaluate_model
from unified_tte.model.zoo import tiny_qwen2vl
from unified_tte.testing import randomize_adapters


def test_batches_round_trip_and_a_killed_writers_temp_file_is_ignored(tmp_path):
    cache = EmbeddingCache(tmp_path, "m1", "digits/classify")
    cache.put(["a", "b"], np.eye(2, dtype=np.float32), ["t1", ""])
    (cache.folder / "deadbeef.123.tmp").write_bytes(b"half a file")       # SIGKILL mid-write
    again = EmbeddingCache(tmp_path, "m1", "digits/classify")
    hit = again.get(["a", "b", "c"])
    assert sorted(hit) == ["a", "b"] and hit["a"][1] == "t1" and (hit["b"][0] == [0, 1]).all()
    again.clean()
    assert not list(cache.folder.glob("*.tmp"))
    assert EmbeddingCache(tmp_path, "m2", "digits/classify").get(["a"]) == {}   # another model


def test_the_model_hash_follows_adapter_weights_and_image_settings():
    tte = UnifiedTTE(tiny_qwen2vl(), mode="activated")
    first = model_key(tte)
    assert model_key(tte) == first
    tte.set_image_size(max_pixels=28 * 28 * 16)
    second = model_key(tte)
    randomize_adapters(tte, seed=1)
    assert len({first, second, model_key(tte)}) == 3


class CountingModel:
    cache_key = "counting-v1"

    def __init__(self):
        self.calls = 0

    def embed(self, inputs, traces=None):
        self.calls += len(inputs)
        g = torch.Generator().manual_seed(sum(len(x.text) for x in inputs))
        return torch.nn.functional.normalize(torch.randn(len(inputs), 16, generator=g), dim=-1)


def test_a_fully_cached_evaluation_recomputes_nothing_and_scores_the_same(tmp_path):
    tasks = resolve_tasks("digits/classify,digits/next_number", max_rows=9)
    first_model, second_model = CountingModel(), CountingModel()
    first = evaluate_model(first_model, tasks, batch_size=4, use_think=False, progress=False, cache_dir=tmp_path)
    second = evaluate_model(second_model, tasks, batch_size=4, use_think=False, progress=False, cache_dir=tmp_path)
    assert second_model.calls == 0 and first_model.calls > 0
    for name, m in second["tasks"].items():
        assert m["cached_items"] == m["n"] + m["n_distinct_candidates"]
        assert {k: m[k] for k in ("hit@1", "ndcg@5", "mrr")} == {k: first["tasks"][name][k] for k in ("hit@1", "ndcg@5", "mrr")}
