"""Seeded spherical k-means over streamed batches (the cluster probe's fit and the label-free criteria).
"""
from __future__ import annotations

from typing import Callable, Iterable

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm


def _flatten_vectors(batch: torch.Tensor) -> torch.Tensor:
    """(B, D, h, w) or (N, D) -> (N, D) L2-normalised float32."""
    if batch.dim() == 4:
        batch = batch.permute(0, 2, 3, 1).reshape(-1, batch.shape[1])
    return F.normalize(batch.float(), dim=1)


def _kmeans_pp_init(sample: torch.Tensor, k: int, generator: torch.Generator) -> torch.Tensor:
    """k-means++ seeding on unit vectors with cosine distance (1 - cos)."""
    n = sample.shape[0]
    first = torch.randint(n, (1,), generator=generator, device="cpu").item()
    centroids = [sample[first]]
    dist = (1 - sample @ sample[first]).clamp_min(0)
    for _ in range(1, k):
        if float(dist.sum()) <= 0:
            idx = torch.randint(n, (1,), generator=generator, device="cpu").item()
        else:
            idx = torch.multinomial(dist.cpu(), 1, generator=generator).item()
        centroids.append(sample[idx])
        dist = torch.minimum(dist, (1 - sample @ sample[idx]).clamp_min(0))
    return torch.stack(centroids)


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
    tensors; each Lloyd iteration streams over it once, accumulating per-cluster sums,
    so memory holds one batch at a time. Initialisation is k-means++ on a random
    subsample of at most ``init_sample`` vectors. Empty clusters are re-seeded with the
    vectors farthest from their centroid in the last pass.
    """
    g = torch.Generator().manual_seed(seed)
    # Uniform subsample for the initialisation: count the vectors, then keep each batch's
    # share (one extra pass over the stream; Lloyd iterations make many more).
    total = sum(b.shape[0] * b.shape[2] * b.shape[3] if b.dim() == 4 else b.shape[0] for b in batches())
    fraction = min(1.0, init_sample / max(total, 1))
    pool = []
    for b in batches():
        v = _flatten_vectors(b)
        take = min(v.shape[0], max(1, int(round(v.shape[0] * fraction))))
        pool.append(v[torch.randperm(v.shape[0], generator=g)[:take]])
    sample = torch.cat(pool)
    sample = sample[torch.randperm(sample.shape[0], generator=g)[:init_sample]].to(device)
    if sample.shape[0] < n_clusters:
        raise ValueError(f"k-means needs at least {n_clusters} feature vectors, got {sample.shape[0]}")
    centroids = _kmeans_pp_init(sample, n_clusters, g).to(device)
    prev_obj = None
    it = tqdm(range(n_iter), desc="k-means", disable=not progress, leave=False)
    for _ in it:
        sums = torch.zeros_like(centroids)
        counts = torch.zeros(n_clusters, device=device)
        obj, n = 0.0, 0
        worst_sim, worst_vec = None, None
        for b in batches():
            v = _flatten_vectors(b.to(device))
            sim = v @ centroids.T
            best, assign = sim.max(1)
            sums.index_add_(0, assign, v)
            counts += torch.bincount(assign, minlength=n_clusters).float()
            obj += float(best.sum())
            n += v.shape[0]
            j = int(best.argmin())
            if worst_sim is None or best[j] < worst_sim:
                worst_sim, worst_vec = best[j], v[j]
        empty = counts == 0
        new = F.normalize(sums, dim=1)
        if empty.any():
            new[empty] = worst_vec
        centroids = new
        obj /= max(n, 1)
        it.set_postfix(mean_cos=f"{obj:.4f}")
        if prev_obj is not None and abs(obj - prev_obj) < tol:
            break
        prev_obj = obj
    return centroids
