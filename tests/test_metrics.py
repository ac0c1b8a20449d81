"""Metrics against values computed by hand (the arithmetic is in the comments)."""

from __future__ import annotations

import numpy as np
import pytest

from model.metrics import average_precision, evaluate_scores, gap_at_k, hit_at_k, mean_ap, per_class_ap

SCORES = np.array([
    [0.9, 0.8, 0.1, 0.3],   # truth {1}: rank 2
    [0.2, 0.1, 0.7, 0.6],   # truth {2, 3}: rank 1
    [0.5, 0.4, 0.3, 0.2],   # truth {3}: rank 4
    [0.05, 0.02, 0.01, 0.0],  # no labels: left out of Hit@k, counts in GAP's pooled list
])
TRUTH = np.array([[0, 1, 0, 0], [0, 0, 1, 1], [0, 0, 0, 1], [0, 0, 0, 0]])


def test_hit_at_k():
    assert hit_at_k(SCORES, TRUTH, 1) == pytest.approx(1 / 3)
    assert hit_at_k(SCORES, TRUTH, 2) == pytest.approx(2 / 3)
    assert hit_at_k(SCORES, TRUTH, 3) == pytest.approx(2 / 3)
    assert hit_at_k(SCORES, TRUTH, 5) == pytest.approx(1.0)


def test_gap():
    # top-2 of each video pooled and sorted: .9F .8T .7T .6T .5F .4F .05F .02F; 4 positives in total
    # GAP = (1/2 + 2/3 + 3/4) / 4
    assert gap_at_k(SCORES, TRUTH, 2) == pytest.approx((0.5 + 2 / 3 + 0.75) / 4)
    # k=20 covers everything: ranks of positives in the pooled list of all 16 scores
    # .9F .8T .7T .6T .5F .4F .3F(v0c3) .3F(v2c2) .2F .2T(v2c3) ... -> positives at ranks 2, 3, 4, 10
    assert gap_at_k(SCORES, TRUTH, 20) == pytest.approx((1 / 2 + 2 / 3 + 3 / 4 + 4 / 10) / 4)


def test_average_precision_and_map():
    aps = per_class_ap(SCORES, TRUTH)
    assert aps[0] is None  # no positive
    assert aps[1] == pytest.approx(1.0) and aps[2] == pytest.approx(1.0)
    # class 3: sorted .6T .3F .2T .0F -> (1 + 2/3) / 2
    assert aps[3] == pytest.approx((1 + 2 / 3) / 2)
    assert mean_ap(aps) == pytest.approx((1 + 1 + 5 / 6) / 3)
    # tied scores form one threshold: (.5: P=1/2, R=1/2), (.1: P=2/3, R=1) -> 1/2*1/2 + 1/2*2/3
    assert average_precision(np.array([0.5, 0.5, 0.1]), np.array([0, 1, 1])) == pytest.approx(0.25 + 1 / 3)


def test_evaluate_scores_json_shape():
    result = evaluate_scores(SCORES, TRUTH, ["a-1", "a-2", "b-1", "b-2"])
    assert set(result) >= {"hit_at_1", "hit_at_2", "hit_at_3", "hit_at_5", "gap_at_20", "map", "per_class_ap"}
    assert result["per_class_ap"]["a-1"] is None
    assert all(0.0 <= result[k] <= 1.0 for k in ("hit_at_1", "gap_at_20", "map"))
