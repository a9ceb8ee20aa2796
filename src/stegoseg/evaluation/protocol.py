"""The evaluation protocol as explicit options, streaming over a dataset.

Published protocol (the defaults): resize the minor side to 320 with NEAREST resampling
for images (as the reference evaluation script does), centre crop 320 x 320, average the
code over the image and its horizontal flip, upsample the code bilinearly to label size,
read both probes, refine each with the dense CRF, and count confusion for cluster
(Hungarian-matched, parity and strict modes) and linear (identity) predictions.

Outputs (when ``out_dir`` is given): ``metrics.json``, ``confusion_cluster.png``,
``confusion_linear.png``, ``predictions.png`` (image | ground truth | cluster |
linear, clusters shown in the colour of their matched class).
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from stegoseg.progress import progress_bar as tqdm

from stegoseg.data.base import IGNORE_INDEX, SegmentationDataset
from stegoseg.data.transforms import EvalTransform
from stegoseg.errors import StegosegError
from stegoseg.evaluation.crf import CRFParams, crf_pool, image_to_uint8
from stegoseg.evaluation.metrics import (
    ConfusionAccumulator,
    plot_confusion,
    save_metrics_json,
)
from stegoseg.labels import classes_from_assignment, cluster_label_names, cluster_lookup
from stegoseg.reporting.figures import make_palette, prediction_grid


@dataclass
class EvalConfig:
    resolution: Optional[int] = 320  # minor side; None = full image, no resize
    crop: str = "center"  # "center" or "none"
    image_resample: str = "nearest"  # the reference evaluation used nearest
    flip: bool = True
    crf: bool = True
    crf_workers: int = 2
    batch_size: int = 8
    num_workers: int = 0
    max_images: Optional[int] = None
    n_grid: int = 6
    crf_params: CRFParams = CRFParams()  # kernel settings and input convention of the dense CRF


def _collate(samples):
    """Batch samples; images of different sizes (crop='none') are kept as a list."""
    out = {"id": [s["id"] for s in samples]}
    shapes = {tuple(s["image"].shape) for s in samples}
    out["image"] = torch.stack([s["image"] for s in samples]) if len(shapes) == 1 else [s["image"] for s in samples]
    if "label" in samples[0]:
        out["label"] = torch.stack([s["label"] for s in samples]) if len(shapes) == 1 else [s["label"] for s in samples]
    return out


def evaluate_model(
    model,
    dataset: SegmentationDataset,
    config: EvalConfig = EvalConfig(),
    out_dir=None,
    progress: bool = True,
    parts=None,
) -> dict:
    """Evaluate ``model`` (a :class:`~stegoseg.model.SegmentationModel`) on ``dataset``.

    ``dataset`` is built without a transform; the protocol's transform is applied here.
    Returns the metrics dict ({"cluster": {"parity": ..., "strict": ...}, "linear": ...,
    "config": ..., "n_images": ..., "seconds": ...}). Unlabelled datasets give no
    metrics, only prediction pictures. ``parts``: ``parts(indices, grid_at)`` evaluates the
    images elsewhere (``--ray-address``: :func:`stegoseg.distributed.stages.evaluation_parts`)
    and returns the :class:`EvalPart` s that cover them; the counts are summed here, so the
    metrics are the same integers as this process's.
    """
    dataset.transform = eval_transform(config)
    indices = list(range(len(dataset)))
    if config.max_images is not None:
        indices = indices[: config.max_images]
    labelled = dataset.has_labels
    n_classes = dataset.n_classes if labelled else None
    if labelled and model.linear_probe is not None and model.linear_probe.n_classes != n_classes:
        raise StegosegError(
            f"the checkpoint's linear probe predicts {model.linear_probe.n_classes} classes but the "
            f"'{dataset.split}' split of {dataset.root} has {n_classes}: evaluate on data with the training classes "
            "(same classes.txt / --class-names / --n-classes)"
        )
    # Grid rows spread evenly over the evaluated images (neighbouring frames look alike).
    grid_at = set(np.linspace(0, len(indices) - 1, min(config.n_grid, len(indices))).round().astype(int).tolist())
    t0 = time.perf_counter()
    if parts is None:
        pool = crf_pool(config.crf_workers) if config.crf and config.crf_workers > 1 else None
        try:
            done = [evaluate_part(model, dataset, config, 0, indices, grid_at, pool=pool, progress=progress)]
        finally:
            if pool is not None:
                pool.shutdown()
    else:
        done = parts(indices, grid_at)
    seconds = time.perf_counter() - t0
    result = {
        "n_images": len(indices),
        "seconds": seconds,
        "images_per_s": len(indices) / seconds if seconds else None,
        "config": asdict(config),
    }
    grid_rows = [part.grid[pos] for part in sorted(done, key=lambda d: min(d.grid, default=0)) for pos in sorted(part.grid)]
    names = dataset.class_names if labelled else None
    if labelled:
        cluster_acc = ConfusionAccumulator(model.n_clusters, n_classes)
        cluster_acc.confusion = sum((part.cluster for part in done), cluster_acc.confusion)
        result["cluster"] = {mode: cluster_acc.compute(mode, names) for mode in ("parity", "strict")}
        if model.linear_probe is not None:
            linear_acc = ConfusionAccumulator(n_classes, n_classes, hungarian=False)
            linear_acc.confusion = sum((part.linear for part in done), linear_acc.confusion)
            result["linear"] = linear_acc.compute("strict", names)
    if out_dir is not None:
        write_eval_outputs(result, grid_rows, out_dir, n_classes or model.n_clusters, model.n_clusters)
    return result


def eval_transform(config: EvalConfig) -> EvalTransform:
    return EvalTransform(resolution=config.resolution, crop=config.crop, image_resample=config.image_resample)


@dataclass
class EvalPart:
    """The counts of a run of consecutive evaluated images: cluster and linear confusion
    (None without labels / without a linear probe) and the prediction-grid rows among them
    (by position in the evaluated list)."""

    cluster: Optional[np.ndarray]
    linear: Optional[np.ndarray]
    grid: dict
    n: int


def evaluate_part(model, dataset: SegmentationDataset, config: EvalConfig, first: int, indices: list, grid_at: set,
                  pool=None, progress: bool = False) -> EvalPart:
    """Predict ``dataset[indices]`` (already with the protocol's transform; ``first``: the
    position of ``indices[0]`` in the evaluated list) in the protocol's batches and count."""
    loader = torch.utils.data.DataLoader(
        torch.utils.data.Subset(dataset, indices),
        batch_size=config.batch_size if config.crop == "center" else 1,
        num_workers=config.num_workers,
        collate_fn=_collate,
    )
    labelled = dataset.has_labels
    n_classes = dataset.n_classes if labelled else None
    cluster_acc = ConfusionAccumulator(model.n_clusters, n_classes) if labelled else None
    linear_acc = ConfusionAccumulator(n_classes, n_classes, hungarian=False) if labelled and model.linear_probe is not None else None
    grid, seen = {}, first
    crf_params = config.crf_params
    for batch in tqdm(loader, desc="evaluate", disable=not progress, unit="batch"):
        images = batch["image"]
        image_list = images if isinstance(images, list) else list(images)
        if isinstance(images, list):
            preds = [model.predict(im[None], flip=config.flip, crf=config.crf, crf_params=crf_params, crf_pool=pool)
                     for im in images]
            cluster = [p["cluster"][0] for p in preds]
            linear = [p["linear"][0] if p["linear"] is not None else None for p in preds]
        else:
            p = model.predict(images, flip=config.flip, crf=config.crf, crf_params=crf_params, crf_pool=pool)
            cluster = list(p["cluster"])
            linear = list(p["linear"]) if p["linear"] is not None else [None] * len(cluster)
        labels = batch.get("label")
        if labelled:
            check_label_values(labels, n_classes, batch["id"])
        for i in range(len(cluster)):
            if labelled:
                cluster_acc.update(cluster[i], labels[i])
                if linear_acc is not None:
                    linear_acc.update(linear[i], labels[i])
            if seen in grid_at:
                grid[seen] = {
                    "image": image_to_uint8(image_list[i]),
                    "label": labels[i].numpy() if labelled else None,
                    "cluster": cluster[i].numpy(),
                    "linear": linear[i].numpy() if linear[i] is not None else None,
                }
            seen += 1
    return EvalPart(cluster_acc.confusion if cluster_acc else None, linear_acc.confusion if linear_acc else None,
                    grid, seen - first)


