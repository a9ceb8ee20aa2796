"""CAUSE end to end (``--method cause-mlp`` / ``cause-tr``): the feature cache, the concept
clusterbook (stage 1), the head against its EMA teacher (stage 2), the modularity cluster
probe (stage 3), one checkpoint. Each stage's output is kept in ``--out`` and reused:
``clusterbook.npy`` (+ ``clusterbook.json``), Lightning checkpoints of stages 2 and 3
(``--resume``), ``checkpoint.pt``. See docs/cause.md.
"""
from __future__ import annotations

import copy
import json
import logging
import time
from pathlib import Path
from typing import Optional

import torch

from stegoseg.config.stego import Config, selection_mode
from stegoseg.features.cache import config_neighbors
from stegoseg.methods.common import (
    build_backbone_from_config,
    build_split,
    n_classes_for,
    prepare,
    resolve_device,
)
from stegoseg.methods.stego import check_selection_possible, checkpoint_model, save_run_config, select_checkpoint
from stegoseg.reporting.figures import plot_training_curves
from stegoseg.training.cause import fit_cause, fit_clusterbook

log = logging.getLogger("stegoseg")

#: The stage-3 (modularity-fitted) cluster probe's centroids, kept beside the checkpoint.
MODULARITY_PROBE = "modularity_probe.pt"


def train_cause(cfg: Config, out, resume: bool = False) -> Optional[Path]:
    """The three stages into ``out``; returns ``<out>/checkpoint.pt`` (None on other DDP ranks).

    ``--select label-free`` / ``val-miou`` picks the head among stage 2's checkpoints (every
    ``--ckpt-every`` steps, and its last step, the head stage 3 saw) by the same criterion as
    STEGO's (:func:`~stegoseg.methods.stego.select_checkpoint`); each candidate's cluster probe
    is the k-means refit of its own code (``--cluster-fit kmeans``, required there: the
    modularity probe of stage 3 belongs to the last head only)."""
    out = Path(out)
    if resume:
        check_cause_resume(cfg, out)
    out.mkdir(parents=True, exist_ok=True)
    check_selection_possible(cfg, out)
    mode = selection_mode(cfg)
    save_run_config(cfg, out / "config.yaml")
    backbone, spec = build_backbone_from_config(cfg, out)
    # CAUSE reads no nearest neighbours; the label-free criterion does
    cache = prepare(cfg, out, backbone, neighbors=mode != "last")
    train = build_split(cfg, cfg.train_split, out)
    n_classes = n_classes_for(cfg, train)
    t0 = time.perf_counter()
    book = fit_clusterbook(cfg, cache, out, device=resolve_device(cfg.device))
    module = fit_cause(cfg, out, cache, n_classes, cache.has_labels, book, resume=resume)
    if not module.is_global_zero:
        return None
    final = copy.deepcopy(module.state_dict())
    modularity = module.model.cluster_probe.centroids.detach().clone()  # stage 3's, for the last head

    def model_from(run: dict, state: dict):
        # --cluster-fit kmeans (the default): the cluster probe refitted by spherical k-means on the
        # teacher's code, as STEGO's is; --cluster-fit online keeps the reference's modularity-fitted probe
        return checkpoint_model(module, state, cfg, backbone, spec, train, cache)

    run = {"name": "", "cfg": cfg, "calibration": None, "folder": out, "module": module, "final": final}
    knn = config_neighbors(cfg, cache) if mode != "last" else None
    _, model = select_checkpoint(cfg, out, [run], model_from, cache, knn, n_classes + cfg.extra_clusters)
    chosen = json.loads((out / "selection.json").read_text())["chosen_step"]
    if chosen == cfg.steps:
        torch.save(modularity, out / MODULARITY_PROBE)
    else:  # an earlier head: stage 3's probe was fitted on another code
        (out / MODULARITY_PROBE).unlink(missing_ok=True)
    if cfg.cluster_fit == "kmeans":
        log.info("cluster probe refitted by spherical k-means on the trained code (--cluster-fit kmeans%s)",
                 f"; the modularity-fitted probe of stage 3 is in {out / MODULARITY_PROBE}" if chosen == cfg.steps
                 else "")
    path = model.save(out / "checkpoint.pt")
    plot_training_curves(out / "logs" / "metrics.csv", out / "training_curves.png")
    log.info("CAUSE (%s): %d head steps + %d probe steps in %.1fs; checkpoint %s (head of step %d)", cfg.method,
             cfg.steps, cfg.cause_probe_steps, time.perf_counter() - t0, path, chosen)
    return path


def check_cause_resume(cfg: Config, out: Path) -> None:
    """``--resume`` of a CAUSE run, checked before any work: the same settings as the interrupted
    run (:func:`~stegoseg.training.resume.resume_checkpoint`; ``--cause-probe-steps`` among them),
    and also the same ``--steps``, which STEGO may extend (stage 3 starts at step ``--steps``: a
    longer stage 2 after it began would mix the stages)."""
    from stegoseg.errors import StegosegError
    from stegoseg.training.resume import RUN_CONFIG, resume_checkpoint

    resume_checkpoint(out / "lightning", cfg)  # the other settings (--cause-probe-steps among them) must agree
    saved = out / RUN_CONFIG
    if saved.exists():
        old = json.loads(saved.read_text())
        if old.get("steps") != cfg.steps:
            raise StegosegError(f"--resume: --steps {cfg.steps} differs from the interrupted CAUSE run's {old.get('steps')} "
                                f"in {out} (stage 3 starts at --steps): resume with --steps {old.get('steps')}, or pass "
                                "--overwrite")


def train_method(cfg: Config, out, resume: bool = False) -> Optional[Path]:
    """Train ``cfg.method`` (STEGO, CAUSE, PriMaPs-EM) into ``out``; the checkpoint's path."""
    if cfg.method == "stego":
        from stegoseg.methods.stego import train_stego

        return train_stego(cfg, out, resume=resume)
    if cfg.method == "primaps" or cfg.method.endswith("+primaps"):
        from stegoseg.methods.primaps import train_primaps

        return train_primaps(cfg, out, resume=resume)
    return train_cause(cfg, out, resume=resume)
