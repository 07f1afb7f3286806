import math

import numpy as np
import pytest
import torch

from unified_tte.eval.metrics import aggregate, evaluate_scores, hit_at_1, mrr, ndcg_at_k, rank_of_positive


def test_positive_scored_highest_ranks_first():
    s = [0.9, 0.1, 0.5]
    assert rank_of_positive(s, 0) == 1
    assert hit_at_1(s, 0) == 1.0
    assert ndcg_at_k(s, 0) == 1.0
    assert mrr(s, 0) == 1.0


def test_second_place_matches_hand_computed_values():
    s = [0.9, 0.1, 0.5]
    assert rank_of_positive(s, 2) == 2
    assert hit_at_1(s, 2) == 0.0
    assert ndcg_at_k(s, 2) == pytest.approx(1 / math.log2(3))
    assert mrr(s, 2) == pytest.approx(0.5)


def test_tie_counts_pessimistically_positive_ranks_below_equal_negatives():
    # All equal: the positive ranks last, whatever its index.
    for pos in range(3):
        assert rank_of_positive([0.5, 0.5, 0.5], pos) == 3
    assert hit_at_1([0.5, 0.5, 0.5], 0) == 0.0
    assert mrr([0.5, 0.5, 0.5], 1) == pytest.approx(1 / 3)
    assert ndcg_at_k([0.5, 0.5, 0.5], 2) == pytest.approx(1 / math.log2(4))
    # Tied with one negative above a third: rank 2, no Hit@1.
    assert rank_of_positive([0.7, 0.7, 0.1], 0) == 2
    assert hit_at_1([0.7, 0.7, 0.1], 1) == 0.0


def test_ndcg_is_zero_beyond_k_and_mrr_keeps_counting():
    s = np.linspace(1.0, 0.1, 10)            # strictly decreasing: index i has rank i + 1
    assert ndcg_at_k(s, 4) == pytest.approx(1 / math.log2(6))   # rank 5 is inside @5
    assert ndcg_at_k(s, 5) == 0.0                              # rank 6 is outside
    assert mrr(s, 5) == pytest.approx(1 / 6)
    assert ndcg_at_k(s, 5, k=10) == pytest.approx(1 / math.log2(7))


def test_evaluate_scores_averages_over_queries_from_a_tensor():
    scores = torch.tensor([[0.9, 0.1, 0.5],     # pos 0 -> rank 1
                           [0.9, 0.1, 0.5],     # pos 2 -> rank 2
                           [0.2, 0.2, 0.2]])    # pos 1 -> rank 3 (tie)
    m = evaluate_scores(scores, [0, 2, 1])
    assert m["n"] == 3
    assert m["hit@1"] == pytest.approx(1 / 3)
    assert m["mrr"] == pytest.approx((1 + 1 / 2 + 1 / 3) / 3)
    assert m["ndcg@5"] == pytest.approx((1 + 1 / math.log2(3) + 1 / math.log2(4)) / 3)


def test_evaluate_scores_accepts_ragged_candidate_lists():
    m = evaluate_scores([[0.1, 0.3], [0.4, 0.3, 0.2, 0.1]], [1, 0])
    assert m["hit@1"] == 1.0 and m["mrr"] == 1.0


def test_bad_scores_raise():
    with pytest.raises(ValueError, match="NaN"):
        rank_of_positive([0.1, float("nan")], 0)
    with pytest.raises(ValueError, match="outside"):
        rank_of_positive([0.1, 0.2], 2)
    with pytest.raises(ValueError, match="empty"):
        rank_of_positive([], 0)
    with pytest.raises(ValueError, match="positives"):
        evaluate_scores([[0.1, 0.2]], [0, 1])


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
