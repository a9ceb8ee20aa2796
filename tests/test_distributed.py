"""The data-parallel stages on a local Ray cluster of two CPU workers (``--ray-address``):
the same cache, KNN lists and label maps as one process; a worker killed midway and a driver
killed and rerun still give complete results with nothing missing or duplicated; bad options
are one line, exit 2, before any work."""
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
    assert main(["evaluate", "x.pt", "--ray-address", "local"]) == 2  # not on Ray yet: said, not ignored
    assert "--ray-address: evaluation does not run on Ray yet" in one_error_line(capsys)
    assert not list((out / "cache").glob("*/meta.json")) if (out / "cache").exists() else True


@pytest.fixture(scope="module")
def one_process(data, tmp_path_factory):
    """The single-process cache (one torch thread, as each Ray worker has)."""
    import torch

    out = tmp_path_factory.mktemp("single") / "p"
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main(prepare_args(data, out)) == 0
    finally:
        torch.set_num_threads(before)
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
    finished = {p.name: p.stat().st_mtime_ns for p in shards.glob("features-*.f16")}
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
    import torch

    images = data / "imgs" / "val"
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert _segment(checkpoint, images, tmp_path / "one") == 0
    finally:
        torch.set_num_threads(before)
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
    assert one == two and len(one) == 2 * 4 + 1  # a label map and an overlay per image, labels.json
    from PIL import Image

    for name in one:
        if name.endswith(".png"):
            assert np.array_equal(np.array(Image.open(tmp_path / "one" / name)),
                                  np.array(Image.open(tmp_path / "ray" / name))), name


def test_bad_ray_options_are_one_line_before_any_work(cluster, data, tmp_path, capsys, monkeypatch):
    out = tmp_path / "bad"
    assert main(prepare_args(data, out, "--ray-address", "local", "--ray-gpus-per-worker", "1")) == 2
    assert "--ray-gpus-per-worker 1: the Ray cluster has 0 GPUs" in one_error_line(capsys)
    assert main(prepare_args(data, out, "--ray-address", "local", "--ray-workers", "3")) == 2
    assert "--ray-workers 3 x --ray-cpus-per-worker 1 needs 3 CPUs, the Ray cluster has 2" in one_error_line(capsys)
    assert main(prepare_args(data, out, "--ray-address", "local", "--ray-workers", "0")) == 2
    assert "--ray-workers must be >= 1" in one_error_line(capsys)
    assert not (out / "cache").exists() or not list((out / "cache").glob("*/meta.json"))
