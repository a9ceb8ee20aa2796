"""Library functions behind every command: build datasets and backbones from a Config,
prepare the feature cache, run the raw-feature baseline, evaluate a checkpoint.

The command-line interface is a thin layer over these; each is usable from Python.
"""
from __future__ import annotations

import copy
import json
import logging
import os
import time
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from tqdm.auto import tqdm

from .backbones import create_backbone
from .calibration import calibrate_for_config
from .config import PRESETS, Config, replace, selection_mode
from .data import build_dataset
from .errors import StegosegError
from .evaluate import EvalConfig, evaluate_model, summary_rows
from .features import CropView, FeatureCache, config_neighbors, extract_features
from .model import SegmentationModel
from .probes import spherical_kmeans, train_linear_probe, set_centroids
from .selection import score_for_config
from .train import fit_stego

log = logging.getLogger("stegoseg")

RANDOM_BACKBONE_WARNING = (
    "using a RANDOMLY INITIALISED backbone ({name}): the numbers from this run are not meaningful "
    "as segmentation quality; pass --weights FILE (or run with network access) for real results"
)


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise StegosegError(f"--device {device}: no CUDA GPU is available here; use --device cpu")
    return device


def data_root(cfg: Config, out: Optional[Path] = None) -> str:
    """The dataset folder; for dataset=synthetic without a root, generate one under ``out``."""
    if cfg.dataset == "synthetic":
        from .synthetic import make_synthetic_dataset

        root = Path(cfg.data_root) if cfg.data_root else Path(out or ".") / "synthetic-data"
        if not (root / "imgs").exists():
            make_synthetic_dataset(root)
        return str(root)
    if not cfg.data_root:
        raise StegosegError("--data-root is required (the dataset folder), or use --dataset synthetic")
    return cfg.data_root


def parse_class_names(text: Optional[str]) -> Optional[list]:
    """``--class-names``: a file with one name per line, or a comma-separated list."""
    if not text:
        return None
    p = Path(text)
    if p.is_file():
        names = [line.strip() for line in p.read_text().splitlines() if line.strip()]
    else:
        names = [t.strip() for t in text.split(",") if t.strip()]
    if len(names) < 2:
        raise StegosegError(f"--class-names {text!r}: give at least two names (comma-separated) or a file")
    return names


def build_split(cfg: Config, split: str, out: Optional[Path] = None, class_names: Optional[list] = None):
    """One split of the configured dataset. ``class_names``: the classes a model was trained
    with, for a directory split whose classes are not given by the config (so that the
    validation split never infers a different class count than training did)."""
    kind = "directory" if cfg.dataset == "synthetic" else cfg.dataset
    options = {}
    if kind == "directory":
        names = parse_class_names(cfg.class_names)
        options = {"ignore_index": cfg.ignore_index, "class_names": names}
        if names is None and cfg.n_classes is not None:
            options["n_classes"] = cfg.n_classes
        elif names is None and class_names:
            options["class_names"] = list(class_names)
    elif cfg.class_names:
        raise StegosegError(f"--class-names applies to directory datasets; {cfg.dataset} has its own class names")
    return build_dataset(kind, data_root(cfg, out), split, **options)


def backbone_spec(cfg: Config) -> dict:
    return {"name": cfg.backbone, "pretrained": cfg.pretrained, "weights": cfg.weights, "tiny": cfg.tiny, "overrides": {},
            "pos_embed": cfg.pos_embed}


def build_backbone_from_config(cfg: Config):
    """The configured backbone. A randomly initialised one (``--no-pretrained``, no
    ``--weights``) is drawn from ``cfg.seed``: the same weights in every command and process
    with that seed (so ``run``, ``train``, ``baseline`` and ``datus`` share it); the caller's
    RNG state is left untouched."""
    spec = backbone_spec(cfg)
    random_init = not cfg.pretrained and not cfg.weights
    with torch.random.fork_rng(devices=[]):
        if random_init:
            torch.manual_seed(cfg.seed)
        backbone = create_backbone(cfg.backbone, pretrained=cfg.pretrained, weights=cfg.weights, tiny=cfg.tiny,
                                   pos_embed=cfg.pos_embed)
    if random_init:
        log.warning(RANDOM_BACKBONE_WARNING.format(name=cfg.backbone))
    return backbone, spec


