"""Dense CRF refinement (Kraehenbuehl & Koltun) through pydensecrf2.

Defaults are the published STEGO settings: 10 mean-field iterations, a Gaussian
(position) kernel with weight 3 and sxy 1, and a bilateral (position + colour) kernel
with weight 4, sxy 67 and srgb 3. The unary is -log of the softmax of the given logits
(for the cluster probe, ``2 * cosine similarity``), upsampled bilinearly to image size.

:func:`crf_batch` refines many images in parallel worker processes.
"""
from __future__ import annotations

from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from stegoseg.errors import StegosegError


@dataclass(frozen=True)
class CRFParams:
    """Dense CRF settings (defaults: the published STEGO values).

    ``reference_input``: feed the CRF the image exactly as the reference STEGO code does,
    to reproduce its published numbers: channels in BGR order and, for float images in
    [0, 1] (:func:`crf_batch`), 8-bit values by truncation (``(x * 255).astype(uint8)``)
    instead of rounding. The bilateral kernel's permutohedral lattice is not invariant to
    the channel order, so refined labels differ from the default (RGB, rounded) on a
    fraction of a percent of pixels. Images that are already 8-bit (``segment``) are
    exact either way; there only the channel order changes.
    """

    iterations: int = 10
    pos_w: float = 3.0
    pos_xy_std: float = 1.0
    bi_w: float = 4.0
    bi_xy_std: float = 67.0
    bi_rgb_std: float = 3.0
    reference_input: bool = False


def crf_params_from(values: dict) -> CRFParams:
    """The CRF settings of a run config (a dict with ``crf_*`` entries; missing ones keep the
    published defaults), e.g. a checkpoint's recorded config."""
    defaults = CRFParams()
    return CRFParams(
        iterations=int(values.get("crf_iterations", defaults.iterations)),
        pos_w=float(values.get("crf_pos_w", defaults.pos_w)),
        pos_xy_std=float(values.get("crf_pos_xy_std", defaults.pos_xy_std)),
        bi_w=float(values.get("crf_bi_w", defaults.bi_w)),
        bi_xy_std=float(values.get("crf_bi_xy_std", defaults.bi_xy_std)),
        bi_rgb_std=float(values.get("crf_bi_rgb_std", defaults.bi_rgb_std)),
        reference_input=bool(values.get("crf_reference_input", defaults.reference_input)),
    )


def _densecrf():
    try:
        import pydensecrf.densecrf as dcrf
        from pydensecrf.utils import unary_from_softmax
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise StegosegError(
            "the dense CRF needs pydensecrf2: `pip install pydensecrf2` (needs a C++ compiler), or pass --no-crf"
        ) from exc
    return dcrf, unary_from_softmax


def dense_crf(image: np.ndarray, probs: np.ndarray, params: CRFParams = CRFParams()) -> np.ndarray:
    """Refine class probabilities with a dense CRF.

    ``image``: (H, W, 3) uint8 RGB (any memory layout, read-only is fine);
    ``probs``: (C, H, W) float probabilities summing to 1 over C. With
    ``params.reference_input`` the channels are reversed to BGR here, as the reference
    does. Returns the refined marginals (C, H, W) float32.
    """
    dcrf, unary_from_softmax = _densecrf()
    c, h, w = probs.shape
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"image must be (H, W, 3) uint8 RGB, got shape {image.shape}")
    if image.shape[:2] != (h, w):
        raise ValueError(f"image {image.shape[:2]} and probabilities {(h, w)} differ in size")
    if params.reference_input:
        image = image[..., ::-1]
    # pydensecrf's Cython signatures take writable typed memoryviews: always hand it fresh,
    # writable, C-contiguous copies (a caller's array may be read-only, e.g. np.asarray(PIL)).
    rgb = np.array(image, dtype=np.uint8, order="C", copy=True)
    unary = np.array(unary_from_softmax(np.asarray(probs, dtype=np.float32)), dtype=np.float32, order="C", copy=True)
    d = dcrf.DenseCRF2D(w, h, c)
    d.setUnaryEnergy(unary)
    d.addPairwiseGaussian(sxy=params.pos_xy_std, compat=params.pos_w)
    d.addPairwiseBilateral(sxy=params.bi_xy_std, srgb=params.bi_rgb_std, rgbim=rgb, compat=params.bi_w)
    q = d.inference(params.iterations)
    return np.asarray(q, dtype=np.float32).reshape(c, h, w)


