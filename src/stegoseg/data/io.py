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

from stegoseg.errors import StegosegError

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

    Hidden files (names starting with ``.``, e.g. macOS ``._x.jpg`` AppleDouble files) are
    skipped. A symbolic link whose target is missing raises StegosegError naming it (it
    would otherwise drop an image silently). Raises StegosegError if ``folder`` is not a
    directory.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise StegosegError(f"image folder not found: {folder} (check the path)")
    found = []
    for p in folder.iterdir():
        if p.suffix.lower() not in IMAGE_EXTENSIONS or p.name.startswith("."):
            continue
        if p.is_symlink() and not p.exists():
            raise StegosegError(
                f"{p} is a link to a missing file ({os.readlink(p)}): restore its target or remove the link"
            )
        if p.is_file():
            found.append(p)
    return sorted(found)


_ACCEPTED_INPUTS = (
    "a PIL image, a numpy array (H, W), (H, W, 1), (H, W, 3) or (H, W, 4), "
    "a torch tensor (H, W) or (C, H, W) with C = 1, 3 or 4, or an image file path"
)


def image_from_array_or_pil(obj, name: str = "image") -> Image.Image:
    """Convert a PIL image, numpy array, torch tensor or path to an 8-bit RGB PIL image.

    ``name`` is used in error and warning messages (e.g. ``"image 3"``).

    * ``str`` / :class:`os.PathLike`: read with :func:`load_image`.
    * PIL image: :func:`to_rgb` (16/32-bit and float greyscale scaled by their range).
    * numpy array, channels last: ``(H, W)`` and ``(H, W, 1)`` are greyscale, ``(H, W, 3)``
      RGB, ``(H, W, 4)`` RGBA whose alpha is dropped. Any other shape, an empty array or an
      unsupported dtype raises :class:`~stegoseg.errors.StegosegError`. Values by dtype:

      - ``uint8``: used as is; ``bool``: False -> 0, True -> 255;
      - ``uint16``: the 16-bit range 0..65535 maps to 0..255 (value / 257, rounded);
      - other integers: values in 0..255 are taken as 8-bit values; anything else
        (negative or above 255) is min-max normalised;
      - floats: NaN or infinite values raise StegosegError; values in [0, 1] are
        multiplied by 255 and rounded (so an array that only holds 0 and 1 is read as
        0..1 data); values in [0, 255] are rounded; anything else is min-max normalised.

      Min-max normalisation maps the array's minimum to 0 and maximum to 255 over all
      channels together (a constant array becomes black) and emits a ``UserWarning``,
      since it changes the image's contrast.
    * torch tensor: channels first, as torchvision uses: ``(H, W)`` or ``(C, H, W)`` with
      C = 1, 3 or 4 (e.g. a (3, H, W) float tensor in [0, 1]); it is moved to the CPU,
      made channels last and converted with the numpy rules. Other shapes (including a
      batch dimension) raise StegosegError.
    * anything else (lists, ...) raises StegosegError naming what is accepted.
    """
    if isinstance(obj, (str, os.PathLike)):
        return load_image(obj)
    if isinstance(obj, Image.Image):
        try:
            return to_rgb(obj)
        except (ValueError, OSError) as exc:
            raise StegosegError(
                f"cannot convert {name} (PIL mode {obj.mode}) to RGB: {exc}; pass an 8-bit RGB image"
            ) from None
    if isinstance(obj, np.ndarray):
        return _rgb_from_array(obj, name, "")
    import sys

    torch = sys.modules.get("torch")  # a tensor can only exist if torch was imported
    if torch is not None and isinstance(obj, torch.Tensor):
        shape = tuple(obj.shape)
        if obj.ndim == 3 and shape[0] in (1, 3, 4):
            arr = obj.detach().cpu().permute(1, 2, 0).numpy()
        elif obj.ndim == 2:
            arr = obj.detach().cpu().numpy()
        else:
            raise StegosegError(
                f"{name} is a torch tensor of shape {shape}; tensors must be (H, W) or channels first "
                "(C, H, W) with C = 1, 3 or 4 (no batch dimension); pass channels-last data as a numpy array"
            )
        return _rgb_from_array(arr, name, f" (tensor shape {shape})")
    raise StegosegError(f"{name} is a {type(obj).__name__}; expected {_ACCEPTED_INPUTS}")


def _rgb_from_array(arr: np.ndarray, name: str, origin: str) -> Image.Image:
    """The numpy part of :func:`image_from_array_or_pil`; ``origin`` is added to messages."""
    shape = tuple(arr.shape)
    if arr.size == 0:
        raise StegosegError(f"{name} array is empty (shape {shape}){origin}; pass an image with pixels")
    if not (arr.ndim == 2 or (arr.ndim == 3 and shape[2] in (1, 3, 4))):
        raise StegosegError(
            f"{name} array has shape {shape}{origin}; expected (H, W), (H, W, 1), (H, W, 3) or "
            "(H, W, 4) (channels last)"
        )
    if arr.ndim == 3:
        arr = arr[..., 0] if shape[2] == 1 else arr[..., :3]  # drop alpha before taking the range
    kind = arr.dtype.kind
    if arr.dtype == np.uint8:
        out = arr
    elif kind == "b":
        out = arr.astype(np.uint8) * np.uint8(255)
    elif arr.dtype == np.uint16:
        out = _scale_to_uint8(arr, 65535.0)
    elif kind in "iu":
        lo, hi = int(arr.min()), int(arr.max())
        if lo >= 0 and hi <= 255:
            out = arr.astype(np.uint8)
        else:
            out = _min_max_to_uint8(arr, lo, hi, name, origin)
    elif kind == "f":
        values = np.asarray(arr, dtype=np.float64)
        if not np.isfinite(values).all():
            raise StegosegError(
                f"{name} array contains NaN or infinite values{origin}; replace them before segmenting"
            )
        lo, hi = float(values.min()), float(values.max())
        if lo >= 0.0 and hi <= 1.0:
            out = _scale_to_uint8(values, 1.0)
        elif lo >= 0.0 and hi <= 255.0:
            out = _scale_to_uint8(values, 255.0)
        else:
            out = _min_max_to_uint8(values, lo, hi, name, origin)
    else:
        raise StegosegError(
            f"{name} array has unsupported dtype {arr.dtype}{origin}; use uint8, uint16, another integer, "
            "bool or float"
        )
    if out.ndim == 2:
        out = np.stack([out, out, out], axis=-1)
    return Image.fromarray(np.ascontiguousarray(out, dtype=np.uint8), mode="RGB")


def _min_max_to_uint8(arr: np.ndarray, lo: float, hi: float, name: str, origin: str) -> np.ndarray:
    """Map [lo, hi] linearly to [0, 255] (rounded), warning that the contrast was changed."""
    warnings.warn(
        f"{name} array{origin} has values in [{lo:g}, {hi:g}], outside 0..1 and 0..255 "
        f"(dtype {arr.dtype}): it was min-max scaled to 0..255; scale it yourself to control the contrast",
        UserWarning,
        stacklevel=4,
    )
    span = float(hi) - float(lo)
    return _scale_to_uint8(np.asarray(arr, dtype=np.float64) - float(lo), span if span > 0 else 1.0)