def n_classes_for(cfg: Config, dataset) -> int:
    if cfg.n_classes is not None:
        return cfg.n_classes
    if dataset.has_labels and dataset.n_classes:
        return dataset.n_classes
    raise StegosegError(
        f"the {cfg.train_split} split has no labels, so the number of classes is unknown: pass --n-classes N"
    )


def class_count_source(cfg: Config, dataset) -> str:
    """Where the number of classes comes from, for error messages."""
    if cfg.n_classes is not None:
        return f"--n-classes {cfg.n_classes}"
    if cfg.class_names:
        return "--class-names"
    if (Path(str(dataset.root)) / "classes.txt").is_file() and cfg.dataset in ("directory", "synthetic"):
        return f"{Path(str(dataset.root)) / 'classes.txt'}"
    if cfg.dataset in ("directory", "synthetic"):
        return f"inferred from the '{cfg.train_split}' labels"
    return f"the {cfg.dataset} dataset"


def check_before_work(cfg: Config, out: Path, evaluate: bool = False, train: bool = True) -> Optional[int]:
    """Everything that can be checked before the long work starts, so that bad input ends
    in one line at once instead of after preparing and training: the output folder is
    writable, the accelerator exists, the splits exist, and every label value of the
    splits the command reads is a class id (the class count comes from the config, the
    dataset's class list, or the training labels). Returns the number of classes (None
    for an unlabelled training split without --n-classes when ``train`` is False)."""
    from .preflight import check_accelerator, check_label_range, check_writable, label_values

    from .backbones import get_backbone_preset

    check_writable(out)
    check_accelerator(cfg.accelerator, cfg.device)
    get_backbone_preset(cfg.backbone)  # an unknown name fails here, with the list of names
    if cfg.weights and not Path(cfg.weights).is_file():
        raise StegosegError(f"--weights {cfg.weights}: file not found")
    scan_dir = cache_root(cfg, out) / ".label-scans"
    n_classes, names = None, None
    if train:
        train_split = build_split(cfg, cfg.train_split, out)
        n_classes = n_classes_for(cfg, train_split)
        if train_split.has_labels:
            values = label_values(train_split, scan_dir, cfg.progress)
            check_label_range(values, n_classes, cfg.train_split, class_count_source(cfg, train_split))
            names = train_split.class_names
    if evaluate or selection_mode(cfg) == "val-miou":
        try:
            val = build_split(cfg, cfg.val_split, out, class_names=names)
        except StegosegError as exc:
            raise StegosegError(f"the validation split '{cfg.val_split}' (needed for evaluation) is not usable: {exc}; "
                                f"pass --val-split NAME (--val-split {cfg.train_split} evaluates on the training images)"
                                ) from None
        if val.has_labels:
            count = n_classes if n_classes is not None else val.n_classes
            check_label_range(label_values(val, scan_dir, cfg.progress), count, cfg.val_split,
                              class_count_source(cfg, val))
    return n_classes


def check_eval_labels(cfg: Config, model: SegmentationModel, out: Path, split: Optional[str] = None) -> None:
    """``evaluate``: the split exists and its label values are ids of the checkpoint's classes."""
    from .preflight import check_label_range, label_values

    name = split or cfg.val_split
    val = build_split(cfg, name, out, class_names=model.class_names)
    if val.has_labels:
        count = model.n_classes or val.n_classes
        source = "the checkpoint's classes" if model.n_classes else class_count_source(cfg, val)
        check_label_range(label_values(val, None, cfg.progress), count, name, source)


def cache_root(cfg: Config, out: Path) -> Path:
    return Path(cfg.cache_dir) if cfg.cache_dir else Path(out) / "cache"


def prepare(cfg: Config, out, backbone=None) -> FeatureCache:
    """Five-crop (optional), extract and cache training features, then global descriptors and KNN."""
    out = Path(out)
    device = resolve_device(cfg.device)
    train = build_split(cfg, cfg.train_split, out)
    if backbone is None:
        backbone, _ = build_backbone_from_config(cfg)
    kind = "directory" if cfg.dataset == "synthetic" else cfg.dataset
    cache = extract_features(
        backbone,
        train,
        cache_root(cfg, out),
        resolution=cfg.resolution,
        five_crop=cfg.five_crop,
        batch_size=cfg.extract_batch_size,
        num_workers=cfg.num_workers,
        device=device,
        progress=cfg.progress,
        dataset_kind=kind,
        image_resample=cfg.train_resample,
        crop_jpeg=cfg.crop_jpeg,
    )
    t0 = time.perf_counter()
    config_neighbors(cfg, cache, device=device)
    log.info("nearest neighbours ready for %d items in %.1fs (%s)", cache.n, time.perf_counter() - t0, cache.path)
    return cache


