"""The CRF kernel as a Potts loss term (STEGO A.9).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from stegoseg.evaluation.crf import CRFParams
from stegoseg.losses.stego import random_coords, sample_points, tensor_correlation


def coords_to_pixels(coords: torch.Tensor, size: int) -> torch.Tensor:
    """grid_sample coordinates in [-1, 1] (align_corners=True) -> pixel positions in [0, size - 1]."""
    return (coords + 1) / 2 * (size - 1)


def potts_kernel(pos1, col1, pos2, col2, params: CRFParams = CRFParams()) -> torch.Tensor:
    """Normalised CRF kernel (n, h, w, i, j) between point sets.

    ``pos*``: (n, h, w, 2) pixel positions; ``col*``: (n, 3, h, w) colours in 0..255.
    """
    d_pos = ((pos1[:, :, :, None, None, :] - pos2[:, None, None, :, :, :]) ** 2).sum(-1)
    c1 = col1.permute(0, 2, 3, 1)
    c2 = col2.permute(0, 2, 3, 1)
    d_col = ((c1[:, :, :, None, None, :] - c2[:, None, None, :, :, :]) ** 2).sum(-1)
    bilateral = torch.exp(-d_pos / (2 * params.bi_xy_std**2) - d_col / (2 * params.bi_rgb_std**2))
    gaussian = torch.exp(-d_pos / (2 * params.pos_xy_std**2))
    return (params.bi_w * bilateral + params.pos_w * gaussian) / (params.bi_w + params.pos_w)


def potts_loss(code1, code2, kernel, shift: float, zero_clamp: bool = True) -> torch.Tensor:
    """Per-pair loss -clamp(S) * (k - shift) for sampled codes (n, K, h, w) and kernel (n, h, w, i, j)."""
    s = tensor_correlation(F.normalize(code1, dim=1, eps=1e-10), F.normalize(code2, dim=1, eps=1e-10))
    if zero_clamp:
        s = s.clamp(min=0)
    return -s * (kernel - shift)


def potts_term(code: torch.Tensor, images255: torch.Tensor, shift: float, n_samples: int = 11,
               params: CRFParams = CRFParams(), image_size: Optional[int] = None,
               generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Scalar Potts loss of a batch: codes (n, K, h, w) and images (n, 3, H, W) in 0..255,
    at ``n_samples`` x ``n_samples`` random points per image (positions measured in pixels of
    an ``image_size`` square, default the images' own size)."""
    n = code.shape[0]
    coords = random_coords(n, n_samples, generator=generator).to(code.device)
    size = image_size or images255.shape[-1]
    pos = coords_to_pixels(coords, size)
    col = sample_points(images255.float(), coords)
    k = potts_kernel(pos, col, pos, col, params)
    s = sample_points(code, coords)
    return potts_loss(s, s, k, shift).mean()
