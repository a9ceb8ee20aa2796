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

    from stegoseg.features.crops import CropView
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
    from stegoseg.features.crops import CropView
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


def test_student_augs_equal_torchvision_as_the_reference_calls_it():
    """The reference's student copy (primaps_modules/transforms.py, Compose(student_augs=True)):
    ``GaussianBlur(21, sigma)``, then ``ColorJitter(0.1, 0.1, 0.1, 0.1)`` or ``Grayscale(3)``, on
    the normalised tensor. Here torchvision's transform objects, as the reference builds them,
    under a torch seed, against our function given the parameters those objects draw."""
    import torchvision.transforms as T

    from stegoseg.training.primaps_em import student_augment

    image = torch.randn(3, 24, 28, generator=torch.Generator().manual_seed(3))  # normalised: negative values too
    for seed in range(4):
        torch.manual_seed(seed)
        sigma = float(torch.empty(1).uniform_(0.1, 2.0))
        torch.manual_seed(100 + seed)
        expected = T.ColorJitter(0.1, 0.1, 0.1, 0.1)(T.GaussianBlur(21, sigma=(sigma, sigma))(image))
        # the parameters those two objects drew: GaussianBlur's sigma first, then the jitter's
        torch.manual_seed(100 + seed)
        torch.empty(1).uniform_(sigma, sigma)
        order, b, c, s, h = T.ColorJitter.get_params((0.9, 1.1), (0.9, 1.1), (0.9, 1.1), (-0.1, 0.1))
        params = {"sigma": sigma, "branch": "jitter", "jitter": True, "grey": False, "order": order.tolist(),
                  "brightness": b, "contrast": c, "saturation": s, "hue": h}
        torch.testing.assert_close(student_augment(image, params), expected, rtol=0, atol=0)
        assert student_augment(image, params).min() >= 0  # torchvision clamps the jittered normalised tensor
        grey = T.Grayscale(3)(T.GaussianBlur(21, sigma=(sigma, sigma))(image))
        torch.testing.assert_close(student_augment(image, dict(params, branch="grey", grey=True)), grey, rtol=0, atol=0)
        blur_only = T.GaussianBlur(21, sigma=(sigma, sigma))(image)
        for quiet in (dict(params, jitter=False), dict(params, branch="grey", grey=False)):
            torch.testing.assert_close(student_augment(image, quiet), blur_only, rtol=0, atol=0)


def test_student_augs_draws_follow_the_reference_probabilities():
    from stegoseg.training.primaps_em import draw_student_aug

    g = torch.Generator().manual_seed(0)
    draws = [draw_student_aug(g) for _ in range(4000)]
    rate = lambda key, cond=lambda d: True: np.mean([d[key] for d in draws if cond(d)])  # noqa: E731
    assert abs(np.mean([d["branch"] == "jitter" for d in draws]) - 0.5) < 0.03
    assert abs(rate("jitter", lambda d: d["branch"] == "jitter") - 0.3) < 0.03
    assert abs(rate("grey", lambda d: d["branch"] == "grey") - 0.1) < 0.02
    assert abs(rate("flip") - 0.5) < 0.03
    sigmas = np.array([d["sigma"] for d in draws])
    assert 0.1 <= sigmas.min() < 0.12 and 1.98 < sigmas.max() <= 2.0
    hues = np.array([d["hue"] for d in draws])
    assert -0.1 <= hues.min() < -0.09 and 0.09 < hues.max() <= 0.1
    again = torch.Generator().manual_seed(0)
    assert [draw_student_aug(again) for _ in range(3)] == draws[:3]  # seeded: a resume draws the same