def eval_config(cfg: Config) -> EvalConfig:
    return EvalConfig(
        resolution=cfg.eval_resolution,
        crop=cfg.eval_crop,
        image_resample=cfg.eval_resample,
        flip=cfg.flip,
        crf=cfg.crf,
        crf_workers=cfg.crf_workers,
        batch_size=cfg.eval_batch_size,
        max_images=cfg.max_eval_images,
        n_grid=cfg.n_grid,
        crf_reference_input=cfg.crf_reference_input,
    )


def fit_centroids(cfg: Config, cache: FeatureCache, n_clusters: int, head=None, device="cpu") -> torch.Tensor:
    """Spherical k-means (k-means++ init seeded by ``cfg.seed``, ``cfg.kmeans_iters`` Lloyd
    iterations streamed over the cache) on the cached training features, or on
    ``head(features)`` when a head is given. Returns (n_clusters, D) unit centroids."""
    bs = max(8, cfg.batch_size)

    def batches():
        for feats in cache.iter_batches(bs):
            if head is None:
                yield feats
            else:
                with torch.no_grad():
                    yield head(feats.to(device).float())

    if head is not None:
        _, h, w = cache.meta["feature_shape"]
        if cache.n * head.dim * h * w * 4 <= CODE_IN_MEMORY_BYTES:
            # The code of the whole cache fits in memory: run the head once instead of once per
            # Lloyd iteration (the same batches, so the same centroids).
            code = list(batches())
            return spherical_kmeans(lambda: iter(code), n_clusters, n_iter=cfg.kmeans_iters, seed=cfg.seed,
                                    device=device, progress=cfg.progress)
    return spherical_kmeans(batches, n_clusters, n_iter=cfg.kmeans_iters, seed=cfg.seed, device=device,
                            progress=cfg.progress)


# fit_centroids keeps the code of the whole cache in memory up to this size
CODE_IN_MEMORY_BYTES = 2 * 1024**3


def fit_feature_baseline(cfg: Config, out, cache: Optional[FeatureCache] = None, backbone=None) -> SegmentationModel:
    """The "backbone only" baseline: probes fitted straight on cached backbone features.

    Cluster probe: spherical k-means (k-means++ init, Lloyd iterations streamed over the
    cache) with n_classes + extra_clusters centroids. Linear probe: 1x1 classifier with
    cross-entropy on the training labels, when the training split has labels.
    """
    out = Path(out)
    if backbone is None:
        backbone, _ = build_backbone_from_config(cfg)
    if cache is None:
        cache = prepare(cfg, out, backbone)
    train = build_split(cfg, cfg.train_split, out)
    return fit_probes(cfg, cache, backbone, n_classes_for(cfg, train), class_names=train.class_names)


def fit_probes(cfg: Config, cache: FeatureCache, backbone, n_classes: int, class_names=None, head=None,
               method: str = "features") -> SegmentationModel:
    """Cluster and linear probes fitted on the cached training features, or on
    ``head(features)`` when a (fixed) head is given: seeded spherical k-means
    (:func:`fit_centroids`) with n_classes + extra_clusters centroids, and, when the cache
    has labels, the linear probe trained for ``cfg.linear_epochs`` epochs. The probes'
    initial weights come from ``cfg.seed`` (the caller's RNG state is untouched)."""
    device = resolve_device(cfg.device)
    n_clusters = n_classes + cfg.extra_clusters
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        model = SegmentationModel(
            backbone, backbone_spec(cfg), head=head, n_clusters=n_clusters,
            n_classes=n_classes if cache.has_labels else None,
            class_names=class_names if cache.has_labels else None, method=method, config=cfg.to_dict(),
        ).to(device)
    head = model.head
    set_centroids(model.cluster_probe, fit_centroids(cfg, cache, n_clusters, head=head, device=device))
    if cache.has_labels:
        gen = torch.Generator().manual_seed(cfg.seed)
        bs = max(8, cfg.batch_size)

        def batches():
            for feats, labels in cache.shuffled_labelled_batches(bs, gen):
                if head is not None:
                    with torch.no_grad():
                        feats = head(feats.to(device).float())
                yield feats, labels

        train_linear_probe(
            model.linear_probe, batches, epochs=cfg.linear_epochs, lr=cfg.probe_lr, device=device,
            progress=cfg.progress, seed=cfg.seed,
        )
    return model.eval()


