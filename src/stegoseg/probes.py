"""Cluster probe and linear probe: the two readouts of a code (or raw feature) map.

* :class:`ClusterProbe` holds ``n_clusters`` centroids. Its loss is the reference's
  minibatch spherical k-means objective, ``-mean(sum(onehot(argmax) * cos))``, so it can
  be trained alongside the head with its own optimiser; :func:`spherical_kmeans` fits
  the same centroids with Lloyd iterations over a stream of feature batches (used by the
  raw-feature baseline and to initialise).
* :class:`LinearProbe` is a 1x1 convolution trained with cross-entropy on logits
  bilinearly upsampled to label size, ignoring unlabelled pixels.

Both read *detached* inputs: probes never change what they probe.
"""
from __future__ import annotations

from typing import Callable, Iterable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from .data.base import IGNORE_INDEX


class ClusterProbe(nn.Module):
    """Cosine-similarity clustering of a (B, D, h, w) map into ``n_clusters`` clusters."""

    def __init__(self, dim: int, n_clusters: int):
        super().__init__()
        self.dim, self.n_clusters = dim, n_clusters
        self.centroids = nn.Parameter(torch.randn(n_clusters, dim))

    def similarity(self, code: torch.Tensor) -> torch.Tensor:
        """Cosine similarity (B, n_clusters, h, w) between every code vector and every centroid."""
        c = F.normalize(self.centroids, dim=1)
        x = F.normalize(code, dim=1)
        return torch.einsum("bdhw,kd->bkhw", x, c.to(x.dtype))

    def loss(self, code: torch.Tensor) -> torch.Tensor:
        """Minibatch spherical k-means loss: minus the mean similarity to the nearest centroid."""
        sim = self.similarity(code.detach())
        hard = F.one_hot(sim.argmax(1), self.n_clusters).permute(0, 3, 1, 2).to(sim.dtype)
        return -(hard * sim).sum(1).mean()

    def log_probs(self, code: torch.Tensor, alpha: float = 2.0) -> torch.Tensor:
        """Soft assignment log_softmax(alpha * cos) used as CRF unary (reference: alpha = 2)."""
        return F.log_softmax(self.similarity(code) * alpha, dim=1)

    def forward(self, code: torch.Tensor) -> torch.Tensor:
        """Hard cluster ids (B, h, w)."""
        return self.similarity(code).argmax(1)


class LinearProbe(nn.Module):
    """A 1x1 convolution from the code to class logits."""

    def __init__(self, dim: int, n_classes: int):
        super().__init__()
        self.dim, self.n_classes = dim, n_classes
        self.conv = nn.Conv2d(dim, n_classes, 1)

    def forward(self, code: torch.Tensor) -> torch.Tensor:
        return self.conv(code)

    def loss(self, code: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Cross-entropy of logits upsampled to the labels' size; unlabelled pixels ignored."""
        logits = self(code.detach())
        logits = F.interpolate(logits, size=labels.shape[-2:], mode="bilinear", align_corners=False)
        if not (labels != IGNORE_INDEX).any():
            return logits.sum() * 0.0
        return F.cross_entropy(logits, labels.long(), ignore_index=IGNORE_INDEX)


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


def train_linear_probe(
    probe: LinearProbe,
    batches: Callable[[], Iterable[tuple]],
    epochs: int = 10,
    lr: float = 5e-3,
    device: str | torch.device = "cpu",
    progress: bool = True,
    seed: int = 0,
) -> list:
    """Train ``probe`` with Adam on (features (B, D, h, w), labels (B, H, W)) batches; returns losses."""
    probe.to(device).train()
    opt = torch.optim.Adam(probe.parameters(), lr=lr)
    losses = []
    with torch.random.fork_rng(devices=[]):  # seeded here; the caller's RNG state is left as it was
        torch.manual_seed(seed)
        for _ in tqdm(range(epochs), desc="linear probe", disable=not progress, leave=False):
            for feats, labels in batches():
                loss = probe.loss(feats.to(device).float(), labels.to(device))
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                losses.append(float(loss.detach()))
    probe.eval()
    return losses


def set_centroids(probe: ClusterProbe, centroids: torch.Tensor, dtype: Optional[torch.dtype] = None) -> None:
    """Copy fitted centroids into a probe."""
    with torch.no_grad():
        probe.centroids.copy_(centroids.to(probe.centroids.device, dtype or probe.centroids.dtype))
