"""STEGO A.9 study: optimise the Potts loss alone on one image.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from stegoseg.evaluation.crf import CRFParams
from stegoseg.losses.potts import potts_kernel, potts_loss
from stegoseg.reporting.figures import colorize, make_palette


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
