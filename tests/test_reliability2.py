"""The bad-input catalogue, second round (docs/reliability.md, "Round 2"): one test per case;
each fails on the code before the round."""
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from conftest import tiny_cli, tiny_config
from PIL import Image

from stegoseg.cli import main
from stegoseg.errors import RunInterrupted, StegosegError

TINY = ["--no-crf", "--shifts", "fixed", "--cluster-fit", "online", "--steps", "4", "--ckpt-every", "2"]


@pytest.fixture
def data(tmp_path):
    from stegoseg.data.synthetic import make_synthetic_dataset

    return Path(make_synthetic_dataset(tmp_path / "data", n_train=10, n_val=4, size=(48, 64)))


def error_line(capsys) -> str:
    err = [line for line in capsys.readouterr().err.strip().splitlines() if line.startswith("stegoseg:")]
    assert len(err) == 1, err
    return err[0]


def train(data, out, *extra) -> int:
    return main(["train", "--data-root", str(data), "--out", str(out), *tiny_cli("train", *TINY), *extra])


@pytest.fixture
def trained(data, tmp_path):
    out = tmp_path / "run"
    assert train(data, out) == 0
    return out


# ----------------------------------------------------------------------- foreign --weights
def test_weights_of_another_architecture_are_refused(trained, tmp_path, capsys):
    from stegoseg.backbones.backbone import create_backbone

    other = tmp_path / "vits16.pth"
    torch.save(create_backbone("dino_vits16", pretrained=False, tiny=True).model.state_dict(), other)
    for command in (["segment", str(trained / "checkpoint.pt"), str(tmp_path), "--out", str(tmp_path / "s")],
                    ["evaluate", str(trained / "checkpoint.pt"), "--out", str(tmp_path / "e")]):
        for extra in ([], ["--replace-backbone-weights"]):
            assert main([*command, "--weights", str(other), *extra]) == 2
            line = error_line(capsys)
            assert "is not a dino_vits8 backbone" in line and "patch_embed.proj.weight" in line
    assert not (tmp_path / "e" / "metrics.json").exists()


def test_other_weights_of_the_same_architecture_need_an_explicit_option(trained, data, tmp_path, capsys):
    other = tmp_path / "other.pth"
    torch.save(_random_vits8(5), other)
    evaluate = ["evaluate", str(trained / "checkpoint.pt"), "--out", str(tmp_path / "e"), "--no-crf",
                "--eval-resolution", "48", "--no-progress", "--device", "cpu", "--weights", str(other)]
    assert main(evaluate) == 2
    assert "--replace-backbone-weights" in error_line(capsys)
    assert main([*evaluate, "--replace-backbone-weights"]) == 0
    assert json.loads((tmp_path / "e" / "metrics.json").read_text())["backbone"]["weights_replaced"] is True
    # the model's own backbone, saved to a file, is not "other weights"
    from stegoseg.model import load

    own = tmp_path / "own.pth"
    torch.save(load(trained / "checkpoint.pt").backbone.model.state_dict(), own)
    assert main([*evaluate[:-1], str(own), "--overwrite"]) == 0
    assert json.loads((tmp_path / "e" / "metrics.json").read_text())["backbone"]["weights_replaced"] is False


def _random_vits8(seed):
    from stegoseg.backbones.backbone import create_backbone

    torch.manual_seed(seed)
    return create_backbone("dino_vits8", pretrained=False, tiny=True).model.state_dict()


# ------------------------------------------------------------------------ huge images, inputs
def test_an_image_over_the_token_budget_is_refused_before_any_output(trained, tmp_path, capsys):
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    Image.new("RGB", (64, 48)).save(imgs / "a.png")
    Image.new("RGB", (20000, 20)).save(imgs / "z.png")
    assert main(["segment", str(trained / "checkpoint.pt"), str(imgs), "--out", str(tmp_path / "s"), "--quiet"]) == 2
    line = error_line(capsys)
    assert "z.png is 20000x20" in line and "320000x320" in line and "--resolution" in line
    assert not list((tmp_path / "s").glob("*.png")) if (tmp_path / "s").exists() else True


