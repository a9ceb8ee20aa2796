"""Generated images with known classes, in the directory-dataset layout.

Used by the tests, the benchmarks and the default main job (which must run without
downloads). Each class has its own base colour and texture (stripe orientation and
frequency, plus noise), so a good representation can separate them; each image is a
background class with a few ellipses and rectangles of other classes on top.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

CLASS_NAMES = ("meadow", "water", "brick", "sand", "forest", "asphalt", "snow", "rock")


def _class_texture(cls: int, h: int, w: int, rng: np.random.Generator) -> np.ndarray:
    hue_table = np.array(
        [
            [70, 160, 60],
            [40, 90, 200],
            [180, 60, 40],
            [220, 200, 130],
            [20, 90, 30],
            [90, 90, 95],
            [235, 240, 250],
            [130, 110, 100],
        ],
        dtype=np.float32,
    )
    base = hue_table[cls % len(hue_table)]
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    angle = cls * np.pi / 5
    freq = 0.25 + 0.12 * (cls % 4)
    stripes = np.sin(freq * (xx * np.cos(angle) + yy * np.sin(angle)))
    tex = base[None, None, :] + 28 * stripes[..., None] + rng.normal(0, 8, size=(h, w, 3))
    return tex


def make_label_map(h: int, w: int, n_classes: int, rng: np.random.Generator, object_scale: tuple = (0.15, 0.4),
                   n_objects: tuple = (2, 4)) -> np.ndarray:
    """A background class plus ``n_objects`` (inclusive range) random shapes of other classes,
    each with half-axes of ``object_scale`` (a range, as a fraction of the image side)."""
    label = np.full((h, w), rng.integers(n_classes), dtype=np.uint8)
    yy, xx = np.mgrid[0:h, 0:w]
    for _ in range(rng.integers(n_objects[0], n_objects[1] + 1)):
        cls = rng.integers(n_classes)
        cy, cx = rng.uniform(0, h), rng.uniform(0, w)
        ry, rx = rng.uniform(*object_scale) * h, rng.uniform(*object_scale) * w
        if rng.random() < 0.5:
            mask = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1
        else:
            mask = (abs(yy - cy) <= ry) & (abs(xx - cx) <= rx)
        label[mask] = cls
    return label


def render(label: np.ndarray, n_classes: int, rng: np.random.Generator) -> np.ndarray:
    h, w = label.shape
    img = np.zeros((h, w, 3), dtype=np.float32)
    for cls in range(n_classes):
        mask = label == cls
        if mask.any():
            img[mask] = _class_texture(cls, h, w, rng)[mask]
    return img.clip(0, 255).astype(np.uint8)


def make_synthetic_dataset(
    root,
    n_train: int = 40,
    n_val: int = 12,
    size: tuple = (96, 128),
    n_classes: int = 4,
    seed: int = 0,
    with_labels: bool = True,
    object_scale: tuple = (0.15, 0.4),
    n_objects: tuple = (2, 4),
) -> Path:
    """Write a directory dataset (imgs/{train,val}, labels/{train,val}, classes.txt) and return its root.

    Existing files are never overwritten: a root that already holds images raises.
    """
    root = Path(root)
    if n_classes > len(CLASS_NAMES):
        raise ValueError(f"at most {len(CLASS_NAMES)} synthetic classes")
    if (root / "imgs").exists() and any((root / "imgs").rglob("*.png")):
        raise FileExistsError(f"{root} already holds images: choose an empty folder")
    rng = np.random.default_rng(seed)
    h, w = size
    for split, n in (("train", n_train), ("val", n_val)):
        (root / "imgs" / split).mkdir(parents=True, exist_ok=True)
        if with_labels:
            (root / "labels" / split).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            label = make_label_map(h, w, n_classes, rng, object_scale, n_objects)
            Image.fromarray(render(label, n_classes, rng)).save(root / "imgs" / split / f"{split}_{i:04d}.png")
            if with_labels:
                Image.fromarray(label).save(root / "labels" / split / f"{split}_{i:04d}.png")
    if with_labels:
        (root / "classes.txt").write_text("\n".join(CLASS_NAMES[:n_classes]) + "\n")
    return root
