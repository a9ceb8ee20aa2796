"""Building blocks every method shares: datasets and backbones from a config, the checks
before work, the feature cache, probe fitting and evaluation of a model.
"""
from __future__ import annotations

import functools
import json
import logging
import shutil
import time
from pathlib import Path
from typing import Optional

import torch

from stegoseg.backbones.presets import get_backbone_preset
from stegoseg.config.base import load_yaml
from stegoseg.config.stego import (
    Config,
    apply_protocol,
    explicit_values,
    make_config,
    replace,
    selection_mode,
)
from stegoseg.data import build_dataset
from stegoseg.data.registry import parse_class_names
from stegoseg.data.synthetic import make_synthetic_dataset
from stegoseg.errors import StegosegError
from stegoseg.evaluation.crf import crf_params_from
from stegoseg.evaluation.protocol import EvalConfig, evaluate_model
from stegoseg.features.cache import FeatureCache, extract_features
from stegoseg.features.cache import config_neighbors
from stegoseg.features.projection import projection_digest
from stegoseg.model import SegmentationModel, build_backbone, load
from stegoseg.nn.kmeans import spherical_kmeans
from stegoseg.nn.probes import set_centroids, train_linear_probe
from stegoseg.preflight import (
    check_accelerator,
    check_images,
    check_label_range,
    check_writable,
    label_values,
)

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

        root = Path(cfg.data_root) if cfg.data_root else Path(out or ".") / "synthetic-data"
        if not (root / "imgs").exists():
            make_synthetic_dataset(root)
        return str(root)
    if not cfg.data_root:
        raise StegosegError("--data-root is required (the dataset folder), or use --dataset synthetic")
    return cfg.data_root


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


def build_backbone_from_config(cfg: Config, out=None):
    """The configured backbone. A randomly initialised one (``--no-pretrained``, no
    ``--weights``) is drawn from ``cfg.seed``: the same weights in every command and process
    with that seed (so ``run``, ``train``, ``baseline`` and ``datus`` share it); the caller's
    RNG state is left untouched. With ``--pca-dim`` the backbone projects its features
    (:func:`project_backbone`; ``out``: the run folder, where the default cache root is)."""
    spec = backbone_spec(cfg)
    random_init = not cfg.pretrained and not cfg.weights
    with torch.random.fork_rng(devices=[]):
        if random_init:
            torch.manual_seed(cfg.seed)
        backbone = build_backbone(spec)  # the same spec a checkpoint records and `load` rebuilds from
    if random_init:
        log.warning(RANDOM_BACKBONE_WARNING.format(name=cfg.backbone))
    if cfg.pca_dim:
        if out is None:
            raise StegosegError("this command reads the backbone's own features: drop --pca-dim")
        project_backbone(cfg, Path(out), backbone)
    return backbone, spec


#: the seed of the crops and cells a --pca-dim projection is fitted on
PROJECTION_SEED = 0


