"""Dataset loaders, one class per on-disk format, and the ``build_dataset`` registry.

Every class is a :class:`~stegoseg.data.base.SegmentationDataset` yielding the common
sample dict (see ``base.py``): labels are mapped to ``0..n_classes-1`` with
``IGNORE_INDEX`` (255) for unlabelled pixels. Each exposes ``image_paths`` (list of
``Path``, in sample order), ``label_paths`` (same order, or ``None`` for an unlabelled
split), ``ids`` and a one-line ``layout`` describing the expected files.

Constructors check the folders (and, where it is cheap, that every label exists) and
raise :class:`~stegoseg.errors.StegosegError` naming the path and the expected layout.
Files are read lazily in ``load``.
"""
from __future__ import annotations

import inspect
import os
import warnings
from pathlib import Path
from typing import ClassVar, Dict, List, Mapping, Optional, Sequence, Tuple, Type, Union

import numpy as np
from PIL import Image

from stegoseg.data.base import (
    IGNORE_INDEX,
    JointTransform,
    RawSample,
    SegmentationDataset,
)
from stegoseg.data.io import (
    check_same_size,
    list_images,
    load_image,
    load_label,
    open_image,
    to_rgb,
)
from stegoseg.errors import StegosegError

PathLike = Union[str, "os.PathLike[str]"]


# --------------------------------------------------------------------------- helpers


def _lookup_table(mapping: Mapping[int, int], size: int = 256) -> np.ndarray:
    """A ``size``-entry table sending each key of ``mapping`` to its value, the rest to IGNORE_INDEX."""
    table = np.full(size, IGNORE_INDEX, dtype=np.int64)
    for src, dst in mapping.items():
        table[src] = dst
    return table


def _apply_table(label: np.ndarray, table: np.ndarray) -> np.ndarray:
    """Map label values through ``table``; values outside the table become IGNORE_INDEX."""
    label = np.asarray(label, dtype=np.int64)
    out = np.full(label.shape, IGNORE_INDEX, dtype=np.int64)
    inside = (label >= 0) & (label < table.shape[0])
    out[inside] = table[label[inside]]
    return out


def _require_dir(path: Path, what: str, layout: str) -> Path:
    if not path.is_dir():
        raise StegosegError(f"{what} not found: {path} (expected layout: {layout})")
    return path


def _read_id_list(path: Path, layout: str) -> List[str]:
    """Non-empty, stripped lines of a split/image-list text file."""
    if not path.is_file():
        raise StegosegError(f"split list not found: {path} (expected layout: {layout})")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise StegosegError(f"cannot read split list {path}: {exc}") from None
    ids = [line.strip() for line in lines if line.strip()]
    if not ids:
        raise StegosegError(f"split list {path} is empty; it must hold one image id per line")
    return ids


def _first_missing(paths: Sequence[Path]) -> Tuple[Optional[Path], int]:
    missing = [p for p in paths if not p.is_file()]
    return (missing[0] if missing else None), len(missing)


class _FileDataset(SegmentationDataset):
    """Shared machinery: parallel lists of image and (optional) label paths.

    Subclasses fill ``image_paths``, ``label_paths`` and ``ids`` and may override
    :meth:`map_label` (stored values -> library classes) and :meth:`read_label`.
    """

    layout: ClassVar[str] = ""
    image_paths: List[Path]
    label_paths: Optional[List[Path]]
    ids: List[str]

    def __len__(self) -> int:
        return len(self.image_paths)

    @property
    def has_labels(self) -> bool:
        return self.label_paths is not None

    def map_label(self, label: np.ndarray) -> np.ndarray:
        """Stored label values -> ``0..n_classes-1`` / IGNORE_INDEX (identity by default)."""
        return label

    def read_image(self, index: int) -> Image.Image:
        return load_image(self.image_paths[index])

    def read_label(self, index: int) -> np.ndarray:
        assert self.label_paths is not None
        return load_label(self.label_paths[index])

    def load(self, index: int) -> RawSample:
        image = self.read_image(index)
        label = None
        if self.label_paths is not None:
            raw = self.read_label(index)
            check_same_size(image, raw, self.image_paths[index], self.label_paths[index])
            label = self.map_label(raw)
        return RawSample(image=image, label=label, id=self.ids[index])

    def __repr__(self) -> str:
        return f"{type(self).__name__}(root={str(self.root)!r}, split={self.split!r}, n={len(self)})"


# --------------------------------------------------------------------------- directory


