"""Precision / recall of correspondence scores against label agreement, streamed: a
fixed-bin histogram of scores of positive and negative pairs (:class:`ScoreHistogram`) gives
the PR curve and average precision of any number of pairs in constant memory; the exact AP
of a small sample checks it (scikit-learn's).
"""
from __future__ import annotations

import numpy as np
import torch
from sklearn.metrics import average_precision_score, precision_recall_curve

from stegoseg.errors import StegosegError


class ScoreHistogram:
    """Streaming fixed-bin counts of the scores of positive and negative pairs.

    Bin ``b`` holds scores in ``[lo + b w, lo + (b + 1) w)`` with ``w = (hi - lo) / bins``;
    scores outside ``[lo, hi)`` go to the first / last bin.
    """

    def __init__(self, bins: int = 2000, lo: float = -1.0, hi: float = 1.0):
        if bins < 2:
            raise StegosegError(f"--bins must be >= 2, got {bins}")
        if not hi > lo:
            raise StegosegError(f"histogram range [{lo}, {hi}] is empty")
        self.bins, self.lo, self.hi = int(bins), float(lo), float(hi)
        self.pos = np.zeros(self.bins, dtype=np.int64)
        self.neg = np.zeros(self.bins, dtype=np.int64)

    @property
    def edges(self) -> np.ndarray:
        return np.linspace(self.lo, self.hi, self.bins + 1)

    def bin_index(self, scores: torch.Tensor) -> torch.Tensor:
        scale = self.bins / (self.hi - self.lo)
        return ((scores.float() - self.lo) * scale).floor().clamp_(0, self.bins - 1).long()

    def add(self, scores, positive) -> None:
        """Count a batch of scores; ``positive`` is a boolean array of the same shape."""
        s = torch.as_tensor(scores).reshape(-1)
        y = torch.as_tensor(positive, device=s.device).reshape(-1).bool()
        if s.numel() != y.numel():
            raise ValueError(f"{s.numel()} scores but {y.numel()} labels")
        idx = self.bin_index(s)
        self.pos += torch.bincount(idx[y], minlength=self.bins).cpu().numpy()
        self.neg += torch.bincount(idx[~y], minlength=self.bins).cpu().numpy()

    @property
    def n_pos(self) -> int:
        return int(self.pos.sum())

    @property
    def n_neg(self) -> int:
        return int(self.neg.sum())

    @property
    def n(self) -> int:
        return self.n_pos + self.n_neg

    @property
    def positive_rate(self) -> float:
        return self.n_pos / self.n if self.n else float("nan")

    def pr_curve(self) -> tuple:
        """(precision, recall, thresholds), one point per non-empty bin from the highest
        score down; the threshold is the bin's lower edge (score >= threshold is predicted
        positive)."""
        return pr_from_counts(self.pos, self.neg, self.edges[:-1])

    def average_precision(self) -> float:
        """AP of the pairs with their scores rounded down to the bin's lower edge
        (scikit-learn's ``average_precision_score``, each bin weighted by its counts)."""
        y, score, weight = _weighted_bins(self.pos, self.neg, self.edges[:-1])
        if not (y * weight).any():
            return float("nan")
        return float(average_precision_score(y, score, sample_weight=weight))


def _weighted_bins(pos: np.ndarray, neg: np.ndarray, thresholds: np.ndarray) -> tuple:
    """Per-bin counts as weighted samples: (labels, scores, weights), one positive and one
    negative sample per bin (empty ones dropped), scored by the bin's threshold."""
    pos = np.asarray(pos, dtype=np.float64)
    neg = np.asarray(neg, dtype=np.float64)
    thresholds = np.asarray(thresholds, dtype=np.float64)
    y = np.concatenate([np.ones(len(pos), dtype=np.int64), np.zeros(len(neg), dtype=np.int64)])
    score = np.concatenate([thresholds, thresholds])
    weight = np.concatenate([pos, neg])
    keep = weight > 0
    return y[keep], score[keep], weight[keep]


def pr_from_counts(pos: np.ndarray, neg: np.ndarray, thresholds: np.ndarray) -> tuple:
    """PR points from per-bin positive/negative counts (bins in increasing score order).

    scikit-learn's ``precision_recall_curve`` on the bins as weighted samples, returned from
    the highest threshold down, one point per non-empty bin (without scikit-learn's
    closing point precision 1, recall 0); empty arrays when there is no positive.
    """
    y, score, weight = _weighted_bins(pos, neg, thresholds)
    if not (y * weight).any():
        return np.zeros(0), np.zeros(0), np.zeros(0)
    precision, recall, thr = precision_recall_curve(y, score, sample_weight=weight)
    return precision[:-1][::-1], recall[:-1][::-1], thr[::-1]


def average_precision_exact(scores, positive) -> float:
    """Exact average precision of arrays: scikit-learn's ``average_precision_score``
    (ties grouped), ``sum_k (R_k - R_{k-1}) P_k`` over distinct thresholds. NaN when there
    is no positive.
    """
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    y = np.asarray(positive, dtype=bool).reshape(-1)
    if s.shape != y.shape:
        raise ValueError(f"{s.size} scores but {y.size} labels")
    if not y.any():
        return float("nan")
    return float(average_precision_score(y.astype(np.int64), s))
