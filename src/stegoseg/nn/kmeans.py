"""Seeded spherical k-means over streamed batches (the cluster probe's fit and the label-free criteria).

FAISS does the clustering (``faiss.Kmeans(..., spherical=True)``) on a bounded, seeded
sample of the stream; one more streamed pass then assigns every vector, so the result
reflects all the data while memory holds one batch (plus the sample) at a time.
"""
from __future__ import annotations

import math
from typing import Callable, Iterable

import faiss
import numpy as np
import torch
import torch.nn.functional as F
from stegoseg.progress import progress_bar as tqdm

# FAISS subsamples its training set to max_points_per_centroid * k (default 256) anyway:
# the sample drawn from the stream is at most this many vectors per centroid.
POINTS_PER_CENTROID = 256
# FAISS restarts (nredo): the clustering of the sample is run this many times from different
# seeded k-means++ initialisations and the one with the best objective is kept.
RESTARTS = 10

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def _flatten_vectors(batch: torch.Tensor) -> torch.Tensor:
    """(B, D, h, w) or (N, D) -> (N, D) L2-normalised float32."""
    if batch.dim() == 4:
        batch = batch.permute(0, 2, 3, 1).reshape(-1, batch.shape[1])
    return F.normalize(batch.float(), dim=1)


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64 finaliser: a bijection of uint64 that scrambles consecutive inputs."""
    with np.errstate(over="ignore"):
        z = np.asarray(x, dtype=np.uint64) + _GOLDEN
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def _sample_keys(seed: int, start: int, n: int) -> np.ndarray:
    """Random priorities of the stream's vectors ``start .. start + n - 1`` for ``seed``.

    A key depends only on (seed, position in the stream), never on how the stream is cut
    into batches; keys of distinct positions are distinct (SplitMix64 is a bijection)."""
    offset = _splitmix64(np.array([seed & 0xFFFFFFFFFFFFFFFF], dtype=np.uint64))[0]
    with np.errstate(over="ignore"):
        return _splitmix64(np.arange(start, start + n, dtype=np.uint64) + offset)


def _stream_sample(batches: Callable[[], Iterable[torch.Tensor]], size: int, seed: int,
                   progress: bool) -> tuple[torch.Tensor, int]:
    """Uniform sample without replacement of ``size`` unit vectors from the stream, and the
    stream's length. Priority sampling: every vector gets a seeded random key and the
    ``size`` smallest keys are kept, in stream order, so the sample is the same however
    the stream is batched; memory holds the sample and one batch."""
    keys = np.zeros(0, dtype=np.uint64)
    pos = np.zeros(0, dtype=np.int64)
    vecs = None
    total = 0
    for b in tqdm(batches(), desc="k-means: sampling", disable=not progress, leave=False):
        n = b.shape[0] * b.shape[2] * b.shape[3] if b.dim() == 4 else b.shape[0]
        k_b = _sample_keys(seed, total, n)
        cand = np.arange(n)
        if len(keys) >= size:  # only vectors that beat the current size-th key can enter
            cand = np.flatnonzero(k_b < keys.max())
        if len(cand):
            v = _flatten_vectors(b)[torch.from_numpy(cand)].cpu()
            keys = np.concatenate([keys, k_b[cand]])
            pos = np.concatenate([pos, total + cand])
            vecs = v if vecs is None else torch.cat([vecs, v])
            if len(keys) > size:
                keep = np.sort(np.argpartition(keys, size - 1)[:size])
                keys, pos, vecs = keys[keep], pos[keep], vecs[torch.from_numpy(keep)]
        total += n
    if vecs is None:
        return torch.zeros(0, 0), total
    order = torch.from_numpy(np.argsort(pos, kind="stable"))
    return vecs[order], total


def _faiss_kmeans(sample: np.ndarray, k: int, n_iter: int, seed: int, tol: float) -> np.ndarray:
    """FAISS spherical k-means (k-means++ seeding where the installed FAISS has it) on the
    whole sample; (k, D) float32 unit centroids."""
    n, d = sample.shape
    params = dict(niter=int(n_iter), nredo=RESTARTS, spherical=True, seed=int(seed) & 0x7FFFFFFF, verbose=False,
                  max_points_per_centroid=math.ceil(n / k),  # the sample is already bounded: no resampling
                  min_points_per_centroid=1)  # small samples are fine (FAISS would only warn)
    cp = faiss.ClusteringParameters()
    if hasattr(cp, "init_method") and hasattr(faiss, "ClusteringInitMethod_KMEANS_PLUS_PLUS"):
        params["init_method"] = faiss.ClusteringInitMethod_KMEANS_PLUS_PLUS
    if hasattr(cp, "early_stop_threshold"):
        params["early_stop_threshold"] = float(tol)
    km = faiss.Kmeans(d, k, **params)
    km.train(np.ascontiguousarray(sample, dtype=np.float32))
    return np.asarray(km.centroids, dtype=np.float32).reshape(k, d)


def spherical_kmeans(
    batches: Callable[[], Iterable[torch.Tensor]],
    n_clusters: int,
    n_iter: int = 20,
    seed: int = 0,
    device: str | torch.device = "cpu",
    init_sample: int = 100_000,
    tol: float = 1e-5,
    progress: bool = True,
) -> torch.Tensor:
    """Spherical k-means over a stream of feature batches; returns (n_clusters, D) unit centroids.

    ``batches`` is a callable returning a fresh iterable of (B, D, h, w) or (N, D)
    tensors; it is streamed twice and memory holds one batch at a time:

    1. a seeded uniform sample of at most ``min(init_sample, 256 * n_clusters)``
       L2-normalised vectors (priority sampling: the same sample however the stream is
       batched), on which ``faiss.Kmeans(spherical=True)`` runs ``n_iter`` iterations
       (k-means++ seeding where the installed FAISS supports it; ``tol`` is FAISS's
       ``early_stop_threshold``, a relative change of the objective);
    2. every vector is assigned to its nearest FAISS centroid (cosine) and each centroid
       becomes the normalised mean of its members: one Lloyd step on all the data, which
       cannot lower the objective (mean cosine to the assigned centroid). A centroid that
       no vector chose is reseeded with one of the vectors farthest from their centroid
       (the farthest first, one vector per empty cluster).

    Deterministic for a given ``seed`` and stream (FAISS on CPU is seeded).
    """
    k = int(n_clusters)
    device = torch.device(device)
    size = max(k, min(int(init_sample), POINTS_PER_CENTROID * k))
    sample, total = _stream_sample(batches, size, seed, progress)
    if sample.shape[0] < k:
        raise ValueError(f"k-means needs at least {k} feature vectors, got {total}")
    centroids = torch.from_numpy(_faiss_kmeans(sample.numpy(), k, n_iter, seed, tol)).to(device)

    acc = torch.float32 if device.type == "mps" else torch.float64
    sums = torch.zeros(k, centroids.shape[1], dtype=acc, device=device)
    counts = torch.zeros(k, dtype=torch.long, device=device)
    far_sim = torch.zeros(0, device=device)  # the (up to) k lowest best-similarities seen, and their vectors
    far_vec = torch.zeros(0, centroids.shape[1], device=device)
    obj, n = 0.0, 0
    bar = tqdm(batches(), desc="k-means: assigning", disable=not progress, leave=False)
    for b in bar:
        v = _flatten_vectors(b.to(device))
        best, assign = (v @ centroids.T).max(1)
        sums.index_add_(0, assign, v.to(acc))
        counts += torch.bincount(assign, minlength=k)
        obj += float(best.sum())
        n += v.shape[0]
        low = torch.topk(best, min(k, best.numel()), largest=False).indices
        far_sim = torch.cat([far_sim, best[low]])
        far_vec = torch.cat([far_vec, v[low]])
        keep = torch.topk(far_sim, min(k, far_sim.numel()), largest=False).indices
        far_sim, far_vec = far_sim[keep], far_vec[keep]
        bar.set_postfix(mean_cos=f"{obj / max(n, 1):.4f}")
    new = F.normalize(sums, dim=1).float()
    empty = torch.nonzero(counts == 0).flatten()
    if len(empty):
        order = torch.argsort(far_sim)  # farthest first
        for i, c in enumerate(empty.tolist()):
            new[c] = far_vec[order[i % len(order)]]
    return new
