"""Tests for stegoseg.data: image/label I/O, transforms, and every dataset loader.

Loaders are tested on fixtures generated in ``tmp_path`` in each dataset's exact
on-disk format, and on the real CamVid / SUIM samples in ``../shared/data``.
"""
from __future__ import annotations

import io as _io
from pathlib import Path

import numpy as np
import pytest
import scipy.io
import torch
from PIL import Image

from stegoseg.data import (
    DATASETS,
    IGNORE_INDEX,
    VOC2012,
    Cityscapes27,
    CocoStuff,
    CocoStuff3,
    CocoStuff15,
    CocoStuff27,
    DirectoryDataset,
    EvalTransform,
    Potsdam3,
    Suim,
    TrainTransform,
    build_dataset,
    five_crop,
    five_crop_boxes,
    load_image,
    load_label,
)
from stegoseg.data.cocostuff import COCO_COARSE_TO_FINE, FINE_TO_COARSE27
from stegoseg.data.io import check_same_size, list_images
from stegoseg.data.transforms import pad_to_multiple
from stegoseg.errors import StegosegError

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
CAMVID = SHARED_DATA / "camvid"
SUIM_SAMPLE = SHARED_DATA / "suim-sample"
CAMVID_CLASSES = ["sky", "building", "pole", "road", "pavement", "tree", "sign/symbol", "fence", "car",
                  "pedestrian", "bicyclist"]


def _rgb(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8), "RGB")


