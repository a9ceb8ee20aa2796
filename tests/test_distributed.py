"""The data-parallel stages on a local Ray cluster of two CPU workers (``--ray-address``):
the same cache, KNN lists, label maps, metrics and PriMaPs pseudo masks as one process; a worker killed midway and a driver
killed and rerun still give complete results with nothing missing or duplicated; bad options
are one line, exit 2, before any work."""
import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import tiny_cli
from stegoseg.cli import main

ray = pytest.importorskip("ray")

KILL = "STEGOSEG_TEST_KILL_WORKER_ONCE"


@contextlib.contextmanager
def one_thread():
    """One torch thread in this process, as each Ray worker has (the one-process references)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """Two CPUs (two one-CPU workers); the kill hook's path is in the workers' environment from the start."""
    marker = tmp_path_factory.mktemp("kill") / "killed"
    os.environ[KILL] = str(marker)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield marker
    ray.shutdown()
    os.environ.pop(KILL, None)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from stegoseg.data.synthetic import make_synthetic_dataset

    return Path(make_synthetic_dataset(tmp_path_factory.mktemp("ray") / "data", n_train=10, n_val=4, size=(48, 64)))


def one_error_line(capsys) -> str:
    err = [line for line in capsys.readouterr().err.strip().splitlines() if line.startswith("stegoseg:")]
    assert len(err) == 1, err
    return err[0]


def prepare_args(data, out, *extra):
    return ["prepare", "--data-root", str(data), "--out", str(out), *tiny_cli("prepare"), "--cache-shard-items", "7",
            "--extract-batch-size", "4", *extra]


def cache_of(out: Path):
    from stegoseg.features.cache import FeatureCache

    return FeatureCache(next(p for p in (out / "cache").iterdir() if (p / "meta.json").exists()))


def assert_same_cache(a, b):
    assert a.ids == b.ids and a.complete and b.complete
    for kind in ("features", "thumbs", "labels"):
        assert np.array_equal(np.array(getattr(a, kind)), np.array(getattr(b, kind))), kind
    for knn in a.path.glob("knn_*.npy"):
        assert np.array_equal(np.load(knn), np.load(b.path / knn.name)), knn.name


def test_an_unreachable_address_and_a_missing_ray_are_one_line(data, tmp_path, capsys, monkeypatch):
    out = tmp_path / "bad"
    assert not ray.is_initialized()  # (first in this file: before the module's cluster starts)
    assert main(prepare_args(data, out, "--ray-address", "127.0.0.1:9")) == 2
    line = one_error_line(capsys)
    assert line.startswith("stegoseg: error: --ray-address 127.0.0.1:9: no Ray cluster answers there") and \
        "ray start --head" in line
    monkeypatch.setitem(sys.modules, "ray", None)  # as if Ray were not installed
    assert main(prepare_args(data, out, "--ray-address", "local")) == 2
    assert 'Ray is not installed here: pip install "stegoseg[distributed]"' in one_error_line(capsys)
    assert main(["segment", "x.pt", str(data), "--ray-address", "local"]) == 2
    assert "Ray is not installed here" in one_error_line(capsys)
    assert main(["evaluate", "x.pt", "--ray-address", "local"]) == 2  # before the checkpoint is read
    assert "Ray is not installed here" in one_error_line(capsys)
    assert not list((out / "cache").glob("*/meta.json")) if (out / "cache").exists() else True


@pytest.fixture(scope="module")
def one_process(data, tmp_path_factory):
    """The single-process cache (one torch thread, as each Ray worker has)."""
    out = tmp_path_factory.mktemp("single") / "p"
    with one_thread():
        assert main(prepare_args(data, out)) == 0
    return cache_of(out)


def test_ray_extraction_gives_the_one_process_cache_even_when_a_worker_dies(cluster, data, one_process, tmp_path):
    out = tmp_path / "ray"
    armed = Path(str(cluster) + ".armed")
    armed.touch()
    try:
        assert main(prepare_args(data, out, "--ray-address", "local", "--ray-workers", "2")) == 0
    finally:
        armed.unlink()
    assert cluster.exists()  # a worker did die in the middle of a shard
    cache = cache_of(out)
    assert sorted(p.name for p in (cache.path / "shards").iterdir() if p.name.startswith("features")) == [
        f"features-{s:05d}.f16" for s in range(-(-cache.n // 7))]  # every shard once, no temporary file left
    assert not [p for p in (cache.path / "shards").iterdir() if p.name.startswith(".")]
    assert_same_cache(one_process, cache)


def test_ray_extraction_of_a_projected_cache_is_the_one_process_one(cluster, data, tmp_path):
    """--pca-dim on Ray: the driver fits the projection, the workers read it from the cache root
    and write the same reduced cache as one process (which fits its own, identically)."""
    with one_thread():
        assert main(prepare_args(data, tmp_path / "one", "--pca-dim", "8", "--pca-sample", "12")) == 0
    assert main(prepare_args(data, tmp_path / "ray", "--pca-dim", "8", "--pca-sample", "12", "--ray-address", "local",
                             "--ray-workers", "2")) == 0
    one, other = cache_of(tmp_path / "one"), cache_of(tmp_path / "ray")
    assert one.meta["feature_shape"][0] == 8 and one.meta["spec"]["projection"] is not None
    assert one.meta["spec"] == other.meta["spec"]
    assert_same_cache(one, other)


def test_a_killed_driver_reruns_only_the_missing_shards(cluster, data, one_process, tmp_path):
    out = tmp_path / "driver"
    cmd = [sys.executable, "-m", "stegoseg", *prepare_args(data, out, "--ray-address", "local", "--ray-workers", "1",
                                                           "--cache-shard-items", "2")]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.pop(KILL, None)
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.time() + 240
    shards = None
    while time.time() < deadline:
        found = list((out / "cache").glob("*/shards/features-*.f16")) if (out / "cache").exists() else []
        if len(found) >= 3:
            shards = found[0].parent
            break
        assert proc.poll() is None, proc.stdout.read().decode()[-2000:]
        time.sleep(0.2)
    assert shards is not None, "the run wrote no shards in time"
    os.killpg(proc.pid, signal.SIGKILL)  # the driver and its local Ray cluster
    proc.wait()
    # A worker of the dead cluster may still finish the shard it was writing (it notices the death
    # in its own time, seconds on a loaded machine): count the shards once none has appeared for 5 s.
    finished, still = None, time.time() + 60
    while time.time() < still:
        now = {p.name: p.stat().st_mtime_ns for p in shards.glob("features-*.f16")}
        if now == finished:
            break
        finished = now
        time.sleep(5)
    assert 3 <= len(finished) < 25  # 50 crops, 2 per shard: the kill came midway
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    todo = 50 - 2 * len(finished)
    assert f"{todo} of {todo} img to do" in proc.stderr  # the one bar of the rerun counts only what was left
    after = {p.name: p.stat().st_mtime_ns for p in shards.glob("features-*.f16")}
    assert len(after) == 25 and all(after[name] == t for name, t in finished.items())  # finished shards untouched
    cache = cache_of(out)
    assert np.array_equal(np.array(cache.features), np.array(one_process.features))


def _segment(checkpoint, inputs, out, *extra):
    return main(["segment", str(checkpoint), str(inputs), "--out", str(out), "--no-crf", "--resolution", "48",
                 "--batch-size", "2", "--num-workers", "0", "--no-progress", "--device", "cpu", *extra])


@pytest.fixture(scope="module")
def checkpoint(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("train") / "t"
    assert main(["train", "--data-root", str(data), "--out", str(out), *tiny_cli("train"), "--steps", "4",
                 "--ckpt-every", "2", "--shifts", "fixed", "--select", "last"]) == 0
    return out / "checkpoint.pt"


def test_ray_segment_writes_the_one_process_label_maps_even_when_a_worker_dies(cluster, data, checkpoint, tmp_path):
    images = data / "imgs" / "train"  # 10 images in batches of 2: two Ray work items (4 batches and 1)
    with one_thread():
        assert _segment(checkpoint, images, tmp_path / "one") == 0
    cluster.unlink(missing_ok=True)
    armed = Path(str(cluster) + ".armed")
    armed.touch()
    try:
        assert _segment(checkpoint, images, tmp_path / "ray", "--ray-address", "local", "--ray-workers", "2") == 0
    finally:
        armed.unlink()
    assert cluster.exists()
    one = sorted(p.name for p in (tmp_path / "one").iterdir() if not p.name.startswith("."))
    two = sorted(p.name for p in (tmp_path / "ray").iterdir() if not p.name.startswith("."))
    assert one == two and len(one) == 2 * 10 + 1  # a label map and an overlay per image, labels.json
    from PIL import Image

    for name in one:
        if name.endswith(".png"):
            assert np.array_equal(np.array(Image.open(tmp_path / "one" / name)),
                                  np.array(Image.open(tmp_path / "ray" / name))), name


def _evaluate(checkpoint, out, *extra):
    """The 10 training images, one per protocol batch: three Ray work items of 4, 4 and 2 images."""
    return main(["evaluate", str(checkpoint), "--out", str(out), "--split", "train", "--eval-batch-size", "1",
                 "--crf-workers", "1", "--no-progress", "--device", "cpu", *extra])


def _metrics(out):
    import json

    result = json.loads((out / "metrics.json").read_text())
    return {k: result[k] for k in ("cluster", "linear", "n_images")}


@pytest.fixture(scope="module")
def one_process_metrics(checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("eval") / "one"
    with one_thread():
        assert _evaluate(checkpoint, out) == 0
    return out


def test_ray_evaluation_gives_the_one_process_metrics_even_when_a_worker_dies(cluster, checkpoint,
                                                                               one_process_metrics, tmp_path):
    from PIL import Image

    cluster.unlink(missing_ok=True)
    armed = Path(str(cluster) + ".armed")
    armed.touch()
    try:
        assert _evaluate(checkpoint, tmp_path / "ray", "--ray-address", "local", "--ray-workers", "2") == 0
    finally:
        armed.unlink()
    assert cluster.exists()  # a worker died in the middle of its images
    mine, theirs = _metrics(tmp_path / "ray"), _metrics(one_process_metrics)
    assert mine["n_images"] == 10 and mine == theirs  # the same confusion counts, so the same metrics
    assert np.array_equal(np.array(Image.open(tmp_path / "ray" / "predictions.png")),
                          np.array(Image.open(one_process_metrics / "predictions.png")))
    assert not (tmp_path / "ray" / ".eval-parts").exists()  # the counts go once the metrics are written


def test_a_killed_evaluation_reruns_only_the_missing_images(cluster, checkpoint, one_process_metrics, tmp_path,
                                                            monkeypatch):
    """The driver stops (Ctrl-C) while the second work item's counts arrive; the rerun sends
    only the third item to the workers and gives the same metrics."""
    import stegoseg.distributed.stages as stages

    real_read, real_run, sent, reads = stages.part_from_file, stages.run_items, [], []

    def interrupted(path):
        reads.append(path)
        if len(reads) == 2:
            raise KeyboardInterrupt
        return real_read(path)

    def counting(rows, *args, **kwargs):
        sent.append([row["first"] for row in rows])
        return real_run(rows, *args, **kwargs)

    monkeypatch.setattr(stages, "run_items", counting)
    monkeypatch.setattr(stages, "part_from_file", interrupted)
    out = tmp_path / "ray"
    assert _evaluate(checkpoint, out, "--ray-address", "local", "--ray-workers", "1") == 130
    kept = sorted(p.name for p in (out / ".eval-parts").glob("*/part-*.npz"))
    assert len(kept) == 2 and not (out / "metrics.json").exists()
    monkeypatch.setattr(stages, "part_from_file", real_read)
    other = tmp_path / "other"  # the same killed state, then other images into it: nothing of it is reused
    __import__("shutil").copytree(out, other)
    assert _evaluate(checkpoint, out, "--ray-address", "local", "--ray-workers", "1") == 0
    finished = {int(name[5:13]) for name in kept}
    assert sent == [[0, 4, 8], sorted({0, 4, 8} - finished)]
    assert _metrics(out) == _metrics(one_process_metrics)
    assert main(["evaluate", str(checkpoint), "--out", str(other), "--split", "val", "--eval-batch-size", "1",
                 "--crf-workers", "1", "--no-progress", "--device", "cpu", "--ray-address", "local",
                 "--ray-workers", "1"]) == 0
    assert sent[-1] == [0] and _metrics(other)["n_images"] == 4  # the 4 val images, not the train counts kept


def test_ray_pseudo_masks_are_the_one_process_masks_even_when_a_worker_dies(cluster, data, tmp_path, monkeypatch):
    """PriMaPs' pseudo masks (50 crops, 4 chunks) on two Ray workers, one of which dies: the
    same masks and counts as one process; crops marked not done are all that a rerun sends."""
    import shutil

    import stegoseg.distributed.stages as stages
    from conftest import tiny_config
    from stegoseg.config.stego import replace
    from stegoseg.features.cache import CropView
    from stegoseg.methods.common import build_backbone_from_config, build_split, prepare
    from stegoseg.methods.primaps import ray_pseudo_masks
    from stegoseg.training.primaps import build_pseudo_masks, masks_folder

    cfg = tiny_config(data, method="primaps", cache_dir=str(tmp_path / "cache"), crf_workers=1)
    cache = prepare(cfg, tmp_path, build_backbone_from_config(cfg)[0], neighbors=False)
    settings = dict(resolution=cfg.resolution, five_crop=cfg.five_crop, image_resample="bilinear", jpeg=cfg.crop_jpeg)
    view = CropView(build_split(cfg, "train"), **settings)
    folder = masks_folder(cfg, cache)
    with one_thread():
        one = np.array(build_pseudo_masks(cfg, cache, view, progress=False))
    counts = np.load(folder / "n_masks.npy")
    shutil.rmtree(folder)
    on_ray = replace(cfg, ray_address="local", ray_workers=2)
    assert masks_folder(on_ray, cache) == folder  # where they are computed is not what they depend on
    cluster.unlink(missing_ok=True)
    armed = Path(str(cluster) + ".armed")
    armed.touch()
    try:
        two = np.array(build_pseudo_masks(on_ray, cache, view, progress=False,
                                          runner=ray_pseudo_masks(on_ray, tmp_path, settings)))
    finally:
        armed.unlink()
    assert cluster.exists() and one.shape == (50, 32, 32) and one.max() >= 1
    assert np.array_equal(one, two) and np.array_equal(np.load(folder / "n_masks.npy"), counts)
    done = np.load(folder / "done.npy")
    assert done.all()
    done[7:30] = False  # as if the driver had died before these crops arrived (their masks and counts not written)
    np.save(folder / "done.npy", done)
    store = np.memmap(folder / "masks.u8", dtype=np.uint8, mode="r+", shape=one.shape)
    store[7:30] = 0
    store.flush()
    zeroed = counts.copy()
    zeroed[7:30] = 0
    np.save(folder / "n_masks.npy", zeroed)
    real, sent = stages.run_items, []
    monkeypatch.setattr(stages, "run_items", lambda rows, *a, **k: (sent.extend(rows), real(rows, *a, **k))[1])
    again = np.array(build_pseudo_masks(on_ray, cache, view, progress=False,
                                        runner=ray_pseudo_masks(on_ray, tmp_path, settings)))
    assert sorted(i for row in sent for i in row["crops"]) == list(range(7, 30)) and np.array_equal(again, one)
    assert np.array_equal(np.load(folder / "n_masks.npy"), counts)


def test_bad_ray_options_are_one_line_before_any_work(cluster, data, tmp_path, capsys, monkeypatch):
    out = tmp_path / "bad"
    assert main(prepare_args(data, out, "--ray-address", "local", "--ray-gpus-per-worker", "1")) == 2
    assert "--ray-gpus-per-worker 1: the Ray cluster has 0 GPUs" in one_error_line(capsys)
    assert main(prepare_args(data, out, "--ray-address", "local", "--ray-workers", "3")) == 2
    assert "--ray-workers 3 x --ray-cpus-per-worker 1 needs 3 CPUs, the Ray cluster has 2" in one_error_line(capsys)
    assert main(prepare_args(data, out, "--ray-address", "local", "--ray-workers", "0")) == 2
    assert "--ray-workers must be >= 1" in one_error_line(capsys)
    assert not (out / "cache").exists() or not list((out / "cache").glob("*/meta.json"))


def test_evaluate_runs_on_ray_only_when_asked_on_its_command_line(cluster, checkpoint, tmp_path, monkeypatch):
    """A checkpoint whose run had --ray-address keeps it in its config: evaluate without the
    option evaluates in this process; --ray-address none is the same; no traceback."""
    import torch

    import stegoseg.distributed.stages as stages

    ckpt = torch.load(checkpoint, weights_only=False)
    ckpt["config"] = dict(ckpt["config"], ray_address="127.0.0.1:9", ray_workers=4)
    on_ray = tmp_path / "ray-run.pt"
    torch.save(ckpt, on_ray)
    monkeypatch.setattr(stages, "run_items", lambda *a, **k: pytest.fail("evaluated on Ray without being asked"))
    assert _evaluate(on_ray, tmp_path / "plain") == 0
    assert _evaluate(on_ray, tmp_path / "none", "--ray-address", "none") == 0
    assert _metrics(tmp_path / "plain") == _metrics(tmp_path / "none")
