"""The cluster and linear probes.
"""
from __future__ import annotations

from typing import Callable, Iterable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from stegoseg.progress import progress_bar as tqdm

from stegoseg.data.base import IGNORE_INDEX


#: The sharpness of the cluster probe's soft assignment log_softmax(alpha * cos) that the dense
#: CRF receives, per method (the reference implementations' values; STEGO's for the others).
CRF_ALPHA = {"stego": 2.0, "cause-mlp": 3.0, "cause-tr": 3.0}


def probe_kind(method: str) -> tuple:
    """(alpha, metric) of a method's cluster probe: PriMaPs-EM's prototypes (``primaps`` and
    ``METHOD+primaps``) give plain logits (alpha 1, inner product), the others alpha * cosine."""
    if method == "primaps" or method.endswith("+primaps"):
        return 1.0, "dot"
    return CRF_ALPHA.get(method, 2.0), "cosine"


class ClusterProbe(nn.Module):
    """Clustering of a (B, D, h, w) map into ``n_clusters`` clusters by the similarity of every
    code vector to every centroid: ``metric="cosine"`` (STEGO, CAUSE, k-means) or ``"dot"``
    (PriMaPs-EM's prototypes: the plain inner product with centroids that carry their gain, so
    that the CRF sees the reference's logits)."""

    def __init__(self, dim: int, n_clusters: int, alpha: float = 2.0, metric: str = "cosine"):
        super().__init__()
        if metric not in ("cosine", "dot"):
            raise ValueError(f"unknown cluster-probe metric {metric!r}")
        self.dim, self.n_clusters, self.alpha, self.metric = dim, n_clusters, alpha, metric
        self.centroids = nn.Parameter(torch.randn(n_clusters, dim))

    def similarity(self, code: torch.Tensor) -> torch.Tensor:
        """Similarity (B, n_clusters, h, w) between every code vector and every centroid."""
        if self.metric == "dot":
            return torch.einsum("bdhw,kd->bkhw", code, self.centroids.to(code.dtype))
        c = F.normalize(self.centroids, dim=1)
        x = F.normalize(code, dim=1)
        return torch.einsum("bdhw,kd->bkhw", x, c.to(x.dtype))

    def loss(self, code: torch.Tensor) -> torch.Tensor:
        """Minibatch spherical k-means loss: minus the mean similarity to the nearest centroid."""
        sim = self.similarity(code.detach())
        hard = F.one_hot(sim.argmax(1), self.n_clusters).permute(0, 3, 1, 2).to(sim.dtype)
        return -(hard * sim).sum(1).mean()

    def log_probs(self, code: torch.Tensor, alpha: Optional[float] = None) -> torch.Tensor:
        """Soft assignment log_softmax(alpha * cos) used as CRF unary (default: the probe's
        ``alpha``; STEGO's reference uses 2, CAUSE's 3)."""
        return F.log_softmax(self.similarity(code) * (self.alpha if alpha is None else alpha), dim=1)

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