def project_backbone(cfg: Config, out: Path, backbone) -> None:
    """``--pca-dim D``: give ``backbone`` the projection fitted on ``--pca-sample`` crops of the
    training split (:mod:`stegoseg.features.projection`; fitted once, stored in the cache root).
    Before the fit, a new cache of D channels is checked against the free disk. The sample is
    drawn with a fixed seed (:data:`PROJECTION_SEED`), not ``--seed``: runs that differ only in
    their seed share one projection and one cache."""
    from stegoseg.features.cache import CropView, backbone_weights_id, cache_lock, check_cache_space
    from stegoseg.features.projection import PATCHES_PER_CROP, load_or_fit, projection_file, sample_patch_features

    if cfg.pca_dim >= backbone.embed_dim:
        raise StegosegError(f"--pca-dim {cfg.pca_dim} must be below the {backbone.embed_dim} channels of "
                            f"{backbone.name}: pick fewer, or drop --pca-dim")
    train = build_split(cfg, cfg.train_split, out)
    view = CropView(train, cfg.resolution, cfg.five_crop, cfg.train_resample, jpeg=cfg.crop_jpeg)
    key = {"backbone": backbone.name, "weights": backbone_weights_id(backbone),
           "pos_embed": getattr(backbone, "pos_embed_mode", "timm"), "dataset": cfg.dataset,
           "root": str(Path(str(train.root)).resolve()), "split": cfg.train_split, "resolution": cfg.resolution,
           "five_crop": cfg.five_crop, "resample": cfg.train_resample, "crop_jpeg": cfg.crop_jpeg,
           "dim": cfg.pca_dim, "sample": min(cfg.pca_sample, len(view)), "seed": PROJECTION_SEED,
           "patches": PATCHES_PER_CROP}
    root = cache_root(cfg, out)
    path = projection_file(root, key)
    if not path.is_file():
        cells = (cfg.resolution // backbone.patch_size) ** 2
        check_cache_space(root, len(view), cfg.pca_dim, cells, cfg.resolution, train.has_labels,
                          cfg.five_crop)
    device, before = resolve_device(cfg.device), backbone._mean_t.device
    with cache_lock(path):  # processes sharing the cache root fit once; the others read the file
        state = load_or_fit(path, key, lambda: sample_patch_features(backbone.to(device), view, key["sample"],
                                                                     PROJECTION_SEED, cfg.extract_batch_size, device))
    backbone.to(before).project_onto(state["mean"], state["weight"])
    backbone.projection_info = {"dim": cfg.pca_dim, "energy_kept": state["energy_kept"], "file": str(path)}


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
    """:func:`_check_before_work`; a refusal leaves no cache folder it created (the label scans)."""
    root = cache_root(cfg, out)
    existed = root.exists()
    try:
        return _check_before_work(cfg, out, evaluate, train)
    except StegosegError:
        if not existed and root.exists():
            shutil.rmtree(root, ignore_errors=True)
        raise


def _check_before_work(cfg: Config, out: Path, evaluate: bool = False, train: bool = True) -> Optional[int]:
    """Everything that can be checked before the long work starts, so that bad input ends
    in one line at once instead of after preparing and training: the output folder is
    writable, the accelerator exists, the splits exist, and every label value of the
    splits the command reads is a class id (the class count comes from the config, the
    dataset's class list, or the training labels). Returns the number of classes (None
    for an unlabelled training split without --n-classes when ``train`` is False)."""

    check_writable(out)
    check_accelerator(cfg.accelerator, cfg.device)
    if cfg.ray_address:
        from stegoseg.distributed.engine import RayOptions, connect

        connect(RayOptions.from_config(cfg))
    get_backbone_preset(cfg.backbone)  # an unknown name fails here, with the list of names
    if cfg.weights and not Path(cfg.weights).is_file():
        raise StegosegError(f"--weights {cfg.weights}: file not found")
    check_token_budget(cfg)
    scan_dir = cache_root(cfg, out) / ".label-scans"
    n_classes, names = None, None
    train_split = build_split(cfg, cfg.train_split, out)
    # five-crop: each crop is half the image; the crop's minor side is resized to --resolution
    check_images(train_split, min_side=2 if cfg.five_crop else 1,
                 what="five-crop needs at least 2 pixels per side (pass --no-five-crop)" if cfg.five_crop else "")
    if not cfg.five_crop and len(train_split) < 2 and cfg.method == "stego":
        raise StegosegError(f"the {cfg.train_split} split has {len(train_split)} image: STEGO's nearest neighbours need "
                            "at least 2 training crops; add images, or leave five-crop on (5 crops per image)")
    if train or (train_split.has_labels and (cfg.n_classes is not None or train_split.n_classes)):
        n_classes = n_classes_for(cfg, train_split)
        if train_split.has_labels:
            values = label_values(train_split, scan_dir, cfg.progress)
            check_label_range(values, n_classes, cfg.train_split, class_count_source(cfg, train_split))
            names = train_split.class_names
    if evaluate or (train and selection_mode(cfg) == "val-miou"):
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


def check_token_budget(cfg: Config) -> None:
    """A ViT's cost grows with the square of its tokens: the training crops and the evaluation
    crops must stay within :data:`~stegoseg.segment.MAX_TOKENS` tokens."""
    from stegoseg.segment import MAX_TOKENS

    patch = get_backbone_preset(cfg.backbone).patch_size
    for option, side in (("--resolution", cfg.resolution), ("--eval-resolution", cfg.eval_resolution)):
        tokens = (-(-int(side) // patch)) ** 2
        if tokens > MAX_TOKENS:
            raise StegosegError(f"{option} {side} gives {tokens:,} tokens of patch {patch} per crop, more than the "
                                f"{MAX_TOKENS:,} one image may use: pass a smaller {option}")


def check_eval_labels(cfg: Config, model: SegmentationModel, out: Path, split: Optional[str] = None) -> None:
    """``evaluate``: the split exists and its label values are ids of the checkpoint's classes."""

    name = split or cfg.val_split
    val = build_split(cfg, name, out, class_names=model.class_names)
    if val.has_labels:
        count = model.n_classes or val.n_classes
        source = "the checkpoint's classes" if model.n_classes else class_count_source(cfg, val)
        check_label_range(label_values(val, None, cfg.progress), count, name, source)


def ray_extraction(cfg: Config, out: Path):
    """The Ray runner of the cache's missing shards with ``--ray-address``, else None (this process)."""
    from stegoseg.distributed.engine import RayOptions

    options = RayOptions.from_config(cfg)
    if options is None:
        return None
    from stegoseg.distributed.stages import extraction_runner

    return extraction_runner(functools.partial(extraction_inputs, cfg.to_dict(), str(out)), options)


def extraction_inputs(config: dict, out: str, split: str) -> tuple:
    """What a Ray extraction worker builds from the run's config: (backbone, the split's
    dataset, device, extraction batch size)."""
    cfg = Config(**config)
    backbone, _ = build_backbone_from_config(cfg, out)
    return backbone, build_split(cfg, split, Path(out)), resolve_device(cfg.device), cfg.extract_batch_size


def cache_root(cfg: Config, out: Path) -> Path:
    return Path(cfg.cache_dir) if cfg.cache_dir else Path(out) / "cache"


def prepare(cfg: Config, out, backbone=None, neighbors: bool = True) -> FeatureCache:
    """Five-crop (optional), extract and cache training features, then (``neighbors``) global descriptors and KNN."""
    out = Path(out)
    device = resolve_device(cfg.device)
    train = build_split(cfg, cfg.train_split, out)
    if backbone is None:
        backbone, _ = build_backbone_from_config(cfg, out)
    check_run_inputs(out, train, backbone)
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
        shard_items=cfg.cache_shard_items,
        run_shards=ray_extraction(cfg, out),
    )
    if not neighbors:
        return cache
    t0 = time.perf_counter()
    config_neighbors(cfg, cache, device=device)
    log.info("nearest neighbours ready for %d items in %.1fs (%s)", cache.n, time.perf_counter() - t0, cache.path)
    return cache


#: Beside a run's Lightning checkpoints: the data and backbone weights they were trained on.
RUN_INPUTS = "run_inputs.json"


def check_run_inputs(out: Path, dataset, backbone) -> None:
    """Before any work: a run folder that holds training checkpoints continues only on the same
    files (their fingerprint: names, sizes, times) and the same backbone weights (their hash);
    a moved folder or an offline copy of the same weights is fine. A fresh run records them."""
    from stegoseg.features.cache import backbone_weights_id, dataset_fingerprint
    from stegoseg.preflight import atomic_write

    current = {"data_root": str(getattr(dataset, "root", "")), "images": len(dataset),
               "files": dataset_fingerprint(dataset), "backbone": backbone.name,
               "weights": backbone_weights_id(backbone),
               "weights_source": str(getattr(backbone, "weights_source", "")),
               "projection": projection_digest(backbone), "channels": backbone.embed_dim}
    path = Path(out) / RUN_INPUTS
    started = any((Path(out) / "lightning").glob("*.ckpt")) or (Path(out) / "candidates").exists()
    if path.exists() and started:
        old = json.loads(path.read_text())
        if old.get("files") != current["files"]:
            raise StegosegError(f"the run in {out} trained on {old.get('images')} images of {old.get('data_root')}; "
                                f"--data-root {current['data_root']} now gives {current['images']} images with other "
                                "files: resume it on the same data, or pass --overwrite to start a new run")
        if old.get("weights") != current["weights"]:
            raise StegosegError(f"the run in {out} trained on the backbone weights {old.get('weights_source')}; these "
                                f"are other weights ({current['weights_source']}): resume it with the same --weights, "
                                "or pass --overwrite to start a new run")
        if old.get("projection") != current["projection"]:
            raise StegosegError(f"the run in {out} trained on features {_projection_words(old)}; these are "
                                f"{_projection_words(current)}: resume it with the same --pca-dim and --pca-sample, "
                                "or pass --overwrite to start a new run")
        return
    Path(out).mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(current, indent=1)))