def evaluate_checkpoint_model(cfg: Config, model: SegmentationModel, out, split: Optional[str] = None) -> dict:
    """Evaluate a model on the validation split with the protocol options of ``cfg``; writes outputs to ``out``."""
    out = Path(out)
    val = build_split(cfg, split or cfg.val_split, out, class_names=model.class_names)
    model.autocast_dtype = torch.bfloat16 if cfg.bf16_inference else None
    result = evaluate_model(model, val, eval_config(cfg), out_dir=out, progress=cfg.progress)
    result["backbone"] = {
        "name": model.backbone_spec.get("name"),
        "weights_source": getattr(model.backbone, "weights_source", None),
    }
    result["method"] = model.method
    (out / "metrics.json").write_text(json.dumps(result, indent=2, default=float))
    return result


def run_feature_baseline(cfg: Config, out) -> dict:
    """Prepare, fit the probes on raw features, evaluate, and write everything under ``out``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    cfg.save(out / "config.yaml")
    backbone, _ = build_backbone_from_config(cfg)
    cache = prepare(cfg, out, backbone)
    model = fit_feature_baseline(cfg, out, cache=cache, backbone=backbone)
    model.save(out / "checkpoint.pt")
    result = evaluate_checkpoint_model(cfg, model, out)
    result["summary"] = summary_rows(result)
    (out / "metrics.json").write_text(json.dumps(result, indent=2, default=float))
    return result


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
    backbone, spec = build_backbone_from_config(cfg)
    cache = prepare(cfg, out, backbone)
    train = build_split(cfg, cfg.train_split, out)
    n_classes = n_classes_for(cfg, train)
    n_clusters = n_classes + cfg.extra_clusters
    knn = config_neighbors(cfg, cache)
    variants = auto_variants(cfg, out, cache, knn, n_clusters)
    crop_view = (CropView(train, cfg.resolution, cfg.five_crop, cfg.train_resample, jpeg=cfg.crop_jpeg)
                 if cfg.live_backbone else None)
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
        module, vcfg = run["module"], run["cfg"]
        module.load_state_dict(state)
        model = SegmentationModel(
            backbone, spec, head=copy.deepcopy(module.head), n_clusters=module.cluster_probe.n_clusters,
            n_classes=n_classes if module.linear_probe is not None else None,
            class_names=train.class_names if train.has_labels else None, method="stego", config=vcfg.to_dict(),
        )
        model.cluster_probe.load_state_dict(module.cluster_probe.state_dict())
        if module.linear_probe is not None:
            model.linear_probe.load_state_dict(module.linear_probe.state_dict())
        if vcfg.cluster_fit == "kmeans":
            device = resolve_device(vcfg.device)
            head = model.head.to(device).eval()
            set_centroids(model.cluster_probe, fit_centroids(vcfg, cache, model.n_clusters, head=head, device=device))
            head.cpu()
        return model.eval()

    run, model = select_checkpoint(cfg, out, runs, model_from, cache, knn, n_clusters)
    save_run_config(run["cfg"], out / "config.yaml", calibrated=run["calibration"] is not None)
    if run["name"]:  # the chosen candidate's calibration, curves and histogram at the top of the run folder
        for fname in ("calibration.json", "similarity_histogram.png"):
            if (run["folder"] / fname).exists():
                (out / fname).write_bytes((run["folder"] / fname).read_bytes())
    if run["cfg"].cluster_fit == "kmeans":
        log.info("cluster probe refitted by spherical k-means on the trained code (--cluster-fit kmeans)")
    path = model.save(out / "checkpoint.pt")
    plot_training_curves(run["folder"] / "logs" / "metrics.csv", out / "training_curves.png")
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
    log.info("--select %s: %s of %d candidates (%s %.3f)", mode, chosen, len(rows), metric, rows[chosen][metric])
    run, _, state = candidates[chosen]
    return run, model_from(run, state)


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
    from .viz import histogram_png

    values = {f"{'KNN' if k == 'knn' else 'random'} pairs": v for k, v in samples.items() if len(v)}
    if values:
        histogram_png(values, path, title=f"code similarity S, selected checkpoint ({chosen})",
                      xlabel="cosine similarity of codes")


def plot_training_curves(csv_path: Path, png_path: Path) -> None:
    """Loss terms and mean KNN / random code similarity against step, from Lightning's CSV log."""
    import csv

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not Path(csv_path).exists():
        return
    rows = list(csv.DictReader(open(csv_path)))
    if not rows:
        return
    keys = [k for k in rows[0] if k.startswith(("loss/", "sim/"))]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.4))
    for k in keys:
        pts = [(int(r["step"]), float(r[k])) for r in rows if r.get(k) not in (None, "")]
        if pts:
            ax = axes[1] if k.startswith("sim/") else axes[0]
            ax.plot(*zip(*pts), label=k)
    axes[0].set_title("losses")
    axes[1].set_title("mean code similarity (A.11: KNN ~0.3, random ~0)")
    for ax in axes:
        ax.set_xlabel("step")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(png_path, dpi=100)
    plt.close(fig)