def crf_job(args):
    """(image uint8 RGB (H, W, 3), logits (C, H, W), params) -> refined hard labels (H, W); picklable for pools.

    The image stays RGB; :func:`dense_crf` reverses it when ``params.reference_input``.
    """
    image, logits, params = args
    # NumPy only: this runs in forked worker processes, where torch's thread pools can deadlock.
    z = logits.astype(np.float32) - logits.max(axis=0, keepdims=True)
    probs = np.exp(z)
    probs /= probs.sum(axis=0, keepdims=True)
    return dense_crf(image, probs, params).argmax(0).astype(np.int64)


def image_to_uint8(image: torch.Tensor, truncate: bool = False) -> np.ndarray:
    """(3, H, W) float in [0, 1] -> (H, W, 3) uint8, ``x * 255`` rounded to the nearest
    integer, or with ``truncate`` rounded down as the reference's ``(x * 255).astype(uint8)``."""
    scaled = image.clamp(0, 1) * 255
    scaled = scaled.floor() if truncate else scaled.round()
    return scaled.byte().permute(1, 2, 0).cpu().numpy()


def crf_batch(
    images: torch.Tensor,
    logits: torch.Tensor,
    params: CRFParams = CRFParams(),
    workers: int = 1,
    pool: Optional[ProcessPoolExecutor] = None,
) -> torch.Tensor:
    """CRF-refined hard labels (B, H, W) for a batch.

    ``images``: (B, 3, H, W) in [0, 1], made 8-bit by :func:`image_to_uint8` (truncated
    with ``params.reference_input``); ``logits``: (B, C, h, w), upsampled bilinearly to
    (H, W) first. Runs in ``pool`` if given, else in ``workers`` processes (1 = inline).
    """
    size = images.shape[-2:]
    logits = F.interpolate(logits.float(), size=size, mode="bilinear", align_corners=False)
    # reference_input: truncate like the reference; dense_crf then reverses the channels to BGR.
    jobs = [
        (image_to_uint8(img, truncate=params.reference_input), lg.cpu().numpy(), params)
        for img, lg in zip(images, logits)
    ]
    return torch.from_numpy(np.stack(run_crf_jobs(jobs, pool, workers)))


def run_crf_jobs(jobs: Sequence, pool: Optional[ProcessPoolExecutor] = None, workers: int = 1) -> list:
    """Labels of :func:`crf_job` jobs, in order: in ``pool`` if given, else in ``workers``
    processes that end with this one (1 = inline)."""
    if pool is not None:
        return list(pool.map(crf_job, jobs))
    if workers > 1:
        with crf_pool(workers) as ex:
            return list(ex.map(crf_job, jobs))
    return [crf_job(job) for job in jobs]


def _die_with_parent() -> None:
    """Worker initialiser: ask Linux to send SIGTERM to this worker when its parent dies, so
    that killing stegoseg (even with SIGKILL) never leaves CRF workers (each holding
    copies of images and logits) running."""
    import ctypes
    import os
    import signal
    import sys

    if sys.platform.startswith("linux"):
        parent = os.getppid()
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
        if os.getppid() != parent:  # the parent died before the request took effect
            os._exit(1)


def crf_pool(workers: int) -> ProcessPoolExecutor:
    """A process pool for the CRF whose workers end with the process that started them."""
    return ProcessPoolExecutor(workers, initializer=_die_with_parent)


def crf_available() -> bool:
    try:
        _densecrf()
        return True
    except StegosegError:
        return False
