import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from unified_tte.data.registry import SUITES, load_registry
from unified_tte.eval.metrics import (aggregate, distinct_candidates, evaluate_scores, mmeb_averages, rank_of_positive,
                                      ranking, ranking_metrics)

DATA = Path(__file__).parent / "data"


def one_hot(positive, size):
    return [1.0 if i == positive else 0.0 for i in range(size)]


def test_positive_scored_highest_ranks_first():
    s = [0.9, 0.1, 0.5]
    assert rank_of_positive(s, 0) == 1
    m = ranking_metrics(s, one_hot(0, 3))
    assert (m["hit@1"], m["ndcg@5"], m["mrr"], m["recall@1"]) == (1.0, 1.0, 1.0, 1.0)


def test_second_place_matches_hand_computed_values():
    s = [0.9, 0.1, 0.5]
    assert rank_of_positive(s, 2) == 2
    m = ranking_metrics(s, one_hot(2, 3))
    assert m["hit@1"] == 0.0 and m["recall@1"] == 0.0 and m["recall@5"] == 1.0
    assert m["ndcg@5"] == pytest.approx(1 / math.log2(3))
    assert m["mrr"] == pytest.approx(0.5)


def test_pessimistic_rule_ranks_a_tied_positive_below_equal_negatives():
    # All equal: the positive ranks last, whatever its index.
    for pos in range(3):
        assert rank_of_positive([0.5, 0.5, 0.5], pos) == 3
    m = ranking_metrics([0.5, 0.5, 0.5], one_hot(0, 3))
    assert m["hit@1"] == 0.0 and m["ndcg@5"] == pytest.approx(1 / math.log2(4))
    # Tied with one negative above a third: rank 2, no Hit@1.
    assert rank_of_positive([0.7, 0.7, 0.1], 0) == 2


def test_reference_rule_ranks_ties_by_candidate_order_as_argmax_and_a_stable_sort_do():
    scores = [0.5, 0.5, 0.5, 0.2]
    assert [rank_of_positive(scores, pos, "reference") for pos in range(4)] == [1, 2, 3, 4]
    assert [rank_of_positive(scores, pos) for pos in range(4)] == [3, 3, 3, 4]
    # MMEB-V1's rule: a hit when np.argmax, the first of the tied candidates, is the positive
    assert int(np.argmax(scores)) == 0 and rank_of_positive(scores, 0, "reference") == 1
    # several graded positives: among equal scores the earlier candidate first, whatever its gain
    ranked, _ = ranking([0.3, 0.3, 0.3], [1.0, 0.0, 2.0], "reference")
    assert list(ranked) == [1.0, 0.0, 2.0]
    ranked, _ = ranking([0.3, 0.3, 0.3], [1.0, 0.0, 2.0], "pessimistic")
    assert list(ranked) == [0.0, 1.0, 2.0]     # the worst case: the lower gain first


def test_a_tie_counts_only_where_a_rule_decides_it():
    assert ranking([0.9, 0.5, 0.5], one_hot(0, 3))[1] is False           # negatives tie each other
    assert ranking([0.5, 0.5, 0.1], one_hot(0, 3))[1] is True            # the positive ties a negative
    assert ranking([0.5, 0.5, 0.1], [2.0, 2.0, 0.0])[1] is False         # equal gains: order cannot matter
    assert ranking([0.5, 0.5, 0.1], [2.0, 1.0, 0.0])[1] is True          # graded: it can


def test_ndcg_is_zero_beyond_5_and_mrr_keeps_counting():
    s = np.linspace(1.0, 0.1, 12)            # strictly decreasing: index i has rank i + 1
    assert ranking_metrics(s, one_hot(4, 12))["ndcg@5"] == pytest.approx(1 / math.log2(6))   # rank 5 is inside
    m = ranking_metrics(s, one_hot(5, 12))
    assert m["ndcg@5"] == 0.0 and m["mrr"] == pytest.approx(1 / 6) and m["mrr@10"] == pytest.approx(1 / 6)
    m = ranking_metrics(s, one_hot(10, 12))
    assert m["mrr"] == pytest.approx(1 / 11) and m["mrr@10"] == 0.0 and m["recall@10"] == 0.0


