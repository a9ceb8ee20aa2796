"""PriMaPs-EM end to end: ``--method primaps`` (on the backbone features), ``--method primaps
--init-from CHECKPOINT`` (boost a trained stegoseg model: EM on its head's code, starting from
its cluster probe) and ``--method METHOD+primaps`` (train METHOD into ``<out>/base``, then boost
it). Stages, each kept and reused: the feature cache, the pseudo masks
(``<cache>/primaps-<key>/``), the EM run (``<out>/lightning``, ``--resume``), ``checkpoint.pt``.
See docs/primaps.md.
"""
from __future__ import annotations

import dataclasses
import functools
import logging
import time
from pathlib import Path
from typing import Optional

import torch

from stegoseg.config.stego import Config, base_method
from stegoseg.errors import StegosegError
from stegoseg.features.cache import CropView
from stegoseg.methods.common import (
    build_backbone_from_config,
    build_split,
    fit_centroids,
    n_classes_for,
    prepare,
    resolve_device,
    split_dataset,
)
from stegoseg.methods.stego import check_selection_possible, checkpoint_states, save_run_config, write_selection
from stegoseg.model import SegmentationModel
from stegoseg.model import load as load_model
from stegoseg.reporting.figures import plot_training_curves
from stegoseg.training.primaps import build_pseudo_masks, fit_primaps, masks_folder, pca_prototypes

log = logging.getLogger("stegoseg")


def base_config(cfg: Config) -> Config:
    """The config of the base run of ``METHOD+primaps``: the same settings with ``method`` METHOD."""
    return dataclasses.replace(cfg, method=base_method(cfg.method), primaps_student_augs=False)


def load_start_model(path) -> SegmentationModel:
    """The trained model that ``--init-from`` boosts, checked before any work."""
    path = Path(path)
    if not path.is_file():
        raise StegosegError(f"--init-from {path}: no such checkpoint file (pass a stegoseg checkpoint.pt)")
    model = load_model(path, device="cpu")
    if model.head is None:
        raise StegosegError(f"--init-from {path} is a model without a head (the raw-feature baseline): run "
                            "--method primaps without --init-from to boost the backbone features")
    return model


