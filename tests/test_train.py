import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from conftest import tiny_config

from stegoseg.features.cache import CropView, FeatureCache, extract_features
from stegoseg.methods.common import (
    build_backbone_from_config,
    build_split,
    evaluate_checkpoint_model,
    prepare,
)
from stegoseg.methods.stego import train_stego
from stegoseg.training.steps import StepBatches, batch_indices
from stegoseg.training.stego import StegoModule, fit_stego


def test_batch_indices_are_a_function_of_step_and_cover_epochs():
    a = batch_indices(10, 4, step=3, seed=0)
    assert (a == batch_indices(10, 4, step=3, seed=0)).all()
    # consecutive steps walk through permutations: 5 steps of 4 cover 2 full epochs of 10
    seen = np.concatenate([batch_indices(10, 4, s, 0) for s in range(5)])
    assert sorted(seen.tolist()) == sorted(list(range(10)) * 2)
    # ranks get different items
    assert set(batch_indices(10, 2, 0, 0, rank=0, world=2)).isdisjoint(batch_indices(10, 2, 0, 0, rank=1, world=2))


def test_training_beats_chance(synthetic_root, tmp_path):
    cfg = tiny_config(synthetic_root, steps=60, resolution=48, eval_resolution=64, w_rand=0.5, b_rand=0.3)
    ckpt = train_stego(cfg, tmp_path / "run")
    assert ckpt.exists()
    from stegoseg.model import load

    model = load(ckpt)
    result = evaluate_checkpoint_model(cfg, model, tmp_path / "eval")
    val = build_split(cfg, "val")
    counts = np.zeros(val.n_classes)
    for i in range(len(val)):
        lab = val.load(i).label
        counts += np.bincount(lab[lab != 255].ravel(), minlength=val.n_classes)
    chance = counts.max() / counts.sum() * 100  # majority-class accuracy
    acc = result["cluster"]["strict"]["accuracy"]
    assert acc > chance + 15, (acc, chance)
    for name in ("metrics.json", "predictions.png", "confusion_cluster.png"):
        assert (tmp_path / "eval" / name).exists()
    assert (tmp_path / "run" / "similarity_histogram.png").exists()
    assert (tmp_path / "run" / "training_curves.png").exists()


def test_cluster_fit_kmeans_refits_the_cluster_probe_on_the_trained_code(synthetic_root, tmp_path):
    from stegoseg.methods.common import fit_centroids
    from stegoseg.model import load

    common = dict(steps=6, cache_dir=str(tmp_path / "cache"), kmeans_iters=5)
    torch.manual_seed(0)  # the random tiny backbone is drawn from the global RNG: the same one twice
    online = load(train_stego(tiny_config(synthetic_root, **common), tmp_path / "online"))
    cfg = tiny_config(synthetic_root, cluster_fit="kmeans", **common)
    torch.manual_seed(0)
    refit = load(train_stego(cfg, tmp_path / "kmeans"))
    # same head and linear probe (the option only changes the centroids) ...
    torch.testing.assert_close(refit.head.state_dict(), online.head.state_dict())
    torch.testing.assert_close(refit.linear_probe.state_dict(), online.linear_probe.state_dict())
    assert not torch.allclose(refit.cluster_probe.centroids, online.cluster_probe.centroids)
    # ... which are the seeded spherical k-means of the trained code over the cached training crops
    cache = prepare(cfg, tmp_path / "kmeans", refit.backbone)  # the run's cache (same backbone)
    expected = fit_centroids(cfg, cache, refit.n_clusters, head=refit.head.eval())
    torch.testing.assert_close(refit.cluster_probe.centroids, expected.to(refit.cluster_probe.centroids.dtype))
    assert refit.config["cluster_fit"] == "kmeans"


def test_a_random_backbone_is_drawn_from_the_seed(synthetic_root):
    cfg = tiny_config(synthetic_root, seed=3)
    torch.rand(5)
    a, _ = build_backbone_from_config(cfg)
    state = torch.get_rng_state()
    b, _ = build_backbone_from_config(cfg)
    assert torch.equal(torch.get_rng_state(), state)  # the caller's RNG is untouched
    other, _ = build_backbone_from_config(tiny_config(synthetic_root, seed=4))
    for (k, va), vb, vo in zip(a.model.state_dict().items(), b.model.state_dict().values(), other.model.state_dict().values()):
        assert torch.equal(va, vb), k
    assert any(not torch.equal(va, vo) for va, vo in zip(a.model.state_dict().values(), other.model.state_dict().values()))


