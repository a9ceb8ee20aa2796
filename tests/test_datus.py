import json

import numpy as np
import pytest
import torch
from conftest import tiny_cli

from stegoseg.cli import main
from stegoseg.errors import StegosegError
from stegoseg.methods.datus import (
    DatusParams,
    affinity_graph,
    louvain_segments,
    merge_small_segments,
    paint,
    segment_crops,
)


def _blobs(sizes=(30, 25, 20), dim=16, noise=0.05, seed=0):
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(len(sizes), dim, generator=g) * 3
    x = torch.cat([c + noise * torch.randn(n, dim, generator=g) for c, n in zip(centres, sizes)])
    truth = np.concatenate([[i] * n for i, n in enumerate(sizes)])
    return x, truth


def test_louvain_recovers_known_communities():
    x, truth = _blobs()
    labels = louvain_segments(x, DatusParams(knn=8, min_patches=2))
    # the same partition up to renaming: each true community maps to exactly one label and back
    pairs = set(zip(truth.tolist(), labels.tolist()))
    assert len(pairs) == 3 and len(set(labels.tolist())) == 3


def test_graph_is_sparse_knn_with_positive_weights():
    x, _ = _blobs()
    g = affinity_graph(x, knn=5, min_similarity=0.5)
    assert g.number_of_nodes() == 75
    assert all(d["weight"] >= 0.5 for _, _, d in g.edges(data=True))
    assert max(dict(g.degree()).values()) <= 2 * 5 * 3  # kNN graph, no dense block


def test_small_segments_are_merged_into_most_similar():
    x, truth = _blobs(sizes=(20, 20, 2))
    x[-2:] = x[0] + 0.01  # the tiny third group looks like group 0
    merged = merge_small_segments(truth, x, min_size=3)
    assert sorted(set(merged.tolist())) == [0, 1]
    assert merged[-1] == merged[0]


def test_paint_and_crops():
    seg = np.array([[0, 0, 1], [2, 2, 1]])
    assert paint(seg, np.array([5, 6, 7])).tolist() == [[5, 5, 6], [7, 7, 6]]
    img = np.zeros((2, 3, 3), np.uint8)
    img[..., 0] = 200
    crops = segment_crops(img, seg, 8)
    assert len(crops) == 3 and crops[0].shape == (3, 8, 8)
    with pytest.raises(StegosegError, match="empty"):
        segment_crops(img, np.array([[0, 0, 2], [2, 2, 2]]), 8)


def test_datus_cli_end_to_end_and_compare(synthetic_root, tmp_path, capsys):
    out = tmp_path / "datus"
    assert main(["datus", "--out", str(out), "--data-root", str(synthetic_root), *tiny_cli("datus")]) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["n_segments"] >= m["n_clusters"] == 4
    assert m["cluster"]["parity"]["miou"] == pytest.approx(m["cluster"]["strict"]["miou"])  # K = classes
    assert (out / "predictions.png").exists() and (out / "confusion_cluster.png").exists()
    assert main(["datus", "--out", str(tmp_path / "dn"), "--data-root", str(synthetic_root), "--denoise", "light",
                 "--denoise-epochs", "2", *tiny_cli("datus")]) == 0
    assert json.loads((tmp_path / "dn" / "metrics.json").read_text())["method"] == "datus2+light"
    capsys.readouterr()
    assert main(["compare", str(out), str(tmp_path / "dn")]) == 0
    table = capsys.readouterr().out
    assert "datus2+light" in table and table.count("\n") == 4


def test_datus_bad_inputs(synthetic_root, tmp_path, capsys):
    # more clusters than segments
    assert main(["datus", "--out", str(tmp_path / "a"), "--data-root", str(synthetic_root), "--clusters", "5000",
                 *tiny_cli("datus")]) == 2
    assert "segments" in capsys.readouterr().err
    # an image smaller than one patch
    assert main(["datus", "--out", str(tmp_path / "b"), "--data-root", str(synthetic_root),
                 "--no-pretrained", "--tiny", "--eval-resolution", "4", "--no-progress"]) == 2
    assert "patch" in capsys.readouterr().err