def train_primaps(cfg: Config, out, resume: bool = False) -> Optional[Path]:
    """PriMaPs-EM into ``out``; returns ``<out>/checkpoint.pt`` (None on other DDP ranks)."""
    from stegoseg.evaluation.crf import crf_available

    out = Path(out)
    if not crf_available():  # before any work: the pseudo masks need it
        raise StegosegError("PriMaPs' pseudo masks are refined by the dense CRF: install pydensecrf2 "
                            "(`pip install pydensecrf2`, needs a C++ compiler)")
    start: Optional[SegmentationModel] = None
    if cfg.init_from:
        start = load_start_model(cfg.init_from)
    if resume:
        from stegoseg.training.resume import resume_checkpoint

        resume_checkpoint(out / "lightning", cfg)
    check_selection_possible(cfg, out)
    out.mkdir(parents=True, exist_ok=True)
    save_run_config(cfg, out / "config.yaml")
    t0 = time.perf_counter()
    if base_method(cfg.method):
        from stegoseg.methods.cause import train_method

        base = base_config(cfg)
        path = out / "base" / "checkpoint.pt"
        if resume and path.exists():
            log.info("PriMaPs-EM on %s: the base model of the interrupted run is finished: %s", base.method, path)
        else:
            log.info("PriMaPs-EM on %s: training the base model into %s", base.method, out / "base")
            path = train_method(base, out / "base", resume=resume and (out / "base" / "lightning").exists())
            if path is None:
                return None
        start = load_model(path, device="cpu")
    if start is not None:
        backbone, spec = start.backbone, start.backbone_spec
        head = start.head.eval()
    else:
        backbone, spec = build_backbone_from_config(cfg, out)
        head = None
    cache = prepare(cfg, out, backbone, neighbors=False)
    train = build_split(cfg, cfg.train_split, out)
    n_classes = n_classes_for(cfg, train)
    settings = dict(resolution=cfg.resolution, five_crop=cfg.five_crop, image_resample=cfg.train_resample or "bilinear",
                    jpeg=cfg.crop_jpeg)
    view = CropView(train, **settings)
    masks = build_pseudo_masks(cfg, cache, view, progress=cfg.progress, runner=ray_pseudo_masks(cfg, out, settings))
    device = resolve_device(cfg.device)
    if start is not None:
        n_clusters = start.n_clusters
        init = start.cluster_probe.centroids.detach().clone()  # the reference: STEGO's cluster probe, gain 1
        code_dim = start.code_dim
    else:
        n_clusters = n_classes + cfg.extra_clusters
        code_dim = backbone.embed_dim
        if cfg.primaps_init == "pca":
            init = pca_prototypes(cfg, cache, None, n_clusters, device)
        else:
            init = fit_centroids(cfg, cache, n_clusters, device=device).cpu()
    live = (backbone, view) if cfg.primaps_student_augs else None
    module = fit_primaps(cfg, out, cache, masks, code_dim, n_clusters, n_classes if cache.has_labels else None,
                         init, head=head, resume=resume, live=live)
    if not getattr(module, "is_global_zero", True):
        return None

    def model_of(state: dict) -> SegmentationModel:
        """The trained model at one EM step: the teacher's prototypes and the linear probe of ``state``."""
        module.load_state_dict(state)
        model = SegmentationModel(backbone, spec, head, n_clusters=n_clusters,
                                  n_classes=n_classes if cache.has_labels else None,
                                  class_names=list(train.class_names) if train.has_labels else None,
                                  method=cfg.method, config=cfg.to_dict())
        with torch.no_grad():
            model.cluster_probe.centroids.copy_(module.prototypes())
        if module.linear_probe is not None:
            model.linear_probe.load_state_dict(module.linear_probe.state_dict())
        return model.eval()

    steps = cfg.primaps_steps or cfg.steps
    if cfg.select == "val-miou":
        model = select_em_step(cfg, out, model_of, checkpoint_states(out / "lightning", module.state_dict(), steps))
    else:
        model = model_of(module.state_dict())
        write_selection(out, "last", {str(steps): {"run": "", "step": steps}}, str(steps), None)
    stats = masks_folder(cfg, cache) / "stats.json"
    if stats.exists():
        (out / "pseudo_masks.json").write_text(stats.read_text())
    path = model.save(out / "checkpoint.pt")
    plot_training_curves(out / "logs" / "metrics.csv", out / "training_curves.png")
    log.info("PriMaPs-EM (%s): %d EM steps in %.1fs; checkpoint %s", cfg.method, steps, time.perf_counter() - t0, path)
    return path


def select_em_step(cfg: Config, out: Path, model_of, states: dict) -> SegmentationModel:
    """``--select val-miou``, the reference's model choice: the EM step (each saved one and the
    last) whose model has the best strict validation cluster mIoU (no CRF; ties: the earliest);
    every step's scores in ``selection.json`` / ``selection.png``."""
    from stegoseg.methods.common import evaluate_checkpoint_model

    val_cfg = dataclasses.replace(cfg, crf=False, progress=False)
    device = resolve_device(cfg.device)
    rows = {}
    for step, state in states.items():
        result = evaluate_checkpoint_model(val_cfg, model_of(state).to(device), out / "selection-eval" / str(step))
        rows[str(step)] = {"run": "", "step": step, "val_cluster_miou": result["cluster"]["strict"]["miou"],
                           "val_cluster_acc": result["cluster"]["strict"]["accuracy"]}
    chosen = max(rows, key=lambda key: rows[key]["val_cluster_miou"])
    write_selection(out, "val-miou", rows, chosen, None)
    log.info("--select val-miou: chose the EM step %s among %d (validation cluster mIoU %.2f; the last step: %.2f)",
             chosen, len(rows), rows[chosen]["val_cluster_miou"], rows[str(max(states))]["val_cluster_miou"])
    return model_of(states[int(chosen)]).cpu()


def ray_pseudo_masks(cfg: Config, out: Path, view: dict):
    """The Ray runner of the pseudo masks with ``--ray-address`` (each worker builds the
    training split's crops with the CropView settings ``view``), else None (this process)."""
    from stegoseg.distributed.engine import RayOptions

    options = RayOptions.from_config(cfg)
    if options is None:
        return None
    from stegoseg.distributed.stages import pseudo_mask_runner

    build = functools.partial(split_dataset, cfg.to_dict(), str(out), cfg.train_split)
    return pseudo_mask_runner(options, build, view)
