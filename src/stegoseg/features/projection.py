"""A reduced-dimension feature cache (``--pca-dim D``): the backbone's ``C``-channel features
are projected onto ``D`` directions fitted on a sample of the training crops, and everything
after the backbone (cache, neighbours, heads, probes, ``segment``) sees ``D`` channels.

The directions are the top right singular vectors of the sampled patch features *without*
centring (scikit-learn's ``TruncatedSVD``): STEGO's correspondences, the global descriptors
and the cosine probes are dot products of the features, and ``x -> W x`` with these ``W``
keeps dot products best in the least-squares sense (a centred PCA would keep the covariance
instead and move every cosine). The share of the features' energy the projection keeps,
``||W X||^2 / ||X||^2`` on the sample, is measured and reported.

The projection is fitted once per (backbone, split, crops, D, sample, seed) and stored in
``<cache root>/projections/<digest>.pt``, so every process of a run (Ray workers, DDP ranks,
later commands) projects alike; a trained checkpoint stores it too (``projection``), so
``segment`` and ``evaluate`` need no cache.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from stegoseg.errors import StegosegError

log = logging.getLogger("stegoseg")

#: patch features taken from each sampled crop for the fit
PATCHES_PER_CROP = 64


def projection_digest(backbone) -> Optional[str]:
    """SHA-1 of a backbone's projection (None without one): part of the cache spec, so a
    reduced cache never shares a folder with the full one or with another projection."""
    state = backbone.projection_state() if hasattr(backbone, "projection_state") else None
    if state is None:
        return None
    h = hashlib.sha1()
    for key in ("mean", "weight"):
        h.update(state[key].float().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def sample_patch_features(backbone, view, n_crops: int, seed: int, batch_size: int = 32, device: str = "cpu",
                          patches_per_crop: int = PATCHES_PER_CROP) -> np.ndarray:
    """(n, C) float32 patch features of the raw backbone: ``patches_per_crop`` random cells from
    each of ``n_crops`` random crops of ``view`` (all crops when it has fewer), drawn from ``seed``."""
    rng = np.random.default_rng(seed)
    crops = np.sort(rng.choice(len(view), size=min(n_crops, len(view)), replace=False))
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(view, crops.tolist()), batch_size=batch_size,
                                         shuffle=False)
    rows = []
    with torch.inference_mode():
        for batch in loader:
            feats = backbone(backbone.normalize(batch["image"].to(device))).float().cpu()
            cells = feats.flatten(2).transpose(1, 2)  # (B, h*w, C)
            for one in cells:
                pick = rng.choice(one.shape[0], size=min(patches_per_crop, one.shape[0]), replace=False)
                rows.append(one[np.sort(pick)].numpy())
    return np.concatenate(rows)


def fit_projection(x: np.ndarray, dim: int, seed: int) -> dict:
    """The ``dim`` directions that keep most of ``x``'s energy (uncentred, see the module
    docstring): {"mean": zeros (C,), "weight": (dim, C), "energy_kept": float, "n_vectors": n}."""
    from sklearn.decomposition import TruncatedSVD

    n, c = x.shape
    if not 1 <= dim < c:
        raise StegosegError(f"--pca-dim {dim} must be between 1 and {c - 1} (the backbone gives {c} channels)")
    if n <= dim:
        raise StegosegError(f"--pca-dim {dim} needs more than {dim} sampled features, the sample has {n}: "
                            "raise --pca-sample")
    x = x.astype(np.float64)
    svd = TruncatedSVD(n_components=dim, algorithm="arpack", random_state=seed).fit(x)
    weight = svd.components_.astype(np.float32)
    kept = float(np.square(x @ weight.T.astype(np.float64)).sum() / np.square(x).sum())
    return {"mean": torch.zeros(c), "weight": torch.from_numpy(weight), "energy_kept": kept, "n_vectors": int(n)}


def projection_file(cache_root, key: dict) -> Path:
    digest = hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return Path(cache_root) / "projections" / f"pca{key['dim']}-{digest}.pt"


def load_or_fit(path: Path, key: dict, sample) -> dict:
    """The projection stored at ``path``, or ``sample()`` (the (n, C) features) fitted and
    stored there by rename (concurrent fitters write the same file)."""
    path = Path(path)
    if path.is_file():
        state = torch.load(path, map_location="cpu", weights_only=True)
        if state.get("key") == key:
            return state
        log.warning("%s was fitted for other settings: fitting it again", path)
    log.info("fitting a %d-channel projection of the features on %d crops", key["dim"], key["sample"])
    state = fit_projection(sample(), key["dim"], key["seed"])
    state["key"] = key
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)
    log.info("--pca-dim %d keeps %.1f%% of the features' energy (%d patch features from %d crops)", key["dim"],
             100 * state["energy_kept"], state["n_vectors"], key["sample"])
    return state