def test_a_non_image_among_the_inputs_is_found_before_any_output(trained, tmp_path, capsys):
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    for i in range(3):
        Image.new("RGB", (64, 48), (i * 60, 0, 0)).save(imgs / f"a{i}.png")
    (imgs / "zz.jpg").write_text("not a picture")
    assert main(["segment", str(trained / "checkpoint.pt"), str(imgs), "--out", str(tmp_path / "s"), "--quiet"]) == 2
    assert "zz.jpg is not an image" in error_line(capsys)
    assert not (tmp_path / "s").exists() or not list((tmp_path / "s").iterdir())


def test_segment_into_its_own_input_folder_warns(trained, tmp_path, caplog):
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    Image.new("RGB", (64, 48)).save(imgs / "a.jpg")
    assert main(["segment", str(trained / "checkpoint.pt"), str(imgs / "a.jpg"), "--out", str(imgs), "--quiet",
                 "--no-crf"]) == 0
    assert "is also a folder of input images" in caplog.text


def test_corrupt_or_tiny_training_image_is_named_before_feature_extraction(data, tmp_path, capsys):
    labels = data / "labels" / "train"
    (data / "imgs" / "train" / "zzz_last.jpg").write_bytes(b"\xff\xd8 broken")
    Image.new("L", (64, 48)).save(labels / "zzz_last.png")
    assert train(data, tmp_path / "a") == 2
    assert "zzz_last.jpg is not an image stegoseg can read" in error_line(capsys)
    assert not list((tmp_path / "a" / "cache").glob("*/meta.json"))
    (data / "imgs" / "train" / "zzz_last.jpg").unlink()
    (labels / "zzz_last.png").unlink()
    Image.new("RGB", (500, 1)).save(data / "imgs" / "train" / "thin.png")
    Image.new("L", (500, 1)).save(labels / "thin.png")
    assert train(data, tmp_path / "b") == 2
    line = error_line(capsys)
    assert "thin.png is 500x1" in line and "--no-five-crop" in line


def test_one_image_without_five_crop_says_what_to_do(tmp_path, capsys):
    from stegoseg.data.synthetic import make_synthetic_dataset

    one = make_synthetic_dataset(tmp_path / "one", n_train=1, n_val=1, size=(48, 64))
    assert train(one, tmp_path / "o", "--no-five-crop") == 2
    line = error_line(capsys)
    assert "1 image" in line and "five-crop" in line


def test_prepare_checks_label_values_before_extraction(data, tmp_path, capsys):
    assert main(["prepare", "--data-root", str(data), "--out", str(tmp_path / "p"), "--class-names", "a,b",
                 *tiny_cli("prepare")]) == 2
    assert "holds the value" in error_line(capsys)
    assert not list((tmp_path / "p" / "cache").glob("*/meta.json"))


# ------------------------------------------------------------------------- runs into one --out
def test_a_second_command_into_a_busy_out_is_refused(data, tmp_path, capsys):
    out = tmp_path / "busy"
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from stegoseg.preflight import lock_out; "
                               f"lock_out(sys.argv[1], 'train'); print('locked', flush=True); time.sleep(60)", str(out)],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        assert train(data, out) == 2
        line = error_line(capsys)
        assert f"pid {holder.pid}" in line and "in use by another stegoseg command" in line
        assert not (out / "checkpoint.pt").exists()
    finally:
        holder.kill()
        holder.wait()
    assert train(data, out) == 0  # free again once the other process is gone
    assert not (out / ".stegoseg.lock").exists()


