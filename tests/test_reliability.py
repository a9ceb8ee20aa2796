"""The bad-input catalogue (docs/reliability.md): one test per case.

Each case must end in one clear line (exit 2, naming the file or option and what to do),
found before the long work starts, with nothing lost or silently wrong.
"""
import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import tiny_cli, tiny_config
from PIL import Image

from stegoseg.cli import main
from stegoseg.errors import StegosegError

TINY = ["--no-crf", "--shifts", "fixed", "--cluster-fit", "online", "--steps", "4", "--ckpt-every", "2",
        "--log-every", "1"]  # on top of conftest's TINY_CLI


@pytest.fixture
def data(tmp_path):
    """A fresh small labelled folder per test (tests below edit it): 4 classes, values 0..3."""
    from stegoseg.data.synthetic import make_synthetic_dataset

    return Path(make_synthetic_dataset(tmp_path / "data", n_train=10, n_val=4, size=(48, 64)))


def one_error_line(capsys) -> str:
    err = [line for line in capsys.readouterr().err.strip().splitlines() if line.startswith("stegoseg:")]
    assert len(err) == 1, err
    return err[0]


def no_feature_cache(out: Path) -> bool:
    return not list((out / "cache").glob("*/meta.json"))


def put_label_value(label_path: Path, value: int) -> None:
    label = np.array(Image.open(label_path))
    h, w = label.shape
    label[h // 2 - 3 : h // 2 + 3, w // 2 - 3 : w // 2 + 3] = value  # survives any centre crop
    Image.fromarray(label).save(label_path)


# --------------------------------------------------------------------------- 1. label values
@pytest.mark.parametrize("option", [["--class-names", "a,b"], ["--n-classes", "2"]])
def test_label_value_above_the_class_count_is_refused_before_any_work(data, tmp_path, capsys, option):
    out = tmp_path / "t"
    assert main(["train", "--data-root", str(data), "--out", str(out), *tiny_cli("train", *TINY), *option]) == 2
    line = one_error_line(capsys)
    assert "holds the value 3" in line and "there are 2 classes" in line and option[0] in line
    assert "labels/train/" in line
    assert no_feature_cache(out)  # refused before feature extraction


def test_stray_value_in_labels_with_classes_txt_is_refused(data, tmp_path, capsys):
    (data / "classes.txt").write_text("a\nb\nc\nd\n")
    victim = sorted((data / "labels" / "train").glob("*.png"))[3]
    put_label_value(victim, 50)
    assert main(["train", "--data-root", str(data), "--out", str(tmp_path / "t"), *tiny_cli("train", *TINY)]) == 2
    line = one_error_line(capsys)
    assert victim.name in line and "value 50" in line and "classes.txt" in line


def test_stray_value_without_classes_txt_does_not_invent_classes(data, tmp_path, capsys):
    (data / "classes.txt").unlink(missing_ok=True)
    victim = sorted((data / "labels" / "train").glob("*.png"))[2]
    put_label_value(victim, 50)
    assert main(["train", "--data-root", str(data), "--out", str(tmp_path / "t"), *tiny_cli("train", *TINY)]) == 2
    line = one_error_line(capsys)
    assert "cannot infer the number of classes" in line and victim.name in line and "--n-classes" in line


def test_out_of_range_value_in_val_is_refused_before_training(data, tmp_path, capsys):
    victim = sorted((data / "labels" / "val").glob("*.png"))[1]
    put_label_value(victim, 7)
    out = tmp_path / "r"
    assert main(["run", "--data-root", str(data), "--out", str(out), *tiny_cli("run", *TINY)]) == 2
    line = one_error_line(capsys)
    assert victim.name in line and "value 7" in line and "val split" in line
    assert not (out / "train").exists()


def test_evaluation_itself_refuses_out_of_range_values(data):
    from stegoseg.data import build_dataset
    from stegoseg.evaluation.protocol import EvalConfig, evaluate_model
    from stegoseg.methods.baseline import fit_feature_baseline

    cfg = tiny_config(data)
    model = fit_feature_baseline(cfg, data.parent / "b")
    victim = sorted((data / "labels" / "val").glob("*.png"))[0]
    put_label_value(victim, 9)
    val = build_dataset("directory", data, "val")
    with pytest.raises(StegosegError, match="holds the value 9"):
        evaluate_model(model, val, EvalConfig(resolution=48, crf=False), progress=False)


def test_linear_probe_class_mismatch_is_an_error_not_a_dropped_metric(data):
    from stegoseg.data import build_dataset
    from stegoseg.evaluation.protocol import EvalConfig, evaluate_model
    from stegoseg.methods.baseline import fit_feature_baseline

    model = fit_feature_baseline(tiny_config(data), data.parent / "b")
    val = build_dataset("directory", data, "val", n_classes=6)
    with pytest.raises(StegosegError, match="linear probe predicts 4 classes"):
        evaluate_model(model, val, EvalConfig(resolution=48, crf=False), progress=False)


# --------------------------------------------------------------------------- 2. stale caches
def _prepare(data, out):
    from stegoseg.methods.common import prepare

    return prepare(tiny_config(data), out)


def test_cache_follows_added_and_replaced_images(data, tmp_path):
    out = tmp_path / "p"
    first = _prepare(data, out)
    assert first.n == 10 * 5
    train = data / "imgs" / "train"
    shutil.copy(sorted(train.iterdir())[0], train / "zz_new.png")
    shutil.copy(sorted((data / "labels" / "train").iterdir())[0], data / "labels" / "train" / "zz_new.png")
    second = _prepare(data, out)
    assert second.n == 11 * 5 and second.ids[-1] == "zz_new#crop4"
    before = np.array(second.features[0])
    target = sorted(train.iterdir())[0]
    img = np.array(Image.open(target))
    Image.fromarray(255 - img).save(target)  # replaced content, same name
    third = _prepare(data, out)
    assert not np.array_equal(np.array(third.features[0]), before)


def test_rerun_after_deleting_a_corrupt_image_assigns_features_to_the_right_images(data, tmp_path, capsys):
    train = data / "imgs" / "train"
    bad = train / "c_bad.png"
    bad.write_bytes(b"not an image at all")
    shutil.copy(sorted((data / "labels" / "train").iterdir())[0], data / "labels" / "train" / "c_bad.png")
    out = tmp_path / "p"
    assert main(["prepare", "--data-root", str(data), "--out", str(out), *tiny_cli("prepare", *TINY)]) == 2
    assert "c_bad.png" in one_error_line(capsys)
    bad.unlink()
    (data / "labels" / "train" / "c_bad.png").unlink()
    cache = _prepare(data, out)
    assert cache.complete and "c_bad#crop0" not in cache.ids
    # every item's features are those of its own image: recompute one independently
    from stegoseg.features.cache import CropView
    from stegoseg.methods.common import build_backbone_from_config, build_split

    cfg = tiny_config(data)
    backbone, _ = build_backbone_from_config(cfg)
    view = CropView(build_split(cfg, "train"), 32, True, "bilinear")
    i = cache.ids.index(view[27]["id"])
    with torch.no_grad():
        expect = backbone(backbone.normalize(view[27]["image"][None]))[0].numpy().astype(np.float16)
    assert np.allclose(np.array(cache.features[i]), expect, atol=1e-2)


# --------------------------------------------------------------------------- 3. --overwrite / --resume
def test_overwrite_clears_the_old_run_and_resume_refuses_changed_settings(data, tmp_path, capsys):
    out = tmp_path / "t"
    assert main(["train", "--data-root", str(data), "--out", str(out), *tiny_cli("train", *TINY)]) == 0
    (out / "selection.png").write_bytes(b"stale figure of an older run")
    (out / "my_notes.txt").write_text("the user's own file")
    assert main(["train", "--data-root", str(data), "--out", str(out), *tiny_cli("train", *TINY), "--w-knn", "0.5", "--overwrite",
                 "--steps", "2"]) == 0
    assert not (out / "selection.png").exists() and (out / "my_notes.txt").exists()
    assert not (out / "lightning" / "step000004.ckpt").exists()  # the 4-step run's files are gone
    assert json.loads((out / "run_config.json").read_text())["w_knn"] == 0.5
    capsys.readouterr()
    assert main(["train", "--data-root", str(data), "--out", str(out), *tiny_cli("train", *TINY), "--w-knn", "0.7", "--resume"]) == 2
    line = one_error_line(capsys)
    assert "--w-knn 0.5 -> 0.7" in line and "--overwrite" in line


def test_fresh_start_never_trains_on_top_of_an_unfinished_run(data, tmp_path, capsys):
    out = tmp_path / "t"
    assert main(["train", "--data-root", str(data), "--out", str(out), *tiny_cli("train", *TINY)]) == 0
    (out / "checkpoint.pt").unlink()  # as if the run had been killed before the end
    assert main(["train", "--data-root", str(data), "--out", str(out), *tiny_cli("train", *TINY)]) == 2
    assert "--resume" in one_error_line(capsys)


# --------------------------------------------------------------------------- 4. resume keeps the log
def test_resume_keeps_the_training_log_of_the_steps_before(data, tmp_path):
    import csv

    out = tmp_path / "t"
    assert main(["train", "--data-root", str(data), "--out", str(out), *tiny_cli("train", *TINY)]) == 0
    assert main(["train", "--data-root", str(data), "--out", str(out), *tiny_cli("train", *TINY), "--steps", "8", "--resume"]) == 0
    with open(out / "logs" / "metrics.csv") as f:
        steps = sorted({int(r["step"]) for r in csv.DictReader(f) if r["loss/loss"]})
    assert steps == list(range(8))


# --------------------------------------------------------------------------- 5. concurrent prepare
def test_two_prepares_into_one_cache_take_turns(data, tmp_path):
    cache = tmp_path / "shared-cache"
    cmd = [sys.executable, "-c", "import sys; from stegoseg.cli import main; sys.exit(main(sys.argv[1:]))",
           "prepare", "--data-root", str(data), "--cache-dir", str(cache), *tiny_cli("prepare", *TINY)]
    procs = [subprocess.Popen(cmd + ["--out", str(tmp_path / f"o{i}")], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE) for i in range(2)]
    results = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [r[1].decode()[-500:] for r in results]
    from stegoseg.features.cache import FeatureCache

    (folder,) = [p for p in cache.iterdir() if (p / "meta.json").exists()]
    assert FeatureCache(folder).complete
    assert not list(folder.glob("*.tmp*"))


# --------------------------------------------------------------------------- 6. segment outputs
@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from stegoseg.data.synthetic import make_synthetic_dataset

    root = tmp_path_factory.mktemp("ck")
    data = make_synthetic_dataset(root / "data", n_train=10, n_val=4, size=(48, 64))
    assert main(["baseline", "--data-root", str(data), "--out", str(root / "b"), *tiny_cli("baseline", *TINY), "--max-eval-images", "2"]) == 0
    return root / "b" / "checkpoint.pt"


def test_segment_same_stem_inputs_get_distinct_outputs(checkpoint, tmp_path):
    a = tmp_path / "in"
    (a / "x").mkdir(parents=True)
    (a / "y").mkdir()
    rng = np.random.default_rng(0)
    for path in (a / "a.jpg", a / "a.png", a / "x" / "b.png", a / "y" / "b.png"):
        Image.fromarray((rng.random((24, 30, 3)) * 255).astype(np.uint8)).save(path)
    out = tmp_path / "seg"
    assert main(["segment", str(checkpoint), str(a / "a.jpg"), str(a / "a.png"), str(a / "x" / "b.png"),
                 str(a / "y" / "b.png"), "--out", str(out), "--quiet", "--no-crf", "--num-workers", "0"]) == 0
    labels = sorted(p.name for p in out.glob("*.png") if not p.name.endswith("_overlay.png"))
    assert labels == ["a_jpg.png", "a_png.png", "x_b_png.png", "y_b_png.png"]


def test_segment_never_writes_through_a_hard_link_to_an_input(checkpoint, tmp_path, capsys):
    src = tmp_path / "in"
    src.mkdir()
    image = src / "photo.png"
    Image.fromarray(np.full((24, 30, 3), 77, np.uint8)).save(image)
    original = image.read_bytes()
    out = tmp_path / "seg"
    out.mkdir()
    os.link(image, out / "photo.png")  # the label map's name, hard-linked to the input
    assert main(["segment", str(checkpoint), str(image), "--out", str(out), "--quiet", "--overwrite", "--no-crf"]) == 2
    assert "is an input image" in one_error_line(capsys)
    assert image.read_bytes() == original


def test_segment_writes_outputs_by_rename(tmp_path):
    from stegoseg.preflight import atomic_write

    target = tmp_path / "t.png"
    target.write_bytes(b"old")
    linked = tmp_path / "link.png"
    os.link(target, linked)
    atomic_write(target, lambda tmp: Image.fromarray(np.zeros((2, 2), np.uint8)).save(tmp, format="PNG"), suffix=".png")
    assert linked.read_bytes() == b"old" and target.read_bytes() != b"old"


# --------------------------------------------------------------------------- 8. CRF on the command line
def test_segment_with_crf_in_one_process(checkpoint, tmp_path):
    img = tmp_path / "p.png"
    Image.fromarray((np.random.default_rng(3).random((24, 30, 3)) * 255).astype(np.uint8)).save(img)
    assert main(["segment", str(checkpoint), str(img), "--out", str(tmp_path / "s"), "--quiet", "--crf",
                 "--crf-workers", "1", "--num-workers", "0"]) == 0
    assert Image.open(tmp_path / "s" / "p.png").size == (30, 24)


# --------------------------------------------------------------------------- 9. explicit none
def test_explicit_none_overrides_the_checkpoint_config(checkpoint, tmp_path):
    out = tmp_path / "e"
    assert main(["evaluate", str(checkpoint), "--out", str(out), "--max-eval-images", "none", "--no-crf",
                 "--no-progress", "--eval-resolution", "none", "--eval-crop", "none"]) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["n_images"] == 4 and m["config"]["resolution"] is None and m["config"]["max_images"] is None


# --------------------------------------------------------------------------- 10. full disk
def test_prepare_into_a_full_disk_fails_before_writing(data, tmp_path, capsys, monkeypatch):
    import stegoseg.preflight as preflight

    monkeypatch.setattr(preflight, "free_bytes", lambda folder: 1000)
    out = tmp_path / "p"
    assert main(["prepare", "--data-root", str(data), "--out", str(out), *tiny_cli("prepare", *TINY)]) == 2
    line = one_error_line(capsys)
    assert "not enough disk space for the feature cache" in line and "1.0 KB are free" in line and "--cache-dir" in line
    assert not [p for p in (out / "cache").iterdir() if not p.name.startswith(".")]


def test_a_disk_filling_up_midway_is_one_line_and_a_rerun_resumes(data, tmp_path, capsys, monkeypatch):
    from stegoseg.features import shards

    written = []
    real = shards._write_file

    def fills_up(data, path):
        if len(written) >= 6:  # two shards (thumbs, labels, features) fit, then the disk is full
            raise OSError(errno.ENOSPC, "No space left on device")
        written.append(path)
        real(data, path)

    monkeypatch.setattr(shards, "_write_file", fills_up)
    out = tmp_path / "p"
    args = ["prepare", "--data-root", str(data), "--out", str(out), *tiny_cli("prepare", *TINY), "--cache-shard-items", "10"]
    assert main(args) == 2
    line = one_error_line(capsys)
    assert "disk full while writing" in line and "shards/thumbs-00002.u8" in line and "run the same command again" in line
    cache = next(p for p in (out / "cache").iterdir() if not p.name.startswith("."))
    assert sorted(f.name for f in (cache / "shards").iterdir()) == [  # whole shards only, no temporary file
        "features-00000.f16", "features-00001.f16", "labels-00000.u8", "labels-00001.u8", "thumbs-00000.u8",
        "thumbs-00001.u8"]
    monkeypatch.setattr(shards, "_write_file", real)
    assert main(args) == 0
    from stegoseg.features.cache import FeatureCache

    assert FeatureCache(cache).complete


def test_training_checks_checkpoint_space_first(data, tmp_path, capsys, monkeypatch):
    import stegoseg.preflight as preflight
    from stegoseg.methods.common import prepare

    out = tmp_path / "t"
    prepare(tiny_config(data), out)  # the cache fits; the checkpoints will not
    monkeypatch.setattr(preflight, "free_bytes", lambda folder: 10_000)
    assert main(["train", "--data-root", str(data), "--out", str(out), *tiny_cli("train", *TINY)]) == 2
    assert "training checkpoints" in one_error_line(capsys)
    assert not (out / "lightning").exists()


def test_checkpoint_save_into_a_full_disk_keeps_the_old_file(checkpoint, tmp_path, monkeypatch):
    from stegoseg.model import load

    model = load(checkpoint)
    target = tmp_path / "c.pt"
    target.write_bytes(b"previous checkpoint")

    def full(obj, f, *a, **k):
        Path(f).write_bytes(b"partial")
        raise RuntimeError("[enforce fail at inline_container.cc] . PytorchStreamWriter failed writing file")

    monkeypatch.setattr(torch, "save", full)
    with pytest.raises(StegosegError, match="nothing was written"):
        model.save(target)
    assert target.read_bytes() == b"previous checkpoint" and not list(tmp_path.glob("*.tmp"))


# --------------------------------------------------------------------------- weak cases
def test_missing_val_split_is_reported_before_prepare(data, tmp_path, capsys):
    shutil.rmtree(data / "imgs" / "val")
    shutil.rmtree(data / "labels" / "val")
    out = tmp_path / "r"
    assert main(["run", "--data-root", str(data), "--out", str(out), *tiny_cli("run", *TINY)]) == 2
    line = one_error_line(capsys)
    assert "validation split 'val'" in line and "--val-split" in line
    assert no_feature_cache(out)


def test_file_errors_from_the_environment_are_one_line(tmp_path, capsys, monkeypatch):
    import stegoseg.methods.common as pipeline

    def denied(*a, **k):
        raise PermissionError(errno.EACCES, "Permission denied", "/data/locked/x.npy")

    monkeypatch.setattr(pipeline, "prepare", denied)
    assert main(["prepare", "--dataset", "synthetic", "--out", str(tmp_path / "p"), *tiny_cli("prepare", *TINY)]) == 2
    line = one_error_line(capsys)
    assert "/data/locked/x.npy" in line and "permission denied" in line.lower()


def test_evaluate_checks_its_output_folder_first(checkpoint, tmp_path, capsys):
    blocker = tmp_path / "is-a-file"
    blocker.write_text("x")
    assert main(["evaluate", str(checkpoint), "--out", str(blocker), "--no-progress"]) == 2
    assert "a file of that name exists" in one_error_line(capsys)
    assert main(["evaluate", str(checkpoint), "--out", str(blocker / "sub"), "--no-progress"]) == 2
    assert "is a file, not a folder" in one_error_line(capsys)


@pytest.mark.parametrize("option, message", [
    (["--accelerator", "tpu7"], "--accelerator must be one of"),
    (["--device", "tpu7"], "--device must be auto, cpu"),
    (["--dim", "0"], "--dim must be >= 1"),
    (["--lr", "-1"], "--lr must be > 0"),
    (["--resolution", "-32"], "--resolution must be >= 1"),
    (["--eval-resolution", "0"], "--eval-resolution must be >= 1"),
    (["--max-eval-images", "0"], "--max-eval-images must be >= 1"),
    (["--backbone", "nope"], "nope"),
])
def test_bad_options_fail_at_once(data, tmp_path, capsys, option, message):
    out = tmp_path / "t"
    assert main(["run", "--data-root", str(data), "--out", str(out), *tiny_cli("run", *TINY), *option]) == 2
    assert message in one_error_line(capsys)
    assert not out.exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without a GPU")
def test_gpu_options_without_a_gpu(data, tmp_path, capsys):
    assert main(["train", "--data-root", str(data), "--out", str(tmp_path / "t"), *tiny_cli("train", *TINY), "--accelerator", "gpu"]) == 2
    assert "no CUDA GPU" in one_error_line(capsys)
    assert main(["segment", "x.pt", "y.png", "--device", "cuda"]) == 2
    assert "no CUDA GPU" in one_error_line(capsys)


def test_dangling_symlink_in_a_dataset_is_named(data, tmp_path, capsys):
    os.symlink(tmp_path / "gone.jpg", data / "imgs" / "train" / "zz.jpg")
    assert main(["train", "--data-root", str(data), "--out", str(tmp_path / "t"), *tiny_cli("train", *TINY)]) == 2
    line = one_error_line(capsys)
    assert "zz.jpg is a link to a missing file" in line


def test_appledouble_files_in_a_segment_folder_are_skipped(checkpoint, tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    Image.fromarray(np.full((20, 20, 3), 9, np.uint8)).save(src / "x.jpg")
    (src / "._x.jpg").write_bytes(b"\x00\x05\x16\x07 AppleDouble")
    assert main(["segment", str(checkpoint), str(src), "--out", str(tmp_path / "s"), "--quiet", "--no-crf"]) == 0
    assert sorted(p.name for p in (tmp_path / "s").iterdir()) == ["labels.json", "x.png", "x_overlay.png"]


def test_original_size_segmentation_of_a_huge_image_warns_first(tmp_path, caplog):
    from stegoseg.segment import warn_large_images

    big, small = tmp_path / "big.png", tmp_path / "small.png"
    Image.new("RGB", (6000, 4000)).save(big)
    Image.new("RGB", (320, 240)).save(small)
    with caplog.at_level("WARNING", logger="stegoseg"):
        assert warn_large_images([big, small], patch=8) == [big]
    assert "big.png is 6000x4000" in caplog.text and "375000 tokens" in caplog.text


def test_truncated_last_checkpoint_resumes_from_an_earlier_one(data, tmp_path, caplog):
    from stegoseg.methods.stego import train_stego

    cfg = tiny_config(data, steps=4, ckpt_every=2)
    out = tmp_path / "t"
    train_stego(cfg, out)
    reference = torch.load(out / "checkpoint.pt", weights_only=True)["head"]["state_dict"]
    last = out / "lightning" / "last.ckpt"
    last.write_bytes(last.read_bytes()[:1000])
    (out / "checkpoint.pt").unlink()
    with caplog.at_level("WARNING", logger="stegoseg"):
        train_stego(cfg, out, resume=True)
    assert "cannot read" in caplog.text and "last.ckpt" in caplog.text
    again = torch.load(out / "checkpoint.pt", weights_only=True)["head"]["state_dict"]
    assert all(torch.equal(reference[k], again[k]) for k in reference)  # step-indexed: the same result


def test_unreadable_checkpoints_on_resume_end_in_one_line(data, tmp_path, capsys):
    out = tmp_path / "t"
    assert main(["train", "--data-root", str(data), "--out", str(out), *tiny_cli("train", *TINY)]) == 0
    for path in (out / "lightning").glob("*.ckpt"):
        path.write_bytes(b"garbage")
    assert main(["train", "--data-root", str(data), "--out", str(out), *tiny_cli("train", *TINY), "--resume"]) == 2
    line = one_error_line(capsys)
    assert "no checkpoint in" in line and "weights_only" not in line


def test_resume_after_a_kill_during_prepare_continues(data, tmp_path):
    from stegoseg.methods.common import resolve_run_paths

    out = tmp_path / "r"
    cfg = resolve_run_paths(tiny_config(data), out)
    cfg.save(out / "config.yaml")  # what `run` had written when it was killed in prepare
    args = ["run", "--data-root", str(data), "--out", str(out), *tiny_cli("run", *TINY), "--resume", "--no-baseline"]
    assert main(args) == 0
    assert (out / "report.md").exists()


def test_crf_workers_die_with_their_parent(tmp_path):
    script = (
        "import os, sys, time\n"
        "from stegoseg.evaluation.crf import crf_pool\n"
        "pool = crf_pool(1)\n"
        "print(pool.submit(os.getpid).result(), flush=True)\n"
        "time.sleep(60)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    worker = int(proc.stdout.readline())
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    for _ in range(100):
        try:
            os.kill(worker, 0)
        except ProcessLookupError:
            break
        try:  # reap it if it is our grandchild's zombie
            os.waitpid(worker, os.WNOHANG)
        except ChildProcessError:
            pass
        time.sleep(0.05)
    else:
        os.kill(worker, signal.SIGKILL)
        pytest.fail("the CRF worker outlived its parent")


class NotATensor:
    pass


def test_checkpoint_errors_never_suggest_weights_only_false(checkpoint, tmp_path, capsys):
    odd = tmp_path / "odd.pt"
    torch.save({"format": "stegoseg", "payload": NotATensor()}, odd)
    cut = tmp_path / "cut.pt"
    cut.write_bytes(checkpoint.read_bytes()[:5000])
    for path, reason in ((odd, "other than plain tensors"), (cut, "truncated or corrupt")):
        assert main(["evaluate", str(path), "--out", str(tmp_path / "e")]) == 2
        line = one_error_line(capsys)
        assert reason in line and "weights_only" not in line


def test_resume_loads_lightning_checkpoints_weights_only(data, tmp_path, capsys):
    out = tmp_path / "t"
    assert main(["train", "--data-root", str(data), "--out", str(out), *tiny_cli("train", *TINY)]) == 0
    for path in (out / "lightning").glob("*.ckpt"):
        state = torch.load(path, weights_only=True)
        state["smuggled"] = NotATensor()  # arbitrary objects must never be unpickled on resume
        torch.save(state, path)
    assert main(["train", "--data-root", str(data), "--out", str(out), *tiny_cli("train", *TINY), "--resume"]) == 2
    assert "can be read" in one_error_line(capsys)


def test_nan_or_reshaped_weights_are_refused(checkpoint, tmp_path, capsys):
    ckpt = torch.load(checkpoint, weights_only=True)
    ckpt["cluster_probe"]["centroids"][0, 0] = float("nan")
    nan = tmp_path / "nan.pt"
    torch.save(ckpt, nan)
    ckpt = torch.load(checkpoint, weights_only=True)
    ckpt["cluster_probe"]["centroids"] = ckpt["cluster_probe"]["centroids"][:, :3]
    shaped = tmp_path / "shaped.pt"
    torch.save(ckpt, shaped)
    for path, reason in ((nan, "NaN or infinite"), (shaped, "damaged or was edited")):
        assert main(["segment", str(path), str(path), "--out", str(tmp_path / "s")]) == 2
        assert reason in one_error_line(capsys)


def test_overwrite_keeps_the_previous_run_when_the_new_one_is_refused(data, tmp_path, capsys):
    out = tmp_path / "t"
    assert main(["train", "--data-root", str(data), "--out", str(out), *tiny_cli("train", *TINY)]) == 0
    before = (out / "checkpoint.pt").read_bytes()
    assert main(["train", "--data-root", str(data), "--out", str(out), *tiny_cli("train", *TINY), "--n-classes", "2",
                 "--overwrite"]) == 2
    assert "holds the value 3" in one_error_line(capsys)
    assert (out / "checkpoint.pt").read_bytes() == before  # refused before anything was removed


def test_label_scan_is_redone_when_the_ignore_value_changes(data, tmp_path, capsys):
    victim = sorted((data / "labels" / "train").glob("*.png"))[0]
    put_label_value(victim, 7)
    out = tmp_path / "p"
    assert main(["train", "--data-root", str(data), "--out", str(out), *tiny_cli("train", *TINY),
                 "--n-classes", "4"]) == 2
    assert "holds the value 7" in one_error_line(capsys)
    from stegoseg.methods.common import check_before_work

    # the message's advice works on the rerun: 7 marked unlabelled is accepted (same scan folder)
    assert check_before_work(tiny_config(data, n_classes=4, ignore_index=7), out) == 4


def test_yaml_numbers_written_as_strings_are_numbers_and_bad_ones_name_the_option(tmp_path, capsys):
    import argparse

    from stegoseg.config.stego import add_config_arguments, resolve_config

    p = argparse.ArgumentParser()
    add_config_arguments(p)
    good = tmp_path / "good.yaml"
    good.write_text("lr: 5e-4\nsteps: '12'\nfive_crop: 'false'\n")
    cfg = resolve_config(p.parse_args(["--config", str(good)]))
    assert (cfg.lr, cfg.steps, cfg.five_crop) == (5e-4, 12, False)
    bad = tmp_path / "bad.yaml"
    bad.write_text("lr: fast\n")
    with pytest.raises(StegosegError, match="option lr: 'fast' is not a valid float"):
        resolve_config(p.parse_args(["--config", str(bad)]))


def test_protocol_on_the_command_line_replaces_the_quirks_of_a_yaml_or_checkpoint_config(tmp_path):
    import argparse

    from stegoseg.config.stego import Config, add_config_arguments, resolve_config

    p = argparse.ArgumentParser()
    add_config_arguments(p)
    Config(protocol="reference").save(tmp_path / "ref.yaml")
    ref = resolve_config(p.parse_args(["--config", str(tmp_path / "ref.yaml")]))
    assert ref.knn_dropout is True and ref.pos_embed == "dino"
    clean = resolve_config(p.parse_args(["--config", str(tmp_path / "ref.yaml"), "--protocol", "clean"]))
    assert (clean.knn_dropout, clean.crop_jpeg, clean.pos_embed, clean.crf_reference_input) == (False, False, "timm", False)
    mixed = resolve_config(p.parse_args(["--config", str(tmp_path / "ref.yaml"), "--protocol", "clean",
                                         "--crop-jpeg"]))
    assert mixed.crop_jpeg is True and mixed.knn_dropout is False


def test_segment_renames_an_input_named_like_another_inputs_overlay():
    from stegoseg.segment import output_stems

    names = output_stems([Path("/p/a.jpg"), Path("/p/a_overlay.jpg"), Path("/p/b.png")])
    assert names == ["a", "a_overlay_jpg", "b"]
    outputs = {n for stem in names for n in (stem, stem + "_overlay")}
    assert len(outputs) == 6  # no label map or overlay written twice


def test_label_checks_read_labels_the_way_their_format_does():
    """SUIM stores colour-coded masks: the checks before work must decode them as the dataset
    does (reading them as single-channel ids would refuse every file)."""
    from conftest import SHARED_DATA
    from stegoseg.data import build_dataset
    from stegoseg.preflight import check_label_range, label_values

    root = SHARED_DATA / "suim-sample"
    if not root.is_dir():
        pytest.skip("no SUIM sample beside the repository")
    suim = build_dataset("suim", root, None)
    values = label_values(suim, progress=False)
    expect = set()
    for i in range(len(suim)):
        label = suim.load(i).label
        expect |= set(np.unique(label[label != 255]).tolist())
    assert set(values) == expect and max(values) < suim.n_classes
    check_label_range(values, suim.n_classes, "all", "SUIM")
