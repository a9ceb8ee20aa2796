import json

import numpy as np
import pytest
import torch

from stegoseg.errors import StegosegError
from stegoseg.evaluation.metrics import (
    ConfusionAccumulator,
    cluster_metrics,
    confusion_counts,
    linear_metrics,
    plot_confusion,
    save_metrics_json,
)


def test_confusion_counts_by_hand():
    preds = np.array([0, 0, 1, 1, 2, 2])
    targets = np.array([0, 1, 1, 1, 0, 255])
    conf = confusion_counts(preds, targets, n_preds=3, n_classes=2)
    # rows: predicted id, columns: true class; the 255 pixel is skipped
    assert conf.tolist() == [[1, 1], [0, 2], [1, 0]]


def test_cluster_metrics_permuted_perfect_prediction():
    targets = np.array([[0, 0, 1, 1], [2, 2, 255, 1]])
    perm = {0: 2, 1: 0, 2: 1}
    preds = np.vectorize(lambda t: perm.get(t, 0))(targets)
    m = cluster_metrics(preds, targets, n_classes=3)
    assert m["miou"] == pytest.approx(100.0)
    assert m["accuracy"] == pytest.approx(100.0)
    assert m["assignment"] == [1, 2, 0]  # cluster 0 -> class 1, etc.
    assert m["n_pixels"] == 7


def test_cluster_metrics_hand_computed_iou():
    # 2 classes, 2 clusters. Confusion (pred rows, true cols): [[3, 1], [1, 5]]
    preds = np.array([0, 0, 0, 0, 1, 1, 1, 1, 1, 1])
    targets = np.array([0, 0, 0, 1, 0, 1, 1, 1, 1, 1])
    m = cluster_metrics(preds, targets, n_classes=2)
    # class 0: tp 3, fp 1, fn 1 -> 3/5; class 1: tp 5, fp 1, fn 1 -> 5/7
    assert m["per_class_iou"]["0"] == pytest.approx(60.0)
    assert m["per_class_iou"]["1"] == pytest.approx(500 / 7)
    assert m["miou"] == pytest.approx((60.0 + 500 / 7) / 2)
    assert m["accuracy"] == pytest.approx(80.0)


def test_more_clusters_than_classes_strict_vs_parity():
    # classes 0/1; clusters 0, 1 and an extra cluster 2 holding 2 pixels of class 0
    preds = np.array([0, 0, 0, 1, 1, 1, 2, 2])
    targets = np.array([0, 0, 0, 1, 1, 1, 0, 0])
    strict = cluster_metrics(preds, targets, n_classes=2, mode="strict")
    parity = cluster_metrics(preds, targets, n_classes=2, mode="parity")
    # strict: the extra cluster is matched to no class, so its 2 pixels are errors
    assert strict["n_pixels"] == 8
    assert strict["accuracy"] == pytest.approx(75.0)
    # class 0: tp 3, fp 0, fn 2 -> 60%; class 1: 100%
    assert strict["per_class_iou"]["0"] == pytest.approx(60.0)
    assert strict["miou"] == pytest.approx(80.0)
    # parity (reference): pixels with cluster id >= n_classes are dropped before counting
    assert parity["n_pixels"] == 6
    assert parity["accuracy"] == pytest.approx(100.0)
    assert parity["miou"] == pytest.approx(100.0)


def test_extra_cluster_can_win_the_match_in_strict_mode():
    # cluster 2 is the best match for class 0; strict mode may use it, parity cannot see it
    preds = np.array([2, 2, 2, 2, 0, 1, 1, 1])
    targets = np.array([0, 0, 0, 0, 0, 1, 1, 1])
    strict = cluster_metrics(preds, targets, n_classes=2, mode="strict")
    assert strict["assignment"][2] == 0 and strict["assignment"][1] == 1
    assert strict["accuracy"] == pytest.approx(7 / 8 * 100)


def test_ignore_pixels_and_absent_class_nan():
    preds = np.array([0, 1, 1, 0])
    targets = np.array([0, 1, 255, 255])
    m = cluster_metrics(preds, targets, n_classes=3)
    assert m["n_pixels"] == 2
    assert m["per_class_iou"]["2"] is None  # absent from truth and prediction: NaN, excluded
    assert m["miou"] == pytest.approx(100.0)


def test_linear_metrics_identity_mapping():
    preds = np.array([1, 0, 1, 1])
    targets = np.array([0, 0, 1, 1])
    m = linear_metrics(preds, targets, n_classes=2)
    assert m["assignment"] == [0, 1]
    assert m["accuracy"] == pytest.approx(75.0)
    # class 0: tp 1, fp 0, fn 1 -> 50%; class 1: tp 2, fp 1, fn 0 -> 66.7%
    assert m["miou"] == pytest.approx((50 + 200 / 3) / 2)


def test_streaming_equals_one_shot():
    rng = np.random.default_rng(0)
    preds = rng.integers(0, 5, size=(6, 10, 10))
    targets = rng.integers(0, 4, size=(6, 10, 10))
    targets[0, :3] = 255
    acc = ConfusionAccumulator(5, 4)
    for p, t in zip(preds, targets):
        acc.update(torch.from_numpy(p), torch.from_numpy(t))
    streamed = acc.compute("strict")
    once = cluster_metrics(preds, targets, n_classes=4, n_clusters=5)
    assert streamed["miou"] == pytest.approx(once["miou"])
    assert streamed["accuracy"] == pytest.approx(once["accuracy"])


def test_bad_inputs():
    with pytest.raises(StegosegError, match="mode"):
        cluster_metrics(np.zeros(3), np.zeros(3), 2, mode="other")
    with pytest.raises(StegosegError, match="shapes"):
        cluster_metrics(np.zeros(3), np.zeros(4), 2)
    with pytest.raises(StegosegError, match="n_clusters"):
        confusion_counts(np.array([5]), np.array([0]), 2, 2)


def test_outputs_json_and_png(tmp_path):
    m = cluster_metrics(np.array([0, 1, 1]), np.array([0, 1, 0]), n_classes=2, class_names=["a", "b"])
    save_metrics_json(m, tmp_path / "m.json")
    assert json.loads((tmp_path / "m.json").read_text())["per_class_iou"]["a"] == pytest.approx(50.0)
    plot_confusion(m, tmp_path / "c.png")
    assert (tmp_path / "c.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
