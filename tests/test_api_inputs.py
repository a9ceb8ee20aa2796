"""Inputs of the Python API: array / PIL / tensor / path conversion, and the CRF entry points."""
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from stegoseg.data.io import image_from_array_or_pil
from stegoseg.errors import StegosegError
from stegoseg.evaluation.crf import (
    CRFParams,
    crf_available,
    crf_batch,
    crf_job,
    dense_crf,
    image_to_uint8,
)

needs_crf = pytest.mark.skipif(not crf_available(), reason="pydensecrf2 is not installed")


def rgb(obj, **kwargs) -> np.ndarray:
    out = image_from_array_or_pil(obj, **kwargs)
    assert isinstance(out, Image.Image) and out.mode == "RGB"
    return np.asarray(out)


def grey(values) -> np.ndarray:
    """The (1, N, 3) RGB array of a row of grey levels."""
    v = np.asarray(values, dtype=np.uint8)[None, :]
    return np.stack([v, v, v], axis=-1)


# ------------------------------------------------------------------ numpy arrays
def test_float_01_array_is_scaled_by_255_and_rounded():
    arr = np.array([[0.0, 0.5, 1.0, 0.2]], dtype=np.float32)
    np.testing.assert_array_equal(rgb(arr), grey([0, 128, 255, 51]))


def test_float_0_255_array_is_rounded_not_rescaled():
    arr = np.array([[0.0, 2.4, 100.6, 255.0]])
    np.testing.assert_array_equal(rgb(arr), grey([0, 2, 101, 255]))


def test_float_rgb_array_keeps_channels():
    arr = np.zeros((2, 3, 3), dtype=np.float64)
    arr[..., 0], arr[..., 1], arr[..., 2] = 1.0, 0.5, 0.0
    out = rgb(arr)
    assert out.shape == (2, 3, 3)
    assert (out[..., 0] == 255).all() and (out[..., 1] == 128).all() and (out[..., 2] == 0).all()


def test_uint8_array_is_unchanged_and_alpha_or_singleton_channel_handled():
    arr = np.random.default_rng(0).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    np.testing.assert_array_equal(rgb(arr), arr)
    rgba = np.concatenate([arr, np.full((5, 7, 1), 9, np.uint8)], axis=-1)
    np.testing.assert_array_equal(rgb(rgba), arr)
    single = arr[..., :1]
    np.testing.assert_array_equal(rgb(single), np.repeat(single, 3, axis=-1))


def test_uint16_array_uses_the_16_bit_range():
    arr = np.array([[0, 257, 32896, 65535]], dtype=np.uint16)
    np.testing.assert_array_equal(rgb(arr), grey([0, 1, 128, 255]))
    # small uint16 values are 16-bit data too, not 8-bit values
    np.testing.assert_array_equal(rgb(np.array([[0, 255]], dtype=np.uint16)), grey([0, 1]))


def test_other_integers_in_8_bit_range_are_taken_as_is():
    arr = np.array([[0, 7, 200, 255]], dtype=np.int32)
    np.testing.assert_array_equal(rgb(arr), grey([0, 7, 200, 255]))
    np.testing.assert_array_equal(rgb(np.array([[True, False]])), grey([255, 0]))


def test_pil_i16_image_matches_the_uint16_array_path():
    arr = np.array([[0, 1000, 30000, 65535], [5, 257, 40000, 12345]], dtype=np.uint16)
    img = Image.fromarray(arr)
    assert img.mode.startswith("I;16")
    np.testing.assert_array_equal(rgb(img), rgb(arr))
    assert rgb(img)[0, 3, 0] == 255 and rgb(img)[1, 1, 0] == 1


def test_pil_float_image_in_01_is_scaled_not_clipped():
    img = Image.fromarray(np.array([[0.0, 0.5, 1.0]], dtype=np.float32), mode="F")
    np.testing.assert_array_equal(rgb(img), grey([0, 128, 255]))


def test_negative_float_array_is_min_max_normalised_with_a_warning():
    arr = np.array([[-1.0, 0.0, 1.0]])
    with pytest.warns(UserWarning, match="min-max"):
        out = rgb(arr)
    np.testing.assert_array_equal(out, grey([0, 128, 255]))


def test_out_of_range_integers_are_min_max_normalised_with_a_warning():
    arr = np.array([[100, 1100, 600]], dtype=np.int32)
    with pytest.warns(UserWarning, match="min-max"):
        out = rgb(arr)
    np.testing.assert_array_equal(out, grey([0, 255, 128]))


def test_in_range_arrays_do_not_warn():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        rgb(np.array([[0.0, 1.0]]))
        rgb(np.array([[0.0, 200.0]]))
        rgb(np.array([[0, 65535]], dtype=np.uint16))


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nan_or_inf_array_raises(bad):
    arr = np.array([[0.0, bad]], dtype=np.float32)
    with pytest.raises(StegosegError, match="NaN or infinite"):
        image_from_array_or_pil(arr)