def _projection_words(inputs: dict) -> str:
    if inputs.get("projection") is None:
        return "with all the backbone's channels"
    return f"projected onto {inputs.get('channels')} channels (projection {inputs['projection']})"


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
        crf_params=crf_params_from(cfg.to_dict()),
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


def refit_cluster_probe(cfg: Config, cache: FeatureCache, model: SegmentationModel) -> None:
    """``--cluster-fit kmeans``: the model's cluster probe refitted by :func:`fit_centroids` on its
    head's code of the cached training crops (on ``cfg.device``; the head goes back to the CPU)."""
    device = resolve_device(cfg.device)
    head = model.head.to(device).eval()
    set_centroids(model.cluster_probe, fit_centroids(cfg, cache, model.n_clusters, head=head, device=device))
    head.cpu()


# fit_centroids keeps the code of the whole cache in memory up to this size
CODE_IN_MEMORY_BYTES = 2 * 1024**3


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
    parts = ray_evaluation(cfg, model, out, split or cfg.val_split)
    result = evaluate_model(model, val, eval_config(cfg), out_dir=out, progress=cfg.progress, parts=parts)
    result["backbone"] = {
        "name": model.backbone_spec.get("name"),
        "weights_source": getattr(model.backbone, "weights_source", None),
        # True: --replace-backbone-weights ran the model on weights other than its own backbone's
        "weights_replaced": bool(getattr(model.backbone, "weights_replaced", False)),
    }
    result["method"] = model.method
    (out / "metrics.json").write_text(json.dumps(result, indent=2, default=float))
    if parts is not None:
        shutil.rmtree(out / EVAL_PARTS, ignore_errors=True)  # the metrics are written: the counts are not needed
    return result


