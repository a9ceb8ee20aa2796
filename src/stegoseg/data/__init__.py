"""Datasets, image/label I/O and joint transforms.

Every dataset yields ``{"image": FloatTensor (3, H, W) in [0, 1], "label": LongTensor
(H, W) (labelled datasets only), "id": str}`` with IGNORE_INDEX (255) for unlabelled
pixels; build one by name with :func:`build_dataset` (kinds listed in ``DATASETS``).
"""
from stegoseg.data.base import IGNORE_INDEX, RawSample, SegmentationDataset
from stegoseg.data.cityscapes import Cityscapes27
from stegoseg.data.cocostuff import CocoStuff, CocoStuff3, CocoStuff15, CocoStuff27
from stegoseg.data.directory import DirectoryDataset
from stegoseg.data.io import check_same_size, list_images, load_image, load_label
from stegoseg.data.potsdam import Potsdam3
from stegoseg.data.registry import DATASETS, build_dataset
from stegoseg.data.suim import Suim
from stegoseg.data.transforms import (
    EvalTransform,
    TrainTransform,
    five_crop,
    five_crop_boxes,
    pad_to_multiple,
)
from stegoseg.data.voc import VOC2012

__all__ = [
    "IGNORE_INDEX",
    "RawSample",
    "SegmentationDataset",
    "DATASETS",
    "build_dataset",
    "DirectoryDataset",
    "CocoStuff",
    "CocoStuff27",
    "CocoStuff15",
    "CocoStuff3",
    "Cityscapes27",
    "Potsdam3",
    "Suim",
    "VOC2012",
    "EvalTransform",
    "TrainTransform",
    "five_crop",
    "five_crop_boxes",
    "pad_to_multiple",
    "load_image",
    "load_label",
    "check_same_size",
    "list_images",
]
