"""Joint image/label transforms and cropping helpers.

A joint transform is a callable ``(PIL image, label ndarray | None) -> (image, label)``
returning an image ``FloatTensor (3, H, W)`` in ``[0, 1]`` and a label ``LongTensor
(H, W)`` (or ``None``). Labels are always resized with nearest neighbour, so no new
label values appear.

Geometry matches torchvision (what the reference implementation used):

* resize so the *minor* side equals ``resolution``; the other side is
  ``int(resolution * long / short)`` (truncated, like ``torchvision.transforms.Resize``);
* centre crop offsets are ``int(round((size - crop) / 2))`` (like ``CenterCrop``).
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from stegoseg.data.base import pil_to_tensor
from stegoseg.errors import StegosegError

Box = Tuple[int, int, int, int]

_RESAMPLE = {
    "nearest": Image.NEAREST,
    "bilinear": Image.BILINEAR,
    "bicubic": Image.BICUBIC,
}
_CROPS = ("center", "none")


def _check_resolution(resolution: Optional[int], name: str) -> Optional[int]:
    if resolution is None:
        return None
    if isinstance(resolution, bool) or not isinstance(resolution, (int, np.integer)) or resolution <= 0:
        raise StegosegError(f"{name}: resolution must be a positive integer or None, got {resolution!r}")
    return int(resolution)


def _check_resample(image_resample: str, name: str) -> int:
    if image_resample not in _RESAMPLE:
        raise StegosegError(
            f"{name}: image_resample must be one of {', '.join(_RESAMPLE)}, got {image_resample!r}"
        )
    return _RESAMPLE[image_resample]


def minor_side_size(width: int, height: int, resolution: int) -> Tuple[int, int]:
    """(width, height) after resizing so that the shorter side equals ``resolution``."""
    if width <= height:
        return resolution, int(resolution * height / width)
    return int(resolution * width / height), resolution


def center_box(width: int, height: int, crop_w: int, crop_h: int) -> Box:
    """(left, top, right, bottom) of a ``crop_w x crop_h`` box centred in the image."""
    left = int(round((width - crop_w) / 2.0))
    top = int(round((height - crop_h) / 2.0))
    return left, top, left + crop_w, top + crop_h


def _resize_label(label: np.ndarray, size: Tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour resize of an integer label map to ``size`` = (width, height)."""
    if (label.shape[1], label.shape[0]) == tuple(size):
        return label
    # PIL's NEAREST on an int32 image samples exactly the pixels it samples for the image.
    resized = Image.fromarray(np.ascontiguousarray(label, dtype=np.int32), mode="I").resize(size, Image.NEAREST)
    return np.asarray(resized, dtype=np.int64)


def _label_to_tensor(label: Optional[np.ndarray]) -> Optional[torch.Tensor]:
    if label is None:
        return None
    return torch.from_numpy(np.ascontiguousarray(label, dtype=np.int64))


