"""--protocol reference and its separate quirks (docs/reference_mode.md): each one on and
off changes exactly what it should and nothing else."""
import argparse

import numpy as np
import pytest
import torch
from conftest import tiny_config

from stegoseg.config.stego import (
    CLEAN_PROTOCOL,
    REFERENCE_PROTOCOL,
    add_config_arguments,
    resolve_config,
)


def resolve(*argv):
    p = argparse.ArgumentParser()
    add_config_arguments(p)
    return resolve_config(p.parse_args(list(argv)))


def test_protocol_reference_turns_on_every_quirk_and_explicit_options_win():
    clean = resolve()
    assert {k: getattr(clean, k) for k in CLEAN_PROTOCOL} == CLEAN_PROTOCOL
    assert clean.precision == "auto" and clean.shifts == "auto"
    ref = resolve("--protocol", "reference")
    assert {k: getattr(ref, k) for k in REFERENCE_PROTOCOL} == REFERENCE_PROTOCOL
    assert (ref.select, ref.precision, ref.pos_embed, ref.crf_reference_input) == ("val-miou", "32-true", "dino", True)
    mixed = resolve("--protocol", "reference", "--no-knn-dropout", "--pos-embed", "timm")
    assert mixed.knn_dropout is False and mixed.pos_embed == "timm" and mixed.crop_jpeg is True
    one = resolve("--crop-jpeg")  # one quirk alone under the clean protocol
    assert one.crop_jpeg is True and one.knn_dropout is False and one.train_resample == "bilinear"


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    from stegoseg.data.synthetic import make_synthetic_dataset

    return make_synthetic_dataset(tmp_path_factory.mktemp("ref") / "data", n_train=12, n_val=4, size=(48, 64))


def prepared(root, out, **quirks):
    from stegoseg.features.cache import config_neighbors
    from stegoseg.methods.common import prepare

    cfg = tiny_config(root, cache_dir=str(out), **quirks)
    cache = prepare(cfg, out)
    return cfg, cache, config_neighbors(cfg, cache)


def test_knn_dropout_changes_the_neighbours_only(root, tmp_path):
    cfg, cache, clean = prepared(root, tmp_path / "c")
    _, cache2, noisy = prepared(root, tmp_path / "c", knn_dropout=True)
    assert cache2.path == cache.path  # the same features: dropout only touches the KNN descriptors
    assert not np.array_equal(clean, noisy)
    # the perturbed descriptors are Dropout2d(0.1) on the channel means, seeded
    g = cache.global_descriptors(dropout=0.1, seed=cfg.seed)
    mean = torch.from_numpy(np.asarray(cache.features[:], dtype=np.float32)).mean(dim=(2, 3))
    dropped = (g == 0).mean()
    assert 0.05 < dropped < 0.15  # about a tenth of the channels zeroed
    kept = g != 0
    unit = torch.nn.functional.normalize(mean * torch.from_numpy(kept.astype(np.float32)), dim=1).numpy()
    assert np.allclose(g, unit, atol=1e-6)
    assert np.array_equal(noisy, prepared(root, tmp_path / "c", knn_dropout=True)[2])  # reproducible


def test_jpeg_crops_change_features_not_labels(root, tmp_path):
    _, clean, _ = prepared(root, tmp_path / "c")
    _, jpeg, _ = prepared(root, tmp_path / "c", crop_jpeg=True)
    assert jpeg.path != clean.path and jpeg.spec["crop_jpeg"] is True
    assert not np.array_equal(np.asarray(jpeg.features), np.asarray(clean.features))
    assert np.array_equal(np.asarray(jpeg.labels), np.asarray(clean.labels))


def test_jpeg_round_trip_is_the_reference_file_format():
    import io

    from PIL import Image

    from stegoseg.features.cache import jpeg_round_trip

    img = Image.fromarray((np.random.default_rng(0).random((40, 50, 3)) * 255).astype(np.uint8))
    buf = io.BytesIO()
    img.save(buf, "JPEG")  # PIL's default quality, as the reference's crop files
    assert np.array_equal(np.asarray(jpeg_round_trip(img)), np.asarray(Image.open(buf).convert("RGB")))


