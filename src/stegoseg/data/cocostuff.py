"""COCO-Stuff 164k (27 / 15 / 3 classes) with the IIC curated image lists.
"""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import ClassVar, Dict, Optional, Tuple

import numpy as np

from stegoseg.data.base import IGNORE_INDEX, JointTransform
from stegoseg.data.files import (
    FileDataset,
    apply_table,
    lookup_table,
    read_id_list,
    require_dir,
)
from stegoseg.data.io import PathLike
from stegoseg.errors import StegosegError

# COCO-Stuff 164k fine ids (stuffthingmaps pixel values 0..181) grouped by their
# 27 coarse classes, in STEGO's order (12 "things" supercategories, then 15 "stuff").
# Source: the cocostuff label hierarchy as tabulated (fine id -> coarse id) in the
# public STEGO code (mhamilton723/STEGO, src/data.py, ``Coco.fine_to_coarse``), itself
# from IIC (xu-ji/IIC). Checked here: every fine id 0..181 appears exactly once, and
# the grouping agrees with an independently written 27-class table in another public
# project. Written out by coarse class (not copied) for readability.
COCO_COARSE_TO_FINE: Tuple[Tuple[str, Tuple[int, ...]], ...] = (
    ("electronic", (71, 72, 73, 74, 75, 76)),
    ("appliance", (77, 78, 79, 80, 81, 82)),
    ("food-things", tuple(range(51, 61))),
    ("furniture-things", tuple(range(61, 71))),
    ("indoor", tuple(range(83, 91))),
    ("kitchen", tuple(range(43, 51))),
    ("accessory", tuple(range(25, 33))),
    ("animal", tuple(range(15, 25))),
    ("outdoor", tuple(range(9, 15))),
    ("person", (0,)),
    ("sports", tuple(range(33, 43))),
    ("vehicle", tuple(range(1, 9))),
    ("ceiling", (101, 102)),
    ("floor", (100, 113, 114, 115, 116, 117)),
    ("food-stuff", (120, 121, 152, 169)),
    ("furniture-stuff", (97, 106, 107, 109, 111, 122, 129, 132, 155, 160, 164)),
    ("rawmaterial", (99, 131, 138, 142)),
    ("textile", (91, 92, 103, 104, 108, 130, 136, 140, 151, 166, 167)),
    ("wall", (170, 171, 172, 173, 174, 175, 176)),
    ("window", (179, 180)),
    ("building", (94, 95, 127, 150, 157, 165)),
    ("ground", (110, 124, 125, 135, 139, 143, 144, 146, 148, 153, 158)),
    ("plant", (93, 96, 118, 123, 128, 133, 141, 162, 168)),
    ("sky", (105, 156)),
    ("solid", (126, 134, 149, 159, 161, 181)),
    ("structural", (98, 112, 137, 145, 163)),
    ("water", (119, 147, 154, 177, 178)),
)


COCO_FIRST_STUFF = 12


COCO27_CLASS_NAMES: Tuple[str, ...] = tuple(name for name, _ in COCO_COARSE_TO_FINE)


COCO15_CLASS_NAMES: Tuple[str, ...] = COCO27_CLASS_NAMES[COCO_FIRST_STUFF:]


# The reference's 3-class variant keeps coarse sky (23), plant (22), ground (21) in that order.
COCO3_COARSE: Tuple[int, ...] = (23, 22, 21)


COCO3_CLASS_NAMES: Tuple[str, ...] = ("sky", "plant", "ground")


FINE_TO_COARSE27: np.ndarray = lookup_table(
    {fine: coarse for coarse, (_, fines) in enumerate(COCO_COARSE_TO_FINE) for fine in fines}
)


def _coco_tables() -> Dict[int, np.ndarray]:
    """Fine (0..181, 255) -> label tables for the 27, 15 (stuff only) and 3-class variants."""
    coarse = FINE_TO_COARSE27
    stuff = np.where(coarse[:] >= COCO_FIRST_STUFF, coarse - COCO_FIRST_STUFF, IGNORE_INDEX)
    stuff[coarse == IGNORE_INDEX] = IGNORE_INDEX
    three = np.full_like(coarse, IGNORE_INDEX)
    for new, old in enumerate(COCO3_COARSE):
        three[coarse == old] = new
    return {27: coarse, 15: stuff, 3: three}


_COCO_TABLES = _coco_tables()


# Curated image lists (IIC) the reference uses by default, per variant and split.
# cocostuff27 trains on the larger "Coarse" list and evaluates on the "Coarse_7" list.
_COCO_DEFAULT_LISTS: Dict[Tuple[int, str], Tuple[str, ...]] = {
    (27, "train2017"): ("Coco164kFull_Stuff_Coarse.txt", "Coco164kFull_Stuff_Coarse_7.txt"),
    (27, "val2017"): ("Coco164kFull_Stuff_Coarse_7.txt",),
    (15, "train2017"): ("Coco164kFull_Stuff_Coarse_7.txt",),
    (15, "val2017"): ("Coco164kFull_Stuff_Coarse_7.txt",),
    (3, "train2017"): ("Coco164kFew_Stuff_6.txt",),
    (3, "val2017"): ("Coco164kFew_Stuff_6.txt",),
}