def config_for_checkpoint(model: SegmentationModel, args=None) -> Config:
    """The checkpoint's own config with explicit command-line values on top."""
    from dataclasses import fields

    from .config import make_config

    values = {k: v for k, v in (model.config or {}).items() if k in {f.name for f in fields(Config)}}
    if args is not None:
        from .config import load_yaml

        from .config import explicit_values

        if getattr(args, "config", None):
            values.update(load_yaml(args.config))
        values.update(explicit_values(args))
    return make_config(values)


# --------------------------------------------------------------------------- segment
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")


def expand_inputs(inputs) -> list:
    """Files, folders (their images, sorted; hidden files such as ``._x.jpg`` skipped) and
    glob patterns -> a list of image paths, each file once."""
    import glob

    from .data.io import list_images

    paths = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            found = list_images(p)
            if not found:
                raise StegosegError(f"{p} holds no images ({', '.join(IMAGE_SUFFIXES)})")
            paths.extend(found)
        elif p.is_file():
            paths.append(p)
        elif p.is_symlink():
            raise StegosegError(f"{p} is a link to a missing file: restore its target or leave it out")
        else:
            matches = sorted(Path(m) for m in glob.glob(str(item))
                             if Path(m).suffix.lower() in IMAGE_SUFFIXES and not Path(m).name.startswith(".")
                             and Path(m).is_file())
            if not matches:
                raise StegosegError(f"{item}: no such file, folder, or glob match")
            paths.extend(matches)
    unique, seen = [], set()
    for p in paths:
        key = p.resolve()
        if key in seen:
            log.warning("%s was given more than once: segmenting it once", p)
            continue
        seen.add(key)
        unique.append(p)
    return unique


def output_stems(paths: list) -> list:
    """A distinct output name per input: the file's stem; where stems clash (``a.jpg`` and
    ``a.png``, or ``x/a.jpg`` and ``y/a.jpg``) the suffix and then parent folder names are
    added until they differ (compared case-insensitively, as some file systems do)."""
    def name(p: Path, level: int) -> str:
        if level == 0:
            return p.stem
        base = f"{p.stem}_{p.suffix.lstrip('.')}" if p.suffix else p.stem
        parents = [q.name for q in p.resolve().parents if q.name][: level - 1]
        return "_".join([*reversed(parents), base])

    levels = [0] * len(paths)
    for _ in range(64):
        names = [name(p, lv) for p, lv in zip(paths, levels)]
        groups: dict = {}
        for i, n in enumerate(names):
            groups.setdefault(n.lower(), []).append(i)
        clashes = [idx for idx in groups.values() if len(idx) > 1]
        if not clashes:
            return names
        for idx in clashes:
            for i in idx:
                levels[i] += 1
    raise StegosegError(f"cannot give distinct output names to {paths[0]} and the inputs named like it")


