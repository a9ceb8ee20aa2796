"""PASCAL VOC 2012 segmentation.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Tuple

import numpy as np

from stegoseg.data.base import JointTransform
from stegoseg.data.files import (
    FileDataset,
    apply_table,
    lookup_table,
    read_id_list,
    require_dir,
)
from stegoseg.data.io import PathLike

VOC_CLASS_NAMES: Tuple[str, ...] = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair",
    "cow", "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
    "train", "tvmonitor",
)


_VOC_TABLE = lookup_table({i: i for i in range(len(VOC_CLASS_NAMES))})


class VOC2012(FileDataset):
    """Pascal VOC 2012 segmentation: 21 classes (background + 20), 255 = border/void.

    Labels are the palette indices of ``SegmentationClass/<id>.png``. ``root`` may also
    be the ``VOCdevkit`` folder containing ``VOC2012/``.
    """

    layout = (
        "<root>/JPEGImages/<id>.jpg, <root>/SegmentationClass/<id>.png (palette indices), "
        "<root>/ImageSets/Segmentation/<split>.txt"
    )
    class_names = VOC_CLASS_NAMES

    def __init__(self, root: PathLike, split: str = "train", transform: Optional[JointTransform] = None):
        root = Path(root)
        if not (root / "JPEGImages").is_dir() and (root / "VOC2012" / "JPEGImages").is_dir():
            root = root / "VOC2012"
        super().__init__(root, split, transform)
        require_dir(root, "dataset root", self.layout)
        image_dir = require_dir(root / "JPEGImages", "VOC image folder", self.layout)
        self.ids = read_id_list(root / "ImageSets" / "Segmentation" / f"{split}.txt", self.layout)
        self.image_paths = [image_dir / f"{i}.jpg" for i in self.ids]
        label_dir = root / "SegmentationClass"
        self.label_paths = [label_dir / f"{i}.png" for i in self.ids] if label_dir.is_dir() else None

    def map_label(self, label: np.ndarray) -> np.ndarray:
        return apply_table(label, _VOC_TABLE)