class CocoStuff(FileDataset):
    """COCO-Stuff 164k as used by STEGO/IIC, fine labels merged to 27, 15 or 3 classes.

    Layout: ``root/images/{train2017,val2017}/<id>.jpg``, ``root/annotations/<same>/<id>.png``
    (stuffthingmaps: fine id 0..181, 255 unlabelled) and curated id lists in
    ``root/curated/<same>/``. Split "train"/"val" (or "train2017"/"val2017").

    * 27: things then stuff (see ``COCO27_CLASS_NAMES``).
    * 15: stuff only (coarse id - 12); thing pixels become IGNORE_INDEX.
    * 3: sky, plant, ground; everything else IGNORE_INDEX.

    ``image_list`` overrides the curated list: a file name inside ``curated/<split>/``
    or a path. By default the reference's list is used (27: ``Coco164kFull_Stuff_Coarse.txt``
    for train, falling back with a warning to ``..._Coarse_7.txt`` if absent, and
    ``..._Coarse_7.txt`` for val; 15: ``..._Coarse_7.txt``; 3: ``Coco164kFew_Stuff_6.txt``).
    """

    layout = (
        "<root>/images/{train2017,val2017}/<id>.jpg, <root>/annotations/{train2017,val2017}/<id>.png, "
        "<root>/curated/{train2017,val2017}/Coco164kFull_Stuff_Coarse_7.txt (one id per line)"
    )
    SPLIT_DIRS: ClassVar[Dict[str, str]] = {
        "train": "train2017", "val": "val2017", "train2017": "train2017", "val2017": "val2017",
    }
    VARIANT_NAMES: ClassVar[Dict[int, Tuple[str, ...]]] = {
        27: COCO27_CLASS_NAMES, 15: COCO15_CLASS_NAMES, 3: COCO3_CLASS_NAMES,
    }

    def __init__(
        self,
        root: PathLike,
        split: str = "train",
        transform: Optional[JointTransform] = None,
        coarse_classes: int = 27,
        image_list: Optional[PathLike] = None,
    ):
        root = Path(root)
        super().__init__(root, split, transform)
        if coarse_classes not in self.VARIANT_NAMES:
            raise StegosegError(f"CocoStuff: coarse_classes must be 27, 15 or 3, got {coarse_classes!r}")
        if split not in self.SPLIT_DIRS:
            raise StegosegError(f"CocoStuff: unknown split {split!r}; use one of {', '.join(self.SPLIT_DIRS)}")
        self.coarse_classes = int(coarse_classes)
        self.class_names = self.VARIANT_NAMES[self.coarse_classes]
        self._table = _COCO_TABLES[self.coarse_classes]
        require_dir(root, "dataset root", self.layout)
        sub = self.SPLIT_DIRS[split]
        image_dir = require_dir(root / "images" / sub, f"COCO image folder for split {split!r}", self.layout)
        label_dir = require_dir(root / "annotations" / sub, f"COCO annotation folder for split {split!r}", self.layout)
        self.image_list_path = self._find_list(root / "curated" / sub, image_list)
        self.ids = read_id_list(self.image_list_path, self.layout)
        self.image_paths = [image_dir / f"{i}.jpg" for i in self.ids]
        self.label_paths = [label_dir / f"{i}.png" for i in self.ids]

    def _find_list(self, curated: Path, image_list: Optional[PathLike]) -> Path:
        if image_list is not None:
            given = Path(image_list)
            return given if given.is_file() or given.is_absolute() else curated / given
        names = _COCO_DEFAULT_LISTS[(self.coarse_classes, curated.name)]
        for k, name in enumerate(names):
            if (curated / name).is_file():
                if k > 0:
                    warnings.warn(
                        f"{curated / names[0]} not found; using {curated / name} instead "
                        "(pass image_list= to choose explicitly)",
                        stacklevel=3,
                    )
                return curated / name
        raise StegosegError(
            f"curated image list not found: {curated / names[0]} (expected layout: {self.layout}; "
            "or pass image_list=<file>)"
        )

    def map_label(self, label: np.ndarray) -> np.ndarray:
        return apply_table(label, self._table)


class CocoStuff27(CocoStuff):
    """COCO-Stuff, 27 coarse classes (12 things + 15 stuff)."""

    class_names = COCO27_CLASS_NAMES

    def __init__(self, root: PathLike, split: str = "train", transform: Optional[JointTransform] = None,
                 image_list: Optional[PathLike] = None):
        super().__init__(root, split, transform, coarse_classes=27, image_list=image_list)


class CocoStuff15(CocoStuff):
    """COCO-Stuff, the 15 stuff classes only (things ignored)."""

    class_names = COCO15_CLASS_NAMES

    def __init__(self, root: PathLike, split: str = "train", transform: Optional[JointTransform] = None,
                 image_list: Optional[PathLike] = None):
        super().__init__(root, split, transform, coarse_classes=15, image_list=image_list)


class CocoStuff3(CocoStuff):
    """COCO-Stuff, 3 classes: sky, plant, ground (IIC "Coco164kFew_Stuff_6" images)."""

    class_names = COCO3_CLASS_NAMES

    def __init__(self, root: PathLike, split: str = "train", transform: Optional[JointTransform] = None,
                 image_list: Optional[PathLike] = None):
        super().__init__(root, split, transform, coarse_classes=3, image_list=image_list)
