"""Pictures a person can open: colour palettes, palette PNGs, overlays, prediction grids, histograms."""
from __future__ import annotations

import colorsys
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image

IGNORE_COLOUR = (0, 0, 0)


def make_palette(n: int) -> np.ndarray:
    """(n, 3) uint8: well-separated colours (golden-ratio hues, alternating lightness)."""
    cols = []
    for i in range(n):
        h = (i * 0.618033988749895) % 1.0
        l = 0.45 if i % 2 == 0 else 0.62
        s = 0.75 if (i // 2) % 2 == 0 else 0.95
        r, g, b = colorsys.hls_to_rgb(h, l, s)
        cols.append((int(r * 255), int(g * 255), int(b * 255)))
    return np.asarray(cols, dtype=np.uint8).reshape(n, 3)


def colorize(labels: np.ndarray, palette: np.ndarray, ignore_index: int = 255) -> np.ndarray:
    """(H, W) int labels -> (H, W, 3) uint8; ignore and out-of-range values are black."""
    labels = np.asarray(labels)
    out = np.zeros(labels.shape + (3,), dtype=np.uint8)
    valid = (labels >= 0) & (labels < len(palette)) & (labels != ignore_index)
    out[valid] = palette[labels[valid]]
    return out


def save_label_png(labels: np.ndarray, path, palette: np.ndarray) -> None:
    """Save a label map as an 8-bit palette PNG: pixel values are the labels, colours from ``palette``.

    Values above 254 cannot be stored and raise; 255 is unlabelled (black).
    """
    labels = np.asarray(labels)
    if labels.max(initial=0) > 255 or labels.min(initial=0) < 0:
        raise ValueError("palette PNGs hold labels 0..255")
    img = Image.fromarray(labels.astype(np.uint8), mode="P")
    pal = np.zeros((256, 3), dtype=np.uint8)
    pal[: min(len(palette), 255)] = palette[:255]
    img.putpalette(pal.reshape(-1).tolist())
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    img.save(path)


def overlay(image: np.ndarray, labels: np.ndarray, palette: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """Blend a colourised label map over an (H, W, 3) uint8 image."""
    col = colorize(labels, palette).astype(np.float32)
    return (image.astype(np.float32) * (1 - alpha) + col * alpha).round().clip(0, 255).astype(np.uint8)


def prediction_grid(
    rows: Sequence[dict],
    path,
    palette: np.ndarray,
    columns: Sequence[str] = ("image", "label", "cluster", "linear"),
) -> None:
    """Save a grid PNG: one row per sample, columns image | ground truth | predictions.

    Each row is a dict with "image" ((H, W, 3) uint8) and label maps under the other
    column names (a missing entry is left blank).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = [c for c in columns if any(r.get(c) is not None for r in rows)]
    fig, axes = plt.subplots(len(rows), len(cols), figsize=(2.6 * len(cols), 2.6 * len(rows)), squeeze=False)
    for i, row in enumerate(rows):
        for j, col in enumerate(cols):
            ax = axes[i][j]
            ax.axis("off")
            value = row.get(col)
            if value is None:
                continue
            ax.imshow(value if col == "image" else colorize(value, palette))
            if i == 0:
                ax.set_title(col, fontsize=9)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)


def histogram_png(values: dict, path, title: str = "", bins: int = 50, xlabel: str = "") -> None:
    """Overlaid histograms of several named 1-D arrays."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.2))
    for name, v in values.items():
        ax.hist(np.asarray(v).reshape(-1), bins=bins, range=(-1, 1), alpha=0.55, label=name, density=True)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("density")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