def test_bad_cluster_fit_is_an_error(synthetic_root):
    from stegoseg.errors import StegosegError

    with pytest.raises(StegosegError, match="--cluster-fit"):
        tiny_config(synthetic_root, cluster_fit="spectral")


class _Kill(L.Callback):
    def __init__(self, at_step):
        self.at_step = at_step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.at_step:
            raise RuntimeError("simulated crash")


def test_resume_matches_uninterrupted_run(synthetic_root, tmp_path):
    cfg = tiny_config(synthetic_root, steps=8, ckpt_every=3, cache_dir=str(tmp_path / "cache"))
    backbone, _ = build_backbone_from_config(cfg)
    cache = prepare(cfg, tmp_path, backbone)
    n_classes = build_split(cfg, "train").n_classes
    full = fit_stego(cfg, tmp_path / "full", cache, n_classes, True)
    with pytest.raises(RuntimeError, match="simulated crash"):
        fit_stego(cfg, tmp_path / "killed", cache, n_classes, True, callbacks=[_Kill(4)])
    assert (tmp_path / "killed" / "lightning" / "last.ckpt").exists()
    resumed = fit_stego(cfg, tmp_path / "killed", cache, n_classes, True, resume=True)
    for (name, a), (_, b) in zip(full.state_dict().items(), resumed.state_dict().items()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)


def test_live_backbone_gives_the_cached_loss(synthetic_root, tmp_path):
    cfg = tiny_config(synthetic_root, cache_dir=str(tmp_path / "cache"))
    backbone, _ = build_backbone_from_config(cfg)
    cache = prepare(cfg, tmp_path, backbone)
    train = build_split(cfg, "train")
    view = CropView(train, cfg.resolution, cfg.five_crop, "bilinear")
    knn = cache.neighbors(cfg.n_neighbors)
    cached = StepBatches(cache, knn, cfg.batch_size, cfg.seed, cfg.knn_topk, steps=5)[2]
    live = StepBatches(cache, knn, cfg.batch_size, cfg.seed, cfg.knn_topk, steps=5, crop_view=view)[2]
    module = StegoModule(cfg, backbone.embed_dim, train.n_classes, train.n_classes, backbone=backbone).eval()
    module.dropout.p = 0.0
    a = module.compute_losses(cached, step=2)
    b = module.compute_losses(live, step=2)
    for key in ("loss", "self", "knn", "rand"):
        torch.testing.assert_close(a[key].float(), b[key].float(), rtol=2e-2, atol=2e-3, msg=key)


def test_prepare_resumes_without_recomputing(synthetic_root, tmp_path):
    from stegoseg.features import shards

    cfg = tiny_config(synthetic_root, five_crop=False)
    backbone, _ = build_backbone_from_config(cfg)
    train = build_split(cfg, "train")
    cache = extract_features(backbone, train, tmp_path, resolution=32, five_crop=False, batch_size=4, progress=False,
                             shard_items=3)
    full = cache.feature_batch(np.arange(cache.n)).clone()
    # Simulate an interruption: every other shard was never written (one a writer died in: a temporary file)
    lost = list(range(0, shards.n_shards(cache.n, 3), 2))
    for s in lost:
        for kind in ("features", "thumbs"):
            shards.shard_file(cache.path, kind, s).unlink()
    (cache.path / "shards" / ".features-00000.f16.tmp-1-abcd").write_bytes(b"half")
    assert FeatureCache(cache.path).done.sum() == cache.n - sum(len(range(3 * s, min(3 * s + 3, cache.n))) for s in lost)
    calls = []
    original = backbone.forward

    def counting_forward(x):
        calls.append(x.shape[0])
        return original(x)

    backbone.forward = counting_forward
    cache2 = extract_features(backbone, train, tmp_path, resolution=32, five_crop=False, batch_size=4, progress=False)
    assert sum(calls) == sum(len(range(3 * s, min(3 * s + 3, cache.n))) for s in lost)  # only the lost shards
    torch.testing.assert_close(cache2.feature_batch(np.arange(cache.n)), full)
    assert cache2.complete and not list((cache.path / "shards").glob(".*tmp*"))  # the dead writer's file is gone
    # a different setting gets a different cache folder
    cache3 = extract_features(backbone, train, tmp_path, resolution=40, five_crop=False, batch_size=4, progress=False)
    assert cache3.path != cache.path


