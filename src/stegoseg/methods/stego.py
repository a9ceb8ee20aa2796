"""STEGO end to end: calibrate the shifts (label-free), train, select a checkpoint.
"""
from __future__ import annotations

import copy
import json
import logging
import time
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from stegoseg.progress import progress_bar as tqdm

from stegoseg.config.stego import Config, replace, selection_mode
from stegoseg.errors import StegosegError
from stegoseg.features.cache import CropView, FeatureCache
from stegoseg.features.cache import config_neighbors
from stegoseg.methods.common import (
    build_backbone_from_config,
    build_split,
    evaluate_checkpoint_model,
    n_classes_for,
    prepare,
    refit_cluster_probe,
    resolve_device,
)
from stegoseg.model import SegmentationModel
from stegoseg.reporting.figures import (
    plot_selection,
    plot_training_curves,
    save_similarity_samples,
)
from stegoseg.training.calibration import calibrate_for_config
from stegoseg.training.selection import score_for_config
from stegoseg.training.stego import fit_stego

log = logging.getLogger("stegoseg")


# --------------------------------------------------------------------------- STEGO
def save_run_config(cfg: Config, path: Path, calibrated: bool = False) -> None:
    """``config.yaml``; after a label-free calibration the shifts it chose are written as
    fixed values (with a comment saying so), so that ``--config`` on this file repeats the run."""
    cfg.save(path)
    if calibrated:
        text = Path(path).read_text()
        Path(path).write_text(
            "# b_self, b_knn, b_rand were chosen by --shifts auto (label-free; see calibration.json) and are\n"
            "# written here as fixed values: `stegoseg train --config THIS_FILE` repeats the run exactly.\n" + text
        )


def check_selection_possible(cfg: Config, out: Path) -> None:
    """``--select val-miou`` needs a labelled validation split: say so before any long work."""
    if selection_mode(cfg) != "val-miou":
        return
    try:
        val = build_split(cfg, cfg.val_split, out)
    except StegosegError as exc:
        raise StegosegError(f"--select val-miou needs the validation split: {exc}") from exc
    if not val.has_labels:
        raise StegosegError(f"--select val-miou needs labels for the '{cfg.val_split}' split; use --select label-free")


def auto_variants(cfg: Config, out: Path, cache: FeatureCache, knn: np.ndarray, n_clusters: int) -> list:
    """The training runs of one ``train``: [(name, config, calibration or None)].

    ``--shifts fixed``: the config as given (name ""). ``--shifts auto``: for each spatial-centring
    setting of ``--auto-centring`` (both by default), the shifts calibrated for it without labels
    (``calibrate_for_config``), pinned in the config (``shifts: fixed``); ``--select`` then picks
    among the checkpoints of all of them. Writes ``calibration.json`` per variant.
    """
    if cfg.shifts != "auto":
        return [("", cfg, None)]
    settings = {"both": (True, False), "on": (True,), "off": (False,)}[cfg.auto_centring]
    variants = []
    for pointwise in settings:
        name = "" if len(settings) == 1 else f"centring-{'on' if pointwise else 'off'}"
        folder = out / "candidates" / name if name else out
        t0 = time.perf_counter()
        vcfg = replace(cfg, pointwise=pointwise, auto_centring="on" if pointwise else "off")
        calibration = calibrate_for_config(vcfg, cache, knn, n_clusters)
        calibration.save(folder / "calibration.json")
        log.info(
            "shifts calibrated without labels (spatial centring %s) in %.1fs: b_self %.3f, b_knn %.3f, b_rand %.3f "
            "(same-cluster rates self %.2f, knn %.2f, random %.2f)", "on" if pointwise else "off",
            time.perf_counter() - t0, calibration.b_self, calibration.b_knn, calibration.b_rand,
            calibration.same_rate["self"], calibration.same_rate["knn"], calibration.same_rate["rand"],
        )
        vcfg = replace(vcfg, shifts="fixed", select=selection_mode(cfg), **calibration.shifts)
        variants.append((name, vcfg, calibration))
    return variants