def check_label_values(labels, n_classes: int, ids) -> None:
    """Label values must be class ids below ``n_classes`` or IGNORE_INDEX: an out-of-range
    value would otherwise be dropped from the counts without a word."""
    for label, sample_id in zip(labels, ids):
        bad = label[(label != IGNORE_INDEX) & ((label < 0) | (label >= n_classes))]
        if bad.numel():
            raise StegosegError(
                f"label of {sample_id} holds the value {int(bad.max())}, but there are {n_classes} classes "
                f"(ids 0..{n_classes - 1}): fix the label or mark those pixels unlabelled"
            )


def write_eval_outputs(result: dict, grid_rows: list, out_dir, n_classes: int, n_clusters: int) -> None:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_metrics_json(result, out_dir / "metrics.json")
    palette = make_palette(max(n_classes, n_clusters))
    if "cluster" in result:
        strict = result["cluster"]["strict"]
        plot_confusion(strict, out_dir / "confusion_cluster.png", title=f"cluster probe (strict) mIoU {strict['miou']:.1f}")
        # Paint clusters with the colour of their matched class; unmatched clusters get the colours after the
        # classes, in cluster order: the same labels and colours as `segment` of a model with this matching
        matched = classes_from_assignment(strict["assignment"], len(strict["assignment"]), n_classes)
        remap = cluster_lookup(matched, len(matched), n_classes)
        palette = make_palette(max(n_classes, int(remap.max()) + 1))
        for row in grid_rows:
            row["cluster"] = remap[row["cluster"]]
        classes = list(strict.get("per_class_iou") or {}) or [f"class {i}" for i in range(n_classes)]
        names = cluster_label_names(classes, matched, len(matched))
    else:
        names = None
    if "linear" in result:
        lin = result["linear"]
        plot_confusion(lin, out_dir / "confusion_linear.png", title=f"linear probe mIoU {lin['miou']:.1f}")
    if grid_rows:
        if names is None and "linear" in result:
            names = list(result["linear"].get("per_class_iou") or {})
        prediction_grid(grid_rows, out_dir / "predictions.png", palette, names=names)


def summary_rows(result: dict) -> dict:
    """Flat headline numbers: cluster (strict/parity) and linear accuracy and mIoU."""
    rows = {}
    for mode in ("parity", "strict"):
        if "cluster" in result:
            rows[f"cluster_{mode}_acc"] = result["cluster"][mode]["accuracy"]
            rows[f"cluster_{mode}_miou"] = result["cluster"][mode]["miou"]
    if "linear" in result:
        rows["linear_acc"] = result["linear"]["accuracy"]
        rows["linear_miou"] = result["linear"]["miou"]
    return rows
