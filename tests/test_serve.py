"""The functions behind `stegoseg serve` (no server): uploads, segmentation views, legend,
downloads, correspondence maps, concurrent requests."""
import threading

import numpy as np
import pytest
import torch
from conftest import tiny_config
from PIL import Image

from stegoseg.errors import StegosegError


@pytest.fixture(scope="module")
def viewer(tmp_path_factory):
    from stegoseg.data.synthetic import make_synthetic_dataset
    from stegoseg.methods.baseline import fit_feature_baseline
    from stegoseg.serve import Neighbours, Viewer

    root = tmp_path_factory.mktemp("serve")
    data = make_synthetic_dataset(root / "data", n_train=10, n_val=2, size=(48, 64))
    cfg = tiny_config(data, cache_dir=str(root / "cache"))
    model = fit_feature_baseline(cfg, root / "b")
    neighbours = Neighbours.from_cache(model, cfg.cache_dir)
    assert neighbours is not None and len(neighbours) == 50  # 10 images x 5 crops
    return Viewer(model, neighbours)


def picture(seed=0, size=(40, 56)):
    rng = np.random.default_rng(seed)
    arr = np.zeros((*size, 3), np.uint8)
    arr[:, : size[1] // 2] = (200, 40, 40)
    arr[:, size[1] // 2 :] = (30, 60, 210)
    return Image.fromarray((arr + rng.integers(0, 20, arr.shape)).astype(np.uint8))


def test_bad_uploads_are_refused_with_a_message(tmp_path, monkeypatch):
    import stegoseg.serve as serve

    text = tmp_path / "notes.png"
    text.write_text("not an image")
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    good = tmp_path / "ok.png"
    picture().save(good)
    with pytest.raises(StegosegError, match="notes.png is not an image"):
        serve.check_upload(text)
    with pytest.raises(StegosegError, match="empty.jpg is an empty file"):
        serve.check_upload(empty)
    monkeypatch.setattr(serve, "MAX_UPLOAD_BYTES", 100)
    with pytest.raises(StegosegError, match="ok.png is .* MB; the page accepts"):
        serve.check_upload(good)
    monkeypatch.setattr(serve, "MAX_UPLOAD_BYTES", 10**9)
    monkeypatch.setattr(serve, "MAX_PIXELS", 1000)
    with pytest.raises(StegosegError, match="56x40 pixels"):
        serve.check_upload(good)
    monkeypatch.setattr(serve, "MAX_PIXELS", 10**9)
    assert serve.check_upload(good).mode == "RGB"


def test_segment_view_matches_the_model_and_the_legend_counts_pixels(viewer, tmp_path):
    image = picture()
    result = viewer.segment(image, name="two.png", flip=True, resolution=48)
    expect = viewer.model.segment(image, flip=True, resolution=48)
    assert np.array_equal(result.labels, expect)
    assert np.array_equal(result.cluster_rgb, viewer.palette[expect])
    ids, counts = np.unique(expect, return_counts=True)
    assert [r[0] for r in result.legend] == ids.tolist()
    assert [r[3] for r in result.legend] == pytest.approx((counts / expect.size).tolist())
    assert "cluster" in viewer.legend_html(result.legend)
    files = viewer.save_files(result, tmp_path)
    assert np.array_equal(np.array(Image.open(files[0])), expect)  # pixel values are the ids
    assert Image.open(files[1]).size == image.size
    linear = viewer.segment(image, resolution=48, linear=True)
    assert np.array_equal(linear.linear_rgb, viewer.palette[viewer.model.segment(image, resolution=48, probe="linear")])


def test_correspondence_maps_peak_at_the_clicked_point(viewer):
    from stegoseg.serve import similarity

    image = picture(1)
    panels = viewer.correspondence(image, 10, 20, resolution=48, n_neighbours=2)
    assert len(panels) == 3 + 2 * 2
    assert [p[1] for p in panels[:3]] == ["clicked point", "backbone features: same image", "trained code: same image"]
    assert all(p[0].shape == (40, 56, 3) for p in panels[:3])
    feats = torch.randn(6, 4, 5)
    sim = similarity(feats, feats[:, 2, 3])
    assert sim[2, 3] == pytest.approx(1.0) and sim.max() == pytest.approx(1.0)
    with pytest.raises(StegosegError, match="outside"):
        viewer.correspondence(image, 100, 5)


def test_nearest_neighbours_of_a_training_crop_start_with_itself(viewer):
    nb = viewer.neighbours
    for j in (0, 7, 31):
        assert nb.nearest(nb.features[j].mean(dim=(1, 2)), 3)[0] == j


def test_concurrent_requests_do_not_mix(viewer):
    images = [picture(seed) for seed in range(4)]
    expected = [viewer.segment(im, resolution=48).labels for im in images]
    got = [None] * 4

    def work(i):
        got[i] = viewer.segment(images[i], resolution=48).labels

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(np.array_equal(a, b) for a, b in zip(got, expected))


def test_serve_command_checks_its_options(tmp_path, capsys):
    from stegoseg.cli import main

    assert main(["serve", str(tmp_path / "x.pt"), "--port", "0"]) == 2
    assert "--port must be" in capsys.readouterr().err
    assert main(["serve", str(tmp_path / "x.pt"), "--images", str(tmp_path / "nope")]) == 2
    assert "--images" in capsys.readouterr().err
    assert main(["serve", str(tmp_path / "x.pt")]) == 2
    assert "x.pt does not exist" in capsys.readouterr().err


def test_serve_binds_to_localhost_unless_told_and_warns_when_exposed(viewer, tmp_path, monkeypatch, caplog):
    pytest.importorskip("gradio")
    import stegoseg.serve as serve

    viewer.model.save(tmp_path / "m.pt")
    launched = []

    class FakePage:
        def queue(self, **kw):
            return self

        def launch(self, **kw):
            launched.append(kw)

    monkeypatch.setattr(serve, "build_page", lambda *a, **k: FakePage())
    with caplog.at_level("WARNING", logger="stegoseg"):
        serve.serve(tmp_path / "m.pt", block=False)
        assert launched[-1]["server_name"] == "127.0.0.1" and "anyone who can reach" not in caplog.text
        serve.serve(tmp_path / "m.pt", host="0.0.0.0", port=7999, block=False)
    assert launched[-1]["server_name"] == "0.0.0.0" and launched[-1]["server_port"] == 7999
    assert "serving on 0.0.0.0: anyone who can reach this machine's port 7999" in caplog.text
