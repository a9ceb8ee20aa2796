"""The one sample format every dataset yields.

A dataset is a :class:`SegmentationDataset`: subclasses only implement ``__len__`` and
``load(index) -> RawSample`` for their on-disk format. ``__getitem__`` applies an
optional joint transform and converts to tensors:

    {"image": FloatTensor (3, H, W) in [0, 1] (not normalised: the backbone normalises),
     "label": LongTensor (H, W), values 0..n_classes-1 or ``ignore_index``  (only when the
              dataset has labels),
     "id": str}

Inside the library the "unlabelled" value is always ``IGNORE_INDEX`` (255).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import numpy as np
import torch
from PIL import Image

IGNORE_INDEX = 255


@dataclass
class RawSample:
    image: Image.Image  # RGB
    label: Optional[np.ndarray]  # (H, W) integer array with IGNORE_INDEX for unlabelled, or None
    id: str


JointTransform = Callable[[Image.Image, Optional[np.ndarray]], tuple]


class SegmentationDataset(torch.utils.data.Dataset):
    """Base class: subclasses set ``class_names`` and implement ``__len__`` and ``load``."""

    class_names: Sequence[str] = ()
    ignore_index: int = IGNORE_INDEX

    def __init__(self, root, split: str = "train", transform: Optional[JointTransform] = None):
        self.root = root
        self.split = split
        self.transform = transform

    @property
    def n_classes(self) -> int:
        return len(self.class_names)

    @property
    def has_labels(self) -> bool:
        """True when every sample of this split carries a label map."""
        return True

    def load(self, index: int) -> RawSample:  # pragma: no cover - abstract
        raise NotImplementedError

    def __len__(self) -> int:  # pragma: no cover - abstract
        raise NotImplementedError

    def __getitem__(self, index: int) -> dict:
        raw = self.load(index)
        image, label = raw.image, raw.label
        if self.transform is not None:
            image, label = self.transform(image, label)
        out = {"image": image if torch.is_tensor(image) else pil_to_tensor(image), "id": raw.id}
        if label is not None:
            out["label"] = label if torch.is_tensor(label) else torch.from_numpy(np.asarray(label, dtype=np.int64))
        return out


def pil_to_tensor(image: Image.Image) -> torch.Tensor:
    """RGB PIL image -> float tensor (3, H, W) in [0, 1]."""
    arr = np.asarray(image.convert("RGB"), dtype=np.uint8)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).float().div_(255.0)
