"""SUIM underwater imagery (RGB colour-coded masks).
"""
from __future__ import annotations

from pathlib import Path
from typing import ClassVar, Dict, Optional, Tuple

import numpy as np

from stegoseg.data.base import JointTransform
from stegoseg.data.files import FileDataset, first_missing, require_dir
from stegoseg.data.io import PathLike, list_images, open_image, to_rgb
from stegoseg.errors import StegosegError

SUIM_CODES: Tuple[str, ...] = ("BW", "HD", "PF", "WR", "RO", "RI", "FV", "SR")


SUIM_CLASS_NAMES: Tuple[str, ...] = (
    "background (waterbody)", "human divers", "plants and sea-grass", "wrecks and ruins",
    "robots and instruments", "reefs and invertebrates", "fish and vertebrates", "sea-floor and rocks",
)


def decode_suim_mask(rgb: np.ndarray) -> np.ndarray:
    """SUIM colour mask (H, W, 3) -> class ids: each channel >= 128 is a bit, class = 4R + 2G + B."""
    bits = (np.asarray(rgb)[..., :3] >= 128).astype(np.int64)
    return bits[..., 0] * 4 + bits[..., 1] * 2 + bits[..., 2]


class Suim(FileDataset):
    """SUIM underwater imagery: ``images/<name>.jpg`` with colour-coded ``masks/<name>.bmp``.

    ``root`` may hold ``images/`` directly (``split`` ignored) or be the release root
    with ``train_val/`` (split "train") and ``TEST/`` (split "test" or "val"). Classes
    follow the 3-bit colour code (BW=0, HD=1, PF=2, WR=3, RO=4, RI=5, FV=6, SR=7). A
    folder without ``masks/`` is unlabelled.
    """

    layout = (
        "<root>/images/<name>.jpg and <root>/masks/<name>.bmp, or the SUIM release root with "
        "train_val/ and TEST/ each holding images/ and masks/"
    )
    class_names = SUIM_CLASS_NAMES
    SPLIT_DIRS: ClassVar[Dict[str, str]] = {"train": "train_val", "train_val": "train_val", "test": "TEST",
                                            "val": "TEST", "TEST": "TEST"}

    def __init__(self, root: PathLike, split: Optional[str] = None, transform: Optional[JointTransform] = None):
        root = Path(root)
        super().__init__(root, split if split is not None else "all", transform)
        require_dir(root, "dataset root", self.layout)
        if (root / "images").is_dir():
            base = root
        elif split is None:
            raise StegosegError(
                f"SUIM: {root} has no images/ folder; pass split 'train' or 'test' for the release root "
                f"(expected layout: {self.layout})"
            )
        elif split in self.SPLIT_DIRS:
            base = require_dir(root / self.SPLIT_DIRS[split] / "images", f"SUIM image folder for split {split!r}",
                                self.layout).parent
        else:
            raise StegosegError(f"SUIM: unknown split {split!r}; use one of {', '.join(self.SPLIT_DIRS)}")
        self.image_paths = list_images(base / "images")
        if not self.image_paths:
            raise StegosegError(f"no image files in {base / 'images'} (expected layout: {self.layout})")
        self.ids = [p.stem for p in self.image_paths]
        mask_dir = base / "masks"
        self.label_paths = None
        if mask_dir.is_dir():
            self.label_paths = [mask_dir / f"{i}.bmp" for i in self.ids]
            first, count = first_missing(self.label_paths)
            if first is not None:
                raise StegosegError(
                    f"mask file missing: {first} ({count} of {len(self.ids)} images have no mask; "
                    f"expected layout: {self.layout})"
                )

    def read_label(self, index: int) -> np.ndarray:
        assert self.label_paths is not None
        path = self.label_paths[index]
        img = open_image(path)
        return decode_suim_mask(np.asarray(to_rgb(img)))