@pytest.mark.parametrize("shape", [(2, 3, 4, 5), (4,), (3, 4, 2), (3, 4, 5)])
def test_wrong_shape_raises_naming_the_shape(shape):
    with pytest.raises(StegosegError) as err:
        image_from_array_or_pil(np.zeros(shape, np.uint8), name="image 2")
    msg = str(err.value)
    assert str(shape) in msg and "(H, W, 3)" in msg and "image 2" in msg and "\n" not in msg


def test_empty_array_and_unknown_types_raise():
    with pytest.raises(StegosegError, match="empty"):
        image_from_array_or_pil(np.zeros((0, 4, 3), np.uint8))
    with pytest.raises(StegosegError, match="list"):
        image_from_array_or_pil([[0, 1], [2, 3]])
    with pytest.raises(StegosegError, match="unsupported dtype"):
        image_from_array_or_pil(np.zeros((2, 2), np.complex64))


# ------------------------------------------------------------------ tensors and paths
def test_chw_float_tensor_is_converted_channels_last():
    t = torch.zeros(3, 2, 4)
    t[0], t[1], t[2] = 1.0, 0.5, 0.2
    out = rgb(t)
    assert out.shape == (2, 4, 3)
    np.testing.assert_array_equal(out[0, 0], [255, 128, 51])


def test_tensor_with_batch_or_unknown_channels_raises():
    with pytest.raises(StegosegError, match=r"\(C, H, W\)"):
        image_from_array_or_pil(torch.zeros(1, 3, 4, 4))
    with pytest.raises(StegosegError, match=r"\(5, 6, 7\)"):
        image_from_array_or_pil(torch.zeros(5, 6, 7))


def test_path_is_loaded(tmp_path):
    arr = np.random.default_rng(1).integers(0, 256, (6, 5, 3), dtype=np.uint8)
    Image.fromarray(arr).save(tmp_path / "x.png")
    np.testing.assert_array_equal(rgb(tmp_path / "x.png"), arr)
    np.testing.assert_array_equal(rgb(str(tmp_path / "x.png")), arr)


# ------------------------------------------------------------------ model.segment
def two_region_model(image_u8: np.ndarray):
    """A tiny random-backbone model whose two cluster centroids are the mean codes of the
    image's left and right halves, so that the halves fall into different clusters."""
    from stegoseg.backbones.backbone import create_backbone
    from stegoseg.data.base import pil_to_tensor
    from stegoseg.model import SegmentationModel

    torch.manual_seed(0)
    backbone = create_backbone("dino_vits8", pretrained=False, tiny=True)
    spec = {"name": "dino_vits8", "pretrained": False, "tiny": True}
    model = SegmentationModel(backbone, spec, None, n_clusters=2).eval()
    code = model.code(pil_to_tensor(Image.fromarray(image_u8))[None], flip=True)[0]
    half = code.shape[-1] // 2
    with torch.no_grad():
        model.cluster_probe.centroids[0] = code[:, :, :half].mean((1, 2))
        model.cluster_probe.centroids[1] = code[:, :, half:].mean((1, 2))
    return model


def two_region_image() -> np.ndarray:
    x = np.zeros((32, 48, 3), dtype=np.float32)
    x[:, :24] = (0.9, 0.2, 0.1)
    x[:, 24:] = (0.1, 0.3, 1.0)
    return x


def test_segment_float_01_image_equals_its_uint8_version_and_finds_both_regions(one_thread):
    x = two_region_image()
    x_u8 = np.round(x * 255).astype(np.uint8)
    model = two_region_model(x_u8)
    labels = model.segment(x, resolution=None)
    assert labels.shape == (32, 48) and labels.dtype == np.int64
    np.testing.assert_array_equal(labels, model.segment(x_u8, resolution=None))
    # before the fix the float image became black: one cluster only
    assert len(np.unique(labels)) == 2
    assert np.bincount(labels[:, :24].ravel()).argmax() != np.bincount(labels[:, 24:].ravel()).argmax()
    # a (3, H, W) tensor and a PIL image give the same map
    np.testing.assert_array_equal(labels, model.segment(torch.from_numpy(x).permute(2, 0, 1), resolution=None))
    batch = model.segment_batch([x, Image.fromarray(x_u8)], resolution=None)
    np.testing.assert_array_equal(batch[0], labels)
    np.testing.assert_array_equal(batch[1], labels)


def test_segment_batch_error_names_the_bad_image(one_thread):
    model = two_region_model(np.round(two_region_image() * 255).astype(np.uint8))
    with pytest.raises(StegosegError, match="image 1 array contains NaN"):
        model.segment_batch([two_region_image(), np.full((8, 8), np.nan)])


