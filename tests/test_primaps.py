"""PriMaPs-EM through the pipeline: `run --method primaps`, METHOD+primaps, --init-from, the
pseudo-mask stage (reused, rebuilt on change, resumed), exact resume, save/load, bad input."""
import json

import numpy as np
import pytest
import torch
from conftest import one_line_error, tiny_cli, tiny_config

from stegoseg.cli import main

PRIMAPS_CLI = ["--ckpt-every", "3", "--crf-workers", "1"]



@pytest.mark.slow
def test_run_with_primaps_trains_evaluates_segments_and_reloads(synthetic_root, tmp_path, capsys):
    from stegoseg.model import load

    out = tmp_path / "run"
    assert main(["run", "--method", "primaps", "--out", str(out), "--data-root", str(synthetic_root), "--steps", "6",
                 "--no-baseline", *PRIMAPS_CLI, *tiny_cli("run")]) == 0
    assert "PriMaPs-EM: cluster_parity_acc" in capsys.readouterr().out
    model = load(out / "train" / "checkpoint.pt")
    assert model.method == "primaps" and model.head is None
    assert model.cluster_probe.metric == "dot" and model.cluster_probe.alpha == 1.0
    stats = json.loads((out / "train" / "pseudo_masks.json").read_text())
    assert stats["crops"] == 24 * 5 and stats["masks_per_crop"] >= 1
    assert "PriMaPs pseudo masks" in (out / "report.md").read_text()
    # the probe is the teacher's effective weight g v / |v|: logits are plain inner products
    code = torch.randn(1, model.code_dim, 3, 3)
    expected = torch.einsum("bdhw,kd->bkhw", code, model.cluster_probe.centroids)
    assert torch.allclose(model.cluster_probe.similarity(code), expected)
    folder = model.save_pretrained(tmp_path / "pretrained")
    again = load(folder)
    images = sorted((synthetic_root / "imgs" / "val").iterdir())[:2]
    for a, b in zip(model.segment_batch(images), again.segment_batch(images)):
        np.testing.assert_array_equal(a, b)
    assert main(["segment", str(folder), str(images[0]), "--out", str(tmp_path / "seg"), "--device", "cpu",
                 "--crf"]) == 0
    assert (tmp_path / "seg" / f"{images[0].stem}.png").exists()


@pytest.mark.slow
def test_stego_plus_primaps_and_init_from_boost_the_same_model(synthetic_root, tmp_path):
    from stegoseg.methods.cause import train_method
    from stegoseg.model import load

    cfg = tiny_config(synthetic_root, method="stego+primaps", steps=6, cache_dir=str(tmp_path / "cache"))
    path = train_method(cfg, tmp_path / "boost")
    base, boosted = load(tmp_path / "boost" / "base" / "checkpoint.pt"), load(path)
    assert boosted.method == "stego+primaps" and boosted.cluster_probe.metric == "dot"
    for (name, a), (_, b) in zip(base.head.state_dict().items(), boosted.head.state_dict().items()):
        assert torch.equal(a, b), name  # the head is the base model's, frozen
    # the same boost through --init-from on the finished base model: the same prototypes
    again = train_method(tiny_config(synthetic_root, method="primaps", steps=6, cache_dir=str(tmp_path / "cache"),
                                     init_from=str(tmp_path / "boost" / "base" / "checkpoint.pt")),
                         tmp_path / "init-from")
    torch.testing.assert_close(load(again).cluster_probe.centroids, boosted.cluster_probe.centroids, rtol=0, atol=0)