class DirectoryDataset(_FileDataset):
    """A user's own data: ``root/imgs/<split>/*`` with optional ``root/labels/<split>/<stem>.png``.

    * Labels are optional: without a ``labels/<split>`` folder the split is unlabelled
      (``has_labels`` False, samples carry no ``label``). With the folder, every image
      must have ``<stem>.png`` there (checked at construction).
    * Label pixels equal to ``ignore_index`` (the value *on disk* that means
      "unlabelled", kept as ``label_ignore_index``) become IGNORE_INDEX (255).
    * Classes: ``class_names`` if given; else ``n_classes`` (names ``class_0``...);
      else ``root/classes.txt`` (one name per line); else inferred, on first access of
      ``class_names``/``n_classes``, as max label value + 1 over this split's label
      files (one full scan, cached). An unlabelled split with none of these has no
      classes (``n_classes`` 0).
    """

    layout = (
        "<root>/imgs/<split>/<name>.{jpg,jpeg,png,bmp,tif,tiff,webp} "
        "and optionally <root>/labels/<split>/<name>.png (single-channel class ids)"
    )

    def __init__(
        self,
        root: PathLike,
        split: str = "train",
        transform: Optional[JointTransform] = None,
        ignore_index: int = IGNORE_INDEX,
        class_names: Optional[Sequence[str]] = None,
        n_classes: Optional[int] = None,
    ):
        root = Path(root)
        super().__init__(root, split, transform)
        _require_dir(root, "dataset root", self.layout)
        img_dir = _require_dir(root / "imgs" / split, f"image folder for split {split!r}", self.layout)
        self.image_paths = list_images(img_dir)
        if not self.image_paths:
            raise StegosegError(f"no image files in {img_dir} (expected layout: {self.layout})")
        self.ids = [p.stem for p in self.image_paths]
        seen: Dict[str, Path] = {}
        for path in self.image_paths:
            if path.stem in seen:
                raise StegosegError(
                    f"images {seen[path.stem]} and {path} share the name {path.stem!r}; "
                    "image names must be unique within a split (rename one)"
                )
            seen[path.stem] = path

        label_dir = root / "labels" / split
        self.label_paths = None
        if label_dir.is_dir():
            self.label_paths = [label_dir / f"{stem}.png" for stem in self.ids]
            first, count = _first_missing(self.label_paths)
            if first is not None:
                raise StegosegError(
                    f"label file missing: {first} ({count} of {len(self.ids)} images in {img_dir} have no label); "
                    f"add the labels or remove {label_dir} to use the split unlabelled"
                )
        self.label_ignore_index = int(ignore_index)
        self._class_names = self._resolve_class_names(class_names, n_classes)

    def _resolve_class_names(
        self, class_names: Optional[Sequence[str]], n_classes: Optional[int]
    ) -> Optional[List[str]]:
        if class_names is not None:
            names = [str(n) for n in class_names]
            if n_classes is not None and int(n_classes) != len(names):
                raise StegosegError(
                    f"directory dataset {self.root}: n_classes={n_classes} but {len(names)} class_names given; "
                    "pass only one or make them agree"
                )
            return names
        if n_classes is not None:
            if int(n_classes) < 1:
                raise StegosegError(f"directory dataset {self.root}: n_classes must be >= 1, got {n_classes}")
            return [f"class_{i}" for i in range(int(n_classes))]
        classes_file = Path(self.root) / "classes.txt"
        if classes_file.is_file():
            try:
                names = [ln.strip() for ln in classes_file.read_text(encoding="utf-8").splitlines() if ln.strip()]
            except (OSError, UnicodeDecodeError) as exc:
                raise StegosegError(f"cannot read {classes_file}: {exc}") from None
            if not names:
                raise StegosegError(f"{classes_file} is empty; write one class name per line")
            return names
        return None  # inferred lazily from the labels

    @property
    def class_names(self) -> List[str]:  # type: ignore[override]
        if self._class_names is None:
            self._class_names = [f"class_{i}" for i in range(self._infer_n_classes())]
        return self._class_names

    def _infer_n_classes(self) -> int:
        """Max label value + 1 over all label files of the split (0 if unlabelled).

        Refused when the values skip a class id: one stray value (a 50 among 0..10) would
        otherwise silently create empty classes and change the number of clusters."""
        if self.label_paths is None:
            return 0
        first: Dict[int, Path] = {}
        for path in self.label_paths:
            label = self.map_label(load_label(path))
            for v in np.unique(label[label != IGNORE_INDEX]).tolist():
                first.setdefault(int(v), path)
        if not first:
            return 0
        top = max(first)
        missing = sorted(set(range(top + 1)) - set(first))
        if missing:
            shown = ", ".join(str(m) for m in missing[:5]) + (", ..." if len(missing) > 5 else "")
            raise StegosegError(
                f"cannot infer the number of classes: the {self.split!r} labels hold values up to {top} "
                f"(in {first[top]}) but none of {shown}; write {Path(self.root) / 'classes.txt'} "
                "(one name per line) or pass --n-classes N"
            )
        return top + 1

    def map_label(self, label: np.ndarray) -> np.ndarray:
        label = np.asarray(label, dtype=np.int64)
        if self.label_ignore_index != IGNORE_INDEX:
            label = np.where(label == self.label_ignore_index, IGNORE_INDEX, label)
        return label