# ---------------------------------------------------------------------- resume on other inputs
def test_resume_on_other_data_or_other_weights_is_refused(trained, tmp_path, capsys):
    from stegoseg.data.synthetic import make_synthetic_dataset

    other = make_synthetic_dataset(tmp_path / "other", n_train=14, n_val=4, size=(48, 64), seed=3)
    assert main(["train", "--data-root", str(other), "--out", str(trained), "--resume",
                 *tiny_cli("train", *TINY)]) == 2
    line = error_line(capsys)
    assert "trained on 10 images" in line and "14 images" in line
    weights = tmp_path / "w.pth"
    torch.save(_random_vits8(7), weights)
    data = json.loads((trained / "run_inputs.json").read_text())["data_root"]
    args = ["train", "--data-root", data, "--out", str(trained), "--resume", *tiny_cli("train", *TINY)]
    args = [a for a in args if a != "--no-pretrained"] + ["--weights", str(weights)]
    assert main(args) == 2
    assert "other weights" in error_line(capsys)
    # a moved copy of the same files resumes fine: the files' fingerprint includes their path, so the
    # same folder again is the case that must keep working
    assert main(["train", "--data-root", data, "--out", str(trained), "--resume", *tiny_cli("train", *TINY)]) == 0


# ------------------------------------------------------------------------------ damaged caches
def _cache(out: Path) -> Path:
    return next((out / "cache").glob("*/meta.json")).parent


