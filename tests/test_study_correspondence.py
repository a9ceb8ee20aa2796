"""The correspondence study (STEGO 3.1 / Fig. 2-3 / A.6): AP maths, sources, the command end to end."""
import argparse
import json

import numpy as np
import pytest
import torch
from conftest import tiny_config

from stegoseg.errors import StegosegError
from stegoseg.studies.correspondence import (
    ScoreHistogram,
    add_cli,
    average_precision_exact,
    coupling_from_joint,
    grid_coords,
    labels_at,
    parse_queries,
    parse_source,
    run_correspondence_study,
)


def _hist_ap(scores, positive, bins=2000, lo=-1.0, hi=1.0):
    h = ScoreHistogram(bins, lo, hi)
    # streamed in chunks, as the study does
    for part in np.array_split(np.arange(len(scores)), 7):
        h.add(torch.as_tensor(scores[part]), torch.as_tensor(positive[part]))
    return h


def test_perfect_predictor_has_ap_one():
    rng = np.random.default_rng(0)
    la, lb = rng.integers(0, 5, 5000), rng.integers(0, 5, 5000)
    same = la == lb
    scores = same.astype(np.float64)  # 1 for the same class, 0 otherwise
    assert average_precision_exact(scores, same) == pytest.approx(1.0)
    h = _hist_ap(scores, same)
    assert h.average_precision() == pytest.approx(1.0)
    assert h.positive_rate == pytest.approx(same.mean())
    precision, recall, _ = h.pr_curve()
    assert recall[-1] == pytest.approx(1.0) and precision[-1] == pytest.approx(same.mean())


def test_random_scores_have_ap_near_the_positive_rate():
    # A score with no skill ranks positives uniformly at random: E[AP] = positive rate up to
    # O(log n / n_pos). Over 100 seeds at this size the deviation had sd 0.0022 (max 0.006),
    # so 0.015 is about 7 sd: the test does not flake, yet catches a wrong AP formula
    # (e.g. interpolated AP or a swapped precision/recall gives errors > 0.05).
    rng = np.random.default_rng(1)
    positive = rng.random(40000) < 0.3
    scores = rng.uniform(-1, 1, 40000)
    exact = average_precision_exact(scores, positive)
    assert abs(exact - positive.mean()) < 0.015
    assert abs(_hist_ap(scores, positive).average_precision() - positive.mean()) < 0.015


def test_histogram_ap_matches_exact_and_sklearn():
    sklearn_metrics = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(2)
    positive = rng.random(30000) < 0.4
    scores = np.clip(rng.normal(0, 0.35, 30000) + 0.3 * positive, -1, 1)
    exact = average_precision_exact(scores, positive)
    assert exact == pytest.approx(sklearn_metrics.average_precision_score(positive, scores), abs=1e-10)
    # ties are grouped like scikit-learn does
    tied = np.round(scores, 1)
    assert average_precision_exact(tied, positive) == pytest.approx(
        sklearn_metrics.average_precision_score(positive, tied), abs=1e-10
    )
    # 2000 bins of width 0.001: only the order inside a bin is lost
    assert abs(_hist_ap(scores, positive).average_precision() - exact) < 2e-3
    # with very few bins the approximation is coarser but still an AP of tied scores
    coarse = _hist_ap(scores, positive, bins=10)
    binned = np.clip(np.floor((scores + 1) / 0.2), 0, 9)
    assert coarse.average_precision() == pytest.approx(average_precision_exact(binned, positive), abs=1e-10)


