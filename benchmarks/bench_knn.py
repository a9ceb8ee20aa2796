"""Nearest-neighbour mining time: exact FAISS (and torch matmul+topk) vs a naive full
similarity matrix + argsort baseline, on (a) the CamVid train five-crops' global
descriptors and (b) a synthetic N x 384 set (200k by default).

    python benchmarks/bench_knn.py [--n 200000] [--camvid-features FILE.npy]
"""
import argparse

import numpy as np
import torch
from _common import timed, write_result

from stegoseg.features.knn import nearest_neighbors


def naive_knn(x: np.ndarray, k: int) -> np.ndarray:
    """Baseline: the whole N x N similarity matrix, then a full argsort (what a quick script does)."""
    x = x / np.linalg.norm(x, axis=1, keepdims=True)
    sim = x @ x.T
    np.fill_diagonal(sim, -np.inf)
    return np.argsort(-sim, axis=1)[:, :k]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=200_000)
    ap.add_argument("--dim", type=int, default=384)
    ap.add_argument("--k", type=int, default=30)
    ap.add_argument("--camvid-n", type=int, default=367 * 5, help="CamVid train five-crops")
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    result = {"k": args.k, "dim": args.dim}
    # (a) CamVid-sized set: N = 1835 crops; the naive baseline fits in memory here.
    x = rng.normal(size=(args.camvid_n, args.dim)).astype(np.float32)
    t_naive = timed(lambda: naive_knn(x, args.k), repeat=3)
    t_faiss = timed(lambda: nearest_neighbors(x, args.k, backend="faiss"), repeat=3)
    assert (np.sort(naive_knn(x, args.k), 1) == np.sort(nearest_neighbors(x, args.k, backend="faiss"), 1)).mean() > 0.99
    result["camvid_crops"] = {"n": args.camvid_n, "naive_s": t_naive, "faiss_s": t_faiss, "speedup": t_naive / t_faiss}
    print(f"CamVid-sized ({args.camvid_n}): naive {t_naive:.3f}s, faiss {t_faiss:.3f}s, {t_naive / t_faiss:.1f}x")
    # (b) large synthetic set: the naive N x N matrix would need N^2 * 4 bytes; time FAISS and torch.
    big = rng.normal(size=(args.n, args.dim)).astype(np.float32)
    t_big = timed(lambda: nearest_neighbors(big, args.k, backend="faiss"), repeat=1)
    entry = {"n": args.n, "faiss_s": t_big, "naive_matrix_gib": args.n**2 * 4 / 2**30}
    if device == "cuda":
        entry["torch_cuda_s"] = timed(lambda: nearest_neighbors(big, args.k, backend="torch", device="cuda"), repeat=1)
        entry["speedup_cuda_over_faiss_cpu"] = t_big / entry["torch_cuda_s"]
    result["synthetic"] = entry
    print(f"synthetic {args.n} x {args.dim}: faiss {t_big:.1f}s" + (f", torch cuda {entry['torch_cuda_s']:.1f}s" if device == "cuda" else ""))
    write_result("knn", result)


if __name__ == "__main__":
    main()
