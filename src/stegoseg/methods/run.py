"""The main job: prepare -> train -> evaluate -> segment (+ raw-feature baseline) -> report.md.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from stegoseg.config.stego import Config
from stegoseg.evaluation.protocol import summary_rows
from stegoseg.methods.baseline import fit_feature_baseline
from stegoseg.methods.common import (
    RANDOM_BACKBONE_WARNING,
    build_split,
    evaluate_checkpoint_model,
    load_model_for,
    resolve_run_paths,
)
from stegoseg.methods.cause import train_method
from stegoseg.reporting.report import write_report
from stegoseg.segment import segment_images


#: How the report names each method's row.
METHOD_NAMES = {"stego": "STEGO", "cause-mlp": "CAUSE-MLP", "cause-tr": "CAUSE-TR", "primaps": "PriMaPs-EM",
                "stego+primaps": "STEGO + PriMaPs-EM", "cause-mlp+primaps": "CAUSE-MLP + PriMaPs-EM",
                "cause-tr+primaps": "CAUSE-TR + PriMaPs-EM"}


def run_all(cfg: Config, out, resume: bool = False, baseline: bool = True, n_segment: int = 8) -> Optional[dict]:
    """The main job: prepare -> train -> evaluate -> segment (+ raw-feature baseline) -> report.md."""
    out = Path(out)
    cfg = resolve_run_paths(cfg, out)
    cfg.save(out / "config.yaml")
    notes = []
    if not cfg.pretrained and not cfg.weights:
        notes.append(RANDOM_BACKBONE_WARNING.format(name=cfg.backbone))
    import logging
    import time

    timings: dict = {}
    t = time.perf_counter()
    ckpt = train_method(cfg, out / "train", resume=resume)
    if ckpt is None:  # a non-zero DDP rank: the main process does the rest
        return None
    timings["prepare + train"] = time.perf_counter() - t
    # the run's config with what training resolved (calibrated shifts, selection mode)
    (out / "config.yaml").write_text((out / "train" / "config.yaml").read_text())
    model = load_model_for(ckpt, cfg)
    t = time.perf_counter()
    results = {METHOD_NAMES[cfg.method]: evaluate_checkpoint_model(cfg, model, out / "eval")}
    timings["evaluate"] = time.perf_counter() - t
    store_cluster_classes(model, results[METHOD_NAMES[cfg.method]], ckpt)
    if baseline:
        t = time.perf_counter()
        base = fit_feature_baseline(cfg, out / "baseline", backbone=model.backbone)
        base.save(out / "baseline" / "checkpoint.pt")
        name = "raw features (k-means / linear)" if not cfg.pca_dim else \
            f"raw features, projected to {cfg.pca_dim} channels (k-means / linear)"
        results[name] = evaluate_checkpoint_model(cfg, base, out / "baseline")
        timings["baseline"] = time.perf_counter() - t
    val = build_split(cfg, cfg.val_split, out)
    paths = [p for p in getattr(val, "image_paths", [])][:n_segment]
    if paths:
        t = time.perf_counter()
        segment_images(model, paths, out / "segment", crf=cfg.crf, resolution=cfg.eval_resolution,
                       overwrite=True, progress=cfg.progress)
        timings["segment"] = time.perf_counter() - t
    (out / "timings.json").write_text(json.dumps(timings, indent=1))
    logging.getLogger("stegoseg").info("time per stage: %s", ", ".join(f"{k} {v:.0f} s" for k, v in timings.items()))
    summary = {name: summary_rows(r) for name, r in results.items()}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    write_report(out, "stegoseg run", results, cfg, notes)
    return summary


def store_cluster_classes(model, result: dict, ckpt) -> None:
    """With labels, the evaluation matched every cluster to a class (Hungarian, strict
    counting): keep that matching in the checkpoint, so that ``segment``, ``stegoseg.load``
    and the page show class names and one colour per class, as the evaluation's figures do."""
    import logging

    assignment = ((result.get("cluster") or {}).get("strict") or {}).get("assignment")
    if not assignment or not model.class_names:
        return
    model.set_cluster_classes(assignment)
    model.save(ckpt)
    logging.getLogger("stegoseg").info("the evaluation's cluster -> class matching is stored in %s: segment shows "
                                       "class names", ckpt)