def test_ap_and_pr_on_a_hand_checked_example():
    # ranked: + - + -  ->  precision 1, 1/2, 2/3, 1/2 at recall 1/2, 1/2, 1, 1
    # AP = (1/2 - 0) * 1 + (1 - 1/2) * 2/3 = (1 + 2/3) / 2
    scores = np.array([0.9, 0.8, 0.7, 0.6])
    positive = np.array([1, 0, 1, 0], dtype=bool)
    want = (1 + 2 / 3) / 2
    assert average_precision_exact(scores, positive) == pytest.approx(want, abs=1e-12)
    # bins of width 0.001 keep the four scores apart: the binned AP is the same number
    h = _hist_ap(scores, positive)
    assert h.average_precision() == pytest.approx(want, abs=1e-12)
    precision, recall, thresholds = h.pr_curve()
    np.testing.assert_allclose(precision, [1, 1 / 2, 2 / 3, 1 / 2])
    np.testing.assert_allclose(recall, [1 / 2, 1 / 2, 1, 1])
    np.testing.assert_allclose(thresholds, [0.9, 0.8, 0.7, 0.6], atol=1e-3)  # lower bin edges
    assert np.all(thresholds <= scores + 1e-9) and np.all(np.diff(thresholds) < 0)
    # tied scores are one threshold: (+, -) tied on top, then (+, -) -> AP = 1/2 * 1/2 + 1/2 * 1/2
    tied = np.array([0.9, 0.9, 0.5, 0.5])
    assert average_precision_exact(tied, positive) == pytest.approx(0.5, abs=1e-12)
    assert _hist_ap(tied, positive).average_precision() == pytest.approx(0.5, abs=1e-12)
    # no positive: AP undefined, empty PR curve
    assert np.isnan(average_precision_exact(scores, np.zeros(4, dtype=bool)))
    empty = _hist_ap(scores, np.zeros(4, dtype=bool))
    assert np.isnan(empty.average_precision()) and all(len(a) == 0 for a in empty.pr_curve())


def test_fine_binned_ap_matches_the_exact_ap():
    rng = np.random.default_rng(7)
    positive = rng.random(20000) < 0.25
    scores = np.clip(rng.normal(0, 0.3, 20000) + 0.25 * positive, -1, 1)
    exact = average_precision_exact(scores, positive)
    fine = _hist_ap(scores, positive, bins=20000)  # bins of width 1e-4
    assert abs(fine.average_precision() - exact) < 1e-3
    # the binned PR curve ends at full recall with the positive rate as precision
    precision, recall, _ = fine.pr_curve()
    assert recall[-1] == pytest.approx(1.0) and precision[-1] == pytest.approx(positive.mean())
    assert np.all(np.diff(recall) >= 0)