#: Where evaluation on Ray keeps the counts of finished runs of images until the metrics are written.
EVAL_PARTS = ".eval-parts"


def ray_evaluation(cfg: Config, model: SegmentationModel, out: Path, split: str):
    """``parts`` for :func:`~stegoseg.evaluation.protocol.evaluate_model` with ``--ray-address``
    (the split's images on Ray actors, each with a copy of ``model``), else None (this process)."""
    from stegoseg.distributed.engine import RayOptions

    options = RayOptions.from_config(cfg)
    if options is None:
        return None
    from stegoseg.distributed.stages import evaluation_parts

    from stegoseg.features.cache import dataset_fingerprint

    build = functools.partial(split_dataset, cfg.to_dict(), str(out), split, model.class_names)
    data = build()
    data_key = f"{cfg.dataset}:{data.root}:{split}:{dataset_fingerprint(data)}"
    return evaluation_parts(options, model, build, eval_config(cfg), cfg.device, Path(out) / EVAL_PARTS, cfg.progress,
                            data_key=data_key)


def split_dataset(config: dict, out: str, split: str, class_names=None):
    """A split's dataset built from a run's config (in a Ray worker)."""
    return build_split(Config(**config), split, Path(out), class_names=class_names)


def config_for_checkpoint(model: SegmentationModel, args=None) -> Config:
    """The checkpoint's own config with explicit command-line values on top."""
    from dataclasses import fields


    # (the Ray options say where the checkpoint's run ran, not what the model is: only from this command line)
    values = {k: v for k, v in (model.config or {}).items()
              if k in {f.name for f in fields(Config)} and not k.startswith("ray_")}
    if args is not None:

        if getattr(args, "config", None):
            values.update(load_yaml(args.config))
        command_line = explicit_values(args)
        values.update(command_line)
        if "protocol" in command_line:  # e.g. `evaluate --protocol clean` on a reference-mode checkpoint
            values = apply_protocol(values, command_line)
    return make_config(values)


def load_model_for(checkpoint, cfg: Config) -> SegmentationModel:

    return load(checkpoint, device=resolve_device(cfg.device))


def with_default_val_split(cfg: Config, given: dict) -> Config:
    """A label-free folder with ``imgs/<train>/`` and no ``imgs/<val>/`` (and ``--val-split`` not
    given): the report uses the training images, said once, instead of an error. With labels
    the error stays: metrics on the training images must be asked for (``--val-split train``)."""
    if cfg.dataset != "directory" or "val_split" in given or not cfg.data_root:
        return cfg
    images = Path(cfg.data_root) / "imgs"
    labelled = (Path(cfg.data_root) / "labels" / cfg.train_split).is_dir()
    if not labelled and (images / cfg.train_split).is_dir() and not (images / cfg.val_split).exists():
        log.warning("%s has no %s split: the evaluation and report use the %s images (pass --val-split to choose)",
                    cfg.data_root, cfg.val_split, cfg.train_split)
        return replace(cfg, val_split=cfg.train_split)
    return cfg


def resolve_run_paths(cfg: Config, out: Path) -> Config:
    """Create ``out`` and pin the paths a multi-stage run shares: the generated data folder
    (dataset=synthetic without a root) and the feature cache (default ``out/cache``)."""
    out.mkdir(parents=True, exist_ok=True)
    if cfg.dataset == "synthetic" and not cfg.data_root:
        cfg = replace(cfg, data_root=data_root(cfg, out))
    if cfg.cache_dir is None:
        cfg = replace(cfg, cache_dir=str(out / "cache"))
    return cfg
