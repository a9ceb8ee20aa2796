"""The raw-feature baseline: cluster and linear probes fitted straight on backbone features.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from stegoseg.config.stego import Config
from stegoseg.evaluation.protocol import summary_rows
from stegoseg.features.cache import FeatureCache
from stegoseg.methods.common import (
    build_backbone_from_config,
    build_split,
    evaluate_checkpoint_model,
    fit_probes,
    n_classes_for,
    prepare,
)
from stegoseg.model import SegmentationModel


def fit_feature_baseline(cfg: Config, out, cache: Optional[FeatureCache] = None, backbone=None) -> SegmentationModel:
    """The "backbone only" baseline: probes fitted straight on cached backbone features.

    Cluster probe: spherical k-means (k-means++ init, Lloyd iterations streamed over the
    cache) with n_classes + extra_clusters centroids. Linear probe: 1x1 classifier with
    cross-entropy on the training labels, when the training split has labels.
    """
    out = Path(out)
    if backbone is None:
        backbone, _ = build_backbone_from_config(cfg, out)
    if cache is None:
        cache = prepare(cfg, out, backbone)
    train = build_split(cfg, cfg.train_split, out)
    return fit_probes(cfg, cache, backbone, n_classes_for(cfg, train), class_names=train.class_names)


def run_feature_baseline(cfg: Config, out) -> dict:
    """Prepare, fit the probes on raw features, evaluate, and write everything under ``out``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    cfg.save(out / "config.yaml")
    backbone, _ = build_backbone_from_config(cfg, out)
    cache = prepare(cfg, out, backbone)
    model = fit_feature_baseline(cfg, out, cache=cache, backbone=backbone)
    model.save(out / "checkpoint.pt")
    result = evaluate_checkpoint_model(cfg, model, out)
    result["summary"] = summary_rows(result)
    (out / "metrics.json").write_text(json.dumps(result, indent=2, default=float))
    return result
