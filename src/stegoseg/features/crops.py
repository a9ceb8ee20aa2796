"""The training view of a dataset that the feature cache stores: optional five-crop, then the
minor side resized and centre-cropped (item ``i`` is crop ``i % 5`` of image ``i // 5``).
"""
from __future__ import annotations

import io

import numpy as np
import torch

from stegoseg.data.base import SegmentationDataset, pil_to_tensor
from stegoseg.data.transforms import TrainTransform, five_crop_boxes


class CropView(torch.utils.data.Dataset):
    """Training view of a dataset: optional five-crop, then resize minor side + centre crop.

    Item ``i`` is crop ``i % 5`` of image ``i // 5`` with five-crop (order: top-left,
    top-right, bottom-left, bottom-right, centre), else image ``i``.
    """

    def __init__(self, dataset: SegmentationDataset, resolution: int, five_crop: bool, image_resample: str,
                 jpeg: bool = False):
        self.dataset, self.five_crop = dataset, five_crop
        self.transform = TrainTransform(resolution=resolution, image_resample=image_resample)
        self.n_crops = 5 if five_crop else 1
        # The reference writes its five-crops to disk as JPEG files (PIL's default quality
        # 75) and trains on those: with ``jpeg`` each crop takes the same round trip.
        self.jpeg = jpeg and five_crop

    def __len__(self) -> int:
        return len(self.dataset) * self.n_crops

    def item_id(self, raw_id: str, index: int) -> str:
        return f"{raw_id}#crop{index % 5}" if self.five_crop else raw_id

    def __getitem__(self, index: int) -> dict:
        raw = self.dataset.load(index // self.n_crops)
        image, label = raw.image, raw.label
        if self.five_crop:
            box = five_crop_boxes(image.width, image.height)[index % 5]
            image = image.crop(box)
            if self.jpeg:
                image = jpeg_round_trip(image)
            if label is not None:
                label = np.asarray(label)[box[1] : box[3], box[0] : box[2]]
        image, label = self.transform(image, label)
        out = {"image": image if torch.is_tensor(image) else pil_to_tensor(image), "index": index}
        out["id"] = self.item_id(raw.id, index)
        if label is not None:
            out["label"] = torch.as_tensor(np.asarray(label), dtype=torch.int64)
        return out


def jpeg_round_trip(image, quality: int = 75):
    """``image`` saved as JPEG (PIL's default quality, as the reference's crop files) and read back."""
    from PIL import Image

    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format="JPEG", quality=quality)
    buffer.seek(0)
    with Image.open(buffer) as decoded:
        return decoded.convert("RGB")
