"""The shared machinery of file-based datasets: parallel lists of image and label paths, label
lookup tables, split lists, one-line errors for missing files.
"""
from __future__ import annotations

from pathlib import Path
from typing import ClassVar, List, Mapping, Optional, Sequence, Tuple

import numpy as np
from PIL import Image

from stegoseg.data.base import IGNORE_INDEX, RawSample, SegmentationDataset
from stegoseg.data.io import check_same_size, load_image, load_label
from stegoseg.errors import StegosegError


def lookup_table(mapping: Mapping[int, int], size: int = 256) -> np.ndarray:
    """A ``size``-entry table sending each key of ``mapping`` to its value, the rest to IGNORE_INDEX."""
    table = np.full(size, IGNORE_INDEX, dtype=np.int64)
    for src, dst in mapping.items():
        table[src] = dst
    return table


def apply_table(label: np.ndarray, table: np.ndarray) -> np.ndarray:
    """Map label values through ``table``; values outside the table become IGNORE_INDEX."""
    label = np.asarray(label, dtype=np.int64)
    out = np.full(label.shape, IGNORE_INDEX, dtype=np.int64)
    inside = (label >= 0) & (label < table.shape[0])
    out[inside] = table[label[inside]]
    return out


def require_dir(path: Path, what: str, layout: str) -> Path:
    if not path.is_dir():
        raise StegosegError(f"{what} not found: {path} (expected layout: {layout})")
    return path


def read_id_list(path: Path, layout: str) -> List[str]:
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


def first_missing(paths: Sequence[Path]) -> Tuple[Optional[Path], int]:
    missing = [p for p in paths if not p.is_file()]
    return (missing[0] if missing else None), len(missing)


class FileDataset(SegmentationDataset):
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

    def label_values(self, progress: bool = False) -> dict:
        """{class id: the first label file holding it} over the split's labels, after the
        format's own reading and mapping (unlabelled pixels left out); scanned once per
        dataset object (class-count inference and the label checks share the scan)."""
        if getattr(self, "_label_values", None) is None:
            from stegoseg.progress import progress_bar as tqdm

            first: dict = {}
            n = len(self) if self.label_paths is not None else 0
            for i in tqdm(range(n), desc=f"check labels {self.split}", disable=not progress or n < 200, unit="img"):
                label = self.map_label(self.read_label(i))
                for v in np.unique(label[label != IGNORE_INDEX]).tolist():
                    first.setdefault(int(v), str(self.label_paths[i]))
            self._label_values = first
        return dict(self._label_values)

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
