"""Day-to-day use (issue #23): readable logs, a strict command line, --resume with nothing to
resume, a flat folder as input, the page's random-backbone notice. Each test fails on the code
before the issue."""
import logging
import subprocess
import sys

import pytest
from conftest import tiny_cli
from PIL import Image

from stegoseg.cli import build_parser, main

TINY = ["--no-crf", "--shifts", "fixed", "--cluster-fit", "online", "--steps", "4", "--ckpt-every", "2"]


def error_line(capsys) -> str:
    err = [line for line in capsys.readouterr().err.strip().splitlines() if "error:" in line]
    assert len(err) == 1, err
    return err[-1]


# --------------------------------------------------------------------------- the command line
@pytest.mark.parametrize("command, typo, meant", [
    (["run"], ["--probe", "linear"], "--probe-lr"),  # was taken as --probe-lr: "invalid float value"
    (["segment", "ck.pt", "x.png"], ["--res", "160"], "--resolution"),  # was taken as --resolution
    (["train"], ["--stepz", "3"], "--steps"),
])
def test_options_are_never_abbreviated_and_typos_get_a_suggestion(command, typo, meant, capsys):
    with pytest.raises(SystemExit) as exit_:
        main([*command, *typo])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert f"usage: stegoseg {command[0]}" in err  # the subcommand's usage, not the top level's
    assert f"unrecognized option(s): {typo[0]} (did you mean {meant}" in err


def test_every_help_shows_the_defaults():
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command").choices
    segment = " ".join(sub["segment"].format_help().split())  # joined: the formatter wraps lines
    assert "(default: 320)" in segment and "(default: 8)" in segment
    train = " ".join(sub["train"].format_help().split())
    assert "(default: 5000)" in train and train.count("(default:") > 50
    assert "default: runs/train) (default" not in train  # said once


def test_resume_with_nothing_to_resume_is_an_error(synthetic_root, tmp_path, capsys):
    for command in ("train", "run"):
        assert main([command, "--data-root", str(synthetic_root), "--out", str(tmp_path / command), "--resume",
                     *tiny_cli(command, *TINY)]) == 2
        line = error_line(capsys)
        assert "holds no run to resume" in line and "drop --resume" in line
    assert not (tmp_path / "train" / "checkpoint.pt").exists()


def test_prepare_with_few_neighbours_explains_the_training_option(synthetic_root, tmp_path, capsys):
    assert main(["prepare", "--data-root", str(synthetic_root), "--out", str(tmp_path / "p"),
                 *tiny_cli("prepare", "--n-neighbors", "2")]) == 2
    line = error_line(capsys)
    assert "--n-neighbors 2 is below --knn-topk" in line and "an option of train and run" in line


# ----------------------------------------------------------------------------------- logs
def test_a_log_file_gets_lines_not_bars_and_no_third_party_noise(synthetic_root, tmp_path):
    """The command's stderr is a file (not a terminal): no carriage returns, one line per stage
    with counts, and none of Lightning's banner lines."""
    args = [sys.executable, "-m", "stegoseg", "train", "--data-root", str(synthetic_root), "--out",
            str(tmp_path / "t"), *[a for a in tiny_cli("train", *TINY) if a != "--no-progress"]]
    with open(tmp_path / "log.txt", "w") as log:
        assert subprocess.run(args, stderr=log, stdout=log, timeout=600).returncode == 0
    text = (tmp_path / "log.txt").read_text()
    assert "\r" not in text
    assert "features train: 120 of 120 img to do" in text and "features train: done, 120 img in" in text
    assert "training: steps 0..4 of 4" in text and "training: 4 steps in" in text
    for noise in ("GPU available", "TPU available", "litlogger", "LeafSpec", "module(s) in eval mode"):
        assert noise not in text, noise


def test_log_progress_reports_rate_and_time_left(caplog):
    from stegoseg.progress import LogProgress

    caplog.set_level(logging.INFO, logger="stegoseg")
    bar = LogProgress(total=100, desc="stage", min_seconds=0.0)
    for _ in range(100):
        bar.update(1)
    bar.close()
    lines = [r.getMessage() for r in caplog.records]
    assert lines[0] == "stage: 100 of 100 it to do" and lines[-1].startswith("stage: done, 100 it in")
    middle = [m for m in lines if "left" in m]
    assert len(middle) == 9 and "10/100 it (10%)" in middle[0] and "it/s" in middle[0]
    silent = LogProgress(total=100, desc="inner", silent=True)
    silent.update(100)
    silent.close()
    assert not any("inner" in r.getMessage() for r in caplog.records)


