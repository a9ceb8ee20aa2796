"""PriMaPs (Hahn et al., "Boosting Unsupervised Semantic Segmentation with Principal Mask
Proposals", TMLR 2024): class-agnostic mask proposals of one image from its dense features,
and the prototype head that PriMaPs-EM fits to them.

Mask proposals of an image with features f (C, h, w), unit vectors f̂_i, all positions free:

    repeat while fewer than ``coverage`` (95%) of the positions are taken:
        u    = first principal direction of the free features (``torch.pca_lowrank``, q 3, 100 iterations)
        s_i  = <u, f̂_i> on free positions, 0 on taken ones
        u    = f̂_j, j = the first position (row-major) with the largest s   (nearest-feature refinement)
        s_i  = <u, f̂_i> on free positions, 0 on taken ones
        s_i  = 0 where s_i < threshold * max s   (threshold 0.4), then s = s / max s
        mask = s; the positions with s > 0 are taken
        stop early when the taken set has not changed for the last three masks

The soft masks are median filtered (3 x 3, reflect padding), multiplied by 10 and clipped to
[0, 1]; a background map max(0, mean of their non-zero values - their sum) goes first; the
log-softmax over the k + 1 maps is refined by the dense CRF (at image size) and its arg-max
gives mask ids 0 (background, later "ignore") .. k. :func:`mask_pseudo_label` gives each mask
one class: the most frequent class of a class map (the EM teacher's prediction) inside it.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from stegoseg.data.base import IGNORE_INDEX


def median_filter3x3(maps: torch.Tensor) -> torch.Tensor:
    """3 x 3 median of every (h, w) map of a (k, h, w) stack, reflect padding (the lower
    median of the nine values, as ``torch.median``)."""
    padded = F.pad(maps.unsqueeze(0), (1, 1, 1, 1), mode="reflect")[0]
    windows = padded.unfold(1, 3, 1).unfold(2, 3, 1)
    return windows.reshape(*maps.shape, 9).median(dim=-1).values


def principal_masks(features: torch.Tensor, threshold: float = 0.4, coverage: float = 0.95,
                    pca_iters: int = 100, generator_seed: Optional[int] = None,
                    stats: Optional[dict] = None) -> torch.Tensor:
    """Soft mask proposals (k, h, w), values in [0, 1], of one image's features (C, h, w).

    ``generator_seed``: seed torch's global generator (inside a forked RNG state, restored
    after) before the first ``pca_lowrank``, which draws its random projection from it; None
    uses the generator as it is (the reference's behaviour). Inputs the reference does not
    handle: when no free feature has s > 0, the direction's sign is flipped (the reference
    divides by a zero maximum and makes NaN masks); the loop stops when fewer than 3
    positions are free (the rank of the randomised PCA; the reference fails there).
    ``stats``: a dict whose ``"sign_flips"`` count is increased by the flips made here.
    """
    if features.dim() != 3:
        raise ValueError(f"expected features of shape (C, h, w), got {tuple(features.shape)}")
    with torch.random.fork_rng(devices=[], enabled=generator_seed is not None):
        if generator_seed is not None:
            torch.manual_seed(int(generator_seed))
        return _principal_masks(features.float(), threshold, coverage, pca_iters, stats)


def _principal_masks(features: torch.Tensor, threshold: float, coverage: float, pca_iters: int,
                     stats: Optional[dict]) -> torch.Tensor:
    unit = F.normalize(features, dim=0)
    free = torch.ones(features.shape[-2:], dtype=torch.bool, device=features.device)
    masks, history = [], []
    while (~free).sum() / free.numel() < coverage:
        if int(free.sum()) < 3:
            break
        _, _, directions = torch.pca_lowrank(features[:, free].T, q=3, niter=pca_iters)
        sim = torch.einsum("c,chw->hw", directions[:, 0], unit)
        sim[~free] = 0
        if not sim.max() > 0:
            # Every free feature points away from the direction (its sign is arbitrary): the
            # reference goes on with max 0 and makes NaN masks; the opposite sign is the same axis.
            sim = torch.einsum("c,chw->hw", -directions[:, 0], unit)
            sim[~free] = 0
            if stats is not None:
                stats["sign_flips"] = stats.get("sign_flips", 0) + 1
            if not sim.max() > 0:
                break
        nearest = unit[:, sim == sim.max()][:, 0]
        sim = torch.einsum("c,chw->hw", nearest, unit)
        sim[~free] = 0
        sim[sim < threshold * sim.max()] = 0
        sim = sim / sim.max()
        masks.append(sim.clone())
        free[sim > 0] = False
        history.insert(0, free.clone())
        if len(history) > 3:
            history.pop()
            if all(torch.equal(history[0], h) for h in history):
                break
    if not masks:
        return features.new_zeros((0, *features.shape[-2:]))
    return torch.stack(masks)


def mask_unaries(masks: torch.Tensor, gain: float = 10.0) -> torch.Tensor:
    """CRF input (k + 1, h, w) of soft masks (k, h, w): log-softmax over [background, masks]
    after the 3 x 3 median filter, ``* gain`` and clipping to [0, 1] (see the module doc)."""
    if masks.shape[0] == 0:
        return torch.zeros((1, *masks.shape[-2:]), dtype=masks.dtype, device=masks.device)
    filtered = (median_filter3x3(masks) * gain).clamp(0, 1)
    nonzero = filtered[filtered != 0]
    level = nonzero.mean() if nonzero.numel() else filtered.new_zeros(())
    background = (level - filtered.sum(dim=0)).clamp(0, 1)
    return F.log_softmax(torch.cat([background[None], filtered]), dim=0)


def mask_pseudo_label(mask_ids: torch.Tensor, class_map: Optional[torch.Tensor] = None,
                      ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Pseudo label (..., H, W) long from mask ids (..., H, W) (0 or ``ignore_index``: no mask).

    Without ``class_map``: the mask ids themselves (class-agnostic), background -> ignore.
    With it: every pixel of a mask takes the most frequent class of ``class_map`` (same
    shape, values in [0, n)) inside that mask, ties to the smallest class (``torch.mode``'s
    choice); background stays ``ignore_index``.
    """
    ids = mask_ids.long()
    background = (ids == 0) | (ids == ignore_index)
    if class_map is None:
        return torch.where(background, torch.full_like(ids, ignore_index), ids)
    if class_map.shape != ids.shape:
        raise ValueError(f"class map {tuple(class_map.shape)} and mask ids {tuple(ids.shape)} differ in shape")
    classes = class_map.long()
    n_classes = int(classes.max()) + 1 if classes.numel() else 1
    flat_ids = torch.where(background, torch.zeros_like(ids), ids).flatten(-2)
    n_masks = int(flat_ids.max()) + 1 if flat_ids.numel() else 1
    lead = flat_ids.shape[:-1]
    flat_ids = flat_ids.reshape(-1, flat_ids.shape[-1])
    flat_classes = classes.flatten(-2).reshape(-1, flat_ids.shape[-1])
    rows = torch.arange(flat_ids.shape[0], device=ids.device)[:, None]
    key = (rows * n_masks + flat_ids) * n_classes + flat_classes
    counts = torch.bincount(key.flatten(), minlength=flat_ids.shape[0] * n_masks * n_classes)
    winner = counts.reshape(flat_ids.shape[0], n_masks, n_classes).argmax(-1)  # first max: smallest class
    label = winner.gather(1, flat_ids)
    label = label.reshape(*lead, -1).reshape(ids.shape)
    return torch.where(background, torch.full_like(label, ignore_index), label)


class PrototypeHead(nn.Module):
    """PriMaPs-EM's class prototypes: a bias-free 1 x 1 map with weight normalisation,
    logits_k = g_k <v_k / |v_k|, x> of a (B, C, h, w) map (the reference's weight-normed
    ``Conv2d``: direction ``v`` (K, C) and gain ``g`` (K,), both trained)."""

    def __init__(self, dim: int, n_classes: int):
        super().__init__()
        self.dim, self.n_classes = dim, n_classes
        self.direction = nn.Parameter(torch.randn(n_classes, dim))
        self.gain = nn.Parameter(torch.ones(n_classes))

    def weight(self) -> torch.Tensor:
        """The effective (K, C) weight g v / |v|."""
        return self.gain[:, None] * self.direction / self.direction.norm(dim=1, keepdim=True)

    def reset(self, directions: torch.Tensor) -> None:
        """Start from given (K, C) directions with unit gains."""
        with torch.no_grad():
            self.direction.copy_(directions.to(self.direction))
            self.gain.fill_(1.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.einsum("bchw,kc->bkhw", x, self.weight().to(x.dtype))