class EvalTransform:
    """Resize (minor side -> ``resolution``) then optionally centre crop to a square.

    Args:
        resolution: target size of the shorter side (and of the square crop);
            ``None`` keeps the original size (no resize, no crop).
        crop: ``"center"`` crops ``resolution x resolution`` from the centre;
            ``"none"`` keeps the whole resized image.
        image_resample: ``"nearest"`` (what the reference used for evaluation images),
            ``"bilinear"`` or ``"bicubic"``. Labels always use nearest.
    """

    def __init__(self, resolution: Optional[int] = 320, crop: str = "center", image_resample: str = "nearest"):
        name = type(self).__name__
        self.resolution = _check_resolution(resolution, name)
        if crop not in _CROPS:
            raise StegosegError(f"{name}: crop must be one of {', '.join(_CROPS)}, got {crop!r}")
        self.crop = crop
        self.image_resample = image_resample
        self._resample = _check_resample(image_resample, name)

    def apply_pil(
        self, image: Image.Image, label: Optional[np.ndarray] = None
    ) -> Tuple[Image.Image, Optional[np.ndarray]]:
        """The same geometry on PIL/NumPy inputs, returning PIL/NumPy outputs."""
        if label is not None and (label.shape[0], label.shape[1]) != (image.height, image.width):
            raise StegosegError(
                f"label size {label.shape[1]}x{label.shape[0]} differs from image size "
                f"{image.width}x{image.height}; labels must match their image"
            )
        if self.resolution is None:
            return image, label
        size = minor_side_size(image.width, image.height, self.resolution)
        if image.size != size:
            image = image.resize(size, self._resample)
        if label is not None:
            label = _resize_label(label, size)
        if self.crop == "center":
            box = center_box(size[0], size[1], self.resolution, self.resolution)
            image = image.crop(box)
            if label is not None:
                label = label[box[1]:box[3], box[0]:box[2]]
        return image, label

    def __call__(
        self, image: Image.Image, label: Optional[np.ndarray] = None
    ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        image, label = self.apply_pil(image, label)
        return pil_to_tensor(image), _label_to_tensor(label)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(resolution={self.resolution}, crop={self.crop!r}, "
            f"image_resample={self.image_resample!r})"
        )


class TrainTransform(EvalTransform):
    """Training transform: minor-side resize then centre crop, bilinear for images.

    STEGO trains on cached features of fixed crops, so there is no random augmentation.
    """

    def __init__(self, resolution: Optional[int] = 224, image_resample: str = "bilinear"):
        super().__init__(resolution=resolution, crop="center", image_resample=image_resample)

    def __repr__(self) -> str:
        return f"TrainTransform(resolution={self.resolution}, image_resample={self.image_resample!r})"


def five_crop_boxes(width: int, height: int, fraction: float = 0.5) -> List[Box]:
    """Five ``(left, top, right, bottom)`` boxes: top-left, top-right, bottom-left,
    bottom-right, centre, in that order.

    Each box is ``int(fraction * width)`` wide and ``int(fraction * height)`` high;
    corner boxes touch their image corner, the centre box uses :func:`center_box`.
    """
    if not 0.0 < fraction <= 1.0:
        raise StegosegError(f"five_crop_boxes: fraction must be in (0, 1], got {fraction!r}")
    cw, ch = int(fraction * width), int(fraction * height)
    if cw < 1 or ch < 1:
        raise StegosegError(
            f"five_crop_boxes: image {width}x{height} is too small for crops of fraction {fraction}"
        )
    return [
        (0, 0, cw, ch),
        (width - cw, 0, width, ch),
        (0, height - ch, cw, height),
        (width - cw, height - ch, width, height),
        center_box(width, height, cw, ch),
    ]


def five_crop(
    image: Image.Image, label: Optional[np.ndarray] = None, fraction: float = 0.5
) -> List[Tuple[Image.Image, Optional[np.ndarray]]]:
    """Cut an image (and its label) into the 5 crops of :func:`five_crop_boxes`.

    Returns 5 ``(PIL image, label ndarray | None)`` pairs in the order tl, tr, bl, br, centre.
    """
    if label is not None and (label.shape[0], label.shape[1]) != (image.height, image.width):
        raise StegosegError(
            f"five_crop: label size {label.shape[1]}x{label.shape[0]} differs from image size "
            f"{image.width}x{image.height}"
        )
    out: List[Tuple[Image.Image, Optional[np.ndarray]]] = []
    for left, top, right, bottom in five_crop_boxes(image.width, image.height, fraction):
        crop_label = None if label is None else np.ascontiguousarray(label[top:bottom, left:right])
        out.append((image.crop((left, top, right, bottom)), crop_label))
    return out


def pad_to_multiple(
    x: torch.Tensor, multiple: int, value: float = 0
) -> Tuple[torch.Tensor, Tuple[int, int]]:
    """Pad a ``(B, C, H, W)`` or ``(C, H, W)`` tensor at the bottom/right so H and W are
    multiples of ``multiple``. Returns ``(padded, (H, W))`` with the original size,
    so callers can crop results back with ``out[..., :H, :W]``.
    """
    if x.dim() not in (3, 4):
        raise ValueError(f"pad_to_multiple expects a (C, H, W) or (B, C, H, W) tensor, got shape {tuple(x.shape)}")
    if multiple < 1:
        raise ValueError(f"pad_to_multiple: multiple must be >= 1, got {multiple}")
    height, width = int(x.shape[-2]), int(x.shape[-1])
    pad_h = (-height) % multiple
    pad_w = (-width) % multiple
    if pad_h == 0 and pad_w == 0:
        return x, (height, width)
    return F.pad(x, (0, pad_w, 0, pad_h), mode="constant", value=value), (height, width)