def test_em_resume_matches_the_uninterrupted_run(synthetic_root, tmp_path):
    import lightning as L

    from stegoseg.features.cache import CropView
    from stegoseg.methods.common import build_backbone_from_config, build_split, prepare
    from stegoseg.training.primaps import build_pseudo_masks, fit_primaps

    class Kill(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if trainer.global_step == 7:
                raise RuntimeError("simulated crash")

    cfg = tiny_config(synthetic_root, method="primaps", steps=12, ckpt_every=3, primaps_ema_every=2,
                      cache_dir=str(tmp_path / "cache"))
    backbone, _ = build_backbone_from_config(cfg)
    cache = prepare(cfg, tmp_path, backbone, neighbors=False)
    train = build_split(cfg, "train")
    masks = build_pseudo_masks(cfg, cache, CropView(train, cfg.resolution, True, "bilinear"), progress=False)
    init = torch.randn(4, backbone.embed_dim, generator=torch.Generator().manual_seed(0))
    full = fit_primaps(cfg, tmp_path / "full", cache, masks, backbone.embed_dim, 4, 4, init)
    with pytest.raises(RuntimeError, match="simulated crash"):
        _fit_with(cfg, tmp_path / "killed", cache, masks, backbone.embed_dim, init, [Kill()])
    resumed = fit_primaps(cfg, tmp_path / "killed", cache, masks, backbone.embed_dim, 4, 4, init, resume=True)
    assert not torch.equal(full.teacher.direction, init)  # the teacher moved (updates at steps 2, 4, ..., 10)
    for (name, a), (_, b) in zip(full.state_dict().items(), resumed.state_dict().items()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)


def _fit_with(cfg, out, cache, masks, dim, init, callbacks):
    """fit_primaps with extra Lightning callbacks (a crash hook)."""
    from pathlib import Path

    import lightning as L

    from stegoseg.training.primaps import PrimapsModule
    from stegoseg.training.steps import fit_step_module

    L.seed_everything(cfg.seed, workers=True, verbose=False)
    module = PrimapsModule(cfg, dim, 4, 4, init)
    module.masks = masks
    return fit_step_module(module, cfg, Path(out), cache, None, max_steps=cfg.steps, callbacks=callbacks)


def test_pseudo_masks_are_reused_resumed_and_rebuilt_when_settings_change(synthetic_root, tmp_path):
    from stegoseg.config.stego import replace
    from stegoseg.features.cache import CropView
    from stegoseg.methods.common import build_backbone_from_config, build_split, prepare
    from stegoseg.training.primaps import build_pseudo_masks, masks_folder

    cfg = tiny_config(synthetic_root, method="primaps", cache_dir=str(tmp_path / "cache"))
    cache = prepare(cfg, tmp_path, build_backbone_from_config(cfg)[0], neighbors=False)
    view = CropView(build_split(cfg, "train"), cfg.resolution, True, "bilinear")
    first = np.array(build_pseudo_masks(cfg, cache, view, progress=False))
    folder = masks_folder(cfg, cache)
    assert first.shape == (cache.n, 32, 32) and first.max() >= 1
    stamp = (folder / "masks.u8").stat().st_mtime_ns
    assert np.array_equal(build_pseudo_masks(cfg, cache, view, progress=False), first)
    assert (folder / "masks.u8").stat().st_mtime_ns == stamp  # reused, not recomputed
    # an interrupted build: crops marked not done are recomputed, the same values come back
    done = np.load(folder / "done.npy")
    done[7:30] = False
    np.save(folder / "done.npy", done)
    store = np.memmap(folder / "masks.u8", dtype=np.uint8, mode="r+", shape=first.shape)
    store[7:30] = 0
    store.flush()
    assert np.array_equal(build_pseudo_masks(cfg, cache, view, progress=False), first)
    other = replace(cfg, primaps_threshold=0.7)
    assert masks_folder(other, cache) != folder
    assert not np.array_equal(build_pseudo_masks(other, cache, view, progress=False), first)


def test_bad_primaps_input_is_one_line(synthetic_root, tmp_path, capsys):
    base = ["train", "--data-root", str(synthetic_root), "--steps", "3", *tiny_cli("train")]
    one_line_error(capsys, [*base, "--out", str(tmp_path / "a"), "--method", "primaps", "--init-from",
                            str(tmp_path / "missing.pt")], "--init-from", "missing.pt")
    one_line_error(capsys, [*base, "--out", str(tmp_path / "b"), "--method", "stego", "--init-from",
                            str(tmp_path / "missing.pt")], "--init-from", "--method primaps")
    one_line_error(capsys, [*base, "--out", str(tmp_path / "c"), "--method", "primaps", "--primaps-threshold", "1.5"],
                   "--primaps-threshold")
    one_line_error(capsys, [*base, "--out", str(tmp_path / "d"), "--method", "primaps", "--primaps-init", "random"],
                   "--primaps-init")
    one_line_error(capsys, [*base, "--out", str(tmp_path / "e"), "--method", "primaps+primaps"], "--method")
    assert not (tmp_path / "a").exists() and not (tmp_path / "c").exists()
