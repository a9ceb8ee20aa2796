"""Seeded spherical k-means (FAISS on a streamed sample + one streamed full-data pass)."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from stegoseg.nn import kmeans as km
from stegoseg.nn.kmeans import spherical_kmeans


def _planted(n=20000, k=8, d=64, sigma=0.05, seed=0):
    g = torch.Generator().manual_seed(seed)
    dirs = F.normalize(torch.randn(k, d, generator=g), dim=1)
    labels = torch.randint(k, (n,), generator=g)
    x = F.normalize(dirs[labels] + sigma * torch.randn(n, d, generator=g), dim=1)
    return x, labels


def _mean_cos(x, c):
    return float((F.normalize(x, dim=1) @ c.T).max(1).values.mean())


def _fit(x, k, chunk=1000, **kw):
    chunks = list(x.split(chunk))
    return spherical_kmeans(lambda: iter(chunks), k, progress=False, **kw)


def test_recovers_planted_clusters():
    adjusted_rand_score = pytest.importorskip("sklearn.metrics").adjusted_rand_score
    for sigma in (0.05, 0.15):  # cosine to the own direction ~0.93 and ~0.64; between directions ~0.1
        x, labels = _planted(sigma=sigma)
        for seed in (0, 1, 2):
            c = _fit(x, 8, n_iter=30, seed=seed)
            assert c.shape == (8, 64) and c.dtype == torch.float32
            torch.testing.assert_close(c.norm(dim=1), torch.ones(8))
            ari = adjusted_rand_score(labels.numpy(), (x @ c.T).argmax(1).numpy())
            assert ari >= 0.99, (sigma, seed, ari)


def test_same_seed_same_centroids_other_seed_differs():
    x = F.normalize(torch.randn(6000, 16, generator=torch.Generator().manual_seed(3)), dim=1)
    a = _fit(x, 6, n_iter=15, seed=4)
    b = _fit(x, 6, n_iter=15, seed=4)
    assert torch.equal(a, b)
    # structureless data: another seed samples other points and lands elsewhere
    c = _fit(x, 6, n_iter=15, seed=5)
    assert not torch.allclose(a, c, atol=1e-3)


def test_streamed_batches_equal_one_batch():
    # The training sample depends only on (seed, position in the stream), so FAISS sees the
    # same sample bit for bit however the stream is cut; only the final pass's per-cluster
    # sums are added in another order (float64 accumulators): equal up to float rounding,
    # hence a tight tolerance rather than bit equality.
    x, _ = _planted(n=5000, k=5, d=24, sigma=0.3, seed=1)
    one = spherical_kmeans(lambda: iter([x]), 5, n_iter=20, seed=0, progress=False)
    many = _fit(x, 5, chunk=37, n_iter=20, seed=0)
    torch.testing.assert_close(many, one, rtol=0, atol=1e-5)
    # (B, D, h, w) batches are the same vectors in (b, y, x) order
    maps = x[:4992].reshape(8, 24, 26, 24).permute(0, 3, 1, 2)  # (8, 24 channels, 24, 26)
    flat = maps.permute(0, 2, 3, 1).reshape(-1, 24)
    a = spherical_kmeans(lambda: iter(maps.split(3)), 5, n_iter=20, seed=2, progress=False)
    b = spherical_kmeans(lambda: iter(flat.split(500)), 5, n_iter=20, seed=2, progress=False)
    torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
    s1, n1 = km._stream_sample(lambda: iter([x]), 700, seed=0, progress=False)
    s2, n2 = km._stream_sample(lambda: iter(x.split(37)), 700, seed=0, progress=False)
    assert n1 == n2 == 5000 and s1.shape == (700, 24) and torch.equal(s1, s2)


def test_sample_is_bounded_and_uniform():
    x = torch.arange(40000, dtype=torch.float32)[:, None] * torch.tensor([[1.0, 0.0]]) + torch.tensor([[1.0, 1.0]])
    # rows are distinct directions; recover the stream position from the angle of each sampled row
    sample, total = km._stream_sample(lambda: iter(x.split(999)), 2000, seed=7, progress=False)
    assert total == 40000 and sample.shape == (2000, 2)
    pos = np.rint(sample[:, 0].numpy() / sample[:, 1].numpy() - 1).astype(int)
    assert len(np.unique(pos)) == 2000 and np.all(np.diff(pos) > 0)  # distinct, in stream order
    counts = np.bincount(pos // 10000, minlength=4)  # each quarter of the stream: 500 +- ~20
    assert np.all(np.abs(counts - 500) < 100), counts


def test_empty_clusters_are_reseeded_without_nan():
    # 3 distinct directions, 5 clusters: at least two centroids get no vector in the full pass
    base = F.normalize(torch.tensor([[1.0, 0, 0, 0], [0, 1.0, 0, 0], [0.6, 0.8, 0.3, 0]]), dim=1)
    x = base.repeat(200, 1)
    c = _fit(x, 5, chunk=64, n_iter=10, seed=0)
    assert c.shape == (5, 4) and torch.isfinite(c).all()
    torch.testing.assert_close(c.norm(dim=1), torch.ones(5))
    # every distinct point has a centroid on it
    assert torch.allclose((base @ c.T).max(1).values, torch.ones(3), atol=1e-5)
    # a single distinct point and more clusters than points -> still k unit centroids
    same = F.normalize(torch.ones(7, 3), dim=1)
    c1 = spherical_kmeans(lambda: iter([same]), 7, n_iter=5, seed=0, progress=False)
    assert torch.isfinite(c1).all() and torch.allclose(c1, same, atol=1e-5)
    with pytest.raises(ValueError, match="at least 8"):
        spherical_kmeans(lambda: iter([same]), 8, progress=False)


def test_objective_beats_random_centroids_and_the_full_data_step_helps():
    x, _ = _planted(n=12000, k=12, d=32, sigma=0.25, seed=5)
    c = _fit(x, 12, n_iter=25, seed=0)
    obj = _mean_cos(x, c)
    g = torch.Generator().manual_seed(0)
    random_points = [_mean_cos(x, x[torch.randperm(len(x), generator=g)[:12]]) for _ in range(5)]
    random_dirs = [_mean_cos(x, F.normalize(torch.randn(12, 32, generator=g), dim=1)) for _ in range(5)]
    assert obj > max(random_points) + 0.05 and obj > max(random_dirs) + 0.2, (obj, random_points, random_dirs)
    # the final streamed Lloyd step on all vectors does not lower the objective of FAISS's centroids
    sample, _ = km._stream_sample(lambda: iter(x.split(1000)), 256 * 12, 0, False)
    faiss_only = torch.from_numpy(km._faiss_kmeans(sample.numpy(), 12, 25, 0, 1e-5))
    assert obj >= _mean_cos(x, faiss_only) - 1e-6


def test_final_pass_averages_all_vectors_not_just_the_sample():
    # init_sample = k: FAISS only sees 2 sampled vectors (its centroids are those vectors);
    # the streamed pass then moves each centroid to the normalised mean of all the vectors
    # assigned to it
    x, _ = _planted(n=4000, k=2, d=16, sigma=0.2, seed=9)
    c = _fit(x, 2, chunk=333, n_iter=10, seed=0, init_sample=2)
    sample, _ = km._stream_sample(lambda: iter(x.split(333)), 2, 0, False)
    faiss_only = torch.from_numpy(km._faiss_kmeans(sample.numpy(), 2, 10, 0, 1e-5))
    torch.testing.assert_close((faiss_only @ sample.T).max(1).values, torch.ones(2), rtol=0, atol=1e-5)
    assign = (x @ faiss_only.T).argmax(1)
    means = torch.stack([F.normalize(x[assign == j].sum(0), dim=0) for j in range(2)])
    torch.testing.assert_close(c, means, rtol=0, atol=1e-5)
    assert (x @ c.T).max(0).values.max() < 0.999  # no centroid is a data vector any more
