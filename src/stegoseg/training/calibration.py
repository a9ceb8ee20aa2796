"""Label-free calibration of STEGO's shifts (``--shifts auto``).

What a shift does. Per pair of sampled points the loss is ``-max(S, 0) (F - b)``: where
the feature correspondence F is above b the code similarity S is pulled up to 1, where F
is below b, S is pushed down to 0 (and then left alone, because of the zero clamp). So b
is a *threshold on F*, and what matters is not its value but which fraction of the pairs
of each type (within an image, with a nearest neighbour, with a random image) it
attracts. The published values put the thresholds for DINO ViT features on CocoStuff;
the distribution of F depends on the backbone, the resolution and the images, so the
same b attracts almost every pair on one dataset (everything merges: collapse) and
almost none on another.

The calibration therefore chooses, for each pair type t, the fraction of pairs to
attract, and puts b_t at the matching quantile of that type's F:

    b_t = quantile(F_t, 1 - pi_t)

where pi_t is the rate at which two points of a pair of type t fall in the same cluster
of a k-means partition of the backbone features into the run's number of clusters (the
seeded spherical k-means of the raw-feature baseline, fitted on the sampled points). pi_t is the label-free estimate of
"how often does a pair of this type show the same class": high within an image and
between nearest neighbours, about 1/K between random images. Pairs are drawn exactly as
training draws them (the cached features, the KNN lists, 11 x 11 points per image, the
same centring), from their own seeded stream. Nothing reads labels.

With these shifts the run lands in the balanced regime that paper A.11 asks for without
trial and error (mean KNN code similarity well above the random one, random near 0),
and it stays there as training goes on: see ``docs/label_free.md`` for the evidence.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
import torch
import torch.nn.functional as F

from stegoseg.losses.stego import (
    feature_correspondence,
    random_coords,
    random_derangement,
    sample_points,
)
from stegoseg.nn.kmeans import spherical_kmeans
from stegoseg.training.steps import batch_indices

PAIR_TYPES = ("self", "knn", "rand")


# Seeds of the calibration's and the selection's own streams, apart from training's.
CALIBRATION_SALT = 7_777


# Quantiles are estimated on at most this many pairs per type (a uniform subsample).
MAX_QUANTILE_PAIRS = 2_000_000


@dataclass
class PairSample:
    """One batch of sampled points, as training samples them (before dropout).

    ``feats`` (n, C, s, s): the points of each item; ``partner`` per pair type: the points
    they are paired with (the same points for ``self``, independent points of a KNN
    partner and of a random other item of the batch).
    """

    index: np.ndarray
    feats: torch.Tensor
    partner: dict
    coords: tuple  # (points of the items, points of the KNN / random partners), grid_sample coordinates
    knn_index: np.ndarray  # item indices of the KNN partners
    perm: torch.Tensor  # the random pairing: item i is paired with item perm[i] of the batch

    @property
    def partner_index(self) -> dict:
        """Item indices of the KNN and random partners."""
        return {"knn": self.knn_index, "rand": self.index[self.perm.numpy()]}


def sample_pairs(cache, knn: np.ndarray, n_batches: int, batch_size: int, n_samples: int, knn_topk: int,
                 seed: int, salt: int = CALIBRATION_SALT) -> Iterator[PairSample]:
    """``n_batches`` batches of sampled points with their self / KNN / random partners.

    Items, KNN partners (uniform among the ``knn_topk`` nearest), point coordinates and the
    random pairing (a derangement of the batch) are drawn as in training, from a stream of
    their own seeded by (seed, salt), so calibration never consumes training's randomness.
    """
    g = torch.Generator().manual_seed(seed * 1_000_003 + salt)
    topk = min(knn_topk, knn.shape[1])
    batch_size = min(batch_size, cache.n)
    for b in range(n_batches):
        idx = batch_indices(cache.n, batch_size, b, seed + salt)
        rng = np.random.default_rng([seed, salt, b])
        partner = knn[idx, rng.integers(0, topk, size=len(idx))]
        feats, feats_knn = cache.feature_batch(idx), cache.feature_batch(partner)
        c1 = random_coords(len(idx), n_samples, generator=g)
        c2 = random_coords(len(idx), n_samples, generator=g)
        perm = random_derangement(len(idx), generator=g)
        points = sample_points(feats, c1)
        yield PairSample(idx, points, {
            "self": points,
            "knn": sample_points(feats_knn, c2),
            "rand": sample_points(feats[perm], c2),
        }, coords=(c1, c2), knn_index=partner, perm=perm)


def nearest_centroid(points: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """(n, C, h, w) vectors -> (n, h, w) index of the most cosine-similar of (K, C) unit centroids."""
    return torch.einsum("nchw,kc->nkhw", F.normalize(points.float(), dim=1), centroids.to(points.device).float()).argmax(1)


def same_cluster(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(n, h, w) and (n, i, j) cluster ids -> (n, h, w, i, j) bool: are the two points of a pair in one cluster."""
    return a[:, :, :, None, None] == b[:, None, None, :, :]


