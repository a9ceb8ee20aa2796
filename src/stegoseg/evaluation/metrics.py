"""Segmentation metrics as plain functions over a confusion matrix.

Two ways of scoring an unsupervised prediction against ground truth:

* :func:`cluster_metrics`: predictions are cluster ids; clusters are matched to classes
  with the Hungarian algorithm (SciPy's ``linear_sum_assignment``) on the confusion
  counts so that the number of matched pixels is maximal.
* :func:`linear_metrics`: predictions are class ids already (linear probe); identity
  mapping.

Counting modes (``mode``):

* ``"parity"`` reproduces the public STEGO evaluation exactly: a pixel whose predicted
  cluster id is ``>= n_classes`` is dropped from the counts, so with extra clusters some
  labelled pixels are never scored.
* ``"strict"`` counts every labelled pixel: a pixel in a cluster that is matched to no
  class counts as an error (a false negative for its true class).

Both metrics accept streaming use through :class:`ConfusionAccumulator`: accumulate
counts batch by batch, then compute. Memory does not grow with the dataset.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

from stegoseg.errors import StegosegError

MODES = ("strict", "parity")


def confusion_counts(preds, targets, n_preds: int, n_classes: int, ignore_index: int = 255) -> np.ndarray:
    """Confusion counts of shape (n_preds, n_classes): entry [p, t] counts pixels predicted p with label t.

    Pixels labelled ``ignore_index`` (or outside ``[0, n_classes)``) are skipped. A
    prediction outside ``[0, n_preds)`` raises, since it means ``n_preds`` is wrong.
    """
    p = torch.as_tensor(preds).reshape(-1).long()
    t = torch.as_tensor(targets).reshape(-1).long()
    if p.shape != t.shape:
        raise StegosegError(f"predictions have {p.numel()} pixels but targets have {t.numel()}: shapes must match")
    keep = (t != ignore_index) & (t >= 0) & (t < n_classes)
    p, t = p[keep], t[keep]
    if p.numel() and (p.min() < 0 or p.max() >= n_preds):
        raise StegosegError(f"prediction id {int(p.max())} is outside [0, {n_preds}): pass a larger n_clusters")
    counts = torch.bincount(p * n_classes + t, minlength=n_preds * n_classes)
    return counts.reshape(n_preds, n_classes).cpu().numpy().astype(np.int64)


def hungarian_assignment(confusion: np.ndarray) -> np.ndarray:
    """Cluster -> class map maximising matched pixels. Unmatched clusters map to -1.

    ``confusion`` is (n_clusters, n_classes). With more clusters than classes, each class
    gets exactly one cluster and the rest stay unmatched.
    """
    rows, cols = linear_sum_assignment(confusion, maximize=True)
    mapping = np.full(confusion.shape[0], -1, dtype=np.int64)
    mapping[rows] = cols
    return mapping


def _finish(tp, fp, fn, n_counted, class_names, mapping, confusion) -> dict:
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = tp / (tp + fp + fn)
    n_classes = len(tp)
    names = list(class_names) if class_names is not None else [str(i) for i in range(n_classes)]
    if len(names) != n_classes:
        raise StegosegError(f"got {len(names)} class names for {n_classes} classes")
    miou = float(np.nanmean(iou)) * 100 if np.any(~np.isnan(iou)) else float("nan")
    accuracy = float(tp.sum() / n_counted * 100) if n_counted else float("nan")
    return {
        "miou": miou,
        "accuracy": accuracy,
        "per_class_iou": {name: (None if np.isnan(v) else float(v) * 100) for name, v in zip(names, iou)},
        "assignment": [int(m) for m in mapping],
        "n_pixels": int(n_counted),
        "confusion": confusion.tolist(),
        "class_names": names,
    }


def metrics_from_confusion(
    confusion: np.ndarray,
    mode: str = "strict",
    hungarian: bool = True,
    class_names: Optional[Sequence[str]] = None,
) -> dict:
    """Metrics from confusion counts (n_preds, n_classes).

    Returns a dict with ``miou`` and ``accuracy`` (percent), ``per_class_iou`` (percent,
    None for classes absent from both prediction and truth), ``assignment`` (cluster ->
    class, -1 when unmatched), ``n_pixels`` (pixels counted), ``confusion`` (the
    class x class matrix after mapping, rows = predicted class, columns = true class, plus
    in strict mode nothing is dropped) and ``class_names``.
    """
    if mode not in MODES:
        raise StegosegError(f"unknown metrics mode '{mode}': use one of {', '.join(MODES)}")
    confusion = np.asarray(confusion, dtype=np.int64)
    n_preds, n_classes = confusion.shape
    if mode == "parity":
        # The reference drops pixels whose predicted id is >= n_classes before matching.
        confusion = confusion[: min(n_preds, n_classes)]
        if confusion.shape[0] < n_classes:
            confusion = np.vstack([confusion, np.zeros((n_classes - confusion.shape[0], n_classes), np.int64)])
    if hungarian:
        mapping = hungarian_assignment(confusion)
    else:
        if confusion.shape[0] < n_classes:
            raise StegosegError(f"identity mapping needs at least {n_classes} predicted ids, got {confusion.shape[0]}")
        mapping = np.where(np.arange(confusion.shape[0]) < n_classes, np.arange(confusion.shape[0]), -1)
    class_conf = np.zeros((n_classes, n_classes), dtype=np.int64)
    for p, c in enumerate(mapping):
        if c >= 0:
            class_conf[c] += confusion[p]
    n_counted = int(confusion.sum())
    tp = np.diag(class_conf).astype(np.float64)
    fp = class_conf.sum(axis=1) - tp
    # Every counted pixel of class t that is not a true positive is a false negative of t;
    # in strict mode this includes pixels in unmatched clusters.
    fn = confusion.sum(axis=0) - tp
    return _finish(tp, fp, fn, n_counted, class_names, mapping, class_conf)


def cluster_metrics(
    preds,
    targets,
    n_classes: int,
    ignore_index: int = 255,
    mode: str = "strict",
    n_clusters: Optional[int] = None,
    class_names: Optional[Sequence[str]] = None,
) -> dict:
    """Hungarian-matched metrics of cluster predictions against class labels.

    ``preds`` may hold more clusters than classes (``n_clusters`` defaults to
    ``max(n_classes, preds.max() + 1)``). See the module docstring for ``mode``.
    """
    p = torch.as_tensor(preds)
    if n_clusters is None:
        n_clusters = max(n_classes, int(p.max()) + 1 if p.numel() else n_classes)
    conf = confusion_counts(p, targets, n_clusters, n_classes, ignore_index)
    return metrics_from_confusion(conf, mode=mode, hungarian=True, class_names=class_names)


def linear_metrics(
    preds, targets, n_classes: int, ignore_index: int = 255, class_names: Optional[Sequence[str]] = None
) -> dict:
    """Metrics of class predictions (e.g. the linear probe) with the identity mapping."""
    conf = confusion_counts(preds, targets, n_classes, n_classes, ignore_index)
    return metrics_from_confusion(conf, mode="strict", hungarian=False, class_names=class_names)


class ConfusionAccumulator:
    """Streaming confusion counts: ``update(preds, targets)`` per batch, ``compute()`` at the end."""

    def __init__(self, n_preds: int, n_classes: int, ignore_index: int = 255, hungarian: bool = True):
        self.n_preds, self.n_classes, self.ignore_index, self.hungarian = n_preds, n_classes, ignore_index, hungarian
        self.confusion = np.zeros((n_preds, n_classes), dtype=np.int64)

    def update(self, preds, targets) -> None:
        self.confusion += confusion_counts(preds, targets, self.n_preds, self.n_classes, self.ignore_index)

    def compute(self, mode: str = "strict", class_names: Optional[Sequence[str]] = None) -> dict:
        return metrics_from_confusion(
            self.confusion, mode=mode if self.hungarian else "strict", hungarian=self.hungarian, class_names=class_names
        )


def save_metrics_json(metrics: dict, path) -> None:
    """Write a metrics dict (possibly nested) as pretty JSON."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(metrics, indent=2, default=_json_default))


def _json_default(obj):
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (np.floating,)):
        return float(obj)
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    raise TypeError(f"not JSON serialisable: {type(obj)}")


def plot_confusion(metrics: dict, path, title: str = "") -> None:
    """Save the mapped confusion matrix (rows = true class, normalised per row) as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    conf = np.asarray(metrics["confusion"], dtype=np.float64).T  # rows: true class
    with np.errstate(invalid="ignore", divide="ignore"):
        norm = conf / conf.sum(axis=1, keepdims=True)
    names = metrics["class_names"]
    n = len(names)
    size = max(4.0, 0.35 * n + 2)
    fig, ax = plt.subplots(figsize=(size, size))
    im = ax.imshow(np.nan_to_num(norm), cmap="viridis", vmin=0, vmax=1)
    ax.set_xticks(range(n), names, rotation=90, fontsize=7)
    ax.set_yticks(range(n), names, fontsize=7)
    ax.set_xlabel("predicted (after matching)")
    ax.set_ylabel("ground truth")
    ax.set_title(title or f"mIoU {metrics['miou']:.1f}  acc {metrics['accuracy']:.1f}")
    fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
