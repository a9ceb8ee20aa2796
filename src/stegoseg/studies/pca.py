"""PCA of cached backbone features (streamed) and fixed random projections, for the
dimensionality-reduction study (:mod:`stegoseg.studies.dimred`)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import numpy as np
import torch

from stegoseg.errors import StegosegError
from stegoseg.nn.heads import ProjectionHead


@dataclass
class PCAResult:
    """Principal components of a set of feature vectors (rows of ``components``, by decreasing variance)."""

    mean: torch.Tensor  # (C,)
    components: torch.Tensor  # (C, C), row i = i-th principal direction
    explained_variance: torch.Tensor  # (C,), decreasing
    n_samples: int

    @property
    def explained_variance_ratio(self) -> torch.Tensor:
        total = self.explained_variance.sum()
        return self.explained_variance / total if total > 0 else torch.zeros_like(self.explained_variance)

    @property
    def cumulative_ratio(self) -> torch.Tensor:
        """Cumulative explained variance: entry i is the share kept by the first i + 1 components."""
        return torch.cumsum(self.explained_variance_ratio, 0)

    def head(self, dim: int) -> ProjectionHead:
        if not 1 <= dim <= self.components.shape[0]:
            raise StegosegError(f"PCA to {dim} components: choose 1..{self.components.shape[0]}")
        return ProjectionHead.from_matrix(self.components[:dim].float(), self.mean.float())


def _vectors(batch: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w) or (N, C) -> (N, C)."""
    if batch.dim() == 4:
        return batch.permute(0, 2, 3, 1).reshape(-1, batch.shape[1])
    return batch


def streamed_pca(batches: Iterable[torch.Tensor], device="cpu") -> PCAResult:
    """Exact PCA of all feature vectors of a stream of (B, C, h, w) or (N, C) batches.

    One pass accumulates the sum and the C x C scatter matrix in float64 (memory does not
    grow with the data), then the covariance is diagonalised. Same components and
    explained-variance ratios as a full (non-incremental) PCA, up to sign.
    """
    total = scatter = None
    n = 0
    for b in batches:
        v = _vectors(b).to(device=device, dtype=torch.float64)
        if total is None:
            total = torch.zeros(v.shape[1], dtype=torch.float64, device=device)
            scatter = torch.zeros(v.shape[1], v.shape[1], dtype=torch.float64, device=device)
        total += v.sum(0)
        scatter += v.T @ v
        n += v.shape[0]
    if n < 2:
        raise StegosegError("PCA needs at least two feature vectors")
    mean = total / n
    cov = (scatter - n * torch.outer(mean, mean)) / (n - 1)
    cov = (cov + cov.T) / 2
    values, vectors = torch.linalg.eigh(cov)  # ascending
    order = torch.argsort(values, descending=True)
    values = values[order].clamp_min(0)
    components = vectors[:, order].T.contiguous()
    return PCAResult(mean=mean.cpu(), components=components.cpu(), explained_variance=values.cpu(), n_samples=n)


def fit_pca(cache, batch_size: int = 64, device="cpu") -> PCAResult:
    """PCA of every patch feature vector in a :class:`~stegoseg.features.cache.FeatureCache`."""
    return streamed_pca(cache.iter_batches(batch_size), device=device)


def random_projection_head(in_dim: int, dim: int, seed: int = 0) -> ProjectionHead:
    """Gaussian random projection to ``dim`` dims: entries N(0, 1/dim), seeded by (seed, dim)."""
    rng = np.random.default_rng([int(seed), int(dim)])
    weight = rng.normal(0.0, 1.0 / np.sqrt(dim), size=(dim, in_dim)).astype(np.float32)
    return ProjectionHead.from_matrix(torch.from_numpy(weight))


# --------------------------------------------------------------------------- shared evaluation