@pytest.mark.slow
def test_ddp_two_cpu_processes(synthetic_root, tmp_path):
    out = tmp_path / "ddp"
    cmd = [
        sys.executable, "-m", "stegoseg", "train", "--out", str(out),
        "--dataset", "directory", "--data-root", str(synthetic_root),
        "--no-pretrained", "--tiny", "--resolution", "32", "--n-neighbors", "8", "--knn-topk", "3",
        "--dim", "16", "--steps", "4", "--batch-size", "4", "--n-samples", "5", "--num-workers", "0",
        "--accelerator", "cpu", "--devices", "2", "--strategy", "ddp", "--no-progress", "--ckpt-every", "2",
    ]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (out / "checkpoint.pt").exists()
    assert "Starting with 2 processes" in proc.stderr


def test_cache_held_in_memory_trains_exactly_like_reading_the_cache_from_disk(synthetic_root, tmp_path):
    from stegoseg.features.cache import ResidentFeatures
    from stegoseg.methods.common import prepare
    from stegoseg.training.steps import StepBatches, use_resident_cache
    from stegoseg.training.stego import fit_stego

    states = {}
    for mode in ("off", "on"):
        cfg = tiny_config(synthetic_root, cache_in_memory=mode, steps=6, cache_dir=str(tmp_path / "cache"))
        cache = prepare(cfg, tmp_path / mode)
        assert use_resident_cache(cfg, cache) is (mode == "on")
        module = fit_stego(cfg, tmp_path / mode, cache, 4, True)
        states[mode] = module.state_dict()
    assert states["on"].keys() == states["off"].keys()
    for k in states["off"]:
        assert torch.equal(states["on"][k], states["off"][k]), k
    # the indices-only batch gathers exactly the tensors the disk path reads
    knn = cache.neighbors(cfg.n_neighbors)
    disk = StepBatches(cache, knn, 8, 0, steps=3)[2]
    ids = StepBatches(cache, knn, 8, 0, steps=3, indices_only=True)[2]
    got = ResidentFeatures(cache).batch(ids["index"], ids["partner"])
    for key in ("feats", "feats_knn", "label"):
        assert torch.equal(got[key], disk[key]), key


def test_progress_log_reads_the_step_count_the_trainer_was_given_after_it_was_built(caplog, monkeypatch):
    """DINO pretraining builds its trainer with ``max_steps=-1`` and sets the fit loop's step
    count afterwards; the log lines must show that count (not "-1", "-800%"), and with a
    ``max_time`` the time left is the time limit's when it ends first."""
    import logging
    from datetime import timedelta
    from types import SimpleNamespace

    from stegoseg.training import trainer as trainer_module

    clock = [1000.0]
    monkeypatch.setattr(trainer_module.time, "monotonic", lambda: clock[0])

    def run(steps_at_seconds):
        fake = SimpleNamespace(max_steps=200, global_step=0, is_global_zero=True, callback_metrics={})
        callback = trainer_module.LogTrainingProgress(-1, timedelta(minutes=25))
        clock[0] = 1000.0
        callback.on_train_start(fake, None)
        for step, seconds in steps_at_seconds:
            clock[0], fake.global_step = 1000.0 + seconds, step
            callback.on_train_batch_end(fake, None, None, None, step - 1)

    with caplog.at_level(logging.INFO, logger="stegoseg"):
        # 0.5 steps/s: 200 steps in 6m40s, inside the limit; at step 40 only 50 s of the 25 min are left
        run([(5, 10.0), (20, 40.0), (40, 1450.0)])
        # 0.05 steps/s over the first 5 steps: the 200 steps would need 1h06m, the limit ends it first
        run([(5, 100.0)])
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("training:")]
    assert lines == [
        "training: steps 0..200 of 200, at most 25m00s",
        "training: 0.50 steps/s over the first 5 steps: about 6m40s for the 200 steps",
        "training: step 20/200 (10%), 0.50 steps/s, about 6m00s left",
        "training: step 40/200 (20%), 0.03 steps/s, about 50s left (time limit)",
        "training: steps 0..200 of 200, at most 25m00s",
        "training: 0.05 steps/s over the first 5 steps: about 1h06m for the 200 steps; "
        "the time limit ends it in 23m20s",
    ]
