"""Nearest neighbours of the cached items' global descriptors (FAISS or torch): exact search,
or FAISS's HNSW graph above :data:`EXACT_UP_TO` items (``--knn-index``), whose recall against
exact search is measured on a seeded sample of queries and reported with the lists.
"""
from __future__ import annotations

import logging

import numpy as np
import torch

from stegoseg.errors import StegosegError

log = logging.getLogger("stegoseg")

#: ``--knn-index auto``: exact search up to this many items, HNSW above (benchmarks/bench_scale.py:
#: on 2 CPU cores exact search of 100k 384-d vectors takes minutes and grows as N^2).
EXACT_UP_TO = 200_000
#: HNSW settings: graph degree, construction and first search breadth (search: at least 4k).
HNSW_M, HNSW_EF_CONSTRUCTION, HNSW_EF_SEARCH = 32, 80, 128
#: The search breadth is doubled up to this while the measured recall is below the target.
HNSW_EF_SEARCH_MAX = 1024
#: Queries the recall of an approximate index is measured on, and the recall@k it should reach.
RECALL_QUERIES, RECALL_TARGET = 1000, 0.95


def index_kind(index: str, n: int) -> str:
    """``exact`` or ``hnsw`` for ``--knn-index`` ``index`` and ``n`` items."""
    if index not in ("auto", "exact", "hnsw"):
        raise StegosegError(f"unknown --knn-index '{index}': use auto, exact or hnsw")
    return ("exact" if n <= EXACT_UP_TO else "hnsw") if index == "auto" else index


def approximate_neighbors(vectors: np.ndarray, k: int = 30, seed: int = 0) -> tuple:
    """Top-``k`` cosine neighbours (self excluded) from a FAISS HNSW graph, and a report:
    recall@k against exact search on :data:`RECALL_QUERIES` seeded queries, the settings.
    The search breadth starts at :data:`HNSW_EF_SEARCH` and is doubled (up to
    :data:`HNSW_EF_SEARCH_MAX`) while the queries' recall is below :data:`RECALL_TARGET`."""
    import faiss

    x = _normalised(vectors)
    n = x.shape[0]
    k_eff = min(k, n - 1)
    index = faiss.IndexHNSWFlat(x.shape[1], HNSW_M, faiss.METRIC_INNER_PRODUCT)
    index.hnsw.efConstruction = HNSW_EF_CONSTRUCTION
    index.add(x)
    queries = np.sort(np.random.default_rng(seed).choice(n, size=min(RECALL_QUERIES, n), replace=False))
    flat = faiss.IndexFlatIP(x.shape[1])
    flat.add(x)
    _, exact = flat.search(x[queries], k_eff + 1)
    exact = _drop_self(exact, k_eff, ids=queries)
    del flat

    def recall_of(found: np.ndarray) -> float:
        return sum(len(set(a) & set(b)) for a, b in zip(found, exact)) / (len(queries) * k_eff)

    def search(rows: np.ndarray) -> np.ndarray:
        found = np.empty((len(rows), k_eff + 1), dtype=np.int64)
        for s in range(0, len(rows), 8192):
            _, found[s : s + 8192] = index.search(x[rows[s : s + 8192]], k_eff + 1)
        short = np.flatnonzero((found < 0).any(axis=1))  # unfilled slots (tiny graphs): search those rows exactly
        if len(short):
            sims = x[rows[short]] @ x.T
            found[short] = np.argsort(-sims, axis=1, kind="stable")[:, : k_eff + 1]
        return _drop_self(found, k_eff, ids=rows)

    ef = max(HNSW_EF_SEARCH, 4 * (k_eff + 1))
    tried = {}
    while True:
        index.hnsw.efSearch = ef
        tried[ef] = recall_of(search(queries))
        if tried[ef] >= RECALL_TARGET or ef >= HNSW_EF_SEARCH_MAX:
            break
        ef *= 2
    knn = search(np.arange(n))
    report = {"index": "hnsw", "n_items": int(n), "k": int(k_eff), "recall_at_k": recall_of(knn[queries]),
              "recall_queries": int(len(queries)), "recall_target": RECALL_TARGET, "M": HNSW_M,
              "ef_construction": HNSW_EF_CONSTRUCTION, "ef_search": int(ef),
              "recall_by_ef_search": {str(e): r for e, r in tried.items()}}
    if report["recall_at_k"] < RECALL_TARGET:
        log.warning("HNSW neighbours: recall@%d %.3f is below %.2f even with efSearch %d: --knn-index exact gives "
                    "exact lists (slower)", k_eff, report["recall_at_k"], RECALL_TARGET, ef)
    return knn, report


def _normalised(vectors: np.ndarray) -> np.ndarray:
    x = np.ascontiguousarray(vectors, dtype=np.float32).copy()
    x /= np.linalg.norm(x, axis=1, keepdims=True).clip(min=1e-12)
    if x.shape[0] < 2:
        raise StegosegError(f"nearest neighbours need at least 2 items, the cache has {x.shape[0]}")
    return x

def nearest_neighbors(
    vectors: np.ndarray, k: int = 30, backend: str = "auto", device: str = "cpu", chunk: int = 8192
) -> np.ndarray:
    """Exact top-``k`` cosine neighbours of every row among the other rows (self excluded).

    ``backend``: ``"faiss"`` (exact inner-product index, CPU), ``"torch"`` (chunked
    matmul + topk, runs on ``device``, e.g. a GPU), or ``"auto"`` (torch on CUDA, else
    FAISS). Rows are L2-normalised first. Query chunks bound memory.
    """
    x = _normalised(vectors)
    n = x.shape[0]
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


def _drop_self(found: np.ndarray, k: int, ids: np.ndarray = None) -> np.ndarray:
    """Remove each row's own index (``ids[row]``; default: the row number) or, if absent because
    of ties, the last entry."""
    n = found.shape[0]
    rows = (np.arange(n) if ids is None else np.asarray(ids))[:, None]
    is_self = found == rows
    no_self = ~is_self.any(axis=1)
    is_self[no_self, -1] = True
    return found[~is_self].reshape(n, k)