def _subsample(values: torch.Tensor, limit: int, generator: torch.Generator) -> torch.Tensor:
    if values.numel() <= limit:
        return values
    return values[torch.randperm(values.numel(), generator=generator)[:limit]]


@dataclass
class ShiftCalibration:
    """The chosen shifts and how they were found (written to ``calibration.json``)."""

    b_self: float
    b_knn: float
    b_rand: float
    same_rate: dict  # pi_t: fraction of pairs of each type in one feature cluster
    feature_similarity: dict  # per type: mean and quantiles (5, 25, 50, 75, 95 %) of F
    n_clusters: int
    n_pairs: int  # pairs per type
    pointwise: bool
    method: str = "quantile of F at 1 - same-cluster rate of a k-means partition of the features"
    histogram: dict = field(default_factory=dict)  # per type: (bin edges, counts) of F

    @property
    def shifts(self) -> dict:
        return {"b_self": self.b_self, "b_knn": self.b_knn, "b_rand": self.b_rand}

    def save(self, path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(asdict(self), indent=2))
        return path


def calibrate_shifts(cache, knn: np.ndarray, n_clusters: int, *, pointwise: bool = True, n_samples: int = 11,
                     knn_topk: int = 7, batch_size: int = 16, n_batches: int = 40, seed: int = 0,
                     kmeans_iters: int = 30, centroids: Optional[torch.Tensor] = None,
                     progress: bool = False) -> ShiftCalibration:
    """Choose b_self, b_knn, b_rand from the feature cache and KNN lists alone (see the module docstring).

    ``centroids``: a partition of the features to estimate the same-cluster rates with
    (default: seeded spherical k-means with ``n_clusters`` clusters over every sampled
    point, i.e. over a uniform sample of the cache's feature vectors).
    """
    batches = list(sample_pairs(cache, knn, n_batches, batch_size, n_samples, knn_topk, seed))
    if centroids is None:
        pool = [p for b in batches for p in (b.feats, b.partner["knn"], b.partner["rand"])]
        centroids = spherical_kmeans(lambda: iter(pool), n_clusters, n_iter=kmeans_iters, seed=seed,
                                     progress=progress)
    values = {t: [] for t in PAIR_TYPES}
    same = {t: [] for t in PAIR_TYPES}
    for batch in batches:
        ids = nearest_centroid(batch.feats, centroids)
        for t in PAIR_TYPES:
            other = batch.partner[t]
            values[t].append(feature_correspondence(batch.feats, other, pointwise).reshape(-1))
            same[t].append(same_cluster(ids, nearest_centroid(other, centroids)).reshape(-1))
    g = torch.Generator().manual_seed(seed)
    shifts, rates, stats, hists = {}, {}, {}, {}
    n_pairs = 0
    qs = [0.05, 0.25, 0.5, 0.75, 0.95]
    for t in PAIR_TYPES:
        fd = torch.cat(values[t]).float()
        rate = float(torch.cat(same[t]).float().mean())
        n_pairs = fd.numel()
        sub = _subsample(fd, MAX_QUANTILE_PAIRS, g)
        shifts[t] = float(torch.quantile(sub, 1.0 - rate))  # rate 1: the minimum (attract all); 0: the maximum
        rates[t] = rate
        quantiles = torch.quantile(sub, torch.tensor(qs)).tolist()
        stats[t] = {"mean": float(fd.mean()), **{f"q{round(q * 100):02d}": v for q, v in zip(qs, quantiles)}}
        counts, edges = np.histogram(sub.numpy(), bins=60, range=(-1.0, 1.0))
        hists[t] = {"edges": edges.tolist(), "counts": counts.tolist()}
    return ShiftCalibration(
        b_self=shifts["self"], b_knn=shifts["knn"], b_rand=shifts["rand"], same_rate=rates,
        feature_similarity=stats, n_clusters=n_clusters, n_pairs=n_pairs, pointwise=pointwise, histogram=hists,
    )


def calibrate_for_config(cfg, cache, knn: np.ndarray, n_clusters: int) -> ShiftCalibration:
    """:func:`calibrate_shifts` with a run's settings (points, centring, KNN top-k, seed, k-means)."""
    return calibrate_shifts(
        cache, knn, n_clusters, pointwise=cfg.pointwise, n_samples=cfg.n_samples, knn_topk=cfg.knn_topk,
        batch_size=cfg.batch_size, n_batches=cfg.calibration_batches, seed=cfg.seed,
        kmeans_iters=cfg.kmeans_iters, progress=cfg.progress,
    )