def _atomic_write_png(save, path: Path) -> None:
    """Write through a temporary file and rename, so that an existing file (even one hard-linked
    to an input image) is replaced as a directory entry, never rewritten in place."""
    import tempfile

    fd, tmp = tempfile.mkstemp(prefix="." + path.stem + ".", suffix=".png", dir=path.parent)
    os.close(fd)
    try:
        save(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


# inputs larger than this many ViT tokens get a warning when segmented at their original size
LARGE_TOKEN_COUNT = 16384


def warn_large_images(paths, patch: int) -> list:
    """Warn (before any work) about images that, at their original size, give the network
    more than LARGE_TOKEN_COUNT tokens; returns those paths."""
    from PIL import Image

    large = []
    for p in paths:
        with Image.open(p) as im:
            w, h = im.size
        tokens = -(-w // patch) * -(-h // patch)
        if tokens > LARGE_TOKEN_COUNT:
            large.append(p)
            log.warning("%s is %dx%d: at its original size (--resolution 0) the network sees %d tokens; attention "
                        "cost grows with their square, so this is slow and memory-hungry: pass --resolution 320 "
                        "(the default) unless you need it", p, w, h, tokens)
    return large


def segment_images(
    model: SegmentationModel,
    inputs,
    out_dir,
    crf: bool = False,
    flip: bool = True,
    resolution: Optional[int] = 320,
    probe: str = "cluster",
    overwrite: bool = False,
    progress: bool = True,
    num_workers: int = 2,
    batch_size: int = 8,
    crf_workers: int = 2,
    crf_params=None,
) -> list:
    """Write ``<name>.png`` (palette PNG of labels) and ``<name>_overlay.png`` per input image.

    Every input gets its own output names (see :func:`output_stems`). Never writes over an
    input image (also not through a hard link); refuses existing outputs unless ``overwrite``.
    Returns the label-map paths.
    """
    from PIL import Image
    from tqdm.auto import tqdm

    from .crf import crf_pool
    from .preflight import check_writable
    from .viz import make_palette, overlay, save_label_png

    if probe == "linear" and model.linear_probe is None:
        raise StegosegError("--probe linear: this checkpoint has no linear probe (trained without labels); use --probe cluster")
    paths = expand_inputs(inputs)
    out_dir = check_writable(out_dir)
    input_files = {(st.st_dev, st.st_ino) for st in (os.stat(p) for p in paths)}
    targets = []
    for p, stem in zip(paths, output_stems(paths)):
        label_path, overlay_path = out_dir / f"{stem}.png", out_dir / f"{stem}_overlay.png"
        for t in (label_path, overlay_path):
            if t.exists():
                st = os.stat(t)
                if (st.st_dev, st.st_ino) in input_files:
                    raise StegosegError(f"output {t} is an input image (or a link to one): choose another --out")
                if not overwrite:
                    raise StegosegError(f"{t} exists: choose another --out or pass --overwrite")
        targets.append((label_path, overlay_path))
    names = [t.name.lower() for pair in targets for t in pair]
    if len(set(names)) != len(names):
        clash = next(n for n in names if names.count(n) > 1)
        raise StegosegError(f"two inputs would both write {out_dir / clash}: rename one, or segment them into "
                            "different --out folders")
    if not resolution:
        warn_large_images(paths, model.backbone.patch_size)
    out_dir.mkdir(parents=True, exist_ok=True)
    n_colours = max(model.n_clusters, model.n_classes or 0)
    palette = make_palette(n_colours)
    loader = torch.utils.data.DataLoader(
        _ImageFiles(paths), batch_size=None, num_workers=min(num_workers, len(paths)), shuffle=False
    )
    written = []
    bar = tqdm(total=len(paths), desc="segment", disable=not progress, unit="img")

    def flush(buffer):
        images = [im for im, _ in buffer]
        for (image, (label_path, overlay_path)), labels in zip(
            buffer, model.segment_batch(images, crf=crf, flip=flip, resolution=resolution, probe=probe, crf_pool=pool,
                                        crf_params=crf_params)
        ):
            _atomic_write_png(lambda tmp: save_label_png(labels, tmp, palette), label_path)
            _atomic_write_png(lambda tmp: Image.fromarray(overlay(np.asarray(image), labels, palette)).save(tmp, format="PNG"),
                              overlay_path)
            written.append(label_path)
        bar.update(len(buffer))

    pool = crf_pool(crf_workers) if crf and crf_workers > 1 else None
    try:
        buffer = []
        for image, target in zip(loader, targets):
            buffer.append((image, target))
            if len(buffer) == batch_size:
                flush(buffer)
                buffer = []
        if buffer:
            flush(buffer)
    finally:
        bar.close()
        if pool is not None:
            pool.shutdown()
    return written


class _ImageFiles(torch.utils.data.Dataset):
    """Decodes images in loader workers (parallel to the network)."""

    def __init__(self, paths):
        self.paths = list(paths)

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        from .data.io import load_image

        return load_image(self.paths[i])


# --------------------------------------------------------------------------- main job
def write_report(out: Path, title: str, results: dict, cfg: Config, notes: list) -> Path:
    """A short markdown report: metrics table, similarity histogram, training curves, predictions."""
    out = Path(out)
    lines = [f"# {title}", ""]
    lines += [f"> {n}" for n in notes] + ([""] if notes else [])
    lines += [
        f"Dataset `{cfg.dataset}` ({cfg.data_root or 'generated'}), train split `{cfg.train_split}`, "
        f"evaluated on `{cfg.val_split}`; backbone `{cfg.backbone}` "
        f"({'random init' if not cfg.pretrained and not cfg.weights else cfg.weights or 'pretrained'}); "
        f"{cfg.steps} steps, batch {cfg.batch_size}, K = {cfg.dim}; CRF {'on' if cfg.crf else 'off'}.",
        "",
        "| method | cluster acc (strict) | cluster mIoU (strict) | cluster acc (parity) | cluster mIoU (parity) | linear acc | linear mIoU |",
        "|---|---|---|---|---|---|---|",
    ]

    def fmt(v):
        return "-" if v is None else f"{v:.1f}"

    for name, res in results.items():
        s = summary_rows(res)
        lines.append(
            f"| {name} | {fmt(s.get('cluster_strict_acc'))} | {fmt(s.get('cluster_strict_miou'))} | "
            f"{fmt(s.get('cluster_parity_acc'))} | {fmt(s.get('cluster_parity_miou'))} | "
            f"{fmt(s.get('linear_acc'))} | {fmt(s.get('linear_miou'))} |"
        )
    lines.append("")
    lines += calibration_report_lines(out / "train")
    for caption, rel in (
        ("Code similarity histogram (paper A.11: healthy runs are bimodal)", "train/similarity_histogram.png"),
        ("Code similarity histogram of the selected checkpoint", "train/selected_similarity_histogram.png"),
        ("Checkpoint selection criterion", "train/selection.png"),
        ("Training curves", "train/training_curves.png"),
        ("STEGO predictions (image | ground truth | cluster probe | linear probe)", "eval/predictions.png"),
        ("Raw-feature baseline predictions", "baseline/predictions.png"),
        ("Cluster-probe confusion (rows: ground truth, normalised)", "eval/confusion_cluster.png"),
    ):
        if (out / rel).exists():
            lines += [f"## {caption}", "", f"![{caption}]({rel})", ""]
    lines += ["Resolved config: `config.yaml`. Metrics: `summary.json`, `eval/metrics.json`.", ""]
    path = out / "report.md"
    path.write_text("\n".join(lines))
    return path


def calibration_report_lines(train_dir: Path) -> list:
    """Markdown: the shifts the run used (and how --shifts auto chose them), and the
    checkpoint --select picked with every candidate's criterion."""
    lines = []
    cal_path, sel_path, cfg_path = train_dir / "calibration.json", train_dir / "selection.json", train_dir / "config.yaml"
    if cal_path.exists():
        cal = json.loads(cal_path.read_text())
        lines += [
            f"## Loss shifts (`--shifts auto`, chosen without labels; spatial centring "
            f"{'on' if cal['pointwise'] else 'off'} in the selected run)", "",
            "Each shift b sits at the quantile of its pair type's feature correspondence F that leaves above it "
            "the fraction of pairs a k-means partition of the features puts in one cluster "
            "(see docs/label_free.md).", "",
            "| pair type | same-cluster rate | mean F | chosen shift | published CocoStuff shift |",
            "|---|---|---|---|---|",
        ]
        published = PRESETS["cocostuff27"]
        for t, name in (("self", "within image"), ("knn", "nearest neighbour"), ("rand", "random image")):
            lines.append(f"| {name} | {cal['same_rate'][t]:.3f} | {cal['feature_similarity'][t]['mean']:.3f} | "
                         f"{cal['b_' + t]:.3f} | {published['b_' + t]:.2f} |")
        lines.append("")
    elif cfg_path.exists():
        import yaml

        c = yaml.safe_load(cfg_path.read_text())
        if c and "b_knn" in c:
            lines += [f"Loss shifts as given (`--shifts fixed`): b_self {c['b_self']}, b_knn {c['b_knn']}, "
                      f"b_rand {c['b_rand']}.", ""]
    if sel_path.exists():
        sel = json.loads(sel_path.read_text())
        lines += [f"## Checkpoint selection (`--select {sel['mode']}`): {sel['chosen']}", ""]
        rows = sel["candidates"]
        if len(rows) > 1:
            has_val = any("val_cluster_miou" in r for r in rows.values())
            lines += ["| candidate (run/step) | label-free score | mean S, KNN pairs | mean S, random pairs | clusters used |"
                      + (" val cluster mIoU |" if has_val else ""),
                      "|---|---|---|---|---|" + ("---|" if has_val else "")]
            for key, r in rows.items():
                mark = " **(chosen)**" if key == sel["chosen"] else ""
                lines.append(f"| {key}{mark} | {r['label_free_score']:.3f} | {r['mean_code_similarity']['knn']:.3f} | "
                             f"{r['mean_code_similarity']['rand']:.3f} | {r['clusters_used']} |"
                             + (f" {r.get('val_cluster_miou', float('nan')):.1f} |" if has_val else ""))
            lines.append("")
    return lines


def run_all(cfg: Config, out, resume: bool = False, baseline: bool = True, n_segment: int = 8) -> Optional[dict]:
    """The main job: prepare -> train -> evaluate -> segment (+ raw-feature baseline) -> report.md."""
    out = Path(out)
    cfg = resolve_run_paths(cfg, out)
    cfg.save(out / "config.yaml")
    notes = []
    if not cfg.pretrained and not cfg.weights:
        notes.append(RANDOM_BACKBONE_WARNING.format(name=cfg.backbone))
    ckpt = train_stego(cfg, out / "train", resume=resume)
    if ckpt is None:  # a non-zero DDP rank: the main process does the rest
        return None
    # the run's config with what training resolved (calibrated shifts, selection mode)
    (out / "config.yaml").write_text((out / "train" / "config.yaml").read_text())
    model = load_model_for(ckpt, cfg)
    results = {"STEGO": evaluate_checkpoint_model(cfg, model, out / "eval")}
    if baseline:
        base = fit_feature_baseline(cfg, out / "baseline", backbone=model.backbone)
        base.save(out / "baseline" / "checkpoint.pt")
        results["raw features (k-means / linear)"] = evaluate_checkpoint_model(cfg, base, out / "baseline")
    val = build_split(cfg, cfg.val_split, out)
    paths = [p for p in getattr(val, "image_paths", [])][:n_segment]
    if paths:
        segment_images(model, paths, out / "segment", crf=cfg.crf, resolution=cfg.eval_resolution,
                       overwrite=True, progress=cfg.progress)
    summary = {name: summary_rows(r) for name, r in results.items()}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    write_report(out, "stegoseg run", results, cfg, notes)
    return summary


def load_model_for(checkpoint, cfg: Config) -> SegmentationModel:
    from .model import load

    return load(checkpoint, device=resolve_device(cfg.device))


def resolve_run_paths(cfg: Config, out: Path) -> Config:
    """Create ``out`` and pin the paths a multi-stage run shares: the generated data folder
    (dataset=synthetic without a root) and the feature cache (default ``out/cache``)."""
    out.mkdir(parents=True, exist_ok=True)
    if cfg.dataset == "synthetic" and not cfg.data_root:
        cfg = replace(cfg, data_root=data_root(cfg, out))
    if cfg.cache_dir is None:
        cfg = replace(cfg, cache_dir=str(out / "cache"))
    return cfg