# --------------------------------------------------------------------------- COCO-Stuff

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

FINE_TO_COARSE27: np.ndarray = _lookup_table(
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


class CocoStuff(_FileDataset):
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
        _require_dir(root, "dataset root", self.layout)
        sub = self.SPLIT_DIRS[split]
        image_dir = _require_dir(root / "images" / sub, f"COCO image folder for split {split!r}", self.layout)
        label_dir = _require_dir(root / "annotations" / sub, f"COCO annotation folder for split {split!r}", self.layout)
        self.image_list_path = self._find_list(root / "curated" / sub, image_list)
        self.ids = _read_id_list(self.image_list_path, self.layout)
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
        return _apply_table(label, self._table)


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


# --------------------------------------------------------------------------- Cityscapes

CITYSCAPES_FIRST_ID = 7
CITYSCAPES27_CLASS_NAMES: Tuple[str, ...] = (
    "road", "sidewalk", "parking", "rail track", "building", "wall", "fence", "guard rail",
    "bridge", "tunnel", "pole", "polegroup", "traffic light", "traffic sign", "vegetation",
    "terrain", "sky", "person", "rider", "car", "truck", "bus", "caravan", "trailer", "train",
    "motorcycle", "bicycle",
)
_CITYSCAPES_TABLE = _lookup_table({i: i - CITYSCAPES_FIRST_ID for i in range(CITYSCAPES_FIRST_ID, 34)})


class Cityscapes27(_FileDataset):
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
        _require_dir(root, "dataset root", self.layout)
        image_dir = _require_dir(root / "leftImg8bit" / split, f"Cityscapes image folder for split {split!r}",
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
            first, count = _first_missing(self.label_paths)
            if first is not None:
                raise StegosegError(
                    f"label file missing: {first} ({count} of {len(self.ids)} missing; expected layout: {self.layout})"
                )

    def map_label(self, label: np.ndarray) -> np.ndarray:
        return _apply_table(label, _CITYSCAPES_TABLE)


# --------------------------------------------------------------------------- Potsdam

# IIC's 6-class order (xu-ji/IIC code/datasets/segmentation/util/potsdam_prepare.py,
# colour_dict): 0 roads (impervious surfaces), 1 buildings, 2 low vegetation, 3 trees,
# 4 cars, 5 clutter. Merged as in IIC/STEGO: {roads, cars} -> 0,
# {buildings, clutter} -> 1, {vegetation, trees} -> 2.
POTSDAM6_CLASS_NAMES: Tuple[str, ...] = ("roads", "buildings", "vegetation", "trees", "cars", "clutter")
POTSDAM3_CLASS_NAMES: Tuple[str, ...] = ("roads and cars", "buildings and clutter", "trees and vegetation")
_POTSDAM_TABLE = _lookup_table({0: 0, 4: 0, 1: 1, 5: 1, 2: 2, 3: 2})


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


class Potsdam3(_FileDataset):
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
        _require_dir(root, "dataset root", self.layout)
        image_dir = _require_dir(root / "imgs", "Potsdam image folder", self.layout)
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
        self.ids = [i for name in lists for i in _read_id_list(root / name, self.layout)]
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
        return _apply_table(label, _POTSDAM_TABLE)


# --------------------------------------------------------------------------- SUIM

SUIM_CODES: Tuple[str, ...] = ("BW", "HD", "PF", "WR", "RO", "RI", "FV", "SR")
SUIM_CLASS_NAMES: Tuple[str, ...] = (
    "background (waterbody)", "human divers", "plants and sea-grass", "wrecks and ruins",
    "robots and instruments", "reefs and invertebrates", "fish and vertebrates", "sea-floor and rocks",
)


def decode_suim_mask(rgb: np.ndarray) -> np.ndarray:
    """SUIM colour mask (H, W, 3) -> class ids: each channel >= 128 is a bit, class = 4R + 2G + B."""
    bits = (np.asarray(rgb)[..., :3] >= 128).astype(np.int64)
    return bits[..., 0] * 4 + bits[..., 1] * 2 + bits[..., 2]


class Suim(_FileDataset):
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
        _require_dir(root, "dataset root", self.layout)
        if (root / "images").is_dir():
            base = root
        elif split is None:
            raise StegosegError(
                f"SUIM: {root} has no images/ folder; pass split 'train' or 'test' for the release root "
                f"(expected layout: {self.layout})"
            )
        elif split in self.SPLIT_DIRS:
            base = _require_dir(root / self.SPLIT_DIRS[split] / "images", f"SUIM image folder for split {split!r}",
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
            first, count = _first_missing(self.label_paths)
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


# --------------------------------------------------------------------------- Pascal VOC

VOC_CLASS_NAMES: Tuple[str, ...] = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair",
    "cow", "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
    "train", "tvmonitor",
)
_VOC_TABLE = _lookup_table({i: i for i in range(len(VOC_CLASS_NAMES))})


class VOC2012(_FileDataset):
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
        _require_dir(root, "dataset root", self.layout)
        image_dir = _require_dir(root / "JPEGImages", "VOC image folder", self.layout)
        self.ids = _read_id_list(root / "ImageSets" / "Segmentation" / f"{split}.txt", self.layout)
        self.image_paths = [image_dir / f"{i}.jpg" for i in self.ids]
        label_dir = root / "SegmentationClass"
        self.label_paths = [label_dir / f"{i}.png" for i in self.ids] if label_dir.is_dir() else None

    def map_label(self, label: np.ndarray) -> np.ndarray:
        return _apply_table(label, _VOC_TABLE)


# --------------------------------------------------------------------------- registry

DATASETS: Dict[str, Type[SegmentationDataset]] = {
    "directory": DirectoryDataset,
    "cocostuff27": CocoStuff27,
    "cocostuff15": CocoStuff15,
    "cocostuff3": CocoStuff3,
    "cityscapes27": Cityscapes27,
    "potsdam3": Potsdam3,
    "suim": Suim,
    "voc2012": VOC2012,
}


def parse_class_names(text: Optional[str]) -> Optional[list]:
    """``--class-names``: a file with one name per line, or a comma-separated list."""
    if not text:
        return None
    p = Path(text)
    if p.is_file():
        names = [line.strip() for line in p.read_text().splitlines() if line.strip()]
    else:
        names = [t.strip() for t in text.split(",") if t.strip()]
    if len(names) < 2:
        raise StegosegError(f"--class-names {text!r}: give at least two names (comma-separated) or a file")
    return names


def build_dataset(
    kind: str,
    root: PathLike,
    split: Optional[str],
    transform: Optional[JointTransform] = None,
    **options: object,
) -> SegmentationDataset:
    """Instantiate the dataset class registered as ``kind`` (see ``DATASETS``).

    Raises StegosegError for an unknown kind (listing the valid ones), an option the
    class does not take, or a missing root/split folder (naming the path and layout).
    """
    key = str(kind).strip().lower()
    if key not in DATASETS:
        raise StegosegError(f"unknown dataset kind {kind!r}; valid kinds: {', '.join(DATASETS)}")
    cls = DATASETS[key]
    accepted = set(inspect.signature(cls.__init__).parameters) - {"self", "root", "split", "transform"}
    unknown = sorted(set(options) - accepted)
    if unknown:
        raise StegosegError(
            f"dataset kind {key!r} does not take option(s) {', '.join(unknown)}; "
            f"valid options: {', '.join(sorted(accepted)) or 'none'}"
        )
    root_path = Path(root).expanduser()
    if not root_path.is_dir():
        raise StegosegError(
            f"dataset root not found: {root_path} (expected layout for {key}: {getattr(cls, 'layout', '?')})"
        )
    if split is None and key != "suim":
        raise StegosegError(f"dataset kind {key!r} needs a split (e.g. 'train' or 'val')")
    return cls(root_path, split, transform=transform, **options)  # type: ignore[call-arg]
