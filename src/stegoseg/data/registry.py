"""Datasets by name (``--dataset``): the registry and ``build_dataset``.
"""
from __future__ import annotations

import inspect
from pathlib import Path
from typing import Dict, Optional, Type

from stegoseg.data.base import JointTransform, SegmentationDataset
from stegoseg.data.cityscapes import Cityscapes27
from stegoseg.data.cocostuff import CocoStuff3, CocoStuff15, CocoStuff27
from stegoseg.data.directory import DirectoryDataset
from stegoseg.data.io import PathLike
from stegoseg.data.potsdam import Potsdam3
from stegoseg.data.suim import Suim
from stegoseg.data.voc import VOC2012
from stegoseg.errors import StegosegError

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