def test_em_with_student_augs_reads_live_flipped_crops_and_resumes_exactly(synthetic_root, tmp_path):
    import lightning as L

    from stegoseg.features.crops import CropView
    from stegoseg.methods.common import build_backbone_from_config, build_split, prepare
    from stegoseg.training.primaps import PrimapsModule, build_pseudo_masks, fit_primaps
    from stegoseg.training.primaps_em import draw_student_aug, student_augment
    from stegoseg.training.steps import StepBatches, step_seed

    cfg = tiny_config(synthetic_root, method="primaps", steps=8, ckpt_every=3, primaps_ema_every=2,
                      primaps_student_augs=True, cache_dir=str(tmp_path / "cache"))
    backbone, _ = build_backbone_from_config(cfg)
    backbone.eval()
    cache = prepare(cfg, tmp_path, backbone, neighbors=False)
    view = CropView(build_split(cfg, "train"), cfg.resolution, True, "bilinear")
    masks = build_pseudo_masks(cfg, cache, view, progress=False)
    init = torch.randn(4, backbone.embed_dim, generator=torch.Generator().manual_seed(0))

    # one step's batch, against the crops flipped by hand
    module = PrimapsModule(cfg, backbone.embed_dim, 4, 4, init)
    module.masks, module.live = masks, [backbone]
    # step 5's batch as the step loader gives it with the crop view (images decoded there, no cached features)
    loaded = StepBatches(cache, None, 8, cfg.seed, crop_view=view, start_step=5, steps=6)[0]
    assert "feats" not in loaded and "image_knn" not in loaded
    index = loaded["index"].numpy()
    batch = module.live_batch(loaded, 5)
    g = torch.Generator().manual_seed(step_seed(cfg.seed, 5, 0, 11))
    params = [draw_student_aug(g) for _ in range(8)]
    assert 0 < sum(p["flip"] for p in params) < 8  # both kinds in this batch
    for i, (j, p) in enumerate(zip(index, params)):
        image = view[int(j)]["image"].float() / (255 if view[int(j)]["image"].dtype == torch.uint8 else 1)
        image = image.flip(-1) if p["flip"] else image
        with torch.no_grad():
            clean = backbone(backbone.normalize(image[None]))[0]
            student = backbone(student_augment(backbone.normalize(image), p)[None])[0]
        torch.testing.assert_close(batch["code"][i], clean, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(batch["student_code"][i], student, rtol=1e-5, atol=1e-5)
        mask = torch.from_numpy(np.array(masks[j]))
        assert torch.equal(batch["masks"][i], mask.flip(-1) if p["flip"] else mask)
        label = torch.from_numpy(np.asarray(cache.labels[j])).long()
        assert torch.equal(batch["label"][i].long(), label.flip(-1) if p["flip"] else label)
    assert not torch.allclose(batch["code"], batch["student_code"])

    class Kill(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if trainer.global_step == 5:
                raise RuntimeError("simulated crash")

    full = fit_primaps(cfg, tmp_path / "full", cache, masks, backbone.embed_dim, 4, 4, init, live=(backbone, view))
    plain = fit_primaps(replace_cfg(cfg, primaps_student_augs=False), tmp_path / "plain", cache, masks,
                        backbone.embed_dim, 4, 4, init)
    assert not torch.allclose(full.student.weight(), plain.student.weight())  # the option changes training
    with pytest.raises(RuntimeError, match="simulated crash"):
        from stegoseg.training.steps import fit_step_module

        L.seed_everything(cfg.seed, workers=True, verbose=False)
        killed = PrimapsModule(cfg, backbone.embed_dim, 4, 4, init)
        killed.masks, killed.live = masks, [backbone]
        fit_step_module(killed, cfg, tmp_path / "killed", cache, None, max_steps=cfg.steps, callbacks=[Kill()],
                        crop_view=view)
    resumed = fit_primaps(cfg, tmp_path / "killed", cache, masks, backbone.embed_dim, 4, 4, init, resume=True,
                          live=(backbone, view))
    for (name, a), (_, b) in zip(full.state_dict().items(), resumed.state_dict().items()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)


def replace_cfg(cfg, **changes):
    from stegoseg.config.stego import replace

    return replace(cfg, **changes)


def test_student_augs_through_train_and_refused_outside_primaps(synthetic_root, tmp_path, capsys):
    from stegoseg.model import load

    out = tmp_path / "run"
    assert main(["train", "--method", "primaps", "--primaps-student-augs", "--out", str(out), "--data-root",
                 str(synthetic_root), "--steps", "4", *PRIMAPS_CLI, *tiny_cli("train")]) == 0
    model = load(out / "checkpoint.pt")
    assert model.method == "primaps" and model.config["primaps_student_augs"] is True
    one_line_error(capsys, ["train", "--data-root", str(synthetic_root), "--steps", "3", *tiny_cli("train"),
                            "--out", str(tmp_path / "s"), "--method", "stego", "--primaps-student-augs"],
                   "--primaps-student-augs", "--method primaps")


def test_primaps_val_miou_selection_keeps_the_best_em_step(synthetic_root, tmp_path, capsys):
    """--select val-miou (the reference's model choice): every saved EM step and the last are
    candidates; checkpoint.pt holds the teacher prototypes of the step with the best recorded
    validation cluster mIoU, and that score is the one `evaluate` measures on checkpoint.pt."""
    from stegoseg.methods.common import evaluate_checkpoint_model
    from stegoseg.model import load
    from stegoseg.nn.primaps import PrototypeHead

    out = tmp_path / "sel"
    assert main(["train", "--method", "primaps", "--select", "val-miou", "--out", str(out), "--data-root",
                 str(synthetic_root), "--steps", "6", "--ckpt-every", "2", "--crf-workers", "1",
                 "--primaps-ema-every", "1", "--primaps-lr", "0.05", *tiny_cli("train")]) == 0  # a teacher that moves
    selection = json.loads((out / "selection.json").read_text())
    rows = selection["candidates"]
    assert selection["mode"] == "val-miou" and sorted(int(k) for k in rows) == [2, 4, 6]
    assert len({r["val_cluster_miou"] for r in rows.values()}) > 1  # the steps differ: the choice matters
    best = max(rows.values(), key=lambda r: r["val_cluster_miou"])["val_cluster_miou"]
    chosen = min(int(k) for k, r in rows.items() if r["val_cluster_miou"] == best)
    assert selection["chosen_step"] == chosen
    model = load(out / "checkpoint.pt")
    if chosen < 6:  # the chosen step's teacher, read from its Lightning checkpoint
        state = torch.load(out / "lightning" / f"step{chosen:06d}.ckpt", map_location="cpu",
                           weights_only=True)["state_dict"]
        teacher = PrototypeHead(model.code_dim, model.n_clusters)
        teacher.load_state_dict({k[len("teacher."):]: v for k, v in state.items() if k.startswith("teacher.")})
        torch.testing.assert_close(model.cluster_probe.centroids, teacher.weight().detach(), rtol=0, atol=0)
    cfg = tiny_config(synthetic_root, method="primaps", crf=False)
    measured = evaluate_checkpoint_model(cfg, model, tmp_path / "eval")["cluster"]["strict"]["miou"]
    assert measured == pytest.approx(best, abs=1e-9)
    assert (out / "selection.png").exists()