def test_nearest_training_resize_changes_images_not_labels(root):
    from stegoseg.features.cache import CropView
    from stegoseg.methods.common import build_split

    train = build_split(tiny_config(root), "train")
    bil, near = CropView(train, 32, True, "bilinear"), CropView(train, 32, True, "nearest")
    a, b = bil[3], near[3]
    assert not torch.equal(a["image"], b["image"]) and torch.equal(a["label"], b["label"])
    # nearest takes pixel values from the source: every value is one of the crop's own colours
    raw = np.asarray(train.load(0).image.crop((32, 24, 64, 48))).reshape(-1, 3)  # crop 3: bottom right
    got = (b["image"].permute(1, 2, 0).reshape(-1, 3) * 255).round().numpy().astype(np.uint8)
    assert {tuple(v) for v in got} <= {tuple(v) for v in raw}


def test_crf_reference_input_reaches_the_crf(root, tmp_path, monkeypatch):
    from stegoseg.evaluation.crf import CRFParams
    from stegoseg.methods.baseline import fit_feature_baseline
    from stegoseg.methods.common import eval_config, evaluate_checkpoint_model

    cfg = tiny_config(root, crf=True, crf_reference_input=True, max_eval_images=2)
    assert eval_config(cfg).crf_params.reference_input is True
    model = fit_feature_baseline(cfg, tmp_path / "b")
    seen = []
    original = type(model).predict

    def spy(self, *a, **k):
        seen.append(k.get("crf_params"))
        return original(self, *a, **k)

    monkeypatch.setattr(type(model), "predict", spy)
    evaluate_checkpoint_model(cfg, model, tmp_path / "e")
    assert seen and all(p == CRFParams(reference_input=True) for p in seen)


def test_pos_embed_option_reaches_the_backbone_and_the_checkpoint(root, tmp_path):
    from stegoseg.methods.baseline import fit_feature_baseline
    from stegoseg.methods.common import build_backbone_from_config
    from stegoseg.model import load

    cfg = tiny_config(root, pos_embed="dino")
    backbone, spec = build_backbone_from_config(cfg)
    assert backbone.pos_embed_mode == "dino" and spec["pos_embed"] == "dino"
    model = fit_feature_baseline(cfg, tmp_path / "b")
    model.save(tmp_path / "m.pt")
    again = load(tmp_path / "m.pt")
    assert again.backbone.pos_embed_mode == "dino"
    x = torch.rand(1, 3, 40, 48)  # a grid other than the stored one: the resampling matters
    assert torch.equal(again.code(x), model.code(x))
    clean, _ = build_backbone_from_config(tiny_config(root))
    clean.load_state_dict(backbone.state_dict())
    assert not torch.allclose(clean.features(x), backbone.features(x))


def test_reference_protocol_trains_fp32_and_selects_by_val_miou(root, tmp_path):
    import json

    from stegoseg.methods.stego import train_stego
    from stegoseg.training.trainer import default_precision

    cfg = tiny_config(root, protocol="reference", select="val-miou", precision="32-true", knn_dropout=True,
                      crop_jpeg=True, train_resample="nearest", steps=4, ckpt_every=2)
    assert default_precision(cfg.precision, "gpu") == "32-true"
    train_stego(cfg, tmp_path / "t")
    sel = json.loads((tmp_path / "t" / "selection.json").read_text())
    assert sel["mode"] == "val-miou" and all("val_cluster_miou" in r for r in sel["candidates"].values())
    best = max(sel["candidates"].values(), key=lambda r: r["val_cluster_miou"])
    assert sel["chosen_step"] == best["step"]


def test_crf_settings_are_config_options_recorded_in_the_checkpoint(root):
    from stegoseg.evaluation.crf import CRFParams, crf_params_from
    from stegoseg.methods.common import eval_config

    assert crf_params_from({}) == CRFParams()  # the published settings by default
    cfg = tiny_config(root, crf_iterations=3, crf_bi_rgb_std=5.0, crf_reference_input=True)
    params = eval_config(cfg).crf_params
    assert (params.iterations, params.bi_rgb_std, params.reference_input, params.pos_w) == (3, 5.0, True, 3.0)
    assert crf_params_from(cfg.to_dict()) == params  # what `segment` reads from a checkpoint's config
