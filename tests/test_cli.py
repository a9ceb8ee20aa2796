import json

import numpy as np
import pytest
import torch
from conftest import tiny_cli
from PIL import Image

import stegoseg
import stegoseg.errors
from stegoseg.cli import main


def test_help_of_every_subcommand(capsys):
    for sub in ("run", "prepare", "train", "evaluate", "segment", "baseline", "backbones", "make-synthetic"):
        with pytest.raises(SystemExit) as e:
            main([sub, "--help"])
        assert e.value.code == 0
        assert "usage" in capsys.readouterr().out


def test_baseline_command_end_to_end(synthetic_root, tmp_path, capsys):
    out = tmp_path / "baseline"
    assert main(["baseline", "--out", str(out), "--data-root", str(synthetic_root), *tiny_cli("baseline")]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    # no extra clusters: parity and strict counting agree; the linear probe beats chance (4 classes)
    assert metrics["cluster"]["parity"]["miou"] == pytest.approx(metrics["cluster"]["strict"]["miou"])
    assert metrics["linear"]["accuracy"] > 50
    assert metrics["method"] == "features"
    for name in ("config.yaml", "checkpoint.pt", "confusion_cluster.png", "confusion_linear.png", "predictions.png"):
        assert (out / name).exists(), name
    # a second run into the same folder refuses to overwrite
    assert main(["baseline", "--out", str(out), "--data-root", str(synthetic_root), *tiny_cli("baseline")]) == 2
    assert "--overwrite" in capsys.readouterr().err


def test_main_job_then_evaluate_and_segment(synthetic_root, tmp_path, capsys):
    out = tmp_path / "run"
    args = ["run", "--out", str(out), "--data-root", str(synthetic_root), "--steps", "6", "--crf", *tiny_cli("run")]
    assert main(args) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary) == {"STEGO", "raw features (k-means / linear)"}
    report = (out / "report.md").read_text()
    assert "RANDOMLY INITIALISED" in report and "| STEGO |" in report
    assert (out / "train" / "checkpoint.pt").exists()
    assert len(list((out / "segment").glob("*_overlay.png"))) == 8

    # evaluate the checkpoint again with an overridden protocol
    ev = tmp_path / "eval"
    assert main(["evaluate", str(out / "train" / "checkpoint.pt"), "--out", str(ev), "--no-crf", "--no-flip",
                 "--eval-crop", "none", "--no-progress"]) == 0
    m = json.loads((ev / "metrics.json").read_text())
    assert m["config"]["crop"] == "none" and m["config"]["flip"] is False

    # segment a folder and a single greyscale image from the command line
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    Image.fromarray((np.random.default_rng(0).random((50, 70)) * 255).astype(np.uint8), "L").save(imgs / "grey.png")
    Image.fromarray((np.random.default_rng(1).random((40, 30, 3)) * 255).astype(np.uint8)).save(imgs / "rgb.jpg")
    seg = tmp_path / "seg"
    assert main(["segment", str(out / "train" / "checkpoint.pt"), str(imgs), "--out", str(seg), "--quiet",
                 "--num-workers", "0", "--device", "cpu"]) == 0
    label = Image.open(seg / "grey.png")
    assert label.mode == "P" and label.size == (70, 50)
    assert Image.open(seg / "rgb_overlay.png").size == (30, 40)
    # a rerun skips the finished outputs (rewrites nothing); never write over inputs
    stamp = (seg / "grey_overlay.png").stat().st_mtime_ns
    assert main(["segment", str(out / "train" / "checkpoint.pt"), str(imgs), "--out", str(seg), "--quiet"]) == 0
    assert (seg / "grey_overlay.png").stat().st_mtime_ns == stamp
    assert main(["segment", str(out / "train" / "checkpoint.pt"), str(imgs / "rgb.jpg"), "--out", str(imgs), "--quiet"]) == 0
    assert main(["segment", str(out / "train" / "checkpoint.pt"), str(seg / "grey.png"), "--out", str(seg),
                 "--quiet", "--overwrite"]) == 2
    assert "is an input image" in capsys.readouterr().err

    # Python API
    model = stegoseg.load(out / "train" / "checkpoint.pt")
    labels = model.segment(Image.open(imgs / "rgb.jpg"))
    assert labels.shape == (40, 30) and labels.max() < model.n_clusters
    assert model.code(torch.zeros(1, 3, 32, 32)).shape == (1, 16, 4, 4)
    assert model.features(torch.zeros(1, 3, 30, 30)).shape[-2:] == (4, 4)