def test_crf_kernel_source_is_the_bilateral_kernel():
    src = parse_source("crf", has_checkpoint=False)
    assert (src.sxy, src.srgb) == (67.0, 3.0) and src.metric == "log_kernel"
    custom = parse_source("crf:20:13", has_checkpoint=False)
    custom.patch = 8.0
    rng = np.random.default_rng(3)
    rgb = torch.as_tensor(rng.uniform(0, 255, (2, 3, 4, 4)), dtype=torch.float32)
    feats = torch.zeros(2, 5, 4, 4)
    maps = custom.maps(feats, rgb)  # (2, 5, 4, 4): x, y, r, g, b scaled
    a = maps[0].reshape(5, -1)
    b = maps[1].reshape(5, -1)
    got = custom.log_kernel(a, b).numpy()  # (16, 16) log kernel between image 0 and image 1
    pos = np.stack(np.meshgrid((np.arange(4) + 0.5) * 8, (np.arange(4) + 0.5) * 8), -1).reshape(-1, 2)
    col0, col1 = rgb[0].reshape(3, -1).T.numpy(), rgb[1].reshape(3, -1).T.numpy()
    dp = ((pos[:, None] - pos[None]) ** 2).sum(-1)
    dc = ((col0[:, None] - col1[None]) ** 2).sum(-1)
    want = np.exp(-dp / (2 * 20.0**2) - dc / (2 * 13.0**2))
    np.testing.assert_allclose(np.exp(got), want, rtol=1e-3, atol=1e-6)
    # the score is log k (0 for a pixel with itself); bins are uniform in -log(1 - log k), monotone
    np.testing.assert_allclose(custom.score(a, b).numpy(), got)
    np.testing.assert_allclose(np.diag(custom.score(a, a).numpy()), 0.0, atol=1e-3)
    t = custom.to_bins(torch.as_tensor(got)).numpy()
    np.testing.assert_allclose(t, -np.log1p(-got), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(custom.from_bins(t), got, rtol=1e-4, atol=1e-5)
    for bad in ("crf:1", "crf:a:b", "crf:-1:3", "colour"):
        with pytest.raises(StegosegError):
            parse_source(bad, has_checkpoint=False)
    with pytest.raises(StegosegError, match="checkpoint"):
        parse_source("code", has_checkpoint=False)


def test_bins_spread_cosines_near_one():
    src = parse_source("features", has_checkpoint=False)
    s = torch.tensor([-1.0, -0.5, 0.0, 0.9, 0.999, 0.99999, 1.0])
    t = src.to_bins(s)
    assert torch.all(t[1:] > t[:-1])
    lo, hi = src.bin_range
    assert lo - 1e-5 <= float(t.min()) and float(t.max()) <= hi + 1e-5  # float32 rounding
    np.testing.assert_allclose(src.from_bins(t.numpy()), s.numpy(), atol=1e-5)
    # 2000 bins: [0.999, 1] spans hundreds of bins instead of one
    h = ScoreHistogram(2000, lo, hi)
    top = h.bin_index(src.to_bins(torch.tensor([0.999, 1.0])))
    assert int(top[1] - top[0]) > 500


def test_points_read_the_label_under_each_feature_cell():
    labels = torch.arange(16 * 16).reshape(1, 16, 16) % 251
    coords = grid_coords(1, 4, 4)
    got = labels_at(labels, coords, (4, 4)).reshape(4, 4)
    # cell (r, c) of a 4x4 grid over 16 px is centred on pixel 4c + 1.5 -> rounds to 4c + 2
    want = labels[0, 2::4, 2::4]
    assert torch.equal(got, want)


def test_class_coupling_thresholds_and_rows():
    joint = np.zeros((2, 2, 4), dtype=np.int64)
    joint[0, 0, 3] = 10  # strongest bin: class 0 with class 0
    joint[1, 0, 3] = 5
    joint[0, 1, 0] = 100
    edges = np.linspace(-1, 1, 5)
    c = coupling_from_joint(joint, edges, ["a", "b"], top_fraction=0.1)
    assert c["threshold"] == pytest.approx(0.5) and c["n_pairs_coupled"] == 15
    m = np.asarray(c["matrix"])
    np.testing.assert_allclose(m, [[1, 0], [1, 0]])
    assert c["same_class_share"] == pytest.approx(10 / 15)
    c2 = coupling_from_joint(joint, edges, ["a", "b"], threshold=-1.0)
    np.testing.assert_allclose(np.asarray(c2["matrix"]).sum(1), [1, 1])


def _parser():
    return add_cli(argparse.ArgumentParser(prog="stegoseg").add_subparsers())


TINY = [
    "--data-root", None, "--no-pretrained", "--tiny", "--resolution", "32", "--n-neighbors", "8", "--knn-topk", "3",
    "--n-samples", "5", "--num-workers", "0", "--no-progress", "--device", "cpu", "--extract-batch-size", "64",
]


def _run(argv):
    parser = argparse.ArgumentParser(prog="stegoseg")
    add_cli(parser.add_subparsers())
    args = parser.parse_args(argv)
    return args.func(args)


def test_command_end_to_end(synthetic_root, tmp_path, capsys):
    out = tmp_path / "study"
    tiny = [str(synthetic_root) if a is None else a for a in TINY]
    cache = str(tmp_path / "cache")
    assert _run(["study-correspondence", "--out", str(out), *tiny, "--cache-dir", cache, "--n-images", "30",
                 "--settings", "self,knn,random", "--queries", "4,4;20,28", "--map-neighbors", "2"]) == 0
    printed = capsys.readouterr().out
    assert "| features | knn |" in printed
    for name in ("correspondence_pr.png", "correspondence_ap.json", "correspondence_ap.md", "correspondence_maps.png",
                 "class_coupling.png", "class_coupling.json", "config.yaml", "correspondence_hist.npz"):
        assert (out / name).stat().st_size > 0, name
    ap = json.loads((out / "correspondence_ap.json").read_text())
    assert ap["backbone"]["randomly_initialised"] is True
    assert {(r["source"], r["setting"]) for r in ap["results"]} == {
        (s, t) for s in ("features", "crf(sxy=67,srgb=3)") for t in ("self", "knn", "random")
    }
    for r in ap["results"]:
        assert 0 < r["positive_rate"] < 1 and r["n_pairs"] > 0
        check = r["binning_check"]  # all pairs kept raw here: binned AP of the same pairs ~ exact AP
        assert check["n_pairs"] == r["n_pairs"] and abs(check["ap_binned"] - check["ap_exact"]) < 5e-3
        assert check["ap_binned"] == pytest.approx(r["ap"])
        # every source scores the same pairs
        same = [q for q in ap["results"] if q["setting"] == r["setting"]]
        assert len({(q["n_pairs"], q["n_positive"]) for q in same}) == 1
    # within an image: 30 images x C(25, 2) pairs minus unlabelled ones
    assert next(r for r in ap["results"] if r["setting"] == "self")["n_pairs"] <= 30 * 300
    coupling = json.loads((out / "class_coupling.json").read_text())
    m = np.asarray(coupling["matrix"])
    assert m.shape == (4, 4) and len(coupling["class_names"]) == 4
    assert np.all((np.abs(m.sum(1) - 1) < 1e-9) | (m.sum(1) == 0))
    assert 0 < coupling["fraction_of_pairs"] <= 1 and coupling["setting"] == "knn"
    assert "| features | self |" in (out / "correspondence_ap.md").read_text()

    # refuses to overwrite; a checkpoint adds the code source and brings its backbone and config
    with pytest.raises(StegosegError, match="--overwrite"):
        _run(["study-correspondence", "--out", str(out), *tiny, "--cache-dir", cache])
    from stegoseg.methods.common import build_backbone_from_config
    from stegoseg.model import SegmentationModel
    from stegoseg.nn.heads import SegmentationHead

    cfg = tiny_config(synthetic_root, cache_dir=str(tmp_path / "cache-ckpt"), n_samples=4)
    torch.manual_seed(5)
    backbone, spec = build_backbone_from_config(cfg)
    model = SegmentationModel(backbone, spec, SegmentationHead(backbone.embed_dim, 8), n_clusters=4,
                              method="stego", config=cfg.to_dict())
    ckpt = model.save(tmp_path / "checkpoint.pt")
    out2 = tmp_path / "study-ckpt"
    assert _run(["study-correspondence", "--checkpoint", str(ckpt), "--out", str(out2), "--n-images", "12",
                 "--settings", "knn", "--map-source", "code", "--coupling-source", "code", "--queries", "2"]) == 0
    ap2 = json.loads((out2 / "correspondence_ap.json").read_text())
    assert [r["source"] for r in ap2["results"]] == ["features", "code", "crf(sxy=67,srgb=3)"]
    assert ap2["points"] == "4x4 random" and ap2["n_images"] == 12
    assert json.loads((out2 / "class_coupling.json").read_text())["source"] == "code"

    # the same seed draws the same random backbone and reuses the checkpoint's cache; another
    # random initialisation (another seed) gets its own cache (keyed by a fingerprint of the
    # weights), never the checkpoint's features
    before = {p.name for p in (tmp_path / "cache-ckpt").iterdir()}
    run_correspondence_study(tiny_config(synthetic_root, cache_dir=str(tmp_path / "cache-ckpt")),
                             tmp_path / "same", n_images=4)
    assert {p.name for p in (tmp_path / "cache-ckpt").iterdir()} == before
    run_correspondence_study(tiny_config(synthetic_root, cache_dir=str(tmp_path / "cache-ckpt"), seed=1),
                             tmp_path / "mixed", n_images=4)
    assert len({p.name for p in (tmp_path / "cache-ckpt").iterdir()} - before) == 1


def test_bad_input_is_a_one_line_error(synthetic_root, tmp_path):
    cfg = tiny_config(synthetic_root, cache_dir=str(tmp_path / "cache"))
    with pytest.raises(StegosegError, match="checkpoint"):
        run_correspondence_study(cfg, tmp_path / "a", sources=["code"])
    with pytest.raises(StegosegError, match="setting"):
        run_correspondence_study(cfg, tmp_path / "b", settings=["sideways"])
    with pytest.raises(StegosegError, match="outside"):
        run_correspondence_study(cfg, tmp_path / "c", n_images=2, settings=["self"], queries=[(500, 3)])
    with pytest.raises(StegosegError, match="queries"):
        parse_queries("1,2;3")
    assert parse_queries("3") == 3 and parse_queries("1,2;3,4") == [(1.0, 2.0), (3.0, 4.0)]
    parser = _parser()
    assert "--checkpoint" in parser.format_help() and "--n-images" in parser.format_help()


def test_registered_in_the_main_cli(capsys):
    from stegoseg.cli import build_parser, main

    sub = next(a for a in build_parser("all")._actions if isinstance(a, argparse._SubParsersAction))
    if "study-correspondence" not in sub.choices:
        pytest.skip("study-correspondence is not wired into stegoseg.cli yet")
    with pytest.raises(SystemExit) as e:
        main(["study-correspondence", "--help"])
    assert e.value.code == 0 and "--checkpoint" in capsys.readouterr().out
