"""Evaluation metrics over a score matrix (N videos x C labels) and a multi-hot truth matrix.

* Hit@k (the paper's eq. 12-13, generalised to multi-label): a video is a hit when **any** of its true
  labels is among its k highest-scoring labels. Videos without any true label are left out.
  Ties are broken by label index (stable sort), so results are deterministic.
* GAP@k (YouTube-8M "global average precision", k = 20): the top k predictions of every video are
  pooled into one list sorted by score; GAP = (1/P) sum_i precision(i) * rel(i) over that list, where
  P is the total number of true labels over all videos (also those that fall outside a video's top k,
  exactly as YouTube-8M's ``AveragePrecisionCalculator`` does).
* AP per class: non-interpolated average precision, sum_n (R_n - R_{n-1}) P_n over the distinct score
  thresholds (tied scores form one threshold, as in scikit-learn's ``average_precision_score``);
  undefined (None) for a class with no positive video. mAP is the mean over defined classes.
"""

from __future__ import annotations

import numpy as np


def _topk(scores: np.ndarray, k: int) -> np.ndarray:
    order = np.argsort(-scores, axis=1, kind="stable")
    return order[:, :k]


def hit_at_k(scores: np.ndarray, truth: np.ndarray, k: int) -> float:
    scores, truth = np.asarray(scores, dtype=np.float64), np.asarray(truth) > 0
    keep = truth.any(axis=1)
    if not keep.any():
        return 0.0
    top = _topk(scores[keep], k)
    return float(np.take_along_axis(truth[keep], top, axis=1).any(axis=1).mean())


def gap_at_k(scores: np.ndarray, truth: np.ndarray, k: int = 20) -> float:
    scores, truth = np.asarray(scores, dtype=np.float64), np.asarray(truth) > 0
    positives = int(truth.sum())
    if positives == 0:
        return 0.0
    top = _topk(scores, min(k, scores.shape[1]))
    pooled_scores = np.take_along_axis(scores, top, axis=1).ravel()
    pooled_truth = np.take_along_axis(truth, top, axis=1).ravel()
    order = np.argsort(-pooled_scores, kind="stable")
    rel = pooled_truth[order].astype(np.float64)
    precision = np.cumsum(rel) / np.arange(1, len(rel) + 1)
    return float((precision * rel).sum() / positives)


def average_precision(scores: np.ndarray, truth: np.ndarray) -> float | None:
    """AP of one class: scores (N,), truth (N,) 0/1. None when there is no positive."""
    scores, truth = np.asarray(scores, dtype=np.float64), np.asarray(truth) > 0
    positives = int(truth.sum())
    if positives == 0:
        return None
    order = np.argsort(-scores, kind="stable")
    s, t = scores[order], truth[order].astype(np.float64)
    tp = np.cumsum(t)
    # last index of each run of equal scores = one threshold
    last = np.r_[np.nonzero(np.diff(s))[0], len(s) - 1]
    tp_at, n_at = tp[last], last + 1.0
    recall = tp_at / positives
    precision = tp_at / n_at
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def per_class_ap(scores: np.ndarray, truth: np.ndarray) -> list[float | None]:
    scores, truth = np.asarray(scores), np.asarray(truth)
    return [average_precision(scores[:, c], truth[:, c]) for c in range(scores.shape[1])]


def mean_ap(aps: list[float | None]) -> float:
    defined = [a for a in aps if a is not None]
    return float(np.mean(defined)) if defined else 0.0


def evaluate_scores(
    scores: np.ndarray, truth: np.ndarray, labels: list[str] | None = None
) -> dict:
    """All metrics as one JSON-ready dict (fractions in [0, 1])."""
    aps = per_class_ap(scores, truth)
    names = labels if labels is not None else [str(i) for i in range(len(aps))]
    return {
        "videos": int(len(scores)),
        "hit_at_1": hit_at_k(scores, truth, 1),
        "hit_at_2": hit_at_k(scores, truth, 2),
        "hit_at_3": hit_at_k(scores, truth, 3),
        "hit_at_5": hit_at_k(scores, truth, 5),
        "gap_at_20": gap_at_k(scores, truth, 20),
        "map": mean_ap(aps),
        "per_class_ap": dict(zip(names, aps, strict=True)),
    }
