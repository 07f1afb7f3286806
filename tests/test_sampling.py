"""Per-subset caps and weights, mixed and same-task global batches (VLM2Vec's sampling), and
info_nce's label convention for more targets than queries."""
from collections import Counter

import pytest
import torch

from unified_tte.data.sampling import BatchSampler, SubsetSpec, apply_subsets
from unified_tte.data.schema import TrainRow
from unified_tte.errors import DataError
from unified_tte.model.inputs import TTEInput
from tte_kernels import info_nce, info_nce_ref

SIZES = {"ImageNet_1K": 60, "OK-VQA": 40, "DocVQA": 30}


def rows():
    return [TrainRow(f"{name}:{i}", TTEInput(f"q{i}", ["p.png"] if name == "DocVQA" else []), TTEInput("p"), task=name)
            for name, n in SIZES.items() for i in range(n)]


def test_caps_keep_the_first_rows_of_a_subset_and_page_caps_reach_its_images():
    kept = apply_subsets(rows(), {"ImageNet_1K": SubsetSpec(max_rows=10), "DocVQA": SubsetSpec(max_pixels=28 * 28 * 64)})
    counts = Counter(r.task for r in kept)
    assert counts == {"ImageNet_1K": 10, "OK-VQA": 40, "DocVQA": 30}
    assert [r.id for r in kept if r.task == "ImageNet_1K"] == [f"ImageNet_1K:{i}" for i in range(10)]
    assert {r.qry.max_pixels for r in kept if r.task == "DocVQA"} == {28 * 28 * 64}
    with pytest.raises(DataError, match=r"data.subsets names \['NIGHTS'\]"):
        apply_subsets(rows(), {"NIGHTS": SubsetSpec(max_rows=1)})


def test_a_page_cap_copies_the_rows_it_caps_and_leaves_the_given_rows_and_shared_inputs_as_they_are():
    shared = TTEInput("p", ["p.png"])     # one input in many rows, as a loader may share it
    given = [TrainRow(f"DocVQA:{i}", TTEInput(f"q{i}", ["p.png"]), shared, task="DocVQA") for i in range(3)]
    kept = apply_subsets(given, {"DocVQA": SubsetSpec(max_pixels=28 * 28 * 64)})
    assert all(r.qry.max_pixels == r.pos.max_pixels == 28 * 28 * 64 for r in kept)
    assert all(r.qry.max_pixels is None for r in given) and shared.max_pixels is None
    assert [r.qry.source for r in kept] == [r.qry.source for r in given]   # still named by their rows


def test_same_task_batches_come_from_one_subset_drawn_by_weight_and_cover_each_subset_before_repeating():
    data = apply_subsets(rows(), {"ImageNet_1K": SubsetSpec(max_rows=40)})
    tasks = [r.task for r in data]
    weights = {"ImageNet_1K": 2.0, "OK-VQA": 1.0, "DocVQA": 1.0}
    sampler = BatchSampler(tasks, batch=10, seed=0, stage_index=1, batching="same_task", weights=weights)
    batches = [sampler.batch(s) for s in range(400)]
    for s, b in enumerate(batches):
        assert len({tasks[i] for i in b}) == 1 and len(set(b)) == 10
        assert sampler.subset_of_batch(s) == tasks[b[0]]
    share = Counter(tasks[b[0]] for b in batches)
    assert share["ImageNet_1K"] / 400 == pytest.approx(0.5, abs=0.07)
    assert share["OK-VQA"] / 400 == pytest.approx(0.25, abs=0.07)
    # Each subset is a stream: its first pass (an "epoch" of it) shows every row exactly once.
    for name, n in (("ImageNet_1K", 40), ("DocVQA", 30)):
        seen = [i for b in batches if tasks[b[0]] == name for i in b]
        assert sorted(seen[:n]) == [i for i, t in enumerate(tasks) if t == name]
    assert BatchSampler(tasks, 10, 0, 1, "same_task", weights).batch(123) == batches[123]   # a function of the step
    assert all(i < len(data) for b in batches for i in b)      # capped rows never come back


def test_mixed_batches_draw_rows_by_weight_and_plain_mixed_is_a_shuffle_per_epoch():
    tasks = [r.task for r in rows()]
    sampler = BatchSampler(tasks, batch=20, seed=1, stage_index=0, batching="mixed", weights={"DocVQA": 3.0})
    drawn = Counter(tasks[i] for s in range(200) for i in sampler.batch(s))
    assert drawn["DocVQA"] / 4000 == pytest.approx(0.6, abs=0.05)        # 3 / (3 + 1 + 1)
    plain = BatchSampler(tasks, batch=26, seed=1, stage_index=0)
    epoch = [i for s in range(5) for i in plain.batch(s)]
    assert len(epoch) == len(set(epoch)) == 130                           # 130 rows, 5 full batches


def test_a_same_task_batch_larger_than_a_subset_is_refused():
    with pytest.raises(DataError, match=r"subset\(s\) \['DocVQA'\] hold fewer rows"):
        BatchSampler([r.task for r in rows()], batch=35, seed=0, stage_index=0, batching="same_task")


def test_same_task_batching_over_two_ranks_gives_every_rank_the_same_subset(monkeypatch):
    from unified_tte.train.batches import stage_sampler
    from unified_tte.train.recipe import recipe_from_dict

    recipe = recipe_from_dict({"data": {"train": ["x.jsonl"], "subsets": {"DocVQA": {"weight": 0}}},
                               "embed": {"batch_size": 8, "batching": "same_task"}})
    data = rows()
    sampler = stage_sampler(recipe, "embed", 1, data)
    for step in range(20):
        idx = sampler.batch(step)
        per_rank = [idx[r * 4:(r + 1) * 4] for r in range(2)]
        assert len({data[i].task for part in per_rank for i in part}) == 1
        assert data[idx[0]].task != "DocVQA"                               # weight 0: never drawn


def test_recipe_subsets_are_checked():
    from unified_tte.train.recipe import RecipeError, recipe_from_dict

    with pytest.raises(RecipeError, match=r"data.subsets.DocVQA.*keys among"):
        recipe_from_dict({"data": {"train": ["x.jsonl"], "subsets": {"DocVQA": {"max_row": 3}}}})
    with pytest.raises(RecipeError, match=r"data.subsets.DocVQA.max_rows.*non-negative integer"):
        recipe_from_dict({"data": {"train": ["x.jsonl"], "subsets": {"DocVQA": {"max_rows": 2.5}}}})


def test_info_nce_refuses_more_targets_than_queries_without_labels_unless_told_the_layout():
    g = torch.Generator().manual_seed(0)
    q = torch.nn.functional.normalize(torch.randn(4, 8, generator=g), dim=-1)
    t = torch.nn.functional.normalize(torch.randn(8, 8, generator=g), dim=-1)
    with pytest.raises(ValueError, match=r"N=8 rows for B=4 queries and no labels.*layout='block'"):
        info_nce(q, t, backend="chunked")
    block = info_nce(q, t, backend="chunked", layout="block")
    torch.testing.assert_close(block, info_nce_ref(q, t, torch.arange(4)))
    # VLM2Vec's interleaved targets: [pos_0, neg_0, pos_1, neg_1, ...]; positives at 2i.
    inter = info_nce(q, t, backend="chunked", layout="interleaved")
    torch.testing.assert_close(inter, info_nce_ref(q, t, torch.arange(4) * 2))
    assert not torch.isclose(inter, block)
    with pytest.raises(ValueError, match="N = k \\* B"):
        info_nce(q, t[:7], backend="chunked", layout="interleaved")