@needs_crf
def test_segment_path_with_crf_works_and_forwards_params(tmp_path, monkeypatch, one_thread):
    """The README example `model.segment(path, crf=True)` (read-only PIL buffer)."""

    x_u8 = np.round(two_region_image() * 255).astype(np.uint8)
    Image.fromarray(x_u8).save(tmp_path / "img.png")
    model = two_region_model(x_u8)
    labels = model.segment(tmp_path / "img.png", crf=True, resolution=None)
    assert labels.shape == (32, 48) and labels.dtype == np.int64
    assert set(np.unique(labels)) <= {0, 1}

    seen = []

    def spy(job):
        seen.append(job)
        return crf_job(job)

    import stegoseg.evaluation.crf as crf_module

    monkeypatch.setattr(crf_module, "crf_job", spy)
    params = CRFParams(iterations=3, reference_input=True)
    model.segment(str(tmp_path / "img.png"), crf=True, resolution=None, crf_params=params)
    image, _, used = seen[0]
    assert used == params
    np.testing.assert_array_equal(image, x_u8)  # RGB uint8; the flip happens inside dense_crf
    model.segment(x_u8, crf=True, resolution=None)
    assert seen[1][2] == CRFParams()


# ------------------------------------------------------------------ dense CRF
def random_case(seed=0, h=24, w=30, c=4):
    rng = np.random.default_rng(seed)
    img = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    img[:, : w // 2] //= 3  # some structure for the bilateral kernel
    logits = rng.normal(size=(c, h, w)).astype(np.float32) * 2
    probs = np.exp(logits - logits.max(0))
    probs /= probs.sum(0)
    return img, logits, probs.astype(np.float32)


@needs_crf
def test_dense_crf_accepts_read_only_and_non_contiguous_inputs():
    img, _, probs = random_case()
    expected = dense_crf(img.copy(), probs.copy())
    ro_img, ro_probs = img.copy(), probs.copy()
    ro_img.setflags(write=False)
    ro_probs.setflags(write=False)
    out = dense_crf(ro_img, ro_probs)
    np.testing.assert_array_equal(out, expected)
    assert not ro_img.flags.writeable  # the caller's array is untouched
    np.testing.assert_array_equal(ro_img, img)
    fortran = np.asfortranarray(img)
    np.testing.assert_array_equal(dense_crf(fortran, probs), expected)
    # a read-only PIL buffer, as segment() passes it
    pil_view = np.asarray(Image.fromarray(img))
    assert not pil_view.flags.writeable
    np.testing.assert_array_equal(dense_crf(pil_view, probs), expected)


@needs_crf
def test_reference_input_feeds_the_crf_bgr():
    img, _, probs = random_case(seed=1)
    ref = dense_crf(img, probs, CRFParams(reference_input=True))
    np.testing.assert_array_equal(ref, dense_crf(img[..., ::-1].copy(), probs, CRFParams()))
    # the lattice is not channel-order invariant, so the option changes the result
    assert not np.array_equal(ref, dense_crf(img, probs, CRFParams()))


def test_image_to_uint8_truncate_floors_instead_of_rounding():
    t = torch.tensor([0.0, 0.999, 0.5, 0.3, 1.0, 0.1], dtype=torch.float32).reshape(3, 1, 2)
    rounded, truncated = image_to_uint8(t), image_to_uint8(t, truncate=True)
    expected = (t * 255).floor().byte().permute(1, 2, 0).numpy()
    np.testing.assert_array_equal(truncated, expected)
    np.testing.assert_array_equal(truncated.reshape(-1, 3).T.ravel(), [0, 254, 127, 76, 255, 25])
    np.testing.assert_array_equal(rounded.reshape(-1, 3).T.ravel(), [0, 255, 128, 76, 255, 26])
    assert truncated.dtype == np.uint8 and truncated.shape == (1, 2, 3)


@needs_crf
def test_crf_batch_reference_input_truncates_and_flips():
    rng = np.random.default_rng(2)
    images = torch.from_numpy(rng.random((2, 3, 16, 20), dtype=np.float32))
    logits = torch.from_numpy(rng.normal(size=(2, 3, 4, 5)).astype(np.float32) * 3)
    params = CRFParams(reference_input=True)
    out = crf_batch(images, logits, params)
    up = torch.nn.functional.interpolate(logits, size=(16, 20), mode="bilinear", align_corners=False)
    for k in range(2):
        bgr_truncated = (images[k] * 255).byte().permute(1, 2, 0).numpy()[..., ::-1].copy()
        expected = crf_job((bgr_truncated, up[k].numpy(), CRFParams()))
        np.testing.assert_array_equal(out[k].numpy(), expected)
    default = crf_batch(images, logits, CRFParams())
    assert out.shape == default.shape == (2, 16, 20)