def test_graded_ndcg_pairs_each_item_with_its_own_grade():
    # The README's case: grades p1=3, p2=2, p3=1, ranked p3, n1, p1, n2, p2, n3. VLM2Vec's evaluate()
    # reorders the labels through a set but not their grades; the right pairing gives:
    gains = [1.0, 0.0, 3.0, 0.0, 2.0, 0.0]                     # in ranked order
    dcg = 1 / math.log2(2) + 3 / math.log2(4) + 2 / math.log2(6)
    ideal = 3 / math.log2(2) + 2 / math.log2(3) + 1 / math.log2(4)
    m = ranking_metrics(np.linspace(1.0, 0.5, 6), gains)
    assert m["ndcg@5"] == pytest.approx(dcg / ideal) and round(m["ndcg@5"], 4) == 0.6875
    assert m["recall@1"] == pytest.approx(1 / 3) and m["mrr"] == 1.0


def test_evaluate_scores_averages_over_queries_from_a_tensor_and_counts_ties():
    scores = torch.tensor([[0.9, 0.1, 0.5],     # pos 0 -> rank 1
                           [0.9, 0.1, 0.5],     # pos 2 -> rank 2
                           [0.2, 0.2, 0.2]])    # pos 1 -> rank 3 (tie)
    m = evaluate_scores(scores, [0, 2, 1])
    assert m["n"] == 3 and m["n_tied"] == 1 and m["tied_queries"] == [2]
    assert m["hit@1"] == pytest.approx(1 / 3)
    assert m["mrr"] == pytest.approx((1 + 1 / 2 + 1 / 3) / 3)
    assert m["ndcg@5"] == pytest.approx((1 + 1 / math.log2(3) + 1 / math.log2(4)) / 3)
    assert evaluate_scores(scores, [0, 2, 1], tie_rule="reference")["hit@1"] == pytest.approx(1 / 3)
    assert evaluate_scores(scores, [0, 2, 0], tie_rule="reference")["hit@1"] == pytest.approx(2 / 3)


def test_evaluate_scores_accepts_ragged_candidate_lists():
    m = evaluate_scores([[0.1, 0.3], [0.4, 0.3, 0.2, 0.1]], [1, 0])
    assert m["hit@1"] == 1.0 and m["mrr"] == 1.0 and m["n_tied"] == 0


def test_a_matrix_alone_lists_the_duplicate_of_the_positive_as_a_tie_and_keys_collapse_it():
    # columns 0 and 2 hold the same content (the positive "crane", listed twice)
    scores, keys = [[0.8, 0.3, 0.8, 0.1]], [["crane", "tench", "crane", "goldfish"]]
    alone = evaluate_scores(scores, [0])
    assert alone["hit@1"] == 0.0 and alone["tied_queries"] == [0]     # reported, not silently scored
    known = evaluate_scores(scores, [0], candidates=keys)
    assert known["hit@1"] == 1.0 and known["n_tied"] == 0
    assert known == evaluate_scores(scores, [2], candidates=keys)     # either copy is the positive


def test_distinct_candidates_keep_the_first_column_and_the_highest_gain():
    keep, gains = distinct_candidates(["a", "b", "a", "c", "b"], [0.0, 1.0, 2.0, 0.0, 0.0])
    assert keep == [0, 1, 3] and list(gains) == [2.0, 1.0, 0.0]


def test_graded_positives_as_a_mapping_of_columns():
    m = evaluate_scores(np.array([[0.9, 0.8, 0.1, 0.7]]), [{1: 2.0, 3: 1.0}])
    assert m["hit@1"] == 0.0 and m["recall@5"] == 1.0
    assert m["ndcg@5"] == pytest.approx((2 / math.log2(3) + 1 / math.log2(4)) / (2 + 1 / math.log2(3)))