def train_stego(cfg: Config, out, resume: bool = False) -> Optional[Path]:
    """prepare (cache + KNN), calibrate the shifts (``--shifts auto``), train the head and
    probes (one run per calibration candidate), select a checkpoint (``--select``); writes
    ``<out>/checkpoint.pt`` and ``<out>/config.yaml`` (the chosen run's settings, so that
    ``--config`` on it repeats that run).

    Returns the checkpoint path on the main process, None on the other DDP ranks.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    check_selection_possible(cfg, out)
    cfg.save(out / "config.yaml")
    backbone, spec = build_backbone_from_config(cfg, out)
    cache = prepare(cfg, out, backbone)
    train = build_split(cfg, cfg.train_split, out)
    n_classes = n_classes_for(cfg, train)
    n_clusters = n_classes + cfg.extra_clusters
    knn = config_neighbors(cfg, cache)
    variants = auto_variants(cfg, out, cache, knn, n_clusters)
    crop_view = (CropView(train, cfg.resolution, cfg.five_crop, cfg.train_resample, jpeg=cfg.crop_jpeg)
                 if cfg.live_backbone else None)
    if len(variants) > 1:
        log.info("STEGO trains %d runs of %d steps (%s), then --select %s picks one of their checkpoints (every %d "
                 "steps)", len(variants), cfg.steps, ", ".join(name for name, _, _ in variants), selection_mode(cfg),
                 cfg.ckpt_every)
    t0 = time.perf_counter()
    runs = []
    for name, vcfg, calibration in variants:
        folder = out / "candidates" / name if name else out
        if name:
            log.info("training candidate %s", name)
        module = fit_stego(vcfg, folder, cache, n_classes, cache.has_labels, resume=resume, backbone=backbone,
                           crop_view=crop_view)
        runs.append({"name": name, "cfg": vcfg, "calibration": calibration, "folder": folder, "module": module,
                     "final": copy.deepcopy(module.state_dict())})
    if not runs[0]["module"].is_global_zero:
        return None

    def model_from(run: dict, state: dict) -> SegmentationModel:
        return checkpoint_model(run["module"], state, run["cfg"], backbone, spec, train, cache)

    run, model = select_checkpoint(cfg, out, runs, model_from, cache, knn, n_clusters)
    save_run_config(run["cfg"], out / "config.yaml", calibrated=run["calibration"] is not None)
    if run["name"]:  # the chosen candidate's calibration, curves and histogram at the top of the run folder
        for fname in ("calibration.json", "similarity_histogram.png"):
            if (run["folder"] / fname).exists():
                (out / fname).write_bytes((run["folder"] / fname).read_bytes())
    if run["cfg"].cluster_fit == "kmeans":
        log.info("cluster probe refitted by spherical k-means on the trained code (--cluster-fit kmeans)")
    path = model.save(out / "checkpoint.pt")
    # every run's curves, named (with --auto-centring both: the centring-on and centring-off runs)
    plot_training_curves({r["name"] or "run": r["folder"] / "logs" / "metrics.csv" for r in runs},
                         out / "training_curves.png")
    log.info("trained %d steps x %d run(s) in %.1fs; checkpoint %s", cfg.steps, len(runs), time.perf_counter() - t0, path)
    return path


def select_checkpoint(cfg: Config, out: Path, runs: list, model_from, cache: FeatureCache, knn: np.ndarray,
                      n_clusters: int) -> tuple:
    """(run, model) of the checkpoint that ``--select`` picks among the saved steps and last
    step of every run; writes ``selection.json`` (every candidate's criterion),
    ``selection.png`` and the chosen checkpoint's code-similarity histogram
    (``selected_similarity_histogram.png``).

    The label-free criterion's reference shifts come from a calibration of the uncentred
    feature correspondences (the same for every candidate: see docs/label_free.md)."""
    mode = selection_mode(cfg)
    if mode == "last":
        run = runs[0]
        write_selection(out, mode, {str(cfg.steps): {"run": run["name"], "step": cfg.steps}}, str(cfg.steps), None)
        return run, model_from(run, run["final"])
    candidates = {}  # key -> (run, step, state)
    for run in runs:
        for step, state in checkpoint_states(run["folder"] / "lightning", run["final"], cfg.steps).items():
            key = f"{run['name']}/{step}" if run["name"] else str(step)
            candidates[key] = (run, step, state)
    device = resolve_device(cfg.device)
    reference = next((r["calibration"] for r in runs if r["calibration"] is not None and not r["cfg"].pointwise), None)
    if reference is None:
        reference = calibrate_for_config(replace(cfg, pointwise=False), cache, knn, n_clusters)
    rows, keep = {}, {}
    val_cfg = replace(cfg, crf=False, progress=False)
    for key, (run, step, state) in tqdm(candidates.items(), desc=f"select ({mode})", disable=not cfg.progress,
                                        unit="ckpt"):
        module = run["module"]
        module.load_state_dict(state)
        head = module.head.to(device).eval()
        scored = score_for_config(cfg, head, cache, knn, reference, n_clusters, device=device)
        head.cpu()
        rows[key] = {"run": run["name"], "step": step, **scored.row()}
        keep[key] = scored.similarity_samples
        if mode == "val-miou":
            result = evaluate_checkpoint_model(val_cfg, model_from(run, state).to(device),
                                               out / "selection-eval" / key.replace("/", "-"))
            rows[key]["val_cluster_miou"] = result["cluster"]["strict"]["miou"]
            rows[key]["val_cluster_acc"] = result["cluster"]["strict"]["accuracy"]
    metric = "label_free_score" if mode == "label-free" else "val_cluster_miou"
    chosen = max(rows, key=lambda key: rows[key][metric])  # ties: the earliest candidate
    write_selection(out, mode, rows, chosen, reference)
    save_similarity_samples(keep[chosen], out / "selected_similarity_histogram.png", chosen)
    log.info("--select %s: chose the checkpoint %s among %d (%s %.3f, higher is better; docs/label_free.md)", mode,
             f"at step {chosen}" if chosen.isdigit() else chosen.replace("/", " at step "), len(rows), metric,
             rows[chosen][metric])
    run, _, state = candidates[chosen]
    return run, model_from(run, state)


def checkpoint_model(module, state: dict, cfg: Config, backbone, spec: dict, train, cache: FeatureCache
                     ) -> SegmentationModel:
    """The trained model of one checkpoint ``state`` of a Lightning ``module`` (STEGO's or CAUSE's):
    the module's own SegmentationModel, with the backbone, class names (of the ``train`` split, when
    labelled) and run config attached, and, with ``--cluster-fit kmeans``, the cluster probe
    refitted on the trained code. Leaves ``state`` loaded in ``module``."""
    module.load_state_dict(state)
    model = copy.deepcopy(module.model).attach_backbone(backbone, spec)
    model.class_names = list(train.class_names) if train.has_labels else None
    model.config = cfg.to_dict()
    if cfg.cluster_fit == "kmeans":
        refit_cluster_probe(cfg, cache, model)
    return model.eval()


def checkpoint_states(ckpt_dir: Path, final_state: dict, final_step: int) -> dict:
    """{step: module state} for every ``step*.ckpt`` Lightning saved and for the final step."""
    states = {}
    for path in sorted(Path(ckpt_dir).glob("step*.ckpt")):
        step = int(path.stem[4:])
        if step < final_step:
            states[step] = torch.load(path, map_location="cpu", weights_only=True)["state_dict"]
    states[final_step] = final_state
    return states


def write_selection(out: Path, mode: str, rows: dict, chosen: str, reference) -> None:
    """``selection.json`` and, with more than one candidate, ``selection.png`` (criterion against step)."""
    data = {"mode": mode, "chosen": chosen, "chosen_step": rows[chosen]["step"], "chosen_run": rows[chosen]["run"],
            "candidates": rows, "reference_shifts": reference.shifts if reference is not None else None}
    (out / "selection.json").write_text(json.dumps(data, indent=2))
    if len(rows) > 1:
        plot_selection(rows, chosen, out / "selection.png")