@pytest.mark.parametrize("damage", ["n_items", "feature_shape", "nan", "truncated", "shard_items", "meta"])
def test_a_damaged_cache_is_found_on_open_and_rebuilt(data, tmp_path, damage, caplog):
    from stegoseg.features.cache import FeatureCache

    out = tmp_path / "p"
    prepare = ["prepare", "--data-root", str(data), "--out", str(out), *tiny_cli("prepare")]
    assert main(prepare) == 0
    cache = _cache(out)
    meta = json.loads((cache / "meta.json").read_text())
    if damage == "n_items":
        meta["n_items"] -= 5
        meta["ids"] = meta["ids"][:-5]
    elif damage == "feature_shape":
        c, h, w = meta["feature_shape"]
        meta["feature_shape"] = [c, h // 2, w * 2]  # the same number of bytes, misread
    if damage in ("n_items", "feature_shape"):
        (cache / "meta.json").write_text(json.dumps(meta))
    elif damage == "shard_items":
        meta["shard_items"] = "many"
        (cache / "meta.json").write_text(json.dumps(meta))
    elif damage == "nan":
        for shard in (cache / "shards").glob("features-*.f16"):
            feats = np.memmap(shard, dtype=np.float16, mode="r+")
            feats[:] = np.nan
            feats.flush()
    elif damage == "truncated":
        with open(cache / "shards" / "features-00000.f16", "r+b") as f:
            f.truncate(1000)
    elif damage == "meta":
        (cache / "meta.json").write_text("{not json")
    if damage != "nan":
        with pytest.raises(StegosegError, match="is damaged"):
            FeatureCache(cache).done
    caplog.clear()
    assert main(prepare) == 0
    assert "is damaged" in caplog.text and "rebuilding" in caplog.text
    rebuilt = FeatureCache(_cache(out))
    assert rebuilt.complete and np.isfinite(rebuilt.feature_batch([0, 1]).numpy()).all()


def test_a_truncated_neighbour_list_is_computed_again(data, tmp_path, caplog):
    out = tmp_path / "p"
    prepare = ["prepare", "--data-root", str(data), "--out", str(out), *tiny_cli("prepare")]
    assert main(prepare) == 0
    knn = next(_cache(out).glob("knn_*.npy"))
    good = np.load(knn)
    knn.write_bytes(knn.read_bytes()[:100])
    assert main(prepare) == 0
    assert "is damaged" in caplog.text
    assert np.array_equal(np.load(knn), good)


# ----------------------------------------------------------------------- messages that mislead
def test_malicious_weights_and_checkpoints_are_not_called_truncated(trained, tmp_path, capsys, caplog):
    class Payload:
        def __reduce__(self):
            return (os.system, ("true",))

    bad = tmp_path / "bad.pth"
    torch.save({"w": Payload()}, bad)
    args = ["train", "--out", str(tmp_path / "x"), "--data-root", str(trained.parent / "data"),
            *[a for a in tiny_cli("train", *TINY) if a != "--no-pretrained"], "--weights", str(bad)]
    assert main(args) == 2
    line = error_line(capsys)
    assert "nothing in it was run" in line and "weights_only" not in line and "likely succeed" not in line
    torch.save({"state_dict": Payload()}, trained / "lightning" / "last.ckpt")
    assert train(trained.parent / "data", trained, "--resume") == 0  # an earlier periodic checkpoint is used
    assert "Python objects other than plain tensors" in caplog.text and "truncated" not in caplog.text
    cfg = trained / "config.yaml"
    assert main(["evaluate", str(cfg), "--out", str(tmp_path / "e")]) == 2
    assert "is a YAML or text file" in error_line(capsys)


def test_a_model_folder_with_edited_class_names_is_refused_on_load(trained, tmp_path, capsys):
    from stegoseg.model import load

    folder = load(trained / "checkpoint.pt").save_pretrained(tmp_path / "m")
    config = json.loads((folder / "config.json").read_text())
    config["class_names"] = ["a", "b", "c"]
    (folder / "config.json").write_text(json.dumps(config))
    assert main(["evaluate", str(folder), "--out", str(tmp_path / "e")]) == 2
    line = error_line(capsys)
    assert str(folder) in line and "class_names lists 3 classes for a model of 4" in line


# ------------------------------------------------------------------------------ interruptions
class _Signal(L.Callback):
    def __init__(self, signum, at):
        self.signum, self.at = signum, at

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.at:
            os.kill(os.getpid(), self.signum)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_sigterm_or_ctrl_c_in_training_saves_the_step_and_resume_is_exact(data, tmp_path, signum):
    from stegoseg.methods.common import build_backbone_from_config, build_split, prepare
    from stegoseg.training.stego import fit_stego

    cfg = tiny_config(data, cache_dir=str(tmp_path / "cache"), steps=8, ckpt_every=100)
    backbone, _ = build_backbone_from_config(cfg)
    cache = prepare(cfg, tmp_path / "p", backbone)
    n = build_split(cfg, "train").n_classes
    full = fit_stego(cfg, tmp_path / "full", cache, n, True)
    with pytest.raises(RunInterrupted, match="--resume") as err:
        fit_stego(cfg, tmp_path / "k", cache, n, True, callbacks=[_Signal(signum, 3)])
    assert err.value.exit_code == 128 + signum and "after step 4 of 8" in str(err.value)
    assert (tmp_path / "k" / "lightning" / "last.ckpt").exists()  # no periodic checkpoint before step 100
    resumed = fit_stego(cfg, tmp_path / "k", cache, n, True, resume=True)
    for (name, a), (_, b) in zip(full.state_dict().items(), resumed.state_dict().items()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)


# ---------------------------------------------------------------------------- user files stay
def test_run_overwrite_keeps_a_users_files_in_the_run_folders(data, tmp_path):
    out = tmp_path / "r"
    args = ["run", "--data-root", str(data), "--out", str(out), "--no-baseline", *tiny_cli("run", *TINY)]
    assert main(args) == 0
    (out / "train" / "notes.txt").write_text("mine")
    (out / "segment" / "my.txt").write_text("mine")
    assert main([*args, "--overwrite"]) == 0
    assert (out / "train" / "notes.txt").read_text() == "mine" and (out / "segment" / "my.txt").exists()
    assert (out / "train" / "checkpoint.pt").exists() and list((out / "segment").glob("*_overlay.png"))


# ------------------------------------------------------------------------------------- serve
def test_serve_port_in_use_and_a_pixel_bomb_are_one_line(trained, tmp_path):
    import socket

    from stegoseg.serve import check_port_free, check_upload

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(StegosegError, match=f"--port {port} on 127.0.0.1 is not free"):
            check_port_free("127.0.0.1", port)
    bomb = tmp_path / "bomb.png"
    Image.new("1", (30000, 30000)).save(bomb)
    with pytest.raises(StegosegError, match="megapixels") as err:
        check_upload(bomb)
    assert "not an image" not in str(err.value)


def test_a_read_only_cache_folder_needs_no_lock_or_scan_files(data, tmp_path, monkeypatch):
    import errno

    from stegoseg.features import cache as cache_module

    out = tmp_path / "p"
    assert main(["prepare", "--data-root", str(data), "--out", str(out), *tiny_cli("prepare")]) == 0
    real_mkdir = Path.mkdir

    def read_only(self, *args, **kwargs):
        if ".locks" in str(self) or ".label-scans" in str(self):
            raise OSError(errno.EROFS, "Read-only file system", str(self))
        return real_mkdir(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", read_only)
    with cache_module.cache_lock(_cache(out)):
        pass
    assert train(data, tmp_path / "t", "--cache-dir", str(out / "cache")) == 0


# ------------------------------------------------------------------------------- full disks
def test_a_full_disk_during_training_names_the_checkpoint_and_leaves_no_partial_file(data, tmp_path, capsys,
                                                                                     monkeypatch):
    import errno

    real_save = torch.save

    def save(obj, f, *args, **kwargs):
        if str(f).endswith(".ckpt.tmp") and "global_step" in obj and obj["global_step"] >= 2:
            with open(f, "wb") as handle:
                handle.write(b"partial")
            raise OSError(errno.ENOSPC, "No space left on device", str(f))
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save)
    out = tmp_path / "t"
    assert train(data, out) == 2
    line = error_line(capsys)
    assert "disk full while writing the training checkpoint" in line and str(out / "lightning") in line
    assert "--resume" in line and ".tmp" not in line
    left = sorted(p.name for p in (out / "lightning").iterdir())
    assert all(not n.endswith(".tmp") for n in left) and all((out / "lightning" / n).stat().st_size > 1000 for n in left)


def test_segment_into_a_full_disk_names_the_file_and_keeps_images_whole(trained, tmp_path, capsys, monkeypatch):
    import errno

    from PIL import Image as PILImage

    imgs = tmp_path / "imgs"
    imgs.mkdir()
    for i in range(3):
        PILImage.new("RGB", (64, 48), (80 * i, 40, 40)).save(imgs / f"a{i}.png")
    real = PILImage.Image.save
    calls = {"n": 0}

    def save(self, fp, *args, **kwargs):
        if str(fp).endswith(".png") and ".a1_overlay." in str(fp):
            raise OSError(errno.ENOSPC, "No space left on device", str(fp))
        calls["n"] += 1
        return real(self, fp, *args, **kwargs)

    monkeypatch.setattr(PILImage.Image, "save", save)
    out = tmp_path / "s"
    assert main(["segment", str(trained / "checkpoint.pt"), str(imgs), "--out", str(out), "--no-progress",
                 "--no-crf", "--batch-size", "1", "--num-workers", "0"]) == 2
    line = error_line(capsys)
    assert "disk full while writing" in line and "a1_overlay.png" in line and "skips the images already" in line
    assert not (out / "a1.png").exists()  # no label map without its overlay
    assert (out / "a0.png").exists() and (out / "a0_overlay.png").exists()


def test_removing_an_image_reuses_the_cache_of_the_others(data, tmp_path, caplog):
    import time

    from stegoseg.features.cache import FeatureCache

    out = tmp_path / "p"
    prepare = ["prepare", "--data-root", str(data), "--out", str(out), *tiny_cli("prepare")]
    assert main(prepare) == 0
    first = FeatureCache(_cache(out))
    before = {i: first.feature_batch([k]).clone() for k, i in enumerate(first.ids)}
    victim = sorted((data / "imgs" / "train").iterdir())[0]
    victim.unlink()
    (data / "labels" / "train" / f"{victim.stem}.png").unlink()
    changed = sorted((data / "imgs" / "train").iterdir())[0]
    time.sleep(0.01)
    Image.open(changed).transpose(Image.FLIP_LEFT_RIGHT).save(changed)  # new content: recomputed
    caplog.clear()
    caplog.set_level("INFO", logger="stegoseg")
    assert main(prepare) == 0
    assert "reusing 40 of 45 items" in caplog.text  # 9 images x 5 crops, one of them rewritten
    after = FeatureCache(_cache(out))
    assert after.complete and after.n == 45 and not list((out / "cache").glob("*.previous"))
    for k, item in enumerate(after.ids):
        if not item.startswith(changed.stem):
            assert torch.equal(after.feature_batch([k]), before[item]), item
