"""Reading images and label maps from disk, with one-line errors for bad files.

* :func:`load_image` returns an RGB :class:`PIL.Image.Image` for any common mode and
  applies the EXIF orientation (what an image viewer shows).
* :func:`load_label` returns an ``(H, W)`` ``int64`` array of the stored values
  (palette PNGs give their palette *indices*, not colours).
* :func:`check_same_size` and :func:`list_images` are small helpers for loaders.

Every failure caused by a file (missing, unreadable, corrupt, wrong kind) raises
:class:`~stegoseg.errors.StegosegError` whose message names the file.
"""
from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import List, Union

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from ..errors import StegosegError

PathLike = Union[str, "os.PathLike[str]"]

#: File extensions (lower case) that :func:`list_images` treats as images.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")

_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")


def open_image(path: PathLike) -> Image.Image:
    """Open and fully decode an image file in its stored mode, EXIF orientation applied.

    Raises StegosegError naming the file when it is missing, unreadable or corrupt.
    """
    path = Path(path)
    if not path.is_file():
        raise StegosegError(f"image file not found: {path} (check the path and the dataset layout)")
    try:
        with warnings.catch_warnings():
            # Truncated/odd files warn in PIL; we turn real failures into errors below.
            warnings.simplefilter("ignore")
            with Image.open(path) as img:
                img.load()
                out = ImageOps.exif_transpose(img)
                if out is img:  # exif_transpose may return the same (context-managed) object
                    out = img.copy()
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise StegosegError(
            f"cannot read image file {path}: {reason} (the file is corrupt or not an image; replace or remove it)"
        ) from None
    return out


def _scale_to_uint8(arr: np.ndarray, full_scale: float) -> np.ndarray:
    """Linearly map ``[0, full_scale]`` to ``[0, 255]`` (rounded), clipping only outliers."""
    scaled = np.asarray(arr, dtype=np.float64) * (255.0 / full_scale)
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


def _high_depth_to_l(img: Image.Image) -> Image.Image:
    """Convert a 16-bit, 32-bit integer or float greyscale image to 8-bit ``L`` by range.

    * ``I;16*``: the 16-bit range 0..65535 maps to 0..255 (value / 257).
    * ``I`` (32-bit int; how some Pillow versions open 16-bit PNG/TIFF): values in
      0..65535 are taken as 16-bit data and scaled like ``I;16``; anything else
      (negative or larger) is min-max normalised.
    * ``F`` (float): values in [0, 1] are scaled by 255, values in [0, 255] kept,
      anything else is min-max normalised.
    """
    arr = np.asarray(img)
    if img.mode in _SIXTEEN_BIT_MODES:
        return Image.fromarray(_scale_to_uint8(arr, 65535.0), mode="L")
    arr = arr.astype(np.float64)
    lo, hi = (float(arr.min()), float(arr.max())) if arr.size else (0.0, 0.0)
    if img.mode == "F" and lo >= 0.0 and hi <= 1.0:
        return Image.fromarray(_scale_to_uint8(arr, 1.0), mode="L")
    if img.mode == "F" and lo >= 0.0 and hi <= 255.0:
        return Image.fromarray(_scale_to_uint8(arr, 255.0), mode="L")
    if img.mode == "I" and lo >= 0.0 and hi <= 65535.0:
        return Image.fromarray(_scale_to_uint8(arr, 65535.0), mode="L")
    span = hi - lo if hi > lo else 1.0
    return Image.fromarray(_scale_to_uint8(arr - lo, span), mode="L")


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert a PIL image of any mode to 8-bit RGB.

    Alpha is dropped, not composited (the colour channels are kept as stored); palette
    images are expanded through their palette; CMYK uses PIL's conversion; 16/32-bit
    and float greyscale are scaled to 8 bits by their range (see ``_high_depth_to_l``),
    never clipped at 255.
    """
    if img.mode == "RGB":
        return img
    if img.mode in _SIXTEEN_BIT_MODES or img.mode in ("I", "F"):
        return _high_depth_to_l(img).convert("RGB")
    if img.mode == "P":
        # Palette images with a transparency entry must go through RGBA (PIL warns otherwise).
        img = img.convert("RGBA") if "transparency" in img.info else img.convert("RGB")
    if img.mode == "La":
        img = img.convert("LA")  # premultiplied; PIL only converts it to LA
    elif img.mode in ("PA", "RGBa"):
        img = img.convert("RGBA")
    return img.convert("RGB")  # for LA/RGBA this drops alpha


def load_image(path: PathLike) -> Image.Image:
    """Load any image file as an RGB PIL image with its EXIF orientation applied.

    Supported modes include 1, L, LA, P (palette, with or without transparency), RGB,
    RGBA, CMYK, YCbCr, 16-bit ``I;16`` and 32-bit ``I``/``F``. Alpha channels are
    dropped (not composited on a background).
    """
    img = open_image(path)
    try:
        return to_rgb(img)
    except (ValueError, OSError) as exc:
        raise StegosegError(
            f"cannot convert image {path} (mode {img.mode}) to RGB: {exc}; save it as an 8-bit RGB image"
        ) from None


def load_label(path: PathLike) -> np.ndarray:
    """Load a single-channel label image as an ``(H, W)`` ``int64`` array of stored values.

    Palette (``P``) PNGs give their palette indices, 16-bit PNGs their 16-bit values,
    ``LA`` its ``L`` band. An RGB file is accepted only if its three channels are equal
    (a greyscale label saved as RGB); colour-coded masks raise an error.
    """
    img = open_image(path)
    if img.mode in ("P", "L", "1", "I", "I;16", "I;16L", "I;16B", "I;16N"):
        arr = np.asarray(img)
    elif img.mode in ("LA", "PA"):
        arr = np.asarray(img.getchannel(0))
    elif img.mode in ("RGB", "RGBA"):
        rgb = np.asarray(img)[..., :3]
        if not (np.array_equal(rgb[..., 0], rgb[..., 1]) and np.array_equal(rgb[..., 0], rgb[..., 2])):
            raise StegosegError(
                f"label file {path} is a colour image; labels must be single-channel PNGs whose pixel values "
                "are class ids (convert colour masks to ids first)"
            )
        arr = rgb[..., 0]
    else:
        raise StegosegError(
            f"label file {path} has unsupported mode {img.mode}; save labels as 8-bit single-channel "
            "or palette PNGs whose values are class ids"
        )
    return np.asarray(arr, dtype=np.int64)


def check_same_size(
    image: Image.Image, label: np.ndarray, image_path: PathLike, label_path: PathLike
) -> None:
    """Raise StegosegError naming both files when a label's size differs from its image's."""
    width, height = image.size
    lh, lw = int(label.shape[0]), int(label.shape[1])
    if (lh, lw) != (height, width):
        raise StegosegError(
            f"label {label_path} is {lw}x{lh} but image {image_path} is {width}x{height}; "
            "a label must have exactly the size of its image (fix or remove the pair)"
        )


def list_images(folder: PathLike) -> List[Path]:
    """Sorted image files directly inside ``folder`` (by extension, case-insensitive).

    Hidden files (names starting with ``.``, e.g. macOS ``._x.jpg``) are skipped.
    Raises StegosegError if ``folder`` is not a directory.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise StegosegError(f"image folder not found: {folder} (check the path)")
    return sorted(
        p
        for p in folder.iterdir()
        if p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith(".") and p.is_file()
    )