# ------------------------------------------------------------------------------- inputs
def test_a_flat_folder_of_images_is_the_main_jobs_input(tmp_path, capsys):
    flat = tmp_path / "photos"
    flat.mkdir()
    for i in range(6):
        Image.new("RGB", (64, 48), (40 * i, 255 - 30 * i, 90)).save(flat / f"p{i}.jpg")
    out = tmp_path / "run"
    assert main(["run", "--data-root", str(flat), "--out", str(out), "--n-classes", "3", "--no-baseline",
                 *tiny_cli("run", *TINY)]) == 0
    assert (out / "train" / "checkpoint.pt").exists() and (out / "report.md").exists()
    assert len(list((out / "segment").glob("*_overlay.png"))) == 6


def test_the_page_says_when_the_backbone_is_random(synthetic_root, tmp_path):
    from stegoseg.methods.baseline import fit_feature_baseline
    from stegoseg.serve import random_backbone
    from conftest import tiny_config

    model = fit_feature_baseline(tiny_config(synthetic_root, cache_dir=str(tmp_path / "c")), tmp_path / "b")
    path = model.save(tmp_path / "ck.pt")
    from stegoseg.model import load

    assert random_backbone(load(path))


# ------------------------------------------------------------------------------ named classes
def test_after_a_labelled_run_segment_and_the_page_show_class_names(synthetic_root, tmp_path):
    import json

    import numpy as np

    from stegoseg.model import load
    from stegoseg.serve import Viewer

    out = tmp_path / "run"
    assert main(["run", "--data-root", str(synthetic_root), "--out", str(out), "--no-baseline",
                 *tiny_cli("run", *TINY)]) == 0
    model = load(out / "train" / "checkpoint.pt")
    assignment = json.loads((out / "eval" / "metrics.json").read_text())["cluster"]["strict"]["assignment"]
    assert model.cluster_classes == [a if a < 4 else None for a in assignment]
    names = model.label_names("cluster")
    assert names[:4] == model.class_names  # the same names (and palette slots) as the linear probe's
    image = sorted((synthetic_root / "imgs" / "val").iterdir())[0]
    named = model.segment_batch([image], resolution=48)[0]
    raw = model.segment_probes([image], resolution=48, raw_clusters=True)[0]["cluster"]
    np.testing.assert_array_equal(named, model.cluster_lookup()[raw])  # class ids, not cluster ids
    legend = Viewer(model).legend(named)
    assert {name for _, name, _, _ in legend} <= set(names) and any(n in model.class_names for _, n, _, _ in legend)
    again = load(model.save_pretrained(tmp_path / "folder"))  # the matching travels with the model
    assert again.cluster_classes == model.cluster_classes


# ------------------------------------------------------------------------- paths and defaults
def test_a_run_records_its_data_root_absolute_and_its_folder_loads(synthetic_root, tmp_path, monkeypatch, capsys):
    import os

    from stegoseg.model import load

    monkeypatch.chdir(synthetic_root.parent)
    out = tmp_path / "t"
    assert main(["train", "--data-root", synthetic_root.name, "--out", str(out), *tiny_cli("train", *TINY)]) == 0
    model = load(out)  # the run's folder: its checkpoint.pt
    assert model.config["data_root"] == str(synthetic_root.resolve())
    monkeypatch.chdir(tmp_path)  # evaluate from elsewhere: the recorded root still resolves
    assert main(["evaluate", str(out / "checkpoint.pt"), "--out", str(tmp_path / "e"), "--no-crf",
                 "--eval-resolution", "48", "--device", "cpu"]) == 0
    folder = model.save_pretrained(tmp_path / "m")
    assert (folder / "model.safetensors").stat().st_mode & 0o777 == (folder / "config.json").stat().st_mode & 0o777
    image = sorted((synthetic_root / "imgs" / "val").iterdir())[0]
    capsys.readouterr()
    assert main(["segment", str(folder), str(image), "--out", str(tmp_path / "s"), "--no-progress",
                 "--bf16-inference", "--device", "cpu"]) == 0
    assert "wrote 1 label map (+ overlays)" in capsys.readouterr().out


def test_save_pretrained_over_a_model_says_so(synthetic_root, tmp_path, caplog):
    from stegoseg.methods.baseline import fit_feature_baseline
    from conftest import tiny_config

    model = fit_feature_baseline(tiny_config(synthetic_root, cache_dir=str(tmp_path / "c")), tmp_path / "b")
    model.save_pretrained(tmp_path / "m")
    assert "replacing the model" not in caplog.text
    model.save_pretrained(tmp_path / "m")
    assert "replacing the model saved in" in caplog.text