def _save_label(path: Path, label: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(label.astype(np.uint8), "L").save(path)


def _save_palette_label(path: Path, label: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.fromarray(label.astype(np.uint8), "P")
    palette = np.random.default_rng(1).integers(0, 256, 768).tolist()  # colours unrelated to indices
    img.putpalette(palette)
    img.save(path)


# --------------------------------------------------------------------------- load_image


@pytest.mark.parametrize("mode", ["L", "LA", "RGBA", "P", "CMYK", "1", "RGB"])
def test_load_image_modes_become_rgb(tmp_path: Path, mode: str) -> None:
    ext = "jpg" if mode == "CMYK" else "png"
    path = tmp_path / f"img_{mode}.{ext}"
    _rgb(37, 23).convert(mode).save(path)
    img = load_image(path)
    assert img.mode == "RGB" and img.size == (37, 23)


def test_load_image_palette_with_transparency(tmp_path: Path) -> None:
    path = tmp_path / "p_trans.png"
    _rgb(10, 8).convert("P").save(path, transparency=0)
    assert load_image(path).mode == "RGB"


def test_load_image_16bit_scaled_by_range_not_clipped(tmp_path: Path) -> None:
    arr = np.zeros((4, 6), dtype=np.uint16)
    arr[0, 0], arr[0, 1], arr[0, 2] = 65535, 32896, 1000
    path = tmp_path / "grey16.png"
    Image.fromarray(arr).save(path)  # written as a 16-bit greyscale PNG
    img = load_image(path)
    out = np.asarray(img)
    assert img.mode == "RGB" and img.size == (6, 4)
    assert out[0, 0].tolist() == [255, 255, 255]
    assert out[0, 1, 0] == 128  # 32896 / 257
    assert out[0, 2, 0] == 4  # 1000 / 257 rounds to 4 (clipping would give 255)
    # The same data as a 16-bit TIFF (opened as I;16).
    tif = tmp_path / "grey16.tif"
    Image.fromarray(arr).save(tif)
    assert np.asarray(load_image(tif))[0, 1, 0] == 128


def test_load_image_mode_I_and_F(tmp_path: Path) -> None:
    arr = np.array([[0, 65535], [32896, 257]], dtype=np.int32)
    path = tmp_path / "int32.tif"
    Image.fromarray(arr, mode="I").save(path)
    out = np.asarray(load_image(path))[..., 0]
    assert out.tolist() == [[0, 255], [128, 1]]
    fpath = tmp_path / "float.tif"
    Image.fromarray(np.array([[0.0, 1.0], [0.5, 0.25]], dtype=np.float32), mode="F").save(fpath)
    assert np.asarray(load_image(fpath))[..., 0].tolist() == [[0, 255], [128, 64]]


def test_load_image_applies_exif_orientation(tmp_path: Path) -> None:
    path = tmp_path / "rotated.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 CW to display
    _rgb(40, 30).save(path, exif=exif.tobytes())
    with Image.open(path) as raw:
        assert raw.size == (40, 30)
    assert load_image(path).size == (30, 40)


def test_load_image_corrupt_and_missing_name_the_file(tmp_path: Path) -> None:
    bad = tmp_path / "corrupt.jpg"
    bad.write_bytes(b"this is not a jpeg")
    with pytest.raises(StegosegError, match="corrupt.jpg"):
        load_image(bad)
    truncated = tmp_path / "truncated.png"
    buf = _io.BytesIO()
    _rgb(64, 64).save(buf, format="PNG")
    truncated.write_bytes(buf.getvalue()[:200])
    with pytest.raises(StegosegError, match="truncated.png"):
        load_image(truncated)
    with pytest.raises(StegosegError, match="missing.png"):
        load_image(tmp_path / "missing.png")
    with pytest.raises(StegosegError, match="corrupt.jpg"):
        load_label(bad)


# --------------------------------------------------------------------------- load_label & helpers


def test_load_label_palette_gives_indices(tmp_path: Path) -> None:
    label = np.array([[0, 1, 2], [20, 255, 7]])
    path = tmp_path / "pal.png"
    _save_palette_label(path, label)
    out = load_label(path)
    assert out.dtype == np.int64 and out.shape == (2, 3)
    np.testing.assert_array_equal(out, label)


def test_load_label_rejects_colour_mask(tmp_path: Path) -> None:
    path = tmp_path / "colour.png"
    _rgb(5, 5).save(path)
    with pytest.raises(StegosegError, match="colour.png"):
        load_label(path)


def test_check_same_size_names_both_files() -> None:
    with pytest.raises(StegosegError, match=r"lab\.png.*img\.jpg"):
        check_same_size(_rgb(10, 8), np.zeros((8, 9), dtype=np.int64), "img.jpg", "lab.png")
    check_same_size(_rgb(10, 8), np.zeros((8, 10), dtype=np.int64), "img.jpg", "lab.png")


def test_list_images_sorted_case_insensitive(tmp_path: Path) -> None:
    for name in ["b.JPG", "a.png", "c.Tiff", "d.webp", "e.bmp", "f.jpeg", "notes.txt", ".hidden.jpg"]:
        (tmp_path / name).write_bytes(b"")
    assert [p.name for p in list_images(tmp_path)] == ["a.png", "b.JPG", "c.Tiff", "d.webp", "e.bmp", "f.jpeg"]


# --------------------------------------------------------------------------- transforms


def test_eval_transform_minor_side_and_center_crop() -> None:
    image = _rgb(48, 36)
    label = np.random.default_rng(0).choice([0, 3, 7, 255], size=(36, 48))
    img_t, lab_t = EvalTransform(resolution=24)(image, label)
    assert img_t.shape == (3, 24, 24) and img_t.dtype == torch.float32
    assert 0.0 <= float(img_t.min()) and float(img_t.max()) <= 1.0
    assert lab_t.shape == (24, 24) and lab_t.dtype == torch.int64
    assert set(lab_t.unique().tolist()) <= {0, 3, 7, 255}

    img_t, lab_t = EvalTransform(resolution=24, crop="none", image_resample="bilinear")(image, label)
    assert img_t.shape == (3, 24, 32) and lab_t.shape == (24, 32)
    assert set(lab_t.unique().tolist()) <= {0, 3, 7, 255}

    portrait, _ = EvalTransform(resolution=20, crop="none")(_rgb(30, 45), None)
    assert portrait.shape == (3, 30, 20)
    same, none_label = EvalTransform(resolution=None)(image, None)
    assert same.shape == (3, 36, 48) and none_label is None


def test_eval_transform_label_stays_aligned_with_image() -> None:
    # Image pixels encode their label, so nearest resizing must keep them equal.
    label = np.random.default_rng(3).integers(0, 5, size=(30, 50))
    image = Image.fromarray(np.repeat((label * 40).astype(np.uint8)[..., None], 3, axis=2), "RGB")
    img_t, lab_t = EvalTransform(resolution=17)(image, label)
    np.testing.assert_array_equal((img_t[0] * 255).round().long().numpy(), lab_t.numpy() * 40)


def test_train_transform_and_bad_options() -> None:
    img_t, lab_t = TrainTransform(resolution=16)(_rgb(40, 20), np.zeros((20, 40), dtype=np.int64))
    assert img_t.shape == (3, 16, 16) and lab_t.shape == (16, 16)
    with pytest.raises(StegosegError, match="crop"):
        EvalTransform(crop="random")
    with pytest.raises(StegosegError, match="image_resample"):
        EvalTransform(image_resample="lanczos9")
    with pytest.raises(StegosegError, match="resolution"):
        EvalTransform(resolution=0)


def test_five_crop_boxes_geometry() -> None:
    width, height = 481, 360
    boxes = five_crop_boxes(width, height)
    assert len(boxes) == 5
    cw, ch = 240, 180
    for left, top, right, bottom in boxes:
        assert (right - left, bottom - top) == (cw, ch)
        assert 0 <= left and 0 <= top and right <= width and bottom <= height
    tl, tr, bl, br, center = boxes
    assert tl[:2] == (0, 0)
    assert (tr[2], tr[1]) == (width, 0)
    assert (bl[0], bl[3]) == (0, height)
    assert br[2:] == (width, height)
    cx, cy = (center[0] + center[2]) / 2, (center[1] + center[3]) / 2
    assert abs(cx - width / 2) <= 0.5 and abs(cy - height / 2) <= 0.5


def test_five_crop_pairs() -> None:
    label = np.arange(20 * 30).reshape(20, 30)
    crops = five_crop(_rgb(30, 20), label)
    assert len(crops) == 5
    for (img, lab), box in zip(crops, five_crop_boxes(30, 20)):
        assert img.size == (15, 10) and lab.shape == (10, 15)
        assert lab[0, 0] == label[box[1], box[0]]
    assert five_crop(_rgb(30, 20), None)[4][1] is None


def test_pad_to_multiple() -> None:
    x = torch.ones(2, 3, 10, 13)
    padded, size = pad_to_multiple(x, 8)
    assert padded.shape == (2, 3, 16, 16) and size == (10, 13)
    assert float(padded[..., 10:, :].abs().sum()) == 0 and float(padded[..., :, 13:].abs().sum()) == 0
    assert torch.equal(padded[..., :10, :13], x)
    single, size = pad_to_multiple(torch.ones(3, 8, 8), 8, value=5)
    assert single.shape == (3, 8, 8) and size == (8, 8)


# --------------------------------------------------------------------------- DirectoryDataset


def _make_directory(root: Path, split: str = "train", n: int = 3, labels: bool = True) -> None:
    for k in range(n):
        (root / "imgs" / split).mkdir(parents=True, exist_ok=True)
        _rgb(12, 8, seed=k).save(root / "imgs" / split / f"im{k}.jpg")
        if labels:
            lab = np.full((8, 12), k, dtype=np.uint8)
            lab[0, 0] = 250
            _save_label(root / "labels" / split / f"im{k}.png", lab)


def test_directory_dataset_labelled(tmp_path: Path) -> None:
    _make_directory(tmp_path)
    ds = DirectoryDataset(tmp_path, "train", ignore_index=250)
    assert len(ds) == 3 and ds.has_labels and [p.name for p in ds.image_paths] == ["im0.jpg", "im1.jpg", "im2.jpg"]
    sample = ds[2]
    assert sample["id"] == "im2" and sample["image"].shape == (3, 8, 12)
    assert sample["label"].dtype == torch.int64
    assert sample["label"][0, 0] == IGNORE_INDEX and sample["label"][1, 1] == 2
    assert ds.n_classes == 3  # inferred: max label value (2) + 1, on-disk ignore value excluded
    named = DirectoryDataset(tmp_path, "train", ignore_index=250, class_names=["a", "b", "c", "d"])
    assert named.n_classes == 4
    (tmp_path / "classes.txt").write_text("x\ny\n\n")
    assert DirectoryDataset(tmp_path, "train").class_names == ["x", "y"]
    with_transform = DirectoryDataset(tmp_path, "train", transform=EvalTransform(resolution=4))
    assert with_transform[0]["image"].shape == (3, 4, 4) and with_transform[0]["label"].shape == (4, 4)


def test_directory_dataset_unlabelled_has_no_label_key(tmp_path: Path) -> None:
    _make_directory(tmp_path, split="val", labels=False)
    ds = build_dataset("directory", tmp_path, "val")
    assert not ds.has_labels and "label" not in ds[0] and ds.n_classes == 0


def test_directory_dataset_missing_label_and_mismatch(tmp_path: Path) -> None:
    _make_directory(tmp_path)
    (tmp_path / "labels" / "train" / "im1.png").unlink()
    with pytest.raises(StegosegError, match="im1.png"):
        DirectoryDataset(tmp_path, "train")
    _save_label(tmp_path / "labels" / "train" / "im1.png", np.zeros((9, 12)))
    ds = DirectoryDataset(tmp_path, "train")
    with pytest.raises(StegosegError, match=r"im1\.png.*im1\.jpg"):
        ds[1]
    with pytest.raises(StegosegError, match="imgs"):
        DirectoryDataset(tmp_path, "test")


def test_build_dataset_errors(tmp_path: Path) -> None:
    with pytest.raises(StegosegError, match="cocostuff27") as info:
        build_dataset("imagenet", tmp_path, "train")
    assert "unknown dataset kind" in str(info.value)
    with pytest.raises(StegosegError, match="nowhere"):
        build_dataset("cityscapes27", tmp_path / "nowhere", "val")
    with pytest.raises(StegosegError, match="leftImg8bit"):
        build_dataset("cityscapes27", tmp_path, "val")
    with pytest.raises(StegosegError, match="bogus"):
        build_dataset("voc2012", tmp_path, "val", bogus=1)
    assert set(DATASETS) >= {"directory", "cocostuff27", "cocostuff3", "cityscapes27", "potsdam3", "suim", "voc2012"}
    for cls in DATASETS.values():
        assert cls.__name__ == "DirectoryDataset" or len(cls.class_names) > 0


# --------------------------------------------------------------------------- COCO-Stuff


def test_coco_fine_to_coarse_table() -> None:
    fines = sorted(f for _, group in COCO_COARSE_TO_FINE for f in group)
    assert fines == list(range(182)) and len(COCO_COARSE_TO_FINE) == 27
    # person, bicycle, banner(textile), clouds/sky-other(sky), wall-brick(wall), water-other(water)
    expected = {0: 9, 1: 11, 91: 17, 105: 23, 156: 23, 170: 18, 177: 26, 255: IGNORE_INDEX, 200: IGNORE_INDEX}
    for fine, coarse in expected.items():
        assert FINE_TO_COARSE27[fine] == coarse


def _make_coco(root: Path, list_name: str = "Coco164kFull_Stuff_Coarse_7.txt") -> np.ndarray:
    label = np.array([[0, 1, 156, 255], [170, 123, 110, 50]], dtype=np.uint8)
    for sub in ("train2017", "val2017"):
        (root / "images" / sub).mkdir(parents=True)
        (root / "curated" / sub).mkdir(parents=True)
        for img_id in ("000000000009", "000000000025"):
            _rgb(4, 2).save(root / "images" / sub / f"{img_id}.jpg")
            _save_label(root / "annotations" / sub / f"{img_id}.png", label)
        (root / "curated" / sub / list_name).write_text("000000000009\n000000000025\n")
    return label


def test_cocostuff_variants(tmp_path: Path) -> None:
    _make_coco(tmp_path)
    ds = build_dataset("cocostuff27", tmp_path, "val")
    assert isinstance(ds, CocoStuff27) and len(ds) == 2 and ds.n_classes == 27
    assert ds.ids == ["000000000009", "000000000025"]
    np.testing.assert_array_equal(ds[0]["label"].numpy(), [[9, 11, 23, 255], [18, 22, 21, 5]])
    with pytest.warns(UserWarning, match="Coco164kFull_Stuff_Coarse.txt"):
        train = CocoStuff27(tmp_path, "train")  # falls back to the _7 list
    assert len(train) == 2
    np.testing.assert_array_equal(CocoStuff15(tmp_path, "val")[0]["label"].numpy(),
                                  [[255, 255, 11, 255], [6, 10, 9, 255]])
    np.testing.assert_array_equal(
        CocoStuff3(tmp_path, "val", image_list="Coco164kFull_Stuff_Coarse_7.txt")[0]["label"].numpy(),
        [[255, 255, 0, 255], [255, 1, 2, 255]],
    )
    with pytest.raises(StegosegError, match="Coco164kFew_Stuff_6.txt"):
        CocoStuff3(tmp_path, "val")
    with pytest.raises(StegosegError, match="coarse_classes"):
        CocoStuff(tmp_path, "val", coarse_classes=5)


# --------------------------------------------------------------------------- Cityscapes


def test_cityscapes27(tmp_path: Path) -> None:
    img_dir = tmp_path / "leftImg8bit" / "val" / "frankfurt"
    img_dir.mkdir(parents=True)
    _rgb(4, 2).save(img_dir / "frankfurt_000000_000294_leftImg8bit.png")
    label = np.array([[7, 3, 33, 26], [0, 255, 8, 34]], dtype=np.uint8)
    _save_label(tmp_path / "gtFine" / "val" / "frankfurt" / "frankfurt_000000_000294_gtFine_labelIds.png", label)
    ds = Cityscapes27(tmp_path, "val")
    sample = ds[0]
    assert sample["id"] == "frankfurt_000000_000294" and ds.n_classes == 27
    np.testing.assert_array_equal(sample["label"].numpy(), [[0, 255, 26, 19], [255, 255, 1, 255]])
    assert ds.class_names[0] == "road" and ds.class_names[19] == "car"


# --------------------------------------------------------------------------- Potsdam


def test_potsdam3(tmp_path: Path) -> None:
    (tmp_path / "imgs").mkdir()
    (tmp_path / "gt").mkdir()
    rng = np.random.default_rng(0)
    img = rng.random((6, 5, 4)).astype(np.float32)  # float RGB+IR in [0, 1]
    img[0, 0, :3] = [1.0, 0.5, 0.0]
    gt = np.array([[0, 1, 2, 3, 4], [5, 255, 0, 0, 0]] + [[4] * 5] * 4, dtype=np.int32)
    scipy.io.savemat(tmp_path / "imgs" / "17.mat", {"img": img})
    scipy.io.savemat(tmp_path / "gt" / "17.mat", {"gt": gt})
    scipy.io.savemat(tmp_path / "imgs" / "99.mat", {"img": (img * 255).astype(np.uint8)})
    (tmp_path / "labelled_test.txt").write_text("17\n")
    (tmp_path / "unlabelled_train.txt").write_text("99\n")
    (tmp_path / "labelled_train.txt").write_text("17\n")
    ds = build_dataset("potsdam3", tmp_path, "val")
    sample = ds[0]
    assert sample["image"].shape == (3, 6, 5) and sample["id"] == "17"
    np.testing.assert_allclose(sample["image"][:, 0, 0].numpy(), [1.0, 128 / 255, 0.0], atol=1e-6)
    np.testing.assert_array_equal(sample["label"][:2].numpy(), [[0, 1, 2, 2, 0], [1, 255, 0, 0, 0]])
    assert ds.n_classes == 3
    unl = Potsdam3(tmp_path, "unlabelled_train")
    assert not unl.has_labels and "label" not in unl[0] and unl[0]["image"].shape == (3, 6, 5)
    both = Potsdam3(tmp_path, "train", include_unlabelled=True)
    assert len(both) == 2 and not both.has_labels
    assert Potsdam3(tmp_path, "labelled_train.txt").has_labels


# --------------------------------------------------------------------------- SUIM


SUIM_COLOURS = [(0, 0, 0), (0, 0, 255), (0, 255, 0), (0, 255, 255), (255, 0, 0), (255, 0, 255),
                (255, 255, 0), (255, 255, 255)]


def _make_suim(base: Path) -> None:
    (base / "images").mkdir(parents=True)
    (base / "masks").mkdir(parents=True)
    mask = np.zeros((2, 4, 3), dtype=np.uint8)
    for k, colour in enumerate(SUIM_COLOURS):
        mask[k // 4, k % 4] = colour
    mask[0, 0] = (20, 30, 10)  # near-black JPEG-ish noise -> BW
    mask[1, 3] = (250, 240, 200)  # near-white -> SR
    _rgb(4, 2).save(base / "images" / "d_r_1_.jpg")
    Image.fromarray(mask, "RGB").save(base / "masks" / "d_r_1_.bmp")


def test_suim_colour_decoding_and_layouts(tmp_path: Path) -> None:
    _make_suim(tmp_path / "flat")
    ds = Suim(tmp_path / "flat")
    np.testing.assert_array_equal(ds[0]["label"].numpy(), [[0, 1, 2, 3], [4, 5, 6, 7]])
    assert ds.n_classes == 8
    _make_suim(tmp_path / "release" / "train_val")
    _make_suim(tmp_path / "release" / "TEST")
    assert len(build_dataset("suim", tmp_path / "release", "train")) == 1
    assert len(Suim(tmp_path / "release", "test")) == 1
    with pytest.raises(StegosegError, match="split"):
        Suim(tmp_path / "release")
    (tmp_path / "flat" / "masks" / "d_r_1_.bmp").unlink()
    with pytest.raises(StegosegError, match="d_r_1_.bmp"):
        Suim(tmp_path / "flat")


# --------------------------------------------------------------------------- VOC


def test_voc2012_palette_labels(tmp_path: Path) -> None:
    (tmp_path / "JPEGImages").mkdir()
    (tmp_path / "ImageSets" / "Segmentation").mkdir(parents=True)
    _rgb(3, 2).save(tmp_path / "JPEGImages" / "2007_000032.jpg")
    _save_palette_label(tmp_path / "SegmentationClass" / "2007_000032.png", np.array([[0, 1, 15], [20, 255, 30]]))
    (tmp_path / "ImageSets" / "Segmentation" / "val.txt").write_text("2007_000032\n")
    ds = build_dataset("voc2012", tmp_path, "val")
    assert isinstance(ds, VOC2012) and ds.n_classes == 21
    np.testing.assert_array_equal(ds[0]["label"].numpy(), [[0, 1, 15], [20, 255, 255]])
    with pytest.raises(StegosegError, match="train.txt"):
        VOC2012(tmp_path, "train")


# --------------------------------------------------------------------------- real data


@pytest.mark.skipif(not CAMVID.is_dir(), reason=f"real CamVid data not found at {CAMVID}")
def test_real_camvid() -> None:
    train = build_dataset("directory", CAMVID, "train", class_names=CAMVID_CLASSES)
    val = DirectoryDataset(CAMVID, "val", class_names=CAMVID_CLASSES)
    assert len(train) == 367 and len(val) == 101 and train.n_classes == 11
    for ds in (train, val):
        for img_path, lab_path in zip(ds.image_paths, ds.label_paths):
            with Image.open(img_path) as img, Image.open(lab_path) as lab:
                assert img.size == lab.size
    for index in (0, len(val) - 1):
        raw = val.load(index)
        assert raw.image.mode == "RGB" and raw.image.size == (480, 360)
        assert set(np.unique(raw.label).tolist()) <= set(range(11)) | {255}
    sample = val[3]
    assert sample["image"].shape == (3, 360, 480) and sample["label"].shape == (360, 480)
    values = set()
    for path in val.label_paths:
        values |= set(np.unique(load_label(path)).tolist())
    assert values <= set(range(11)) | {255} and len(values) >= 10


@pytest.mark.skipif(not SUIM_SAMPLE.is_dir(), reason=f"real SUIM sample not found at {SUIM_SAMPLE}")
def test_real_suim_sample() -> None:
    ds = build_dataset("suim", SUIM_SAMPLE, None)
    assert len(ds) == 8 and ds.has_labels
    seen = set()
    for index in range(len(ds)):
        raw = ds.load(index)
        assert raw.label.shape == (raw.image.height, raw.image.width)
        seen |= set(np.unique(raw.label).tolist())
        if raw.id == "d_r_47_":
            assert raw.image.size == (480, 448)
    assert seen <= set(range(8)) and len(seen) >= 3
    raw = ds.load(ds.ids.index("d_r_47_"))
    image, label = EvalTransform(resolution=64)(raw.image, raw.label)
    assert image.shape == (3, 64, 64) and label.shape == (64, 64)
    assert set(label.unique().tolist()) <= set(np.unique(raw.label).tolist())
