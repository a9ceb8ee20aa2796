"""Potsdam-3 (the IIC release: .mat tiles).
"""
from __future__ import annotations

from pathlib import Path
from typing import ClassVar, Dict, Optional, Tuple

import numpy as np
from PIL import Image

from stegoseg.data.base import JointTransform
from stegoseg.data.files import (
    FileDataset,
    apply_table,
    lookup_table,
    read_id_list,
    require_dir,
)
from stegoseg.data.io import PathLike
from stegoseg.errors import StegosegError

# IIC's 6-class order (xu-ji/IIC code/datasets/segmentation/util/potsdam_prepare.py,
# colour_dict): 0 roads (impervious surfaces), 1 buildings, 2 low vegetation, 3 trees,
# 4 cars, 5 clutter. Merged as in IIC/STEGO: {roads, cars} -> 0,
# {buildings, clutter} -> 1, {vegetation, trees} -> 2.
POTSDAM6_CLASS_NAMES: Tuple[str, ...] = ("roads", "buildings", "vegetation", "trees", "cars", "clutter")


POTSDAM3_CLASS_NAMES: Tuple[str, ...] = ("roads and cars", "buildings and clutter", "trees and vegetation")


_POTSDAM_TABLE = lookup_table({0: 0, 4: 0, 1: 1, 5: 1, 2: 2, 3: 2})


def _array_to_uint8(arr: np.ndarray) -> np.ndarray:
    """Image array of any numeric dtype -> uint8 by its value range.

    uint8 is kept; floats in [0, 1] are scaled by 255, other floats are taken as
    0..255 values (rounded, clipped); integers above 255 are scaled from 0..65535
    (or min-max normalised if outside that range); booleans become 0/255.
    """
    if arr.dtype == np.uint8:
        return arr
    if arr.dtype == np.bool_:
        return arr.astype(np.uint8) * 255
    data = np.nan_to_num(arr.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    lo, hi = (float(data.min()), float(data.max())) if data.size else (0.0, 0.0)
    if np.issubdtype(arr.dtype, np.floating):
        if lo >= 0.0 and hi <= 1.0:
            data = data * 255.0
    elif lo >= 0.0 and hi > 255.0 and hi <= 65535.0:
        data = data * (255.0 / 65535.0)
    elif lo < 0.0 or hi > 65535.0:
        data = (data - lo) * (255.0 / (hi - lo if hi > lo else 1.0))
    return np.clip(np.rint(data), 0, 255).astype(np.uint8)


def _load_mat_array(path: Path, key: str) -> np.ndarray:
    """``scipy.io.loadmat(path)[key]`` with one-line errors naming the file."""
    from scipy.io import loadmat

    if not path.is_file():
        raise StegosegError(f"file not found: {path} (check the dataset layout)")
    try:
        content = loadmat(str(path))
    except Exception as exc:  # scipy raises many types (ValueError, MatReadError, OSError...)
        raise StegosegError(f"cannot read MATLAB file {path}: {exc} (the file is corrupt; replace it)") from None
    if key not in content:
        keys = ", ".join(k for k in content if not k.startswith("__"))
        raise StegosegError(f"MATLAB file {path} has no variable {key!r} (found: {keys or 'none'})")
    return np.asarray(content[key])


class Potsdam3(FileDataset):
    """ISPRS Potsdam as released by IIC (200x200 .mat tiles), 6 classes merged to 3.

    Images are ``root/imgs/<id>.mat`` (``img``: H x W x 4, RGB + IR; the IR channel is
    dropped and values converted to uint8 by range, see ``_array_to_uint8``); labels
    ``root/gt/<id>.mat`` (``gt``: H x W, 0..5). Splits: ``train`` -> labelled_train.txt
    (plus unlabelled_train.txt when ``include_unlabelled``), ``unlabelled_train``,
    ``val``/``test`` -> labelled_test.txt, ``train+val``, ``all`` -> all.txt, or any
    ``<name>.txt`` in root. A split whose ids do not all have a gt file is unlabelled.
    """

    layout = "<root>/imgs/<id>.mat (key 'img'), <root>/gt/<id>.mat (key 'gt'), <root>/<split list>.txt"
    class_names = POTSDAM3_CLASS_NAMES
    SPLIT_LISTS: ClassVar[Dict[str, Tuple[str, ...]]] = {
        "train": ("labelled_train.txt",),
        "unlabelled_train": ("unlabelled_train.txt",),
        "val": ("labelled_test.txt",),
        "test": ("labelled_test.txt",),
        "train+val": ("labelled_train.txt", "labelled_test.txt"),
        "all": ("all.txt",),
    }

    def __init__(
        self,
        root: PathLike,
        split: str = "train",
        transform: Optional[JointTransform] = None,
        include_unlabelled: bool = False,
    ):
        root = Path(root)
        super().__init__(root, split, transform)
        require_dir(root, "dataset root", self.layout)
        image_dir = require_dir(root / "imgs", "Potsdam image folder", self.layout)
        if split in self.SPLIT_LISTS:
            lists = self.SPLIT_LISTS[split]
            if split == "train" and include_unlabelled:
                lists = lists + ("unlabelled_train.txt",)
        elif split.endswith(".txt") or (root / f"{split}.txt").is_file():
            lists = (split if split.endswith(".txt") else f"{split}.txt",)
        else:
            raise StegosegError(
                f"Potsdam: unknown split {split!r}; use one of {', '.join(self.SPLIT_LISTS)} "
                f"or the name of a .txt id list in {root}"
            )
        self.ids = [i for name in lists for i in read_id_list(root / name, self.layout)]
        self.image_paths = [image_dir / f"{i}.mat" for i in self.ids]
        labels = [root / "gt" / f"{i}.mat" for i in self.ids]
        self.label_paths = labels if all(p.is_file() for p in labels) else None

    def read_image(self, index: int) -> Image.Image:
        path = self.image_paths[index]
        arr = _load_mat_array(path, "img")
        if arr.ndim == 2:
            arr = np.repeat(arr[..., None], 3, axis=2)
        if arr.ndim != 3 or arr.shape[2] < 3:
            raise StegosegError(f"Potsdam image {path}: expected 'img' of shape HxWx3 or HxWx4, got {arr.shape}")
        return Image.fromarray(np.ascontiguousarray(_array_to_uint8(arr[..., :3])), mode="RGB")

    def read_label(self, index: int) -> np.ndarray:
        assert self.label_paths is not None
        path = self.label_paths[index]
        arr = np.squeeze(_load_mat_array(path, "gt"))
        if arr.ndim != 2:
            raise StegosegError(f"Potsdam label {path}: expected 'gt' of shape HxW, got {arr.shape}")
        return arr.astype(np.int64)

    def map_label(self, label: np.ndarray) -> np.ndarray:
        return apply_table(label, _POTSDAM_TABLE)
