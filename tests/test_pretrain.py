import json
import math

import lightning as L
import pytest
import torch

from stegoseg.backbones.backbone import create_backbone
from stegoseg.config.stego import make_config
from stegoseg.training.dino import (
    DinoPretrainModule,
    PretrainConfig,
    cosine_with_warmup,
    pretrain,
)


def tiny_pretrain_config(root, **kw):
    values = dict(
        data_root=str(root), arch="dino_vits8", tiny=True, out_dim=64, hidden_dim=32, bottleneck_dim=16,
        epochs=4, batch_size=4, global_crop_size=32, local_crop_size=16, n_local_views=2, num_workers=0,
        ckpt_every=2, log_every=1, readout_every=0, readout_images=4, readout_resolution=48,
        progress=False, accelerator="cpu", warmup_epochs=1, warmup_teacher_temp_epochs=1,
    )
    values.update(kw)
    return make_config(values, PretrainConfig)


def test_schedule_shape():
    assert cosine_with_warmup(0, 100, 10, 1.0, 0.0) == 0.0
    assert cosine_with_warmup(10, 100, 10, 1.0, 0.0) == pytest.approx(1.0)
    assert cosine_with_warmup(100, 100, 10, 1.0, 0.1) == pytest.approx(0.1)


def _old_cosine_with_warmup(step, total, warmup, base, final):
    """The hand-written schedule that ``cosine_with_warmup`` (now on lightly) replaced."""
    if step < warmup:
        return base * step / max(1, warmup)
    t = (step - warmup) / max(1, total - warmup)
    return final + 0.5 * (base - final) * (1 + math.cos(math.pi * min(1.0, t)))


