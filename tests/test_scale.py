"""The pieces that let the cache and the neighbour search scale: sharded arrays read like one
array, the approximate (HNSW) neighbour index with its recall measured and recorded."""
import json

import numpy as np
import pytest

from conftest import tiny_cli
from stegoseg.cli import main


def clustered(n, d=32, centres=40, seed=0):
    rng = np.random.default_rng(seed)
    c = rng.normal(size=(centres, d))
    return (c[rng.integers(0, centres, n)] + 0.3 * rng.normal(size=(n, d))).astype(np.float32)


def exact_knn(x, k):
    """Brute force in numpy, written out: cosine similarity, self excluded."""
    x = x / np.linalg.norm(x, axis=1, keepdims=True)
    sim = x @ x.T
    np.fill_diagonal(sim, -np.inf)
    return np.argsort(-sim, axis=1, kind="stable")[:, :k]


def test_sharded_array_reads_like_one_array(tmp_path):
    from stegoseg.features import shards

    meta = {"n_items": 11, "feature_shape": [2, 1, 3], "thumb_size": 1, "label_shape": None, "shard_items": 4}
    full = np.arange(11 * 6, dtype=np.float16).reshape(11, 2, 1, 3)
    for s in range(3):
        r = shards.shard_range(meta, s)
        shards.write_shard(tmp_path, meta, s, {"features": full[r.start:r.stop],
                                               "thumbs": np.zeros((len(r), 3, 1, 1), np.uint8)})
    a = shards.ShardedArray(tmp_path, meta, "features")
    assert a.shape == full.shape and a.nbytes == full.nbytes
    for key in (0, 5, -1, slice(None), slice(3, 9, 2), np.array([10, 0, 4, 4]), full[:, 0, 0, 0] % 3 == 0):
        assert np.array_equal(a[key], full[key]), key
    assert np.array_equal(np.array(a), full)
    shards.shard_file(tmp_path, "features", 1).unlink()
    from stegoseg.errors import StegosegError

    with pytest.raises(StegosegError, match="items 4..7 of the feature cache .* are not extracted yet"):
        a.__class__(tmp_path, meta, "features")[5]
    assert shards.done_items(tmp_path, meta)[0].tolist() == [True] * 4 + [False] * 4 + [True] * 3


def test_hnsw_recall_is_measured_against_exact_search(monkeypatch):
    from stegoseg.features import knn as knn_module

    x = clustered(3000)
    monkeypatch.setattr(knn_module, "RECALL_QUERIES", 3000)  # every item a query: the whole list's recall
    found, report = knn_module.approximate_neighbors(x, k=7)
    exact = exact_knn(x, 7)
    recall = np.mean([len(set(a) & set(b)) / 7 for a, b in zip(found, exact)])
    # (abs: float32 near-ties at the 7th place may order differently in numpy and FAISS)
    assert report["recall_at_k"] == pytest.approx(recall, abs=1e-3) and report["k"] == 7 and report["index"] == "hnsw"
    assert recall > 0.9 and not (found == np.arange(3000)[:, None]).any()  # never itself


def test_hnsw_recall_on_a_sample_of_queries_is_that_sample_s_recall(monkeypatch):
    """500 of 3000 items as queries: the report is the mean recall of exactly those rows (a
    sample's own ids, not its row numbers, are the selves to leave out of the exact lists)."""
    from stegoseg.features import knn as knn_module

    x = clustered(3000)
    monkeypatch.setattr(knn_module, "RECALL_QUERIES", 500)
    found, report = knn_module.approximate_neighbors(x, k=7, seed=3)
    exact = exact_knn(x, 7)
    queries = np.sort(np.random.default_rng(3).choice(3000, size=500, replace=False))
    recall = np.mean([len(set(found[q]) & set(exact[q])) / 7 for q in queries])
    assert report["recall_queries"] == 500 and report["recall_at_k"] == pytest.approx(recall, abs=1e-3)
    assert report["recall_at_k"] > 0.95  # (the old bug left each query itself as a neighbour: 6/7 at most)


def test_hnsw_search_breadth_grows_until_the_recall_target(monkeypatch):
    from stegoseg.features import knn as knn_module

    x = clustered(3000)
    monkeypatch.setattr(knn_module, "HNSW_EF_SEARCH", 1)
    monkeypatch.setattr(knn_module, "HNSW_M", 4)
    monkeypatch.setattr(knn_module, "RECALL_TARGET", 1.01)  # unreachable: every breadth up to the cap is tried
    _, report = knn_module.approximate_neighbors(x, k=7)
    assert list(report["recall_by_ef_search"]) == ["32", "64", "128", "256", "512", "1024"]
    assert report["ef_search"] == 1024 and report["recall_at_k"] == report["recall_by_ef_search"]["1024"]


def test_knn_index_auto_switches_at_the_measured_size(monkeypatch):
    from stegoseg.features import knn as knn_module

    assert knn_module.index_kind("auto", knn_module.EXACT_UP_TO) == "exact"
    assert knn_module.index_kind("auto", knn_module.EXACT_UP_TO + 1) == "hnsw"
    assert knn_module.index_kind("hnsw", 10) == "hnsw"


def test_prepare_with_an_approximate_index_records_its_recall(synthetic_root, tmp_path, caplog):
    from stegoseg.features.cache import FeatureCache

    out = tmp_path / "p"
    caplog.set_level("INFO", logger="stegoseg")
    args = ["prepare", "--data-root", str(synthetic_root), "--out", str(out), *tiny_cli("prepare")]
    assert main([*args, "--knn-index", "hnsw"]) == 0
    cache = FeatureCache(next(p for p in (out / "cache").iterdir() if (p / "meta.json").exists()))
    report = json.loads((cache.path / "neighbors.json").read_text())["knn_8_hnsw.npy"]
    assert f"recall@8 {report['recall_at_k']:.3f} against exact search" in caplog.text
    approx = np.load(cache.path / "knn_8_hnsw.npy")
    exact = exact_knn(cache.global_descriptors(), 8)
    assert report["recall_at_k"] == pytest.approx(np.mean([len(set(a) & set(b)) / 8 for a, b in zip(approx, exact)]),
                                                  abs=0.01)
    assert main([*args, "--knn-index", "exact"]) == 0  # the exact list is a file of its own
    assert np.array_equal(np.load(cache.path / "knn_8.npy"), exact)
    assert main([*args, "--knn-index", "nearest"]) == 2


def test_unfilled_hnsw_slots_are_searched_exactly(monkeypatch):
    """FAISS marks slots it could not fill with -1: those rows get their exact neighbours."""
    import faiss

    from stegoseg.features import knn as knn_module

    real = faiss.IndexHNSWFlat

    class Holey:
        def __init__(self, *args):
            self.inner = real(*args)
            self.hnsw = self.inner.hnsw

        def add(self, x):
            self.inner.add(x)

        def search(self, q, k):
            d, i = self.inner.search(q, k)
            i = i.copy()
            i[::3, -2:] = -1
            return d, i

    monkeypatch.setattr(faiss, "IndexHNSWFlat", Holey)
    x = np.random.default_rng(0).normal(size=(300, 16)).astype(np.float32)
    found, _ = knn_module.approximate_neighbors(x, k=7)
    u = x / np.linalg.norm(x, axis=1, keepdims=True)
    sims = u @ u.T
    np.fill_diagonal(sims, -np.inf)
    exact = np.argsort(-sims, axis=1)[:, :7]
    for row in range(0, 300, 3):
        assert set(found[row]) == set(exact[row]), row
