"""Cityscapes with its 27 evaluation classes.
"""
from __future__ import annotations

from pathlib import Path
from typing import ClassVar, Optional, Tuple

import numpy as np

from stegoseg.data.base import JointTransform
from stegoseg.data.files import (
    FileDataset,
    apply_table,
    first_missing,
    lookup_table,
    require_dir,
)
from stegoseg.data.io import PathLike
from stegoseg.errors import StegosegError

CITYSCAPES_FIRST_ID = 7


CITYSCAPES27_CLASS_NAMES: Tuple[str, ...] = (
    "road", "sidewalk", "parking", "rail track", "building", "wall", "fence", "guard rail",
    "bridge", "tunnel", "pole", "polegroup", "traffic light", "traffic sign", "vegetation",
    "terrain", "sky", "person", "rider", "car", "truck", "bus", "caravan", "trailer", "train",
    "motorcycle", "bicycle",
)


_CITYSCAPES_TABLE = lookup_table({i: i - CITYSCAPES_FIRST_ID for i in range(CITYSCAPES_FIRST_ID, 34)})


class Cityscapes27(FileDataset):
    """Cityscapes fine annotations, 27 classes: label = labelId - 7; ids < 7, > 33 and 255 -> ignore.

    If ``gtFine/<split>`` is absent the split is unlabelled.
    """

    layout = (
        "<root>/leftImg8bit/<split>/<city>/<name>_leftImg8bit.png and "
        "<root>/gtFine/<split>/<city>/<name>_gtFine_labelIds.png"
    )
    class_names = CITYSCAPES27_CLASS_NAMES
    _IMAGE_SUFFIX: ClassVar[str] = "_leftImg8bit.png"
    _LABEL_SUFFIX: ClassVar[str] = "_gtFine_labelIds.png"

    def __init__(self, root: PathLike, split: str = "train", transform: Optional[JointTransform] = None):
        root = Path(root)
        super().__init__(root, split, transform)
        require_dir(root, "dataset root", self.layout)
        image_dir = require_dir(root / "leftImg8bit" / split, f"Cityscapes image folder for split {split!r}",
                                 self.layout)
        self.image_paths = sorted(image_dir.glob(f"*/*{self._IMAGE_SUFFIX}"))
        if not self.image_paths:
            raise StegosegError(
                f"no *{self._IMAGE_SUFFIX} files in {image_dir}/<city>/ (expected layout: {self.layout})"
            )
        self.ids = [p.name[: -len(self._IMAGE_SUFFIX)] for p in self.image_paths]
        label_dir = root / "gtFine" / split
        self.label_paths = None
        if label_dir.is_dir():
            self.label_paths = [
                label_dir / p.parent.name / f"{i}{self._LABEL_SUFFIX}" for p, i in zip(self.image_paths, self.ids)
            ]
            first, count = first_missing(self.label_paths)
            if first is not None:
                raise StegosegError(
                    f"label file missing: {first} ({count} of {len(self.ids)} missing; expected layout: {self.layout})"
                )

    def map_label(self, label: np.ndarray) -> np.ndarray:
        return apply_table(label, _CITYSCAPES_TABLE)