def test_the_api_and_the_command_line_use_the_checkpoints_crf_setting(synthetic_root, tmp_path):
    import numpy as np
    from conftest import tiny_config

    from stegoseg.methods.baseline import fit_feature_baseline
    from stegoseg.model import load

    model = fit_feature_baseline(tiny_config(synthetic_root, cache_dir=str(tmp_path / "c"), crf=True), tmp_path / "b")
    path = model.save(tmp_path / "ck.pt")
    model = load(path)
    assert model.default_crf() is True
    image = sorted((synthetic_root / "imgs" / "val").iterdir())[0]
    default = model.segment(image, resolution=48)
    np.testing.assert_array_equal(default, model.segment(image, resolution=48, crf=True))
    assert main(["segment", str(path), str(image), "--out", str(tmp_path / "s"), "--resolution", "48",
                 "--device", "cpu", "--no-progress", "--crf-workers", "1"]) == 0
    from PIL import Image as PILImage

    np.testing.assert_array_equal(np.asarray(PILImage.open(tmp_path / "s" / f"{image.stem}.png")), default)


def test_checkpoints_default_to_a_tenth_of_the_steps():
    from stegoseg.config.stego import make_config

    assert make_config({"steps": 100}).ckpt_every == 10
    assert make_config({"steps": 5000}).ckpt_every == 500
    assert make_config({"steps": 100, "ckpt_every": 7}).ckpt_every == 7


def test_the_report_names_clusters_per_class_iou_and_timings(synthetic_root, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["run", "--data-root", str(synthetic_root), "--out", str(out), "--no-baseline",
                 *tiny_cli("run", *TINY)]) == 0
    report = (out / "report.md").read_text()
    assert "code dimension 16, 4 clusters" in report and "K = 16" not in report
    assert "Per-class IoU of the cluster probe" in report and "| meadow |" in report
    assert "Time per stage: prepare + train" in report


def test_a_label_free_run_says_it_has_no_metrics(tmp_path, capsys):
    flat = tmp_path / "photos"
    flat.mkdir()
    for i in range(6):
        Image.new("RGB", (64, 48), (40 * i, 200, 30 * i)).save(flat / f"p{i}.jpg")
    out = tmp_path / "run"
    assert main(["run", "--data-root", str(flat), "--out", str(out), "--n-classes", "3", "--no-baseline",
                 *tiny_cli("run", *TINY)]) == 0
    assert "STEGO: no metrics (no labels)" in capsys.readouterr().out
    report = (out / "report.md").read_text()
    assert "No metrics: the evaluation split has no labels" in report and "| - |" not in report


