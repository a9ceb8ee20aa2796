import json

import numpy as np
import pytest
import torch
from conftest import tiny_config

from stegoseg.nn.heads import ProjectionHead
from stegoseg.studies.dimred import (
    SharedFeatures,
    add_cli,
    fit_probes_with_head,
    parse_dims,
    random_projection_head,
    resolve_dims,
    streamed_pca,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def _stream(x, batch=50):
    return (x[s : s + batch] for s in range(0, len(x), batch))


def test_streamed_pca_matches_sklearn_and_variance_is_monotone():
    from sklearn.decomposition import PCA

    rng = np.random.default_rng(0)
    x = rng.normal(size=(400, 12)) @ rng.normal(size=(12, 12)) + 3.0  # correlated, not centred
    pca = streamed_pca(_stream(torch.from_numpy(x).float()))
    ref = PCA().fit(x)
    np.testing.assert_allclose(pca.explained_variance_ratio.numpy(), ref.explained_variance_ratio_, rtol=1e-4, atol=1e-6)
    cum = pca.cumulative_ratio.numpy()
    assert (np.diff(cum) >= -1e-12).all() and cum[0] > 0
    assert cum[-1] == pytest.approx(1.0, abs=1e-9)
    # components agree up to sign
    dots = np.abs((pca.components.numpy() * ref.components_).sum(1))
    np.testing.assert_allclose(dots[:6], 1.0, atol=1e-3)
    # the d-dimensional head projects centred vectors onto the top components
    head = pca.head(3)
    feats = torch.from_numpy(x[:8]).float().T.reshape(1, 12, 2, 4)
    code = head(feats)
    assert code.shape == (1, 3, 2, 4)
    expected = ref.transform(x[:8])[:, :3] * np.sign((pca.components.numpy()[:3] * ref.components_[:3]).sum(1))
    np.testing.assert_allclose(code[0].reshape(3, 8).T.numpy(), expected, rtol=1e-3, atol=1e-3)


def test_random_projection_is_seeded_with_gaussian_entries():
    a, b = random_projection_head(256, 64, seed=0), random_projection_head(256, 64, seed=0)
    assert torch.equal(a.weight, b.weight) and not torch.equal(a.weight, random_projection_head(256, 64, seed=1).weight)
    assert a.weight.std().item() == pytest.approx(1 / 8, rel=0.05)  # N(0, 1/d), d = 64
    assert a(torch.randn(2, 256, 3, 3)).shape == (2, 64, 3, 3)


def test_dims_parsing_and_clipping():
    assert parse_dims("C, 64,8") == ["C", 64, 8]
    assert resolve_dims(None, 32) == [32, 16, 8, 4, 2]
    assert resolve_dims("8,500,C,2", 32) == [32, 8, 2]
    from stegoseg.errors import StegosegError

    with pytest.raises(StegosegError, match="--dims"):
        parse_dims("8,x")


def test_projection_probes_run_and_identity_head_reproduces_the_baseline(synthetic_root, tmp_path):
    from stegoseg.methods.baseline import fit_feature_baseline
    from stegoseg.methods.common import build_backbone_from_config, build_split, prepare
    from stegoseg.model import load

    cfg = tiny_config(synthetic_root, cache_dir=str(tmp_path / "cache"), kmeans_iters=3, linear_epochs=1)
    torch.manual_seed(0)
    backbone, _ = build_backbone_from_config(cfg)
    cache = prepare(cfg, tmp_path, backbone)
    train = build_split(cfg, "train")
    width = backbone.embed_dim
    torch.rand(13)  # the baseline seeds its probes itself: the caller's RNG state must not matter
    state = torch.get_rng_state()
    base = fit_feature_baseline(cfg, tmp_path, cache=cache, backbone=backbone)
    assert torch.equal(torch.get_rng_state(), state)  # and leaves it untouched
    ident = fit_probes_with_head(cfg, cache, ProjectionHead.from_matrix(torch.eye(width)), backbone, train.n_classes)
    torch.testing.assert_close(ident.cluster_probe.centroids, base.cluster_probe.centroids)
    torch.testing.assert_close(ident.linear_probe.conv.weight, base.linear_probe.conv.weight)

    model = fit_probes_with_head(cfg, cache, random_projection_head(width, 4), backbone, train.n_classes, method="rp")
    x = torch.rand(2, 3, 40, 48)
    assert model.code(x).shape == (2, 4, 5, 6)
    assert model.cluster_probe.centroids.shape == (train.n_classes, 4)
    assert model.predict(x)["linear"].shape == (2, 40, 48)
    # a projection head survives save / load
    path = model.save(tmp_path / "rp.pt")
    loaded = load(path)
    assert isinstance(loaded.head, ProjectionHead) and loaded.method == "rp"
    torch.testing.assert_close(loaded.code(x), model.code(x))
    # shared features: identical results, the backbone runs once per distinct input
    shared = SharedFeatures(backbone)
    model.backbone = shared
    first, again = model.code(x, flip=True), model.code(x, flip=True)
    torch.testing.assert_close(first, loaded.code(x, flip=True))
    torch.testing.assert_close(again, first)
    assert (shared.misses, shared.hits) == (2, 2)


def test_study_dimred_command_end_to_end(synthetic_root, tmp_path, capsys):
    import argparse

    from conftest import TINY_CLI as TINY

    parser = argparse.ArgumentParser(prog="stegoseg")
    add_cli(parser.add_subparsers(dest="command"))
    out = tmp_path / "study"
    argv = ["study-dimred", "--out", str(out), "--data-root", str(synthetic_root), *TINY, "--dims", "C,8,2",
            "--stego-dims", "8", "--dim", "8", "--steps", "3", "--ckpt-every", "3", "--log-every", "1", "--n-grid", "2"]
    args = parser.parse_args(argv)
    assert args.func(args) == 0
    table = json.loads((out / "dimred_table.json").read_text())
    rows = table["rows"]
    width = table["meta"]["width"]
    assert table["meta"]["dims"] == [width, 8, 2]
    keys = [(r["method"], r["dim"]) for r in rows]
    assert len(keys) == len(set(keys)) == 1 + 2 * 3 + 1
    assert {k for k in keys if k[0] in ("pca", "rp")} == {(m, d) for m in ("pca", "rp") for d in (width, 8, 2)}
    assert ("backbone", width) in keys and ("stego", 8) in keys
    for r in rows:  # no extra clusters: parity and strict counting agree in every row
        assert r["cluster_parity_acc"] == pytest.approx(r["cluster_strict_acc"]), (r["method"], r["dim"])
    ev = json.loads((out / "explained_variance.json").read_text())
    cum = np.asarray(ev["cumulative"])
    assert len(cum) == width and (np.diff(cum) >= -1e-9).all() and cum[-1] == pytest.approx(1.0, abs=1e-6)
    t1 = json.loads((out / "koenig_table1.json").read_text())
    assert [r["method"] for r in t1["rows"]] == ["backbone", "stego"] and t1["random_backbone"]
    md = (out / "dimred_table.md").read_text()
    assert "RANDOMLY INITIALISED" in md and "| PCA | 8 |" in md
    for name in ("dimred_metrics.png", "explained_variance.png", "koenig_table1.md", "pca-d8/predictions.png",
                 "stego-d8/train/checkpoint.pt"):
        assert (out / name).exists(), name
    assert table["meta"]["feature_memo"]["hits"] > 0
    assert "| backbone only |" in capsys.readouterr().out
    # refuses to overwrite
    args = parser.parse_args(argv)
    from stegoseg.errors import StegosegError

    with pytest.raises(StegosegError, match="--overwrite"):
        args.func(args)
    # --resume reuses the finished rows whose config is the same (projections ignore STEGO's options)
    args = parser.parse_args([*argv, "--resume", "--steps", "5", "--no-stego-sweep", "--no-table1", "--methods", "rp"])
    assert args.func(args) == 0
    again = json.loads((out / "dimred_table.json").read_text())["rows"]
    assert [r["method"] for r in again] == ["backbone", "rp", "rp", "rp"] and all(r.get("reused") for r in again)
    before = {(r["method"], r["dim"]): r for r in rows}
    for r in again:
        assert r["cluster_strict_acc"] == before[(r["method"], r["dim"])]["cluster_strict_acc"]
    # ... and recomputes a row when a value it depends on differs
    args = parser.parse_args([*argv, "--resume", "--n-grid", "3", "--dims", "2", "--methods", "rp", "--no-stego-sweep",
                              "--no-table1"])
    assert args.func(args) == 0
    again = json.loads((out / "dimred_table.json").read_text())["rows"]
    assert [(r["method"], bool(r.get("reused"))) for r in again] == [("backbone", False), ("rp", False)]
