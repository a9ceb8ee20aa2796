"""SegmentationModel: the save_pretrained folder, its agreement with the single-file
checkpoint, and the prediction path predict and segment_batch share."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from stegoseg.errors import StegosegError
from stegoseg.evaluation.crf import crf_available

needs_crf = pytest.mark.skipif(not crf_available(), reason="pydensecrf2 is not installed")

SPEC = {"name": "dino_vits8", "pretrained": False, "tiny": True}
CLASS_NAMES = ["sky", "road", "tree", "car"]


def stego_model(seed: int = 0):
    """A tiny STEGO model with random weights: ViT backbone, head, cluster and linear probes."""
    from stegoseg.backbones.backbone import create_backbone
    from stegoseg.model import SegmentationModel
    from stegoseg.nn.heads import build_head

    torch.manual_seed(seed)
    backbone = create_backbone("dino_vits8", pretrained=False, tiny=True)
    head = build_head("stego", backbone.embed_dim, 8)
    return SegmentationModel(
        backbone, SPEC, head, n_clusters=3, n_classes=4, class_names=CLASS_NAMES, method="stego",
        config={"dim": 8, "resolution": 32, "note": "test"},
    ).eval()


def images(seed: int = 0, sizes=((20, 31), (24, 24), (17, 40))) -> list:
    """Random RGB uint8 images (H, W, 3) with some structure (a bright rectangle)."""
    rng = np.random.default_rng(seed)
    out = []
    for h, w in sizes:
        im = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        im[: h // 2, : w // 3] = (230, 40, 20)
        out.append(im)
    return out


def assert_same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for name in sa:
        assert sa[name].dtype == sb[name].dtype, name
        assert torch.equal(sa[name], sb[name]), name


def assert_same_segments(a, b, ims, resolution=16):
    for probe in ("cluster", "linear"):
        la = a.segment_batch(ims, resolution=resolution, probe=probe)
        lb = b.segment_batch(ims, resolution=resolution, probe=probe)
        for x, y in zip(la, lb):
            np.testing.assert_array_equal(x, y)
    # the maps are not trivial (all one label would make the comparison weak)
    assert len(np.unique(np.concatenate([m.ravel() for m in la]))) > 1


# ------------------------------------------------------------------ save_pretrained / from_pretrained
def test_save_pretrained_round_trip_with_the_backbone_stored(tmp_path, one_thread):
    from stegoseg.model import SegmentationModel, load

    model = stego_model()
    folder = model.save_pretrained(tmp_path / "model")
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors"]

    config = json.loads((folder / "config.json").read_text())
    assert config["format"] == "stegoseg" and config["version"] == 1 and config["method"] == "stego"
    assert config["backbone"]["weights_stored"] is True and config["backbone"]["weights_source"] == "random"
    assert {k: config["backbone"][k] for k in SPEC} == SPEC
    assert config["head"] == {"kind": "stego", "in_dim": 32, "dim": 8, "state_dict": "head."}
    assert config["n_clusters"] == 3 and config["n_classes"] == 4 and config["class_names"] == CLASS_NAMES
    assert config["config"] == {"dim": 8, "resolution": 32, "note": "test"}

    from safetensors.torch import load_file

    keys = set(load_file(str(folder / "model.safetensors")))
    assert {k.split(".")[0] for k in keys} == {"backbone", "head", "cluster_probe", "linear_probe"}
    assert len(keys) == len(model.state_dict())

    loaded = SegmentationModel.from_pretrained(folder)
    assert_same_weights(model, loaded)
    assert_same_segments(model, loaded, images())
    assert loaded.class_names == CLASS_NAMES and loaded.n_classes == 4 and loaded.method == "stego"
    assert loaded.config == model.config and loaded.backbone_spec == model.backbone_spec
    # the module-level load takes the folder too
    assert_same_weights(model, load(folder))


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_save_pretrained_without_backbone_loads_the_weights_given(tmp_path, one_thread, suffix):
    from safetensors.torch import load_file, save_file

    from stegoseg.model import SegmentationModel, load

    model = stego_model(seed=3)
    folder = model.save_pretrained(tmp_path / "model", include_backbone=False)
    config = json.loads((folder / "config.json").read_text())
    assert config["backbone"]["weights_stored"] is False and config["backbone"]["state_dict"] is None
    assert not any(k.startswith("backbone.") for k in load_file(str(folder / "model.safetensors")))

    # the backbone's weights as a file the backbone loader reads (Backbone.state_dict keys, "model." prefix)
    weights = tmp_path / f"backbone{suffix}"
    state = model.backbone.state_dict()
    if suffix == ".pth":
        torch.save(state, weights)
    else:
        save_file({k: v.contiguous() for k, v in state.items()}, str(weights))

    loaded = SegmentationModel.from_pretrained(folder, weights=str(weights))
    assert_same_weights(model, loaded)
    assert_same_segments(model, loaded, images(1))
    assert loaded.backbone.weights_source == str(weights.resolve())
    assert_same_weights(model, load(folder, weights=str(weights)))

    # without weights= the spec rebuilds a fresh random backbone: not the saved model
    torch.manual_seed(123)
    rebuilt = SegmentationModel.from_pretrained(folder)
    assert not torch.equal(rebuilt.backbone.state_dict()["model.cls_token"], state["model.cls_token"])
    assert torch.equal(rebuilt.cluster_probe.centroids, model.cluster_probe.centroids)


def test_hub_backbone_is_not_stored_by_default_but_can_be(tmp_path, one_thread):
    model = stego_model()
    model.backbone.weights_source = "timm:vit_small_patch8_224.dino@hub"  # rebuildable from the hub
    default = json.loads((model.save_pretrained(tmp_path / "a") / "config.json").read_text())
    forced = json.loads((model.save_pretrained(tmp_path / "b", include_backbone=True) / "config.json").read_text())
    assert default["backbone"]["weights_stored"] is False
    assert forced["backbone"]["weights_stored"] is True
    # the same rule as the single-file checkpoint
    assert model.state_for_checkpoint()["backbone"]["state_dict"] is None


def test_checkpoint_file_and_folder_give_the_same_model_and_predictions(tmp_path, one_thread):
    from stegoseg.data.base import pil_to_tensor
    from stegoseg.model import load

    model = stego_model(seed=5)
    file_model = load(model.save(tmp_path / "checkpoint.pt"))
    folder_model = load(model.save_pretrained(tmp_path / "model"))
    assert_same_weights(file_model, folder_model)
    assert_same_segments(file_model, folder_model, images(2))
    assert file_model.class_names == folder_model.class_names and file_model.config == folder_model.config
    batch = torch.stack([pil_to_tensor(Image.fromarray(im)) for im in images(3, sizes=((16, 24), (16, 24)))])
    a, b = file_model.predict(batch), folder_model.predict(batch)
    assert torch.equal(a["cluster"], b["cluster"]) and torch.equal(a["linear"], b["linear"])


def test_save_pretrained_overwrites_a_previous_folder(tmp_path, one_thread):
    from stegoseg.model import load

    folder = stego_model(seed=1).save_pretrained(tmp_path / "model")
    model = stego_model(seed=2)
    model.save_pretrained(folder)
    assert_same_weights(model, load(folder))
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors"]


# ------------------------------------------------------------------ bad folders
def one_line_error(path, match, **kwargs) -> str:
    from stegoseg.model import SegmentationModel, load

    for loader in (SegmentationModel.from_pretrained, load):
        with pytest.raises(StegosegError, match=match) as err:
            loader(path, **kwargs)
        message = str(err.value)
        assert str(path) in message and "\n" not in message
    return message


def test_folder_with_a_nan_or_inf_weight_is_refused(tmp_path, one_thread):
    from safetensors.torch import load_file, save_file

    folder = stego_model().save_pretrained(tmp_path / "model")
    tensors = load_file(str(folder / "model.safetensors"))
    tensors["cluster_probe.centroids"][1, 2] = float("nan")
    tensors["head.linear.weight"].view(-1)[0] = float("inf")
    save_file(tensors, str(folder / "model.safetensors"))
    message = one_line_error(folder, "NaN or infinite")
    assert "cluster_probe.centroids" in message or "head." in message
    assert "and 1 more" in message


def test_folder_without_config_json_is_refused(tmp_path, one_thread):
    folder = stego_model().save_pretrained(tmp_path / "model")
    (folder / "config.json").unlink()
    one_line_error(folder, "has no config.json")


def test_folder_with_a_wrong_format_tag_or_newer_version_is_refused(tmp_path, one_thread):
    folder = stego_model().save_pretrained(tmp_path / "model")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "format": "smp"}))
    one_line_error(folder, "not a stegoseg model")
    (folder / "config.json").write_text(json.dumps({**config, "version": 99}))
    one_line_error(folder, "version 99")
    (folder / "config.json").write_text("{not json")
    one_line_error(folder, "cannot read config.json")


def test_folder_with_missing_unknown_or_truncated_tensors_is_refused(tmp_path, one_thread):
    from safetensors.torch import load_file, save_file

    folder = stego_model().save_pretrained(tmp_path / "model")
    weights = folder / "model.safetensors"
    tensors = load_file(str(weights))
    save_file({k: v for k, v in tensors.items() if k != "cluster_probe.centroids"}, str(weights))
    one_line_error(folder, "damaged or was edited")
    save_file({**tensors, "extra.bias": torch.zeros(2)}, str(weights))
    one_line_error(folder, "no part of the model takes")
    weights.write_bytes(b"\x00\x01")
    one_line_error(folder, "cannot read model.safetensors")
    weights.unlink()
    one_line_error(folder, "has no model.safetensors")


def test_single_file_checkpoint_with_nan_is_still_refused(tmp_path, one_thread):
    from stegoseg.model import load

    model = stego_model()
    with torch.no_grad():
        model.cluster_probe.centroids[0, 0] = float("nan")
    path = model.save(tmp_path / "checkpoint.pt")
    with pytest.raises(StegosegError, match=r"checkpoint .*checkpoint\.pt holds NaN or infinite weights"):
        load(path)


# ------------------------------------------------------------------ predict vs segment_batch
@pytest.mark.parametrize("flip", [False, True])
def test_predict_on_a_network_size_batch_equals_segment_batch(flip, one_thread):
    from stegoseg.data.base import pil_to_tensor

    model = stego_model(seed=7)
    ims = images(4, sizes=((16, 24), (16, 24), (16, 24)))  # already the network size (minor side 16)
    batch = torch.stack([pil_to_tensor(Image.fromarray(im)) for im in ims])
    pred = model.predict(batch, flip=flip)
    assert pred["cluster"].shape == (3, 16, 24) and pred["cluster"].dtype == torch.int64
    for probe in ("cluster", "linear"):
        for resolution in (16, None):
            seg = model.segment_batch(ims, flip=flip, resolution=resolution, probe=probe)
            for k in range(3):
                np.testing.assert_array_equal(pred[probe][k].numpy(), seg[k])
    # flip changes the answer somewhere, so the flip flag is really passed on
    other = model.predict(batch, flip=not flip)["cluster"]
    assert not torch.equal(other, pred["cluster"])


@pytest.mark.parametrize("flip", [False, True])
def test_segment_batch_resizes_like_the_evaluation_transform(flip, one_thread):
    """segment_batch on a raw image = predict on EvalTransform's output, upsampled to the image.

    31 x 20 at resolution 16: the long side is 24.8; the transform truncates (24), rounding
    (segment_batch before) gave 25, a different network input."""
    from stegoseg.data.transforms import EvalTransform
    from stegoseg.model import resize_minor

    model = stego_model(seed=8)
    transform = EvalTransform(16, crop="none", image_resample="bilinear")
    ims = images(5, sizes=((20, 31), (31, 20), (17, 40)))
    for im in ims:
        pil = Image.fromarray(im)
        net, _ = transform(pil)
        assert resize_minor(pil, 16).size == (net.shape[-1], net.shape[-2])
    assert resize_minor(Image.fromarray(ims[0]), 16).size == (24, 16)
    seg = {probe: model.segment_batch(ims, flip=flip, resolution=16, probe=probe) for probe in ("cluster", "linear")}
    for k, im in enumerate(ims):
        net, _ = transform(Image.fromarray(im))
        pred = model.predict(net[None], out_size=im.shape[:2], flip=flip)
        for probe in ("cluster", "linear"):
            np.testing.assert_array_equal(pred[probe][0].numpy(), seg[probe][k])


@needs_crf
def test_predict_and_segment_batch_agree_with_the_crf(one_thread):
    from stegoseg.data.base import pil_to_tensor
    from stegoseg.evaluation.crf import CRFParams

    model = stego_model(seed=9)
    ims = images(6, sizes=((16, 24), (16, 24)))
    batch = torch.stack([pil_to_tensor(Image.fromarray(im)) for im in ims])
    params = CRFParams(iterations=3)
    pred = model.predict(batch, crf=True, crf_params=params)
    for probe in ("cluster", "linear"):
        seg = model.segment_batch(ims, crf=True, resolution=16, probe=probe, crf_params=params)
        for k in range(2):
            np.testing.assert_array_equal(pred[probe][k].numpy(), seg[k])
    with pytest.raises(StegosegError, match="image size"):
        model.predict(batch, out_size=(8, 12), crf=True)
