"""Pictures a person can open: colour palettes, palette PNGs, overlays, prediction grids,
histograms, and one plotter of Lightning's CSV logs (STEGO's and DINO pretraining's curves)."""
from __future__ import annotations

import colorsys
import math
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
from PIL import Image


def curve_label(key: str, run: str = "") -> str:
    """A log column as a legend entry: the prefix of its panel dropped ("loss/self" -> "self",
    "loss/loss" -> "total"), the run's name in front when there are several runs."""
    prefix, _, name = key.rpartition("/")
    name = "total" if prefix and name == prefix else name
    return f"{run}: {name}" if run else name


def plot_log_curves(csv_path, png_path, panels: dict, reference_lines: Optional[dict] = None) -> bool:
    """The one plotter of Lightning CSV logs: ``csv_path`` is one log, or a dict run name ->
    log (several runs in one figure, named in the legend); ``panels`` maps a panel title to
    the column names (or name prefixes ending in "/") drawn in it against step;
    ``reference_lines`` maps a panel title to (y, label) horizontal lines. Returns False when
    there is no log."""
    import csv

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sources = csv_path if isinstance(csv_path, dict) else {"": csv_path}
    logs = {}
    for run, path in sources.items():
        if Path(path).exists():
            with open(path, newline="") as f:
                rows = list(csv.DictReader(f))
            if rows:
                logs[run if len(sources) > 1 else ""] = rows
    if not logs:
        return False
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.3), squeeze=False)
    for ax, (title, wanted) in zip(axes[0], panels.items()):
        for run, rows in logs.items():
            columns = list(rows[0])
            keys = [c for c in columns if any(c == w or (w.endswith("/") and c.startswith(w)) for w in wanted)]
            for key in keys:
                pts = [(int(r["step"]), float(r[key])) for r in rows if r.get(key) not in (None, "")]
                if pts:
                    ax.plot(*zip(*pts), lw=0.8, label=curve_label(key, run))
        for y, label in (reference_lines or {}).get(title, []):
            ax.axhline(y, color="gray", ls="--", lw=0.8, label=label)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("step")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(png_path, dpi=100)
    plt.close(fig)
    return True


def plot_training_curves(csv_path, png_path) -> bool:
    """STEGO: loss terms, and mean KNN / random code similarity (paper A.11 targets) against step
    (``csv_path``: one log or {run name: log})."""
    return plot_log_curves(csv_path, png_path, {"losses": ["loss/"],
                                                "mean code similarity (A.11: KNN ~0.3, random ~0)": ["sim/"]})


def plot_dino_curves(csv_path, png_path, out_dim: int) -> bool:
    """DINO pretraining: loss (with log(out_dim), the loss of a uniform student), learning rate, teacher momentum."""
    return plot_log_curves(csv_path, png_path, {"loss": ["loss"], "lr": ["lr"], "momentum": ["momentum"]},
                           {"loss": [(math.log(out_dim), f"log({out_dim}): uniform student")]})


def plot_readout(history: list, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.2))
    steps = [h["step"] for h in history]
    ax.plot(steps, [h["acc"] for h in history], "o-", label="patch k-NN accuracy")
    ax.plot(steps, [h["miou"] for h in history], "s-", label="patch k-NN mIoU")
    ax.set_xlabel("step")
    ax.set_ylabel("percent")
    ax.set_title("DINO pretraining: k-NN readout of the teacher")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


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


COLUMN_TITLES = {"image": "image", "label": "ground truth", "cluster": "cluster probe", "linear": "linear probe"}


def prediction_grid(
    rows: Sequence[dict],
    path,
    palette: np.ndarray,
    columns: Sequence[str] = ("image", "label", "cluster", "linear"),
    names: Optional[Sequence[str]] = None,
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
                ax.set_title(COLUMN_TITLES.get(col, col), fontsize=9)
    if names:  # one legend: the colours mean the same class in every column
        from matplotlib.patches import Patch

        shown = sorted({int(v) for r in rows for c in cols if c != "image" and r.get(c) is not None
                        for v in np.unique(r[c]) if 0 <= v < len(palette) and v < len(names)})
        handles = [Patch(color=palette[v] / 255.0, label=names[v] or f"label {v}") for v in shown]
        fig.legend(handles=handles, loc="lower center", ncol=min(6, max(1, len(handles))), fontsize=7, frameon=False)
        fig.tight_layout(rect=(0, 0.04 + 0.03 * ((len(handles) - 1) // 6), 1, 1))
    else:
        fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)


def histogram_png(values: dict, path, title: str = "", bins: int = 50, xlabel: str = "") -> None:
    """Overlaid histograms of several named 1-D arrays."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.4))
    for name, v in values.items():
        ax.hist(np.asarray(v).reshape(-1), bins=bins, range=(-1, 1), alpha=0.55, label=name, density=True)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("density")
    ax.set_title(title, fontsize=9, wrap=True)  # a long title wraps instead of being cut off
    ax.legend()
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_selection(rows: dict, chosen: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    first = next(iter(rows.values()))
    metrics = [k for k in ("label_free_score", "val_cluster_miou") if k in first]
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.5 * len(metrics), 3.2), squeeze=False)
    for ax, metric in zip(axes[0], metrics):
        for run in dict.fromkeys(r["run"] for r in rows.values()):
            pts = sorted((r["step"], r[metric]) for r in rows.values() if r["run"] == run)
            ax.plot(*zip(*pts), "o-", label=run or "run")
        ax.plot([rows[chosen]["step"]], [rows[chosen][metric]], "r*", markersize=14, label=f"chosen: {chosen}")
        ax.set_xlabel("step")
        ax.set_title(metric.replace("_", " "))
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def save_similarity_samples(samples: dict, path: Path, chosen) -> None:

    values = {f"{'KNN' if k == 'knn' else 'random'} pairs": v for k, v in samples.items() if len(v)}
    if values:
        histogram_png(values, path, title=f"code similarity S, selected checkpoint ({chosen})",
                      xlabel="cosine similarity of codes")


