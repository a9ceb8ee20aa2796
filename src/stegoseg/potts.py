"""The dense CRF's kernel as an unsupervised Potts-model loss (STEGO appendix A.9).

The CRF's pairwise kernel between pixels i and j (positions p, colours I, 0..255):

    k(i, j) = w_bi  exp(-|p_i - p_j|^2 / (2 sxy_bi^2) - |I_i - I_j|^2 / (2 srgb^2))
            + w_pos exp(-|p_i - p_j|^2 / (2 sxy_pos^2))

normalised here by (w_bi + w_pos) to lie in [0, 1]. Shifted by a constant b, it takes
the place of the feature correspondence F in STEGO's loss:

    L = mean( -max(S_ij, 0) * (k(i, j) - b) ),   S = cosine similarity of the codes,

so pixels the CRF would smooth together are pulled to similar codes and the rest pushed
apart. :func:`potts_term` is the optional extra training term (``--w-potts``,
``--b-potts``); :func:`optimise_potts` minimises it alone over free per-pixel label
distributions of one image (Fig. 13), giving a continuous solution (the distributions)
and a discrete one (their argmax).
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F

from .crf import CRFParams
from .loss import random_coords, sample_points, tensor_correlation


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


def optimise_potts(image: np.ndarray, n_codes: int = 8, size: int = 48, steps: int = 300, lr: float = 0.1,
                   shift: float = 0.3, params: CRFParams = CRFParams(), seed: int = 0) -> dict:
    """Minimise the Potts loss alone over a free label distribution of one image.

    The code of each pixel is a distribution over K labels, q = softmax(logits), as in the
    CRF's mean-field relaxation: codes are non-negative, so pushing two pixels' codes to
    zero similarity means giving them disjoint labels. ``image`` (H, W, 3) uint8 is
    resized to ``size`` x ``size`` (positions in its pixels, so set ``params`` sxy
    accordingly). Returns {"code": (K, size, size) continuous solution q, "labels":
    (size, size) its argmax (the discrete solution), "losses": list}.
    """
    from PIL import Image

    g = torch.Generator().manual_seed(seed)
    small = np.asarray(Image.fromarray(image).convert("RGB").resize((size, size), Image.BILINEAR), dtype=np.float32)
    img = torch.from_numpy(small).permute(2, 0, 1)[None]
    # Every pixel pair of the working grid (exact objective; the kernel is fixed).
    yy, xx = torch.meshgrid(torch.arange(size, dtype=torch.float32), torch.arange(size, dtype=torch.float32), indexing="ij")
    pos = torch.stack([xx, yy], -1)[None]
    kernel = potts_kernel(pos, img, pos, img, params)
    logits = (0.1 * torch.randn(1, n_codes, size, size, generator=g)).requires_grad_(True)
    opt = torch.optim.Adam([logits], lr=lr)
    losses = []
    for _ in range(steps):
        q = logits.softmax(1)
        loss = potts_loss(q, q, kernel, shift).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    c = logits.detach().softmax(1)[0]
    return {"code": c.numpy(), "labels": c.argmax(0).numpy(), "losses": losses, "image": small.astype(np.uint8)}


def save_potts_figure(result: dict, path) -> None:
    """Image | continuous solution (first 3 principal components of the code as RGB) |
    discrete solution (argmax) | loss curve."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .viz import colorize, make_palette

    code = result["code"]
    k, h, w = code.shape
    flat = code.reshape(k, -1).T
    flat = flat - flat.mean(0)
    u, s, vt = np.linalg.svd(flat, full_matrices=False)
    pcs = flat @ vt[: min(3, k)].T
    if pcs.shape[1] < 3:
        pcs = np.concatenate([pcs, np.zeros((pcs.shape[0], 3 - pcs.shape[1]))], 1)
    lo, hi = pcs.min(0), pcs.max(0)
    rgb = ((pcs - lo) / np.where(hi > lo, hi - lo, 1)).reshape(h, w, 3)
    fig, axes = plt.subplots(1, 4, figsize=(13, 3.4))
    axes[0].imshow(result["image"])
    axes[0].set_title("image")
    axes[1].imshow(rgb)
    axes[1].set_title("continuous solution (code PCA)")
    axes[2].imshow(colorize(result["labels"], make_palette(k)))
    axes[2].set_title("discrete solution (argmax)")
    for ax in axes[:3]:
        ax.axis("off")
    axes[3].plot(result["losses"])
    axes[3].set_title("Potts loss")
    axes[3].set_xlabel("step")
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