def test_bad_scores_raise():
    with pytest.raises(ValueError, match="NaN"):
        rank_of_positive([0.1, float("nan")], 0)
    with pytest.raises(ValueError, match="outside"):
        rank_of_positive([0.1, 0.2], 2)
    with pytest.raises(ValueError, match="empty"):
        rank_of_positive([], 0)
    with pytest.raises(ValueError, match="positives"):
        evaluate_scores([[0.1, 0.2]], [0, 1])
    with pytest.raises(ValueError, match="query 0: 2 scores but 3 candidate keys"):
        evaluate_scores([[0.1, 0.2]], [0], candidates=[["a", "b", "c"]])
    with pytest.raises(ValueError, match="tie rule 'bogus': expected one of pessimistic, reference"):
        evaluate_scores([[0.1, 0.2]], [0], tie_rule="bogus")
    with pytest.raises(ValueError, match="no relevant item"):
        ranking_metrics([0.1, 0.2], [0.0, 0.0])


def test_aggregate_averages_tasks_per_group_and_overall_over_tasks_not_groups():
    per_task = {"a": {"hit@1": 1.0, "ndcg@5": 1.0, "mrr": 1.0},
                "b": {"hit@1": 0.0, "ndcg@5": 0.5, "mrr": 0.5},
                "c": {"hit@1": 0.5, "ndcg@5": 0.5, "mrr": 0.5}}
    out = aggregate(per_task, {"a": "I2T", "b": "I2T", "c": "T2I"})
    assert out["groups"]["I2T"]["hit@1"] == pytest.approx(0.5)
    assert out["groups"]["I2T"]["n_tasks"] == 2
    assert out["groups"]["T2I"]["mrr"] == pytest.approx(0.5)
    # Over tasks: (1 + 0 + 0.5) / 3 = 0.5; over groups it would be (0.5 + 0.5) / 2 as well, so
    # check ndcg where they differ: tasks (1 + .5 + .5) / 3 vs groups (.75 + .5) / 2.
    assert out["overall"]["ndcg@5"] == pytest.approx(2 / 3)
    assert out["overall"]["n_tasks"] == 3


def test_aggregate_requires_a_group_for_every_task():
    with pytest.raises(ValueError, match="no group"):
        aggregate({"a": {"hit@1": 1.0, "ndcg@5": 1.0, "mrr": 1.0}}, {})


def test_mmeb_v1_reports_ind_and_ood_beside_the_overall(tmp_path):
    specs = load_registry(SUITES["mmeb_v1"], data_root=tmp_path)
    ind = [n for n, s in specs.items() if s.distribution == "IND"]
    assert len(ind) == 20 and sum(s.distribution == "OOD" for s in specs.values()) == 16
    per_task = {n: {"hit@1": 1.0 if s.distribution == "IND" else 0.5, "modality": s.modality,
                    "primary": "hit@1", "distribution": s.distribution} for n, s in specs.items()}
    out = mmeb_averages(per_task)
    assert out["IND"] == {"score": 1.0, "n_tasks": 20} and out["OOD"] == {"score": 0.5, "n_tasks": 16}
    assert out["overall"]["score"] == pytest.approx((20 + 8) / 36) and out["image"]["n_tasks"] == 36


def test_the_published_vlm2vec_v2_scores_average_to_the_papers_58_0_over_the_suites_78_tasks(tmp_path):
    published = json.loads((DATA / "vlm2vec_v2_published_scores.json").read_text())
    specs = load_registry(SUITES["mmeb_v2"], data_root=tmp_path)
    # same tasks, same modalities, in the reference report's order
    assert [(n, s.modality) for n, s in specs.items()] == [(n, mod) for mod, tasks in published["scores"].items()
                                                           for n in tasks]
    per_task = {}
    for name, spec in specs.items():
        primary = "ndcg@5" if spec.modality == "visdoc" else "hit@1"
        per_task[name] = {primary: published["scores"][spec.modality][name], "modality": spec.modality,
                          "primary": primary}
    out = mmeb_averages(per_task)
    scores = {k: round(100 * v["score"], 1) for k, v in out.items()}
    assert scores == {"image": 64.9, "video": 34.6, "visdoc": 65.4, "overall": 58.0}
    assert out["overall"]["n_tasks"] == 78