def test_training_curves_name_their_runs_and_terms(tmp_path):
    from stegoseg.reporting.figures import curve_label, plot_log_curves

    assert curve_label("loss/loss") == "total" and curve_label("loss/self") == "self"
    assert curve_label("loss/knn", "centring-on") == "centring-on: knn"
    for name in ("a", "b"):
        (tmp_path / f"{name}.csv").write_text("step,loss/loss,loss/self\n1,0.5,0.2\n2,0.4,0.1\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    seen = []
    real = plt.Axes.legend

    def spy(self, *args, **kwargs):
        seen.extend(self.get_legend_handles_labels()[1])
        return real(self, *args, **kwargs)

    plt.Axes.legend = spy
    try:
        assert plot_log_curves({"a": tmp_path / "a.csv", "b": tmp_path / "b.csv"}, tmp_path / "c.png",
                               {"losses": ["loss/"]})
    finally:
        plt.Axes.legend = real
    assert seen == ["a: total", "a: self", "b: total", "b: self"]


def test_a_refused_run_leaves_no_cache_folder_behind(synthetic_root, tmp_path, capsys):
    out = tmp_path / "r"
    assert main(["train", "--data-root", str(synthetic_root), "--out", str(out), "--class-names", "a,b",
                 *tiny_cli("train", *TINY)]) == 2
    assert "holds the value" in error_line(capsys)
    assert not (out / "cache").exists() and not (out / "config.yaml").exists()
    run = tmp_path / "run"
    assert main(["run", "--data-root", str(synthetic_root), "--out", str(run), "--class-names", "a,b",
                 *tiny_cli("run", *TINY)]) == 2
    assert "holds the value" in error_line(capsys)
    assert not (run / "cache").exists() and not (run / "config.yaml").exists()


def test_the_pages_neighbours_carry_their_file_names(synthetic_root, tmp_path):
    from conftest import tiny_config

    from stegoseg.methods.baseline import fit_feature_baseline
    from stegoseg.serve import Neighbours, Viewer

    model = fit_feature_baseline(tiny_config(synthetic_root, cache_dir=str(tmp_path / "c")), tmp_path / "b")
    folder = synthetic_root / "imgs" / "val"
    neighbours = Neighbours.from_folder(model, folder)
    assert neighbours.names == sorted(p.name for p in folder.iterdir())
    from_cache = Neighbours.from_cache(model, tmp_path / "c")
    assert from_cache is not None and all(" crop " in n for n in from_cache.names)
    image = Image.open(sorted(folder.iterdir())[0])
    panels = Viewer(model, neighbours).correspondence(image, 5, 5, resolution=48)
    titles = [title for _, title in panels[3:]]
    assert titles and all(t.split(": ", 1)[1] in neighbours.names for t in titles)


def test_a_label_free_models_clusters_can_be_named_for_segment_and_the_page(synthetic_root, tmp_path, capsys):
    import json

    from conftest import tiny_config

    from stegoseg.errors import StegosegError
    from stegoseg.labels import names_file, parse_cluster_names, save_cluster_names
    from stegoseg.methods.baseline import fit_feature_baseline
    from stegoseg.model import load

    cfg = tiny_config(synthetic_root, cache_dir=str(tmp_path / "c"))
    path = fit_feature_baseline(cfg, tmp_path / "b").save(tmp_path / "ck.pt")
    model = load(path)
    assert model.label_names()[:2] == ["cluster 0", "cluster 1"]
    assert parse_cluster_names("0=sky, 2 = road\n1=", 4) == {0: "sky", 2: "road", 1: ""}
    for bad in ("sky", "7=sea", "x=sea"):
        with pytest.raises(StegosegError):
            parse_cluster_names(bad, 4)
    file = save_cluster_names(model, path, parse_cluster_names("0=sky, 2=road", 4))
    assert file == names_file(path) == tmp_path / "ck.names.json"
    again = load(path)
    assert again.label_names() == ["sky", "cluster 1", "road", "cluster 3"]
    image = sorted((synthetic_root / "imgs" / "val").iterdir())[0]
    assert main(["segment", str(path), str(image), "--out", str(tmp_path / "s"), "--device", "cpu", "--no-progress",
                 "--no-crf"]) == 0
    written = json.loads((tmp_path / "s" / "labels.json").read_text())
    assert written["labels"]["0"] == "sky" and written["labels"]["1"] == "cluster 1" and len(written["colours"]) == 4
    (tmp_path / "ck.names.json").write_text('{"cluster_names": {"9": "x"}}')
    with pytest.raises(StegosegError, match="names cluster 9"):
        load(path)


def test_run_and_train_folders_load_alike_and_segment_takes_eval_resolution(synthetic_root, tmp_path):
    from stegoseg.model import load

    out = tmp_path / "run"
    assert main(["run", "--data-root", str(synthetic_root), "--out", str(out), "--no-baseline",
                 *tiny_cli("run", *TINY)]) == 0
    assert load(out).n_clusters == load(out / "train").n_clusters == load(out / "train" / "checkpoint.pt").n_clusters
    image = sorted((synthetic_root / "imgs" / "val").iterdir())[0]
    assert main(["segment", str(out), str(image), "--out", str(tmp_path / "s"), "--eval-resolution", "48",
                 "--device", "cpu", "--no-progress"]) == 0
    assert (tmp_path / "s" / f"{image.stem}.png").exists()


def test_old_option_names_work_and_say_their_new_name(synthetic_root, tmp_path, caplog):
    from conftest import tiny_config

    from stegoseg.methods.baseline import fit_feature_baseline

    path = fit_feature_baseline(tiny_config(synthetic_root, cache_dir=str(tmp_path / "c")), tmp_path / "b").save(
        tmp_path / "ck.pt")
    image = sorted((synthetic_root / "imgs" / "val").iterdir())[0]
    assert main(["segment", str(path), str(image), "--out", str(tmp_path / "s"), "--resolution", "48", "--quiet",
                 "--device", "cpu", "--no-crf"]) == 0
    assert "--resolution is the old name of --eval-resolution" in caplog.text
    assert "--quiet is the old name of --no-progress" in caplog.text


def test_a_two_run_training_says_so_estimates_its_time_and_explains_the_selection(synthetic_root, tmp_path, caplog):
    out = tmp_path / "run"
    args = ["run", "--data-root", str(synthetic_root), "--out", str(out), "--no-baseline",
            *tiny_cli("run", "--no-crf", "--steps", "8", "--ckpt-every", "4")]  # --shifts auto: two runs
    caplog.set_level(logging.INFO, logger="stegoseg")
    assert main(args) == 0
    text = caplog.text
    assert "STEGO trains 2 runs of 8 steps (centring-on, centring-off), then --select label-free" in text
    assert "steps/s over the first 5 steps: about" in text
    assert "--select label-free: chose the checkpoint" in text and " among " in text and "higher is better" in text
    assert "of 2 candidates" not in text
    report = (out / "report.md").read_text()
    assert "The label-free score of a checkpoint" in report


def test_the_pages_linear_probe_map_has_a_named_legend(synthetic_root, tmp_path):
    from conftest import tiny_config

    from stegoseg.methods.baseline import fit_feature_baseline
    from stegoseg.serve import Viewer

    model = fit_feature_baseline(tiny_config(synthetic_root, cache_dir=str(tmp_path / "c")), tmp_path / "b")
    image = Image.open(sorted((synthetic_root / "imgs" / "val").iterdir())[0])
    result = Viewer(model).segment(image, resolution=48, linear=True)
    assert result.linear_legend and {name for _, name, _, _ in result.linear_legend} <= set(model.class_names)
    assert not Viewer(model).segment(image, resolution=48).linear_legend


def test_sigterm_outside_training_exits_with_its_status_and_says_how_to_continue(synthetic_root, tmp_path, capsys,
                                                                                 monkeypatch):
    import os
    import signal
    import time

    import stegoseg.methods.common as common

    def slow_prepare(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)
        raise AssertionError("SIGTERM did not stop the command")

    monkeypatch.setattr(common, "prepare", slow_prepare)
    assert main(["prepare", "--data-root", str(synthetic_root), "--out", str(tmp_path / "p"),
                 *tiny_cli("prepare")]) == 143
    err = capsys.readouterr().err
    assert "interrupted by SIGTERM: what was finished is kept" in err and "run the same command again" in err
    assert signal.getsignal(signal.SIGTERM) is not None  # the previous handler is back


def test_a_long_stage_in_a_log_estimates_its_time_early(caplog):
    from stegoseg.progress import LogProgress

    caplog.set_level(logging.INFO, logger="stegoseg")
    bar = LogProgress(total=100, desc="features train", unit="img")
    for _ in range(6):
        bar.update(1)
    assert any("img/s so far: about" in r.getMessage() and "for the 100 img" in r.getMessage()
               for r in caplog.records)


def test_the_serve_scratch_folder_goes_with_the_process(synthetic_root, tmp_path, monkeypatch):
    import atexit
    import shutil

    from conftest import tiny_config

    from stegoseg.methods.baseline import fit_feature_baseline
    from stegoseg.serve import Viewer, build_page

    model = fit_feature_baseline(tiny_config(synthetic_root, cache_dir=str(tmp_path / "c")), tmp_path / "b")
    registered = []
    monkeypatch.setattr(atexit, "register", lambda fn, *args: registered.append((fn, args)))
    build_page(Viewer(model))
    cleanup = [(fn, args) for fn, args in registered if fn is shutil.rmtree]
    assert cleanup and "stegoseg-serve-" in str(cleanup[0][1][0])


def test_a_folder_with_only_a_training_split_runs_without_val_split(tmp_path, caplog):
    data = tmp_path / "data" / "imgs" / "train"
    data.mkdir(parents=True)
    for i in range(6):
        Image.new("RGB", (64, 48), (30 * i, 90, 200 - 20 * i)).save(data / f"p{i}.jpg")
    out = tmp_path / "run"
    assert main(["run", "--data-root", str(tmp_path / "data"), "--out", str(out), "--n-classes", "3", "--no-baseline",
                 *tiny_cli("run", *TINY)]) == 0
    assert "has no val split: the evaluation and report use the train images" in caplog.text
    assert (out / "report.md").exists()


def test_a_refused_pick_is_one_log_line_not_a_traceback(synthetic_root, tmp_path, capfd, caplog):
    import socket

    pytest.importorskip("gradio_client")
    from conftest import tiny_config
    from gradio_client import Client

    from stegoseg.methods.baseline import fit_feature_baseline
    from stegoseg.serve import serve

    path = fit_feature_baseline(tiny_config(synthetic_root, cache_dir=str(tmp_path / "c")), tmp_path / "b").save(
        tmp_path / "ck.pt")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    page = serve(path, port=port, block=False, images=str(synthetic_root / "imgs" / "val"))
    try:
        client = Client(f"http://127.0.0.1:{port}/", verbose=False)
        with pytest.raises(Exception, match="not one the page offers"):
            client.predict(None, "/etc/passwd", False, True, 320, False, api_name="/segment_all")
    finally:
        page.close()
    assert "Traceback" not in capfd.readouterr().err
    assert "page: refused a request for '/etc/passwd'" in caplog.text
