"""--pca-dim: a reduced-dimension feature cache (features.projection), end to end."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import one_line_error, tiny_cli

from stegoseg.backbones.backbone import create_backbone
from stegoseg.cli import main
from stegoseg.errors import StegosegError
from stegoseg.features import projection
from stegoseg.features.cache import check_cache_space, thumb_size
from stegoseg.model import SegmentationModel, load
from stegoseg import preflight

TINY = ["--no-crf", "--shifts", "fixed", "--cluster-fit", "online", "--steps", "4", "--ckpt-every", "2"]


def test_projected_backbone_returns_weight_times_centred_features(one_thread):
    torch.manual_seed(0)
    plain = create_backbone("dino_vits8", pretrained=False, tiny=True)
    projected = create_backbone("dino_vits8", pretrained=False, tiny=True)
    projected.load_state_dict(plain.state_dict())
    c = plain.embed_dim
    weight, mean = torch.randn(5, c), torch.randn(c)
    keys = list(projected.state_dict())
    projected.project_onto(mean, weight)
    x = torch.rand(2, 3, 24, 40)
    raw = plain.features(x)
    expected = torch.einsum("dc,bchw->bdhw", weight, raw - mean.view(1, -1, 1, 1))
    got = projected.features(x)
    assert got.shape == (2, 5, 3, 5) and projected.embed_dim == 5 and projected.raw_dim == c
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert list(projected.state_dict()) == keys  # the weights stay the preset's; the projection is separate
    with pytest.raises(StegosegError, match="does not fit"):
        plain.project_onto(torch.zeros(c + 1), torch.randn(4, c + 1))


def test_fit_keeps_the_row_space_of_low_rank_features():
    """Features of rank 3 in 12 channels: 3 directions keep all the energy and span the
    features' row space; the directions are numpy's top right singular vectors (up to sign)."""
    rng = np.random.default_rng(0)
    x = (rng.normal(size=(500, 3)) + 2.0) @ rng.normal(size=(3, 12))  # rank 3, far from centred
    state = projection.fit_projection(x, 3, seed=0)
    w = state["weight"].double().numpy()
    assert state["energy_kept"] == pytest.approx(1.0, abs=1e-6)  # float32 directions
    np.testing.assert_allclose(x @ w.T @ w, x, rtol=1e-5, atol=1e-5)
    vt = np.linalg.svd(x, full_matrices=False)[2][:3]
    np.testing.assert_allclose(np.abs(w @ vt.T), np.eye(3), atol=1e-6)
    assert torch.equal(state["mean"], torch.zeros(12))
    two = projection.fit_projection(x, 2, seed=0)
    s = np.linalg.svd(x, compute_uv=False)
    assert two["energy_kept"] == pytest.approx((s[:2] ** 2).sum() / (s ** 2).sum(), rel=1e-6)
    with pytest.raises(StegosegError, match="--pca-dim 12 must be between 1 and 11"):
        projection.fit_projection(x, 12, seed=0)


def test_cache_space_error_names_each_choice_with_its_size(tmp_path, monkeypatch):
    monkeypatch.setattr(preflight, "free_bytes", lambda folder: 1000)
    n, cells, r = 5000, 784, 224
    t = thumb_size(r)

    def size(channels, items):
        return preflight.human_bytes(items * (channels * cells * 2 + 3 * t * t + r * r))

    with pytest.raises(StegosegError) as err:
        check_cache_space(tmp_path, n, 384, cells, r, True, five_crop=True)
    line = str(err.value)
    assert "\n" not in line and "--cache-dir" in line
    assert f"--no-five-crop ({size(384, n // 5)}" in line
    assert f"--pca-dim 128 ({size(128, n)})" in line and f"--pca-dim 64 ({size(64, n)})" in line
    assert f"both --no-five-crop and --pca-dim 64 ({size(64, n // 5)})" in line


@pytest.fixture(scope="module")
def pca_run(tmp_path_factory, synthetic_root):
    out = tmp_path_factory.mktemp("pca") / "run"
    torch.set_num_threads(1)
    assert main(["train", "--data-root", str(synthetic_root), "--out", str(out), *tiny_cli("train", *TINY),
                 "--pca-dim", "8", "--pca-sample", "20"]) == 0
    return out


def test_training_with_pca_dim_caches_and_stores_the_projection(pca_run, synthetic_root, tmp_path, one_thread):
    (meta_file,) = (pca_run / "cache").glob("*/meta.json")
    meta = json.loads(meta_file.read_text())
    assert meta["feature_shape"][0] == 8 and meta["spec"]["projection"] is not None
    (fitted,) = (pca_run / "cache" / "projections").glob("pca8-*.pt")
    state = torch.load(fitted, weights_only=True)
    assert state["key"]["sample"] == 20 and state["n_vectors"] == 20 * min(projection.PATCHES_PER_CROP, (32 // 8) ** 2)

    from stegoseg.checkpoint_io import read_checkpoint_file

    assert read_checkpoint_file(pca_run / "checkpoint.pt")["version"] == 2  # older readers refuse it clearly
    model = load(pca_run / "checkpoint.pt")
    assert model.head.in_dim == 8 and model.backbone.embed_dim == 8
    torch.testing.assert_close(model.backbone.proj_weight.cpu(), state["weight"])
    # the checkpoint's backbone = a plain backbone of its spec, then the stored projection
    plain = create_backbone("dino_vits8", pretrained=False, tiny=True)
    plain.load_state_dict(model.backbone.state_dict())
    x = torch.rand(1, 3, 32, 48)
    expected = torch.einsum("dc,bchw->bdhw", state["weight"], plain.features(x))
    torch.testing.assert_close(model.backbone.features(x), expected, rtol=1e-5, atol=1e-5)
    # and a save_pretrained folder keeps it
    folder = model.save_pretrained(tmp_path / "pretrained")
    again = SegmentationModel.from_pretrained(folder)
    torch.testing.assert_close(again.backbone.proj_weight, model.backbone.proj_weight)
    image = sorted((synthetic_root / "imgs" / "val").iterdir())[0]
    assert np.array_equal(again.segment(image, crf=False), model.segment(image, crf=False))


def test_a_rerun_reads_the_stored_projection(pca_run, synthetic_root, monkeypatch, one_thread):
    def no_fit(*args, **kwargs):
        raise AssertionError("the projection was fitted again")

    monkeypatch.setattr(projection, "fit_projection", no_fit)
    caches = sorted(p.name for p in (pca_run / "cache").iterdir())
    assert main(["prepare", "--data-root", str(synthetic_root), "--out", str(pca_run),
                 *tiny_cli("prepare"), "--pca-dim", "8", "--pca-sample", "20"]) == 0
    assert sorted(p.name for p in (pca_run / "cache").iterdir()) == caches


def test_resuming_with_another_projection_is_one_line(pca_run, synthetic_root, capsys):
    one_line_error(capsys, ["train", "--data-root", str(synthetic_root), "--out", str(pca_run),
                            *tiny_cli("train", *TINY), "--pca-dim", "6", "--pca-sample", "20", "--resume"],
                   "trained on features projected onto 8 channels", "--pca-dim")


@pytest.mark.parametrize("value, fragment", [("32", "--pca-dim 32 must be below the 32 channels"),
                                             ("0", "--pca-dim must be >= 1")])
def test_bad_pca_dim_is_one_line(synthetic_root, tmp_path, capsys, value, fragment):
    one_line_error(capsys, ["train", "--data-root", str(synthetic_root), "--out", str(tmp_path / "o"),
                            *tiny_cli("train", *TINY), "--pca-dim", value], fragment)
    cache = tmp_path / "o" / "cache"
    assert not list(cache.glob("*/meta.json")) and not (cache / "projections").exists()  # no work done


def test_resume_reads_settings_added_since_as_their_defaults(tmp_path, synthetic_root):
    """A run interrupted before --pca-sample / --knn-index existed resumes (they read as their
    defaults there); a real change is still refused."""
    from conftest import tiny_config
    from stegoseg.training.resume import RUN_CONFIG, resume_checkpoint

    cfg = tiny_config(synthetic_root)
    old = {k: v for k, v in json.loads(json.dumps(cfg.to_dict())).items() if k not in ("pca_sample", "knn_index")}
    (tmp_path / "lightning").mkdir()
    (tmp_path / RUN_CONFIG).write_text(json.dumps(old))
    assert resume_checkpoint(tmp_path / "lightning", cfg) is None  # nothing to continue from, and no refusal
    from stegoseg.config.stego import replace

    with pytest.raises(StegosegError, match="--pca-sample 256 -> 100"):
        resume_checkpoint(tmp_path / "lightning", replace(cfg, pca_sample=100))


def test_the_expected_cache_size_is_logged_before_any_work(tmp_path, caplog):
    import logging

    n, cells, r = 1835, 784, 224
    t = thumb_size(r)
    with caplog.at_level(logging.INFO, logger="stegoseg"):
        check_cache_space(tmp_path, n, 64, cells, r, False, five_crop=True)
    total = preflight.human_bytes(n * (64 * cells * 2 + 3 * t * t))
    assert any(f"1,835 items x {preflight.human_bytes(64 * cells * 2 + 3 * t * t)} = {total}" in m
               for m in caplog.messages), caplog.messages
