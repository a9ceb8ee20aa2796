"""Nearest neighbours of the cached items' global descriptors (FAISS or torch).
"""
from __future__ import annotations

import numpy as np
import torch

from stegoseg.errors import StegosegError

def nearest_neighbors(
    vectors: np.ndarray, k: int = 30, backend: str = "auto", device: str = "cpu", chunk: int = 8192
) -> np.ndarray:
    """Exact top-``k`` cosine neighbours of every row among the other rows (self excluded).

    ``backend``: ``"faiss"`` (exact inner-product index, CPU), ``"torch"`` (chunked
    matmul + topk, runs on ``device``, e.g. a GPU), or ``"auto"`` (torch on CUDA, else
    FAISS). Rows are L2-normalised first. Query chunks bound memory.
    """
    x = np.ascontiguousarray(vectors, dtype=np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True).clip(min=1e-12)
    n = x.shape[0]
    if n < 2:
        raise StegosegError(f"nearest neighbours need at least 2 items, the cache has {n}")
    k_eff = min(k, n - 1)
    if backend == "auto":
        backend = "torch" if str(device).startswith("cuda") else "faiss"
    if backend == "faiss":
        import faiss

        index = faiss.IndexFlatIP(x.shape[1])
        index.add(x)
        found = np.empty((n, k_eff + 1), dtype=np.int64)
        for s in range(0, n, chunk):
            _, found[s : s + chunk] = index.search(x[s : s + chunk], k_eff + 1)
    elif backend == "torch":
        xt = torch.from_numpy(x).to(device)
        found = np.empty((n, k_eff + 1), dtype=np.int64)
        for s in range(0, n, chunk):
            sim = xt[s : s + chunk] @ xt.T
            found[s : s + chunk] = sim.topk(k_eff + 1, dim=1).indices.cpu().numpy()
    else:
        raise StegosegError(f"unknown KNN backend '{backend}': use auto, faiss or torch")
    return _drop_self(found, k_eff)


def _drop_self(found: np.ndarray, k: int) -> np.ndarray:
    """Remove each row's own index (or, if absent because of ties, the last entry)."""
    n = found.shape[0]
    rows = np.arange(n)[:, None]
    is_self = found == rows
    no_self = ~is_self.any(axis=1)
    is_self[no_self, -1] = True
    return found[~is_self].reshape(n, k)
