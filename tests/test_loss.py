import math

import numpy as np
import pytest
import torch

from stegoseg.features.knn import nearest_neighbors
from stegoseg.losses.stego import (
    LossWeights,
    correspondence_loss,
    random_coords,
    random_derangement,
    sample_points,
    stego_loss,
)


def _cos(a, b):
    return float(torch.dot(a, b) / (a.norm().clamp_min(1e-10) * b.norm().clamp_min(1e-10)))


def _loop_loss(f1, f2, c1, c2, shift, pointwise, zero_clamp):
    """The formulas written out element by element."""
    n, _, h, w = f1.shape
    _, _, hh, ww = f2.shape
    F = torch.zeros(n, h, w, hh, ww, dtype=torch.float64)
    S = torch.zeros_like(F)
    for a in range(n):
        for y in range(h):
            for x in range(w):
                for i in range(hh):
                    for j in range(ww):
                        F[a, y, x, i, j] = _cos(f1[a, :, y, x], f2[a, :, i, j])
                        S[a, y, x, i, j] = _cos(c1[a, :, y, x], c2[a, :, i, j])
    if pointwise:
        global_mean = F.mean()
        for a in range(n):
            for y in range(h):
                for x in range(w):
                    F[a, y, x] = F[a, y, x] - F[a, y, x].mean()
        F = F - F.mean() + global_mean
    if zero_clamp:
        S = torch.where(S < 0, torch.zeros_like(S), S)
    return -S * (F - shift)


@pytest.mark.parametrize("pointwise", [True, False])
@pytest.mark.parametrize("zero_clamp", [True, False])
def test_correspondence_loss_matches_loop(pointwise, zero_clamp):
    g = torch.Generator().manual_seed(0)
    f1, f2 = torch.randn(2, 5, 3, 4, generator=g), torch.randn(2, 5, 2, 3, generator=g)
    c1, c2 = torch.randn(2, 4, 3, 4, generator=g), torch.randn(2, 4, 2, 3, generator=g)
    got = correspondence_loss(f1, f2, c1, c2, shift=0.3, pointwise=pointwise, zero_clamp=zero_clamp)
    want = _loop_loss(f1.double(), f2.double(), c1.double(), c2.double(), 0.3, pointwise, zero_clamp)
    assert got.shape == (2, 3, 4, 2, 3)
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)


def test_zero_clamp_removes_negative_code_similarity_gradient():
    f = torch.randn(1, 4, 2, 2)
    v = torch.randn(1, 3, 1, 1)
    c1 = (v.repeat(1, 1, 2, 2) * torch.rand(1, 1, 2, 2).add(0.5)).requires_grad_(True)
    c2 = -v.repeat(1, 1, 2, 2)  # every code similarity is -1
    loss = correspondence_loss(f, f, c1, c2, shift=0.0, zero_clamp=True).mean()
    loss.backward()
    assert torch.count_nonzero(c1.grad) == 0


def test_feature_side_has_no_gradient():
    f1 = torch.randn(2, 4, 2, 2, requires_grad=True)
    c = torch.randn(2, 3, 2, 2, requires_grad=True)
    correspondence_loss(f1, f1, c, c, 0.1).mean().backward()
    assert f1.grad is None and c.grad is not None


def test_sampler_coordinates_and_corners():
    coords = random_coords(3, 11, generator=torch.Generator().manual_seed(0))
    assert coords.shape == (3, 11, 11, 2)
    assert coords.min() >= -1 and coords.max() <= 1
    # align_corners=True: (-1, -1) is exactly the top-left value, (1, 1) the bottom-right one
    t = torch.arange(12.0).reshape(1, 1, 3, 4)
    corners = torch.tensor([[[[-1.0, -1.0], [1.0, 1.0]], [[1.0, -1.0], [-1.0, 1.0]]]])
    s = sample_points(t, corners)
    assert s.shape == (1, 1, 2, 2)
    assert s[0, 0].tolist() == [[0.0, 11.0], [3.0, 8.0]]
    # border padding: outside the grid clamps to the edge
    outside = sample_points(t, torch.tensor([[[[-3.0, -3.0]]]]))
    assert float(outside) == 0.0


@pytest.mark.parametrize("n", [2, 3, 5, 16])
def test_derangement_never_pairs_an_image_with_itself(n):
    g = torch.Generator().manual_seed(1)
    for _ in range(200):
        p = random_derangement(n, generator=g)
        assert sorted(p.tolist()) == list(range(n))  # a permutation
        assert not bool((p == torch.arange(n)).any())
    with pytest.raises(ValueError):
        random_derangement(1)


def test_knn_excludes_self_and_is_exact():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(50, 8)).astype(np.float32)
    x[10] = x[3] * 2  # identical direction: self must still be excluded
    for backend in ("faiss", "torch"):
        knn = nearest_neighbors(x, k=5, backend=backend)
        assert knn.shape == (50, 5)
        assert not (knn == np.arange(50)[:, None]).any()
        assert knn[3, 0] == 10 and knn[10, 0] == 3
    xn = x / np.linalg.norm(x, axis=1, keepdims=True)
    sim = xn @ xn.T
    np.fill_diagonal(sim, -np.inf)
    want = np.argsort(-sim, axis=1)[:, :5]
    got = nearest_neighbors(x, k=5, backend="faiss")
    assert (np.sort(got, 1) == np.sort(want, 1)).mean() > 0.99


def test_stego_loss_terms_and_weights():
    g = torch.Generator().manual_seed(0)
    feats, feats_knn = torch.randn(4, 6, 5, 5, generator=g), torch.randn(4, 6, 5, 5, generator=g)
    code = torch.randn(4, 3, 5, 5, generator=g, requires_grad=True)
    code_knn = torch.randn(4, 3, 5, 5, generator=g)
    w = LossWeights(n_samples=4, n_random=3)
    out = stego_loss(feats, feats_knn, code, code_knn, w, generator=torch.Generator().manual_seed(5))
    total = w.w_self * out["self"] + w.w_knn * out["knn"] + w.w_rand * out["rand"]
    assert math.isclose(float(out["loss"].detach()), float(total), rel_tol=1e-5)
    assert out["cd_rand"].shape == (12, 4, 4, 4, 4)  # 3 derangements of a batch of 4
    out["loss"].backward()
    assert code.grad is not None


def test_loss_and_crf_parameter_objects_take_the_config_values_and_share_its_defaults():
    """LossWeights / CRFParams are declared apart from Config (lower layers do not import it):
    a run's values must reach them, and their own defaults must be the config's published ones."""
    import dataclasses

    from stegoseg.config.stego import Config
    from stegoseg.evaluation.crf import CRFParams, crf_params_from
    from stegoseg.training.stego import loss_weights

    cfg = Config(w_self=0.3, b_knn=0.55, n_random=2, n_samples=7, pointwise=False, zero_clamp=False, stabilize=True)
    w = loss_weights(cfg)
    assert (w.w_self, w.b_knn, w.n_random, w.n_samples, w.pointwise, w.zero_clamp, w.stabilize) == (
        0.3, 0.55, 2, 7, False, False, True)
    defaults = Config()
    assert dataclasses.asdict(LossWeights()) == {f.name: getattr(defaults, f.name) for f in dataclasses.fields(LossWeights)}
    assert crf_params_from(dataclasses.asdict(defaults)) == CRFParams()
