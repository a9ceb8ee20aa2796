"""A user's own folder: ``imgs/<split>/*`` with optional ``labels/<split>/<stem>.png``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np

from stegoseg.data.base import IGNORE_INDEX, JointTransform
from stegoseg.data.files import FileDataset, first_missing, require_dir
from stegoseg.data.io import PathLike, list_images
from stegoseg.errors import StegosegError


class DirectoryDataset(FileDataset):
    """A user's own data: ``root/imgs/<split>/*`` with optional ``root/labels/<split>/<stem>.png``,
    or a flat folder of images (no ``imgs/``): then every split is that folder, unlabelled (it
    is trained on and serves the label-free selection and the report).

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
        require_dir(root, "dataset root", self.layout)
        # a flat folder of images (no imgs/<split>/): every split is that folder, unlabelled
        self.flat = not (root / "imgs").is_dir() and bool(list_images(root))
        img_dir = root if self.flat else require_dir(root / "imgs" / split, f"image folder for split {split!r}",
                                                     self.layout)
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
        if label_dir.is_dir() and not self.flat:
            self.label_paths = [label_dir / f"{stem}.png" for stem in self.ids]
            first, count = first_missing(self.label_paths)
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
        first = self.label_values()
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
