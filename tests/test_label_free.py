"""Label-free shift calibration (--shifts auto) and label-free model selection (--select label-free)."""
import numpy as np
import pytest
import torch
import torch.nn as nn
import yaml
from conftest import tiny_config

from stegoseg.losses.stego import feature_correspondence
from stegoseg.training.calibration import calibrate_shifts, sample_pairs
from stegoseg.training.selection import label_free_score


class ConstructedCache:
    """An in-memory stand-in for FeatureCache: every item is one class, its feature vectors are
    that class's direction plus small noise, so feature correspondences are ~1 within a class
    and ~0 between classes."""

    def __init__(self, classes, dim=16, size=6, noise=0.05, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.classes = np.asarray(classes)
        self.n = len(classes)
        directions = torch.eye(dim)
        feats = directions[self.classes][:, :, None, None].expand(-1, -1, size, size).clone()
        self.features = feats + noise * torch.randn(feats.shape, generator=g)

    def feature_batch(self, idx):
        return self.features[np.asarray(idx)].clone()

    def iter_batches(self, batch_size=64, with_labels=False):
        for s in range(0, self.n, batch_size):
            yield self.features[s : s + batch_size]


def knn_by_class(classes, k):
    """Nearest-neighbour lists that hold only items of the same class (as good KNN lists do)."""
    classes = np.asarray(classes)
    out = []
    for i, c in enumerate(classes):
        same = [j for j in np.flatnonzero(classes == c) if j != i]
        out.append((same * k)[:k])
    return np.asarray(out)


def test_calibration_puts_each_shift_between_the_known_modes():
    # (no spatial centring here: it subtracts each query's mean over a partner image, which for
    # these one-class images is the whole signal; the next test covers centring)
    pointwise = False
    # 3 classes, unequal: random pairs share a class (1/2)^2 + (1/3)^2 + (1/6)^2 = 7/18 of the time
    classes = [0] * 18 + [1] * 12 + [2] * 6
    cache = ConstructedCache(classes)
    knn = knn_by_class(classes, 5)
    cal = calibrate_shifts(cache, knn, 3, pointwise=pointwise, n_samples=4, knn_topk=5, batch_size=12, n_batches=30)
    # the k-means partition of these features is the class partition: within-image and KNN pairs
    # are always "same", so their shifts attract all pairs; random pairs follow the class mix
    assert cal.same_rate["self"] == 1.0 and cal.same_rate["knn"] == 1.0
    # independent count of the random pairs' same-class rate over the same sampled batches
    same = []
    for batch in sample_pairs(cache, knn, 30, 12, 4, 5, seed=0):
        same.append(cache.classes[batch.index] == cache.classes[batch.partner_index["rand"]])
    assert cal.same_rate["rand"] == pytest.approx(float(np.concatenate(same).mean()), abs=1e-6)
    # F of one batch, split by the known classes: the random shift separates the two modes
    batch = next(sample_pairs(cache, knn, 1, 12, 4, 5, seed=0))
    fd = feature_correspondence(batch.feats, batch.partner["rand"], pointwise)
    is_same = torch.from_numpy(cache.classes[batch.index] == cache.classes[batch.partner_index["rand"]])
    f_same, f_diff = fd[is_same].reshape(-1), fd[~is_same].reshape(-1)
    assert f_diff.max() < cal.b_rand < f_same.min()
    # within an image and between neighbours everything is one class: no pair is repelled
    fd_knn = feature_correspondence(batch.feats, batch.partner["knn"], pointwise)
    assert cal.b_knn <= fd_knn.min() + 1e-3


@pytest.mark.parametrize("pointwise", [False, True])
def test_calibration_attracts_the_estimated_fraction_of_pairs(pointwise):
    # noisy, overlapping clusters: each shift is the quantile that leaves pi_t of its pairs above it
    classes = [0, 1, 2, 3] * 8
    cache = ConstructedCache(classes, noise=0.6, seed=1)
    knn = np.stack([np.roll(np.arange(32), -s) for s in range(1, 6)], 1)  # arbitrary lists
    cal = calibrate_shifts(cache, knn, 4, pointwise=pointwise, n_samples=4, knn_topk=5, batch_size=8, n_batches=20)
    batches = list(sample_pairs(cache, knn, 20, 8, 4, 5, seed=0))
    for t, shift in (("self", cal.b_self), ("knn", cal.b_knn), ("rand", cal.b_rand)):
        values = torch.cat([feature_correspondence(b.feats, b.partner[t], pointwise).reshape(-1) for b in batches])
        above = float((values > shift).float().mean())
        assert above == pytest.approx(cal.same_rate[t], abs=0.01), t
    assert 0.05 < cal.same_rate["rand"] < 0.6  # a real mix, not a degenerate partition


class Identity(nn.Module):
    def forward(self, x):
        return x


class Collapsed(nn.Module):
    """Maps every feature to nearly the same code (what an over-attracting run converges to)."""

    def __init__(self, dim=16):
        super().__init__()
        g = torch.Generator().manual_seed(3)
        self.direction = torch.randn(dim, generator=g)

    def forward(self, x):
        return self.direction[None, :, None, None] + 1e-3 * x


class Scrambled(nn.Module):
    """A code unrelated to the features (a fixed random function of the item's noise only)."""

    def forward(self, x):
        return torch.sin(40 * x)


def test_selection_ranks_a_collapsed_and_a_scrambled_code_below_a_healthy_one():
    classes = [0] * 12 + [1] * 12 + [2] * 12
    cache = ConstructedCache(classes)
    knn = knn_by_class(classes, 5)
    ref = calibrate_shifts(cache, knn, 3, pointwise=False, n_samples=4, knn_topk=5, batch_size=12, n_batches=10)
    kw = dict(n_batches=8, batch_size=12, n_samples=4, knn_topk=5)
    healthy = label_free_score(Identity(), cache, knn, ref, 3, **kw)
    collapsed = label_free_score(Collapsed(), cache, knn, ref, 3, **kw)
    scrambled = label_free_score(Scrambled(), cache, knn, ref, 3, **kw)
    assert healthy.score == pytest.approx(1.0, abs=0.02)  # the class partition is the best possible
    assert collapsed.score < healthy.score - 0.3
    assert scrambled.score < healthy.score - 0.3
    assert healthy.clusters_used == 3


def test_selection_ranks_a_collapsed_training_run_below_a_healthy_one(synthetic_root, tmp_path, one_thread):
    """On generated images: a run whose shifts attract every pair collapses; the criterion says so."""
    from stegoseg.features.cache import FeatureCache
    from stegoseg.methods.stego import train_stego
    from stegoseg.model import load
    from stegoseg.training.calibration import calibrate_for_config
    from stegoseg.training.selection import score_for_config

    common = dict(steps=40, cache_dir=str(tmp_path / "cache"), select="last", resolution=48)
    healthy = load(train_stego(tiny_config(synthetic_root, shifts="auto", auto_centring="on", **common),
                               tmp_path / "healthy"))
    # b below every feature correspondence: every pair is attracted, the code collapses
    collapsed = load(train_stego(tiny_config(synthetic_root, b_self=-1.0, b_knn=-1.0, b_rand=-1.0, w_rand=1.0,
                                             lr=5e-3, **common), tmp_path / "collapsed"))
    cfg = tiny_config(synthetic_root, **common)
    cache = FeatureCache(next(p for p in (tmp_path / "cache").iterdir() if (p / "meta.json").exists()))
    knn = cache.neighbors(cfg.n_neighbors)
    ref = calibrate_for_config(cfg, cache, knn, 4)
    s_healthy = score_for_config(cfg, healthy.head, cache, knn, ref, 4)
    s_collapsed = score_for_config(cfg, collapsed.head, cache, knn, ref, 4)
    assert s_collapsed.mean_similarity["rand"] > 0.9  # it did collapse
    assert s_collapsed.score < s_healthy.score


def test_shifts_auto_writes_the_chosen_values_and_a_rerun_with_them_repeats_the_run(synthetic_root, tmp_path, one_thread):
    import json

    from stegoseg.config.stego import make_config
    from stegoseg.methods.stego import train_stego
    from stegoseg.model import load

    cfg = tiny_config(synthetic_root, shifts="auto", steps=8, cache_dir=str(tmp_path / "cache"))
    first = load(train_stego(cfg, tmp_path / "auto"))
    written = yaml.safe_load((tmp_path / "auto" / "config.yaml").read_text())
    calibration = json.loads((tmp_path / "auto" / "calibration.json").read_text())
    assert written["shifts"] == "fixed" and written["select"] == "label-free"
    for name in ("b_self", "b_knn", "b_rand"):
        assert written[name] == calibration[name]
    assert written["b_rand"] != cfg.b_rand  # not the published default
    assert (tmp_path / "auto" / "config.yaml").read_text().startswith("# b_self, b_knn, b_rand were chosen")
    selection = json.loads((tmp_path / "auto" / "selection.json").read_text())
    # two calibrated runs (spatial centring on and off), checkpoints at steps 4 and 8 of each
    assert selection["mode"] == "label-free"
    assert set(selection["candidates"]) == {"centring-on/4", "centring-on/8", "centring-off/4", "centring-off/8"}
    scores = {k: v["label_free_score"] for k, v in selection["candidates"].items()}
    assert selection["chosen"] == max(scores, key=scores.get)
    assert written["pointwise"] == (selection["chosen_run"] == "centring-on")
    assert (tmp_path / "auto" / "selected_similarity_histogram.png").exists()
    # the written config, as a user would pass it with --config, repeats the chosen run exactly
    again = load(train_stego(make_config(written), tmp_path / "again"))
    assert not (tmp_path / "again" / "calibration.json").exists()  # nothing recalibrated
    assert json.loads((tmp_path / "again" / "selection.json").read_text())["chosen_step"] == selection["chosen_step"]
    for a, b in zip(first.head.state_dict().values(), again.head.state_dict().values()):
        assert torch.equal(a, b)
    assert torch.equal(first.cluster_probe.centroids, again.cluster_probe.centroids)


def test_val_miou_selection_picks_the_checkpoint_with_the_best_validation_miou(synthetic_root, tmp_path, one_thread):
    import json

    from stegoseg.methods.stego import train_stego

    cfg = tiny_config(synthetic_root, shifts="auto", select="val-miou", steps=8, cache_dir=str(tmp_path / "cache"))
    train_stego(cfg, tmp_path / "run")
    selection = json.loads((tmp_path / "run" / "selection.json").read_text())
    mious = {k: v["val_cluster_miou"] for k, v in selection["candidates"].items()}
    assert len(mious) == 4 and selection["chosen"] == max(mious, key=mious.get)
    # the label-free criterion is recorded next to it, for comparison
    assert all("label_free_score" in v for v in selection["candidates"].values())


def test_explicit_shift_with_auto_and_val_miou_without_labels_are_errors(tmp_path, capsys):
    from stegoseg.cli import main
    from stegoseg.data.synthetic import make_synthetic_dataset

    assert main(["train", "--preset", "demo", "--b-knn", "0.5", "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert "--b-knn was given, but --shifts auto chooses the shifts itself: add --shifts fixed" in err
    assert not (tmp_path / "x").exists()
    assert main(["train", "--preset", "demo", "--select", "last", "--out", str(tmp_path / "x")]) == 2
    assert "pass --auto-centring on (or off), or --select label-free" in capsys.readouterr().err
    root = make_synthetic_dataset(tmp_path / "unlabelled", n_train=6, n_val=2, size=(32, 32), with_labels=False)
    assert main(["train", "--data-root", str(root), "--n-classes", "3", "--select", "val-miou", "--tiny",
                 "--no-pretrained", "--out", str(tmp_path / "y")]) == 2
    assert "--select val-miou needs labels for the 'val' split; use --select label-free" in capsys.readouterr().err
    assert not (tmp_path / "y" / "cache").exists()  # refused before any feature extraction