def test_clear_errors_for_bad_input(tmp_path, capsys):
    assert main(["baseline", "--out", str(tmp_path / "x"), "--data-root", str(tmp_path / "missing"), *tiny_cli("baseline")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "missing" in err[0]
    assert main(["baseline", "--out", str(tmp_path / "x"), "--backbone", "nope", "--data-root", str(tmp_path)]) == 2
    assert "nope" in capsys.readouterr().err
    assert main(["evaluate", str(tmp_path / "none.pt")]) == 2
    assert "none.pt" in capsys.readouterr().err
    bad = tmp_path / "bad.yaml"
    bad.write_text("not_an_option: 3\n")
    assert main(["train", "--config", str(bad), "--out", str(tmp_path / "t")]) == 2
    assert "not_an_option" in capsys.readouterr().err


def test_yaml_config_and_presets(tmp_path):
    import argparse

    from stegoseg.config.stego import add_config_arguments, resolve_config

    p = argparse.ArgumentParser()
    add_config_arguments(p)
    y = tmp_path / "c.yaml"
    y.write_text("steps: 123\nw_knn: 0.5\n")
    cfg = resolve_config(p.parse_args(["--preset", "cityscapes27", "--config", str(y), "--w-knn", "0.7"]))
    assert cfg.steps == 123 and cfg.w_knn == 0.7 and cfg.b_rand == 0.31 and cfg.pointwise is False
    assert resolve_config(p.parse_args(["--no-five-crop", "--n-classes", "none"])).five_crop is False


def test_label_free_run_gives_cluster_maps_only(tmp_path):
    from stegoseg.data.synthetic import make_synthetic_dataset

    root = make_synthetic_dataset(tmp_path / "data", n_train=12, n_val=4, size=(48, 64), with_labels=False)
    out = tmp_path / "run"
    # without labels the number of clusters must be given
    assert main(["run", "--out", str(out), "--data-root", str(root), "--steps", "3", *tiny_cli("run")]) == 2
    assert main(["run", "--out", str(out), "--data-root", str(root), "--steps", "3", "--n-classes", "3", *tiny_cli("run")]) == 0
    metrics = json.loads((out / "eval" / "metrics.json").read_text())
    assert "cluster" not in metrics and metrics["n_images"] == 4
    assert (out / "eval" / "predictions.png").exists()
    model = stegoseg.load(out / "train" / "checkpoint.pt")
    assert model.linear_probe is None and model.n_clusters == 3
    with pytest.raises(stegoseg.errors.StegosegError, match="linear probe"):
        model.segment(np.zeros((20, 20, 3), np.uint8), probe="linear")


def test_class_names_option(synthetic_root, tmp_path):
    out = tmp_path / "b"
    names = "a,b,c,d"
    assert main(["baseline", "--out", str(out), "--data-root", str(synthetic_root), "--class-names", names, *tiny_cli("baseline")]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert list(metrics["cluster"]["strict"]["per_class_iou"]) == ["a", "b", "c", "d"]


def test_tiny_dinov3_prepare_train_segment(synthetic_root, tmp_path):
    """A tiny random DINOv3 (Eva, rotary positions, 4 registers) through prepare, train and segment."""
    cache = tmp_path / "cache"
    common = ["--data-root", str(synthetic_root), "--backbone", "dinov3_vits16", "--cache-dir", str(cache)]
    assert main(["prepare", *common, *tiny_cli("prepare", "--resolution", "48")]) == 0
    meta = json.loads(next(cache.glob("*/meta.json")).read_text())
    assert meta["spec"]["backbone"] == "dinov3_vits16" and meta["feature_shape"] == [32, 3, 3]
    train = tmp_path / "train"
    assert main(["train", "--out", str(train), "--steps", "4", *common, *tiny_cli("train", "--resolution", "48")]) == 0
    model = stegoseg.load(train / "checkpoint.pt")
    assert model.backbone.name == "dinov3_vits16" and model.backbone.patch_size == 16
    # any size: a 40x72 image is padded to 48x80, a 3x5 grid of rotary positions
    assert model.features(torch.zeros(1, 3, 40, 72)).shape == (1, 32, 3, 5)
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    Image.fromarray((np.random.default_rng(2).random((40, 72, 3)) * 255).astype(np.uint8)).save(imgs / "a.png")
    seg = tmp_path / "seg"
    assert main(["segment", str(train / "checkpoint.pt"), str(imgs), "--out", str(seg), "--quiet",
                 "--num-workers", "0", "--device", "cpu"]) == 0
    assert Image.open(seg / "a.png").size == (72, 40)
