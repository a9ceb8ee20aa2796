"""STEGO's feature-correspondence distillation loss (paper Eq. 1-5, reference behaviour).

For two images x, y with sampled backbone features f, g and codes s, t (n, c, h, w):

    F[n,h,w,i,j] = <f[n,:,h,w] / |f|, g[n,:,i,j] / |g|>          (no gradient)
    pointwise:  F <- F - mean_{i,j} F + mean(F_original)         (spatial centering,
                                                                  global mean added back)
    S[n,h,w,i,j] = <s / |s|, t / |t|>
    zero clamp: S <- max(S, 0)     (stabilise: also min(S, 0.8))
    L = -S * (F - b)                                             per pair; the term is its mean

The full loss is w_self L(x, x, b_self) + w_knn L(x, x_knn, b_knn) + w_rand L(x, x_rand,
b_rand), the random term averaged over ``n_random`` derangements of the batch. Points
are 11 x 11 random coordinates in [-1, 1]^2 per image, bilinearly sampled with
``align_corners=True`` and border padding; the self term uses the same points on both
sides, the KNN and random terms a second, independent set for the partner.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F


def random_coords(n: int, samples: int, device=None, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """(n, samples, samples, 2) coordinates uniform in [-1, 1] (grid_sample's x, y order)."""
    return torch.rand((n, samples, samples, 2), generator=generator, device=device) * 2 - 1


def sample_points(t: torch.Tensor, coords: torch.Tensor) -> torch.Tensor:
    """Bilinearly sample (n, c, H, W) at (n, h, w, 2) coords -> (n, c, h, w); align_corners, border padding."""
    return F.grid_sample(t, coords.to(t.dtype), mode="bilinear", padding_mode="border", align_corners=True)


def random_derangement(n: int, device=None, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """A uniformly random permutation of range(n) with no fixed point (no image paired with itself).

    Rejection sampling of uniform permutations (expected ~e tries). The reference's
    shortcut (add 1 to fixed points, modulo n) can pair two images with the same partner;
    this is always a permutation. Needs n >= 2.
    """
    if n < 2:
        raise ValueError("a derangement needs at least 2 items (batch size >= 2)")
    ar = torch.arange(n)
    while True:
        perm = torch.randperm(n, generator=generator)
        if not bool((perm == ar).any()):
            return perm.to(device)


def tensor_correlation(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(n, c, h, w) x (n, c, i, j) -> (n, h, w, i, j) inner products."""
    return torch.einsum("nchw,ncij->nhwij", a, b)


def _norm(t: torch.Tensor) -> torch.Tensor:
    return F.normalize(t, dim=1, eps=1e-10)


def feature_correspondence(feats1: torch.Tensor, feats2: torch.Tensor, pointwise: bool = True) -> torch.Tensor:
    """The (optionally spatially centred) cosine-similarity tensor F, without gradient."""
    with torch.no_grad():
        fd = tensor_correlation(_norm(feats1.float()), _norm(feats2.float()))
        if pointwise:
            old_mean = fd.mean()
            fd = fd - fd.mean(dim=(3, 4), keepdim=True)
            fd = fd - fd.mean() + old_mean
    return fd


def correspondence_terms(
    feats1: torch.Tensor,
    feats2: torch.Tensor,
    code1: torch.Tensor,
    code2: torch.Tensor,
    shift: float,
    pointwise: bool = True,
    zero_clamp: bool = True,
    stabilize: bool = False,
) -> tuple:
    """(per-pair loss (n, h, w, i, j), code similarity S before clamping) for sampled tensors."""
    fd = feature_correspondence(feats1, feats2, pointwise)
    cd = tensor_correlation(_norm(code1.float()), _norm(code2.float()))
    min_val = 0.0 if zero_clamp else None
    max_val = 0.8 if stabilize else None
    clamped = cd.clamp(min=min_val, max=max_val) if (min_val is not None or max_val is not None) else cd
    return -clamped * (fd - shift), cd


def correspondence_loss(
    feats1: torch.Tensor,
    feats2: torch.Tensor,
    code1: torch.Tensor,
    code2: torch.Tensor,
    shift: float,
    pointwise: bool = True,
    zero_clamp: bool = True,
    stabilize: bool = False,
) -> torch.Tensor:
    """Per-pair correspondence loss (n, h, w, i, j) on already-sampled (n, c, h, w) tensors.

    ``.mean()`` of it is the scalar term of the reference.
    """
    return correspondence_terms(feats1, feats2, code1, code2, shift, pointwise, zero_clamp, stabilize)[0]


@dataclass
class LossWeights:
    w_self: float = 0.10
    w_knn: float = 1.00
    w_rand: float = 0.15
    b_self: float = 0.12
    b_knn: float = 0.20
    b_rand: float = 1.00
    n_random: int = 5
    n_samples: int = 11
    pointwise: bool = True
    zero_clamp: bool = True
    stabilize: bool = False


def stego_loss(
    feats: torch.Tensor,
    feats_knn: torch.Tensor,
    code: torch.Tensor,
    code_knn: torch.Tensor,
    w: LossWeights,
    generator: Optional[torch.Generator] = None,
    coords: Optional[tuple] = None,
    perms: Optional[list] = None,
) -> dict:
    """The full STEGO loss for a batch of feature maps and codes and their KNN partners.

    Returns {"loss", "self", "knn", "rand" (scalars), "sim_knn", "sim_rand" (mean code
    similarity S of KNN and random pairs, detached), "cd_knn", "cd_rand" (detached S
    tensors, for histograms)}. ``coords`` (two coordinate tensors) and ``perms``
    (derangements) may be passed for reproducibility; otherwise drawn from ``generator``
    (CPU) with the batch's device.
    """
    n = feats.shape[0]
    if coords is None:
        c1 = random_coords(n, w.n_samples, generator=generator).to(feats.device)
        c2 = random_coords(n, w.n_samples, generator=generator).to(feats.device)
    else:
        c1, c2 = coords
    if perms is None:
        perms = [random_derangement(n, generator=generator).to(feats.device) for _ in range(w.n_random)]
    f1, s1 = sample_points(feats, c1), sample_points(code, c1)
    opts = dict(pointwise=w.pointwise, zero_clamp=w.zero_clamp, stabilize=w.stabilize)
    self_loss, _ = correspondence_terms(f1, f1, s1, s1, w.b_self, **opts)
    knn_loss, cd_knn = correspondence_terms(f1, sample_points(feats_knn, c2), s1, sample_points(code_knn, c2), w.b_knn, **opts)
    rand_losses, rand_cds = [], []
    for perm in perms:
        l, cd = correspondence_terms(f1, sample_points(feats[perm], c2), s1, sample_points(code[perm], c2), w.b_rand, **opts)
        rand_losses.append(l)
        rand_cds.append(cd)
    rand_loss = torch.cat(rand_losses).mean() if rand_losses else feats.new_zeros(())
    cd_rand = torch.cat(rand_cds) if rand_cds else cd_knn.new_zeros(0)
    total = w.w_self * self_loss.mean() + w.w_knn * knn_loss.mean() + w.w_rand * rand_loss
    return {
        "loss": total,
        "self": self_loss.mean().detach(),
        "knn": knn_loss.mean().detach(),
        "rand": rand_loss.detach(),
        "sim_knn": cd_knn.mean().detach(),
        "sim_rand": cd_rand.mean().detach() if cd_rand.numel() else cd_knn.new_zeros(()),
        "cd_knn": cd_knn.detach(),
        "cd_rand": cd_rand.detach(),
    }