@pytest.mark.parametrize("total,warmup,base,final", [
    (100, 10, 1.0, 0.0), (100, 10, 1.0, 0.1), (37, 5, 5e-4 * 64 / 256, 1e-6), (12, 0, 0.04, 0.4), (6, 6, 0.5, 0.0),
])
def test_schedule_is_closed_form_and_bit_identical_to_the_old_one(total, warmup, base, final):
    def closed_form(step):
        if step < warmup:
            return base * step / warmup
        return final + (base - final) * (1 + math.cos(math.pi * (step - warmup) / (total - warmup))) / 2

    steps = {0, warmup - 1, warmup, (warmup + total) // 2, total - 1, total} - {-1}
    for step in sorted(steps):
        value = cosine_with_warmup(step, total, warmup, base, final)
        assert type(value) is float
        if step < total or warmup < total:
            assert value == pytest.approx(closed_form(step), rel=1e-12, abs=1e-15), step
        assert value == _old_cosine_with_warmup(step, total, warmup, base, final), step  # bit-identical
    # every step of a run, and past its end
    args = (total, warmup, base, final)
    for step in range(total + 3):
        assert cosine_with_warmup(step, *args) == _old_cosine_with_warmup(step, *args)
    # at the end: final, except a schedule that is all warm-up (then still base there, as before)
    assert cosine_with_warmup(total, *args) == (base if warmup == total else final)


def test_pretrain_changes_weights_exports_a_loadable_backbone(synthetic_root, tmp_path):
    cfg = tiny_pretrain_config(synthetic_root)
    before = DinoPretrainModule(cfg, 24).teacher.state_dict()  # same seed -> same init as the run
    summary = pretrain(cfg, tmp_path / "p")
    assert summary["steps"] == 4 * (24 // 4)
    bb = create_backbone("dino_vits8", pretrained=False, weights=tmp_path / "p" / "backbone.pt")
    assert bb.tiny and bb.weights_sha256 == summary["sha256"]
    feats = bb.features(torch.rand(2, 3, 40, 48))
    assert feats.shape == (2, bb.embed_dim, 5, 6)
    changed = [k for k, v in bb.model.state_dict().items() if not torch.equal(v, before[k])]
    assert len(changed) > len(before) // 2
    # the periodic readout runs at the end on the labelled val split
    readout = json.loads((tmp_path / "p" / "readout.json").read_text())["readout"]
    assert [r["step"] for r in readout][0] == 0 and readout[-1]["step"] > 0  # the start and the end
    assert readout[-1]["acc"] > 100 / 4  # a k-NN vote on 4 generated classes beats chance
    assert (tmp_path / "p" / "readout.png").exists() and (tmp_path / "p" / "training_curves.png").exists()


def test_teacher_is_ema_of_student(synthetic_root, tmp_path):
    cfg = tiny_pretrain_config(synthetic_root, epochs=2)
    snapshots = {}

    class Spy(L.Callback):
        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            if trainer.global_step == 3:
                snapshots["student"] = {k: v.clone() for k, v in module.student.state_dict().items()}
                snapshots["teacher"] = {k: v.clone() for k, v in module.teacher.state_dict().items()}
                snapshots["m"] = module.momentum(3)

        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            if trainer.global_step == 4:
                snapshots["teacher_after"] = {k: v.clone() for k, v in module.teacher.state_dict().items()}

    pretrain(cfg, tmp_path / "p", callbacks=[Spy()])
    m = snapshots["m"]
    assert 0.996 <= m < 1
    for k, t_after in snapshots["teacher_after"].items():
        if t_after.is_floating_point():
            want = m * snapshots["teacher"][k] + (1 - m) * snapshots["student"][k]
            torch.testing.assert_close(t_after, want, rtol=1e-5, atol=1e-6, msg=k)


class _Kill(L.Callback):
    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        if trainer.global_step == 3:
            raise RuntimeError("simulated crash")


def test_resume_is_bit_identical(synthetic_root, tmp_path):
    cfg = tiny_pretrain_config(synthetic_root, epochs=1, readout_every=0, val_split=None)
    pretrain(cfg, tmp_path / "full")
    with pytest.raises(RuntimeError, match="simulated crash"):
        pretrain(cfg, tmp_path / "killed", callbacks=[_Kill()])
    pretrain(cfg, tmp_path / "killed", resume=True)
    a = torch.load(tmp_path / "full" / "backbone.pt", weights_only=True)["state_dict"]
    b = torch.load(tmp_path / "killed" / "backbone.pt", weights_only=True)["state_dict"]
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--arch", "resnet50_supervised"], "--arch resnet50_supervised"),
        (["--resume"], "--resume: no"),
        (["--epochs", "0"], "--epochs"),
    ],
)
def test_bad_pretrain_options_are_one_line_errors(synthetic_root, tmp_path, capsys, extra, message):
    from stegoseg.cli import main

    argv = ["pretrain", "--out", str(tmp_path / "p"), "--data-root", str(synthetic_root), "--tiny",
            "--accelerator", "cpu", "--no-progress", *extra]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("stegoseg: error:") and message in err[0], err
    assert not (tmp_path / "p").exists()  # nothing written for a run that cannot start


def test_pretrain_without_data_root_names_the_option(tmp_path, capsys):
    from stegoseg.cli import main

    assert main(["pretrain", "--out", str(tmp_path / "p"), "--tiny", "--no-progress"]) == 2
    assert "--data-root" in capsys.readouterr().err


def test_resume_keeps_the_readouts_and_the_log_of_the_steps_before(synthetic_root, tmp_path):
    import csv
    import json

    cfg = tiny_pretrain_config(synthetic_root, epochs=1, readout_every=2, ckpt_every=2, log_every=1)
    with pytest.raises(RuntimeError, match="simulated crash"):
        pretrain(cfg, tmp_path / "k", callbacks=[_Kill()])
    summary = pretrain(cfg, tmp_path / "k", resume=True)
    steps = [r["step"] for r in summary["readout"]]
    assert steps[:2] == [0, 2] and steps == sorted(set(steps))
    with open(tmp_path / "k" / "logs" / "metrics.csv") as f:
        logged = sorted({int(r["step"]) for r in csv.DictReader(f) if r.get("loss")})
    assert logged[:3] == [0, 1, 2] and logged == list(range(logged[-1] + 1))
    assert json.loads((tmp_path / "k" / "readout.json").read_text())["readout"] == summary["readout"]
