"""Label-free model selection (``--select label-free``).

The question a user without labels cannot answer by evaluation: which of the run's
checkpoints (or which of a few candidate calibrations) gives the best segmentation? The
reference answers it with validation mIoU, i.e. with labels.

The criterion here scores the *final cluster map* against the signal STEGO distils. For
pairs of points drawn as training draws them (within an image, with a nearest neighbour,
with a random image; the selection's own seeded stream, training images only), let
``same`` say whether the two points land in one cluster of a k-means partition of the
code (K = the run's number of clusters), and let ``F - b_t`` be the feature
correspondence against the *reference* shifts of a label-free calibration (the same
for every candidate, so that scores are comparable; the training pipeline uses the
calibration of the uncentred correspondences, the plain cosine similarities, for every
candidate whatever its own centring). Per pair type:

    agreement_t = mean(same * (F - b_t)) / mean(max(F - b_t, 0))

the STEGO objective evaluated on the hard partition, as a fraction of its best possible
value (attract exactly the pairs above the threshold, nothing below). A collapsed code
(few clusters for everything) joins many pairs with F far below b and scores low or
negative; a code that splits what the features join scores low too. The score is the mean
over the three pair types. It needs no labels, only the feature cache, the KNN lists and
the head.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from stegoseg.losses.stego import (
    feature_correspondence,
    sample_points,
    tensor_correlation,
)
from stegoseg.nn.kmeans import spherical_kmeans
from stegoseg.training.calibration import (
    PAIR_TYPES,
    ShiftCalibration,
    nearest_centroid,
    same_cluster,
    sample_pairs,
)

SELECTION_SALT = 9_173


@dataclass
class SelectionScore:
    """The label-free criterion of one candidate and what it is made of."""

    score: float
    agreement: dict  # per pair type
    mean_similarity: dict  # mean code similarity S of KNN and random pairs (A.11 diagnostics)
    clusters_used: int  # clusters holding at least 0.5 % of the sampled points
    similarity_samples: dict = field(default_factory=dict, repr=False)  # S values for histograms

    def row(self) -> dict:
        """The JSON-friendly summary written to ``selection.json``."""
        return {"label_free_score": self.score, "agreement": self.agreement,
                "mean_code_similarity": self.mean_similarity, "clusters_used": self.clusters_used}


def _code(head, feats: torch.Tensor, device) -> torch.Tensor:
    with torch.no_grad():
        return head(feats.to(device).float()).float().cpu() if head is not None else feats.float()


def label_free_score(head, cache, knn: np.ndarray, reference: ShiftCalibration, n_clusters: int, *,
                     n_batches: int = 24, batch_size: int = 16, n_samples: int = 11, knn_topk: int = 7,
                     seed: int = 0, kmeans_iters: int = 30, device="cpu", keep_samples: int = 20_000) -> SelectionScore:
    """The criterion of the module docstring for one head (``None``: the raw features themselves)."""
    pointwise = reference.pointwise
    shifts = {"self": reference.b_self, "knn": reference.b_knn, "rand": reference.b_rand}
    batches = []
    for batch in sample_pairs(cache, knn, n_batches, batch_size, n_samples, knn_topk, seed, salt=SELECTION_SALT):
        c1, c2 = batch.coords
        code = _code(head, cache.feature_batch(batch.index), device)
        points = sample_points(code, c1)
        partner = {
            "self": points,
            "knn": sample_points(_code(head, cache.feature_batch(batch.knn_index), device), c2),
            "rand": sample_points(code[batch.perm], c2),  # random partners are items of the same batch
        }
        batches.append((batch, points, partner))
    # k-means over every sampled code point (items and partners), seeded
    pool = [p for _, points, partner in batches for p in (points, partner["knn"], partner["rand"])]
    centroids = spherical_kmeans(lambda: iter(pool), n_clusters, n_iter=kmeans_iters, seed=seed, device="cpu",
                                 progress=False)
    gains = {t: 0.0 for t in PAIR_TYPES}
    best = {t: 0.0 for t in PAIR_TYPES}
    sims = {"knn": [], "rand": []}
    counts = torch.zeros(n_clusters)
    for batch, points, partner in batches:
        ids = nearest_centroid(points, centroids)
        counts += torch.bincount(ids.reshape(-1), minlength=n_clusters).float()
        for t in PAIR_TYPES:
            fd = feature_correspondence(batch.feats, batch.partner[t], pointwise) - shifts[t]
            same = same_cluster(ids, nearest_centroid(partner[t], centroids))
            gains[t] += float((same * fd).sum())
            best[t] += float(fd.clamp_min(0).sum())
            if t in sims:
                s = tensor_correlation(F.normalize(points, dim=1), F.normalize(partner[t], dim=1))
                sims[t].append(s.reshape(-1))
    agreement = {t: gains[t] / best[t] if best[t] > 0 else 0.0 for t in PAIR_TYPES}
    g = torch.Generator().manual_seed(seed)
    samples = {}
    for t in sims:
        v = torch.cat(sims[t])
        samples[t] = v[torch.randperm(v.numel(), generator=g)[:keep_samples]].numpy()
    return SelectionScore(
        score=float(np.mean([agreement[t] for t in PAIR_TYPES])),
        agreement=agreement,
        mean_similarity={t: float(torch.cat(sims[t]).mean()) for t in sims},
        clusters_used=int((counts / counts.sum() >= 0.005).sum()),
        similarity_samples=samples,
    )


def score_for_config(cfg, head, cache, knn: np.ndarray, reference: ShiftCalibration, n_clusters: int,
                     device="cpu") -> SelectionScore:
    """:func:`label_free_score` with a run's settings."""
    return label_free_score(head, cache, knn, reference, n_clusters, n_batches=cfg.selection_batches,
                            batch_size=cfg.batch_size, n_samples=cfg.n_samples, knn_topk=cfg.knn_topk, seed=cfg.seed,
                            kmeans_iters=cfg.kmeans_iters, device=device)
