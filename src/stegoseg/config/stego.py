"""The run configuration (every option of every command), the paper's presets (YAML files in
``presets/``) and command-line options. Resolution order (later wins): dataclass defaults <
``--preset`` < ``--config FILE.yaml`` < explicit command-line options.
"""
from __future__ import annotations

import argparse
import dataclasses
import typing
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Optional

from stegoseg.config.base import (
    EXPLICIT_NONE,
    ConfigBase,
    base_type,
    load_yaml,
    parse_optional,
    raise_first_failure,
)
from stegoseg.distributed.engine import option_problems
from stegoseg.errors import StegosegError


@dataclass
class Config(ConfigBase):
    # ---- data
    dataset: str = "directory"  # directory | cocostuff27 | cityscapes27 | potsdam3 | suim | voc2012 | synthetic
    data_root: Optional[str] = None  # dataset folder; None with dataset=synthetic generates images
    train_split: str = "train"
    val_split: str = "val"
    ignore_index: int = 255  # label value meaning "unlabelled" in a directory dataset
    class_names: Optional[str] = None  # directory dataset: comma-separated names, or a text file with one per line
    # ---- backbone
    backbone: str = "dino_vits8"
    weights: Optional[str] = None  # local weights file (offline use)
    pretrained: bool = True  # False: random initialisation (numbers not meaningful)
    tiny: bool = False  # tiny architecture (tests)
    # ---- prepare: crops, feature cache, nearest neighbours
    resolution: int = 224  # training crops: minor side resized to this, centre crop
    five_crop: bool = True
    n_neighbors: int = 30
    knn_backend: str = "auto"  # auto | faiss | torch
    cache_dir: Optional[str] = None  # default: <out>/cache
    extract_batch_size: int = 32
    num_workers: int = 2
    cache_shard_items: Optional[int] = None  # items per cache shard (default: about 256 MB of features)
    knn_index: str = "auto"  # auto | exact | hnsw: FAISS index of the nearest-neighbour search
    pca_dim: Optional[int] = None  # project the features onto this many directions fitted on a sample (smaller cache)
    pca_sample: int = 256  # training crops the --pca-dim projection is fitted on
    # ---- method
    method: str = "stego"  # stego | cause-mlp | cause-tr | primaps | stego+primaps | cause-mlp+primaps | cause-tr+primaps
    init_from: Optional[str] = None  # --method primaps: boost this trained stegoseg checkpoint (its head's code)
    # ---- head and correspondence loss
    dim: int = 70  # the code's channels (CAUSE's published 90 is its default with --method cause-*)
    n_classes: Optional[int] = None  # needed for label-free data; else from the dataset
    extra_clusters: int = 0
    feature_dropout: float = 0.1
    n_samples: int = 11  # points per side: 11 x 11 = 121
    shifts: str = "auto"  # auto: calibrate b_self/b_knn/b_rand from the feature cache (label-free) | fixed: use them as given
    calibration_batches: int = 40  # batches of sampled pairs the calibration reads
    auto_centring: str = "both"  # with --shifts auto: train with spatial centring of F (on), without (off), or both and --select picks
    w_self: float = 0.10
    w_knn: float = 1.00
    w_rand: float = 0.15
    b_self: float = 0.12
    b_knn: float = 0.20
    b_rand: float = 1.00
    n_random: int = 5
    knn_topk: int = 7
    pointwise: bool = True
    zero_clamp: bool = True
    stabilize: bool = False
    w_potts: float = 0.0  # optional CRF-kernel Potts term (STEGO A.9); 0 = off
    b_potts: float = 0.3  # its shift, on the kernel normalised to [0, 1]
    # ---- CAUSE (--method cause-mlp / cause-tr; docs/cause.md)
    cause_concepts: int = 2048  # concepts of the modularity clusterbook (stage 1)
    cause_book_steps: Optional[int] = None  # clusterbook steps; None: one pass over the training cache, at least 200
    cause_book_temperature: float = 0.1  # tau of the modularity objective (clusterbook and cluster probe)
    cause_projection_dim: int = 2048  # width of the contrastive projection of the code
    cause_temperature: float = 0.07  # temperature of the contrastive loss
    cause_pos_threshold: float = 0.3  # concept cosine above which a pair is a positive
    cause_neg_threshold: float = 0.1  # concept cosine below which a pair is a negative
    cause_bank_size: int = 100  # teacher keys kept per concept
    cause_ema: float = 0.99  # decay of the EMA teacher
    cause_grid: int = 4  # training reads one random token per cause_grid x cause_grid cell (1: every token)
    cause_clip: float = 2.0  # gradient-norm clip of the head (reference: 2 COCO-Stuff, 1 Cityscapes)
    cause_weight_decay: float = 1e-4  # Adam weight decay of the head and linear probe (reference: 0 on Cityscapes)
    cause_probe_steps: int = 1000  # stage 3: cluster probe fitted by the modularity objective on the frozen code
    # ---- PriMaPs-EM (--method primaps / X+primaps; docs/primaps.md)
    primaps_threshold: float = 0.4  # a mask takes the free features with cosine >= this x the largest one
    primaps_coverage: float = 0.95  # masks are proposed until this fraction of the feature grid is taken
    primaps_steps: Optional[int] = None  # EM steps; None: --steps
    primaps_lr: float = 5e-3  # Adam learning rate of the student prototypes
    primaps_ema: float = 0.98  # the EMA teacher's decay (after its warm-up)
    primaps_ema_every: int = 10  # the teacher follows the student every this many steps
    primaps_focal: float = 2.0  # focal-loss exponent
    primaps_init: str = "pca"  # the prototypes' start for --method primaps: pca (the reference's) | kmeans
    primaps_init_epochs: int = 2  # pca init: epochs of the cluster loss after the PCA directions
    primaps_student_augs: bool = False  # the reference's --student-augs: live backbone, flips, blur, jitter, grey
    # ---- optimisation
    steps: int = 5000
    batch_size: int = 16
    lr: float = 5e-4
    probe_lr: float = 5e-3
    cluster_fit: str = "kmeans"  # kmeans: refit the cluster probe on the trained code | online (reference; the paper presets)
    select: Optional[str] = None  # label-free | val-miou | last; None: label-free with --shifts auto, else last
    selection_batches: int = 24  # batches of sampled pairs the label-free criterion reads per candidate
    seed: int = 0
    live_backbone: bool = False  # run the backbone every step instead of reading the cache
    cache_in_memory: str = "auto"  # hold the feature cache on the training device: auto (if it fits) | on | off
    accelerator: str = "auto"
    devices: str = "1"
    strategy: str = "auto"
    num_nodes: int = 1
    precision: str = "auto"  # auto: bf16-mixed on GPU, 32 on CPU
    ckpt_every: Optional[int] = None  # Lightning checkpoint (and selection candidate) interval; None: a tenth of --steps
    log_every: int = 25
    # ---- raw-feature baseline
    kmeans_iters: int = 30
    linear_epochs: int = 5
    # ---- evaluation
    eval_resolution: Optional[int] = 320
    eval_crop: str = "center"
    eval_resample: str = "nearest"
    flip: bool = True
    crf: bool = True
    crf_workers: int = 2
    eval_batch_size: int = 8
    max_eval_images: Optional[int] = None
    n_grid: int = 6
    bf16_inference: bool = False  # evaluate/segment with bfloat16 autocast on CUDA
    # the dense CRF (published STEGO settings)
    crf_iterations: int = 10
    crf_pos_w: float = 3.0  # Gaussian (position) kernel weight
    crf_pos_xy_std: float = 1.0
    crf_bi_w: float = 4.0  # bilateral (position + colour) kernel weight
    crf_bi_xy_std: float = 67.0
    crf_bi_rgb_std: float = 3.0
    # ---- misc
    device: str = "auto"  # for prepare / evaluate / segment: auto | cpu | cuda | cuda:N
    progress: bool = True
    # ---- Ray (pip install "stegoseg[distributed]"): the data-parallel stages on a cluster
    ray_address: Optional[str] = None  # None: this process | local | auto | HOST:PORT | ray://HOST:PORT
    ray_workers: int = 2
    ray_gpus_per_worker: float = 0.0
    ray_cpus_per_worker: float = 1.0
    # ---- reference-exact mode (docs/reference_mode.md): --protocol reference turns on every quirk
    # of the reference pipeline below (each None = the protocol's choice; any can be set alone)
    protocol: str = "clean"  # clean | reference
    knn_dropout: Optional[bool] = None  # KNN descriptors with Dropout2d(feature_dropout) active (reference)
    crop_jpeg: Optional[bool] = None  # five-crops round-tripped through JPEG (quality 75) before resizing (reference)
    train_resample: Optional[str] = None  # training/KNN crop resize: bilinear (clean) | nearest (reference)
    crf_reference_input: Optional[bool] = None  # CRF fed BGR, uint8 by truncation (reference)
    pos_embed: Optional[str] = None  # ViT position-embedding resampling: timm (clean) | dino (reference: offset 0.1, plain bicubic)

    def __post_init__(self) -> None:
        # the reference-mode quirks left unset follow --protocol
        table = REFERENCE_PROTOCOL if self.protocol == "reference" else CLEAN_PROTOCOL
        for name in CLEAN_PROTOCOL:
            if getattr(self, name) is None:
                setattr(self, name, table[name])
        if self.ckpt_every is None and isinstance(self.steps, int):
            self.ckpt_every = max(1, self.steps // 10)  # ten checkpoints (selection candidates) per run

    def validate(self) -> None:
        validate(self)

    def to_dict(self) -> dict:
        """All fields; with ``shifts: auto`` the b_* values are left out (the calibration chooses them)."""
        values = super().to_dict()
        if self.shifts == "auto":
            for name in SHIFT_FIELDS:
                values.pop(name)
        return values


PRESETS_DIR = Path(__file__).resolve().parent / "presets"


def load_presets(folder: Path = PRESETS_DIR) -> dict:
    """The named presets: one YAML file per preset in ``config/presets/`` (the paper's settings
    with where each number comes from, the user's-folder defaults, the demo)."""
    return {p.stem: load_yaml(p) for p in sorted(Path(folder).glob("*.yaml"))}


PRESETS = load_presets()


_FIELD_HELP = {
    "protocol": "clean (default) or reference: reproduce every quirk of the reference STEGO pipeline that its "
    "published numbers come from (see docs/reference_mode.md); each quirk is also its own option",
    "knn_dropout": "reference quirk: KNN descriptors computed with Dropout2d(--feature-dropout) active",
    "crop_jpeg": "reference quirk: five-crops round-tripped through JPEG (quality 75) before resizing",
    "train_resample": "training/KNN crop resizing: bilinear (clean) or nearest (reference)",
    "crf_reference_input": "reference quirk: the CRF sees the image in BGR order, uint8 by truncation",
    "pos_embed": "ViT position-embedding resampling: timm (antialiased bicubic; clean) or dino (DINO's own, offset "
    "0.1, plain bicubic; reference)",
    "method": "stego (default), cause-mlp or cause-tr (CAUSE, Kim et al. 2023: modularity clusterbook, "
    "concept-guided contrastive head with an EMA teacher, modularity cluster probe; docs/cause.md), primaps "
    "(PriMaPs-EM, Hahn et al. 2024, on the backbone features: principal mask proposals as pseudo labels, class "
    "prototypes fitted by EM with an EMA teacher; docs/primaps.md), or METHOD+primaps (train stego, cause-mlp or "
    "cause-tr, then PriMaPs-EM on its code)",
    "init_from": "with --method primaps: a trained stegoseg checkpoint whose code (and cluster probe, as the start "
    "of the prototypes) PriMaPs-EM boosts; its backbone is used",
    "dataset": "dataset format: directory, cocostuff27, cityscapes27, potsdam3, suim, voc2012, or synthetic",
    "data_root": "dataset folder (for directory: imgs/{split}/ and optional labels/{split}/)",
    "weights": "local backbone weights file (timm/safetensors, official DINO .pth, or stegoseg file)",
    "pretrained": "use pretrained weights (--no-pretrained: random init, numbers not meaningful)",
    "class_names": "directory dataset class names: 'sky,road,...' or a file with one name per line",
    "cache_dir": "feature cache folder (default: <out>/cache); shared between runs with the same settings",
    "n_classes": "number of classes/clusters; required for label-free data",
    "devices": "Lightning devices: a count, 'auto', or a list like '0,1'",
    "live_backbone": "run the backbone each training step instead of reading cached features",
    "primaps_student_augs": "PriMaPs-EM as the reference's --student-augs: each step runs the backbone on the batch's "
                            "crops, flipped at random with their masks, and the student reads a blurred, jittered or "
                            "grey copy (slower: two backbone passes a step; effect in docs/primaps.md)",
    "cache_shard_items": "items per feature-cache shard, the unit a worker writes (default: about 256 MB of features)",
    "knn_index": "FAISS index of the nearest-neighbour search: exact (flat), hnsw (approximate, its recall against "
                 "exact search measured on a sample and recorded), auto (exact up to 200,000 items, then hnsw)",
    "pca_dim": "cache (and train on) the features projected onto D directions fitted on --pca-sample training crops "
               "(uncentred PCA: keeps dot products; C/D times smaller features, e.g. 6x for 384 -> 64); the checkpoint "
               "stores the projection; effect on CamVid in docs/scaling.md",
    "pca_sample": "training crops the --pca-dim projection is fitted on (64 patch features from each)",
    "ray_address": "run extraction, evaluation, PriMaPs' pseudo masks and segment on Ray (pip install "
                   "\"stegoseg[distributed]\"): local starts a cluster "
                   "here, auto joins the one on this machine, HOST:PORT or ray://HOST:PORT another",
    "ray_workers": "Ray actors (each loads the backbone or model once)",
    "ray_gpus_per_worker": "GPUs per Ray actor (0: CPU)",
    "ray_cpus_per_worker": "CPUs per Ray actor (its torch threads)",
    "shifts": "auto: choose b_self, b_knn, b_rand without labels from the feature cache (each at the quantile of its "
    "pair type's feature correspondence that a k-means partition of the features calls same-cluster; written to "
    "calibration.json and the run's config.yaml); fixed: use --b-self/--b-knn/--b-rand as given (the paper presets)",
    "auto_centring": "with --shifts auto: calibrate and train with the spatial centring of F (on), without it (off), "
    "or both (default) and let --select choose among the checkpoints of the two runs",
    "select": "which checkpoint becomes checkpoint.pt: label-free (best agreement of the code's clusters with the "
    "feature correspondences, training images only), val-miou (best validation cluster mIoU: needs val labels, the "
    "reference's way), last; default: label-free with STEGO's --shifts auto, else last (CAUSE: among its stage-2 "
    "heads, with --cluster-fit kmeans; PriMaPs-EM: among its EM steps, val-miou or last)",
    "cluster_fit": "the cluster probe: 'kmeans' (after training, seeded spherical k-means++ over the cached "
    "training code: stable between runs; the default) or 'online' (the reference's own: STEGO's minibatch probe "
    "trained alongside the head, the paper presets; CAUSE's modularity-fitted probe of stage 3)",
}


#: The config's fields by stage; a command's --help lists only the groups it reads (every
#: field can still come from --config YAML).
FIELD_GROUPS = {
    "method": ("method", "init_from"),
    "data": ("dataset", "data_root", "train_split", "val_split", "ignore_index", "class_names", "n_classes"),
    "backbone": ("backbone", "weights", "pretrained", "tiny", "pos_embed"),
    "features": ("resolution", "five_crop", "n_neighbors", "knn_backend", "knn_index", "cache_dir", "extract_batch_size",
                 "cache_shard_items", "pca_dim", "pca_sample",
                 "num_workers", "knn_dropout", "crop_jpeg", "train_resample"),
    "loss": ("dim", "extra_clusters", "feature_dropout", "n_samples", "shifts", "calibration_batches", "auto_centring",
             "w_self", "w_knn", "w_rand", "b_self", "b_knn", "b_rand", "n_random", "knn_topk", "pointwise",
             "zero_clamp", "stabilize", "w_potts", "b_potts"),
    "training": ("steps", "batch_size", "lr", "probe_lr", "cluster_fit", "select", "selection_batches", "seed",
                 "live_backbone", "cache_in_memory", "accelerator", "devices", "strategy", "num_nodes", "precision", "ckpt_every",
                 "log_every"),
    "probes": ("kmeans_iters", "linear_epochs"),
    "evaluation": ("eval_resolution", "eval_crop", "eval_resample", "flip", "crf", "crf_workers", "eval_batch_size",
                   "max_eval_images", "n_grid", "bf16_inference", "crf_reference_input", "crf_iterations", "crf_pos_w",
                   "crf_pos_xy_std", "crf_bi_w", "crf_bi_xy_std", "crf_bi_rgb_std"),
    "run": ("device", "progress", "protocol", "ray_address", "ray_workers", "ray_gpus_per_worker", "ray_cpus_per_worker"),
    "cause": ("cause_concepts", "cause_book_steps", "cause_book_temperature", "cause_projection_dim",
              "cause_temperature", "cause_pos_threshold", "cause_neg_threshold", "cause_bank_size", "cause_ema",
              "cause_grid", "cause_clip", "cause_weight_decay", "cause_probe_steps"),
    "primaps": ("primaps_threshold", "primaps_coverage", "primaps_steps", "primaps_lr", "primaps_ema",
                "primaps_ema_every", "primaps_focal", "primaps_init", "primaps_init_epochs", "primaps_student_augs"),
}


def _cls_and_presets(cls, presets: Optional[dict]):
    """The config class (default :class:`Config`) and its presets (default: PRESETS for Config, none otherwise)."""
    cls = cls or Config
    return cls, (PRESETS if presets is None and cls is Config else (presets or {}))


def add_config_arguments(parser: argparse.ArgumentParser, cls=None, presets: Optional[dict] = None,
                         groups: Optional[tuple] = None, extra: tuple = ()) -> None:
    """Add ``--preset`` (if any), ``--config`` and one option per field of ``cls`` (default: not
    given); with ``groups`` (names of :data:`FIELD_GROUPS`) only those groups' options, each
    group under its own heading in --help."""
    cls, presets = _cls_and_presets(cls, presets)
    if presets:
        parser.add_argument("--preset", choices=sorted(presets), help="named settings (config/presets/*.yaml)")
    parser.add_argument("--config", metavar="YAML", help="YAML file of config values (any field of the config)")
    hints = typing.get_type_hints(cls)
    names = {f.name: f for f in fields(cls)}
    if cls is Config:
        sections = [(g, FIELD_GROUPS[g]) for g in (groups or FIELD_GROUPS)]
        shown = {n for _, members in sections for n in members}
        if [n for n in extra if n not in shown]:
            sections.append(("other", tuple(n for n in extra if n not in shown)))
    else:
        sections = [("config", tuple(names))]
    for title, members in sections:
        group = parser.add_argument_group(f"{title} options")
        for name in members:
            _add_field(group, names[name], hints[name])


def _add_field(group, f, tp) -> None:
    """One ``--field-name`` option (booleans also ``--no-field-name``; optional values accept ``none``)."""
    base = base_type(tp)
    flag = "--" + f.name.replace("_", "-")
    help_text = _FIELD_HELP.get(f.name, "") + f" (default: {f.default})"
    if base is bool:
        group.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None, help=help_text)
    else:
        kind = parse_optional(base) if tp is not base else base
        group.add_argument(flag, dest=f.name, type=kind, default=None, metavar=f.name.upper(), help=help_text)


def resolve_config(args: argparse.Namespace, cls=None, presets: Optional[dict] = None, **overrides):
    """Defaults < preset < YAML < explicit command-line values < ``overrides``."""
    cls, presets = _cls_and_presets(cls, presets)
    values = {}
    if getattr(args, "preset", None):
        values.update(presets[args.preset])
    given = {}  # values the user wrote (YAML file, command line), not the preset's
    if getattr(args, "config", None):
        given.update(load_yaml(args.config))
    command_line = explicit_values(args, cls)
    given.update(command_line)
    method = given.get("method", values.get("method", "stego"))
    values.update(METHOD_DEFAULTS.get(method, {}))
    if "progress" in {f.name for f in dataclasses.fields(cls)} and "progress" not in given:
        from stegoseg.progress import on_terminal

        values["progress"] = on_terminal()  # bars on a terminal, plain lines in a log file
    values.update(given)
    values.update({k: v for k, v in overrides.items() if v is not None})
    if values.get("data_root") and "://" not in str(values["data_root"]):
        # stored absolute: a checkpoint's config then finds its data from any working folder
        values["data_root"] = str(Path(values["data_root"]).expanduser().resolve())
    if cls is Config:
        values = apply_protocol(values, command_line)
    cfg = make_config(values, cls)
    if getattr(cfg, "shifts", None) == "auto":
        mine = [k for k in SHIFT_FIELDS if k in given]
        if mine:
            flag = "--" + mine[0].replace("_", "-")
            raise StegosegError(f"{flag} was given, but --shifts auto chooses the shifts itself: add --shifts fixed "
                                f"to train with your values")
    return cfg


SHIFT_FIELDS = ("b_self", "b_knn", "b_rand")


def explicit_values(args: argparse.Namespace, cls=None) -> dict:
    """The config fields given on the command line: ``{name: value}``; ``--x none`` gives
    ``{x: None}`` (an option not given is absent)."""
    values = {}
    for f in fields(cls or Config):
        v = getattr(args, f.name, None)
        if v is EXPLICIT_NONE:
            values[f.name] = None
        elif v is not None:
            values[f.name] = v
    return values


def validate(cfg: Config) -> None:
    checks = [
        (cfg.steps >= 1, "--steps must be >= 1"),
        (cfg.batch_size >= 2, "--batch-size must be >= 2 (the random term needs a partner image)"),
        (cfg.n_samples >= 1, "--n-samples must be >= 1"),
        (cfg.knn_topk >= 1, "--knn-topk must be >= 1"),
        (cfg.n_neighbors >= cfg.knn_topk, f"--n-neighbors {cfg.n_neighbors} is below --knn-topk {cfg.knn_topk} (how many "
         f"of the cached neighbours training draws from; an option of train and run): cache at least {cfg.knn_topk} "
         f"neighbours, or train with --knn-topk {cfg.n_neighbors}"),
        (0 <= cfg.feature_dropout < 1, "--feature-dropout must be in [0, 1)"),
        (cfg.eval_crop in ("center", "none"), "--eval-crop must be center or none"),
        (cfg.eval_resample in ("nearest", "bilinear"), "--eval-resample must be nearest or bilinear"),
        (cfg.knn_backend in ("auto", "faiss", "torch"), "--knn-backend must be auto, faiss or torch"),
        (cfg.cluster_fit in ("online", "kmeans"), "--cluster-fit must be online or kmeans"),
        (cfg.shifts in ("auto", "fixed"), "--shifts must be auto (label-free calibration) or fixed (use --b-self/--b-knn/--b-rand)"),
        (cfg.select in (None, "label-free", "val-miou", "last"), "--select must be label-free, val-miou or last"),
        (cfg.auto_centring in ("both", "on", "off"), "--auto-centring must be both, on or off"),
        (not (cfg.shifts == "auto" and cfg.auto_centring == "both" and cfg.select == "last"),
         "--select last takes one run's last step, but --shifts auto with --auto-centring both trains two: "
         "pass --auto-centring on (or off), or --select label-free"),
        (cfg.calibration_batches >= 1, "--calibration-batches must be >= 1"),
        (cfg.selection_batches >= 1, "--selection-batches must be >= 1"),
        (cfg.extra_clusters >= 0, "--extra-clusters must be >= 0"),
        (cfg.n_classes is None or cfg.n_classes >= 2, "--n-classes must be >= 2"),
        (cfg.dim >= 1, f"--dim must be >= 1 (the code's channels), got {cfg.dim}"),
        (cfg.lr > 0, f"--lr must be > 0, got {cfg.lr}"),
        (cfg.probe_lr > 0, f"--probe-lr must be > 0, got {cfg.probe_lr}"),
        (cfg.resolution >= 1, f"--resolution must be >= 1 pixel, got {cfg.resolution}"),
        (cfg.eval_resolution is None or cfg.eval_resolution >= 1,
         f"--eval-resolution must be >= 1 pixel (or none: original size), got {cfg.eval_resolution}"),
        (cfg.max_eval_images is None or cfg.max_eval_images >= 1,
         f"--max-eval-images must be >= 1 (or none: all), got {cfg.max_eval_images}"),
        (cfg.n_neighbors >= 1, "--n-neighbors must be >= 1"),
        (cfg.extract_batch_size >= 1, "--extract-batch-size must be >= 1"),
        (cfg.cache_shard_items is None or cfg.cache_shard_items >= 1, "--cache-shard-items must be >= 1"),
        (cfg.knn_index in ("auto", "exact", "hnsw"), f"--knn-index must be auto, exact or hnsw, got {cfg.knn_index!r}"),
        (cfg.pca_dim is None or cfg.pca_dim >= 1, f"--pca-dim must be >= 1 (or none: all channels), got {cfg.pca_dim}"),
        (cfg.pca_sample >= 1, f"--pca-sample must be >= 1 crop, got {cfg.pca_sample}"),
        (not (cfg.pca_dim and cfg.init_from), "--init-from boosts a trained model with its own backbone (and its "
         "projection, if it has one): drop --pca-dim"),
        *option_problems(cfg.ray_workers, cfg.ray_gpus_per_worker, cfg.ray_cpus_per_worker),
        (cfg.eval_batch_size >= 1, "--eval-batch-size must be >= 1"),
        (cfg.num_workers >= 0, "--num-workers must be >= 0"),
        (cfg.crf_workers >= 1, "--crf-workers must be >= 1"),
        (cfg.crf_iterations >= 1, "--crf-iterations must be >= 1"),
        (min(cfg.crf_pos_xy_std, cfg.crf_bi_xy_std, cfg.crf_bi_rgb_std) > 0, "--crf-*-std values must be > 0"),
        (cfg.ckpt_every >= 1, "--ckpt-every must be >= 1"),
        (cfg.log_every >= 1, "--log-every must be >= 1"),
        (cfg.kmeans_iters >= 1, "--kmeans-iters must be >= 1"),
        (cfg.linear_epochs >= 0, "--linear-epochs must be >= 0"),
        (cfg.n_grid >= 1, "--n-grid must be >= 1"),
        (cfg.n_random >= 1, "--n-random must be >= 1"),
        (cfg.calibration_batches >= 1, "--calibration-batches must be >= 1"),
        (min(cfg.w_self, cfg.w_knn, cfg.w_rand, cfg.w_potts) >= 0, "--w-self/--w-knn/--w-rand/--w-potts must be >= 0"),
        (cfg.accelerator in ACCELERATORS, f"--accelerator must be one of {', '.join(ACCELERATORS)}, got {cfg.accelerator!r}"),
        (cfg.precision in PRECISIONS, f"--precision must be one of {', '.join(PRECISIONS)}, got {cfg.precision!r}"),
        (valid_device(cfg.device), f"--device must be auto, cpu, cuda, cuda:N or mps, got {cfg.device!r}"),
        (_valid_devices(cfg.devices), f"--devices must be a count (1), auto, or a list like 0,1; got {cfg.devices!r}"),
        (cfg.num_nodes >= 1, "--num-nodes must be >= 1"),
        (cfg.cache_in_memory in ("auto", "on", "off"), "--cache-in-memory must be auto, on or off"),
        (cfg.protocol in ("clean", "reference"), f"--protocol must be clean or reference, got {cfg.protocol!r}"),
        (cfg.train_resample in (None, "bilinear", "nearest"), "--train-resample must be bilinear or nearest"),
        (cfg.pos_embed in (None, "timm", "dino"), "--pos-embed must be timm or dino"),
        (cfg.method in METHODS, f"--method must be one of {', '.join(METHODS)}, got {cfg.method!r}"),
        (cfg.cause_concepts >= 2, "--cause-concepts must be >= 2"),
        (cfg.cause_book_steps is None or cfg.cause_book_steps >= 1, "--cause-book-steps must be >= 1 (or none)"),
        (min(cfg.cause_book_temperature, cfg.cause_temperature) > 0,
         "--cause-book-temperature and --cause-temperature must be > 0"),
        (cfg.cause_projection_dim >= 1, "--cause-projection-dim must be >= 1"),
        (-1 <= cfg.cause_neg_threshold <= cfg.cause_pos_threshold <= 1,
         "--cause-neg-threshold must be <= --cause-pos-threshold, both in [-1, 1]"),
        (cfg.cause_bank_size >= 1, "--cause-bank-size must be >= 1"),
        (0 <= cfg.cause_ema < 1, "--cause-ema must be in [0, 1)"),
        (cfg.cause_grid >= 1, "--cause-grid must be >= 1"),
        (cfg.cause_clip > 0, "--cause-clip must be > 0"),
        (cfg.cause_weight_decay >= 0, "--cause-weight-decay must be >= 0"),
        (cfg.cause_probe_steps >= 1, "--cause-probe-steps must be >= 1"),
        (not (uses_primaps(cfg.method) and cfg.select == "label-free"),
         f"--select label-free scores a head's code, which PriMaPs-EM does not change (--method {cfg.method} moves "
         "only its prototypes): drop --select (the last EM step) or use --select val-miou (needs validation labels; "
         "docs/primaps.md)"),
        (not (cfg.method in ("cause-mlp", "cause-tr") and cfg.select not in (None, "last")
              and cfg.cluster_fit != "kmeans"),
         f"--select {cfg.select} picks one of CAUSE's stage-2 heads, but the modularity cluster probe "
         "(--cluster-fit online) is fitted for the last head only: use --cluster-fit kmeans or --select last"),
        (not (cfg.method != "stego" and cfg.live_backbone), f"--method {cfg.method} trains on the feature cache: "
         "drop --live-backbone"),
        (not ((base_method(cfg.method) or cfg.method) != "stego" and cfg.w_potts > 0),
         f"--w-potts is a term of STEGO's loss; --method {cfg.method} does not use it: drop --w-potts"),
        (0 < cfg.primaps_threshold < 1, "--primaps-threshold must be in (0, 1)"),
        (0 < cfg.primaps_coverage <= 1, "--primaps-coverage must be in (0, 1]"),
        (cfg.primaps_steps is None or cfg.primaps_steps >= 1, "--primaps-steps must be >= 1 (or none)"),
        (cfg.primaps_lr > 0, "--primaps-lr must be > 0"),
        (0 <= cfg.primaps_ema < 1, "--primaps-ema must be in [0, 1)"),
        (cfg.primaps_ema_every >= 1, "--primaps-ema-every must be >= 1"),
        (cfg.primaps_focal >= 0, "--primaps-focal must be >= 0"),
        (cfg.primaps_init in ("pca", "kmeans"), f"--primaps-init must be pca or kmeans, got {cfg.primaps_init!r}"),
        (cfg.primaps_init_epochs >= 0, "--primaps-init-epochs must be >= 0"),
        (not (cfg.primaps_student_augs and not uses_primaps(cfg.method)),
         f"--primaps-student-augs is an option of PriMaPs-EM: use it with --method primaps or METHOD+primaps "
         f"(not --method {cfg.method})"),
        (not (cfg.init_from and cfg.method != "primaps"), f"--init-from boosts a trained model with PriMaPs-EM: "
         f"use it with --method primaps (--method {cfg.method} trains its own head)"),
        (not cfg.init_from or Path(cfg.init_from).expanduser().is_file(),
         f"--init-from {cfg.init_from}: no such checkpoint file (pass a stegoseg checkpoint.pt)"),
    ]
    raise_first_failure(checks)


#: The trainable methods of ``--method``.
METHODS = ("stego", "cause-mlp", "cause-tr", "primaps", "stego+primaps", "cause-mlp+primaps", "cause-tr+primaps")

#: Each method's published settings, used where the user (command line or --config YAML) did
#: not set the field; they override the (STEGO) paper presets' values.
METHOD_DEFAULTS = {
    "stego": {},
    "cause-mlp": {"dim": 90, "lr": 1e-3, "probe_lr": 1e-3},
    "cause-tr": {"dim": 90, "lr": 1e-3, "probe_lr": 1e-3},
    "primaps": {"probe_lr": 5e-3},
    "stego+primaps": {},
    "cause-mlp+primaps": {"dim": 90, "lr": 1e-3, "probe_lr": 1e-3},
    "cause-tr+primaps": {"dim": 90, "lr": 1e-3, "probe_lr": 1e-3},
}


def base_method(method: str) -> Optional[str]:
    """The method whose code PriMaPs-EM boosts in ``METHOD+primaps`` (None for plain primaps and
    for methods without PriMaPs)."""
    return method[: -len("+primaps")] if method.endswith("+primaps") else None


def uses_primaps(method: str) -> bool:
    return method == "primaps" or method.endswith("+primaps")


ACCELERATORS = ("auto", "cpu", "gpu", "cuda", "mps")


PRECISIONS = ("auto", "32-true", "32", "bf16-mixed", "16-mixed", "bf16-true", "64-true")


def valid_device(device: str) -> bool:
    """``--device``: auto, cpu, mps, cuda or cuda:N."""
    import re

    return bool(re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", str(device)))


def _valid_devices(devices: str) -> bool:
    import re

    return bool(re.fullmatch(r"auto|-1|\d+|\d+(,\s*\d+)*,?", str(devices).strip()))


def selection_mode(cfg: Config) -> str:
    """``cfg.select`` with its default resolved: label-free with ``--shifts auto``, else last."""
    if cfg.select is not None:
        return cfg.select
    if cfg.method != "stego":
        return "last"  # CAUSE and PriMaPs-EM keep their last step, as their references do
    return "label-free" if cfg.shifts == "auto" else "last"


#: What ``--protocol reference`` sets (unless given explicitly): every quirk of the reference
#: pipeline that its published numbers come from, plus its training choices.
REFERENCE_PROTOCOL = dict(
    knn_dropout=True, crop_jpeg=True, train_resample="nearest", crf_reference_input=True, pos_embed="dino",
    select="val-miou", precision="32-true", shifts="fixed", cluster_fit="online", eval_resample="nearest",
)


#: The quirk fields' values under ``--protocol clean``.
CLEAN_PROTOCOL = dict(knn_dropout=False, crop_jpeg=False, train_resample="bilinear", crf_reference_input=False,
                      pos_embed="timm")


def apply_protocol(values: dict, given: dict) -> dict:
    """``values`` with the protocol's settings filled in below the options given on the command
    line (``given``): ``--protocol reference`` turns on every reference quirk (and the
    reference's training choices), ``clean`` none. A protocol given on the command line also
    replaces the quirk values a preset, YAML file or checkpoint config brought."""
    protocol = values.get("protocol", "clean")
    table = REFERENCE_PROTOCOL if protocol == "reference" else CLEAN_PROTOCOL
    force = "protocol" in given
    out = dict(values)
    for name, value in table.items():
        if name not in given and (force or protocol == "reference" or out.get(name) is None):
            out[name] = value
    return out


def replace(cfg: Config, **changes) -> Config:
    return dataclasses.replace(cfg, **changes)


def coerce_types(values: dict, cls) -> dict:
    """YAML values as the fields' types: PyYAML reads ``5e-4`` as a string, and a quoted number
    is still a number; anything that does not convert is a one-line error naming the option."""
    hints = typing.get_type_hints(cls)
    out = dict(values)
    for name, value in values.items():
        kind = base_type(hints[name])
        if value is None or kind not in (int, float, bool) or isinstance(value, kind) and not (
                kind is int and isinstance(value, bool)):
            continue
        try:
            if kind is bool:
                if str(value).lower() not in ("true", "false", "yes", "no", "1", "0"):
                    raise ValueError
                out[name] = str(value).lower() in ("true", "yes", "1")
            elif kind is int and isinstance(value, float) and value.is_integer():
                out[name] = int(value)
            else:
                out[name] = kind(value)
        except (TypeError, ValueError):
            raise StegosegError(f"option {name}: {value!r} is not a valid {kind.__name__}") from None
    return out


def make_config(values: dict, cls=None):
    """Build a config dataclass, rejecting unknown keys with a one-line error."""
    cls = cls or Config
    names = {f.name for f in fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise StegosegError(f"unknown config option(s): {', '.join(unknown)} (see the command's --help)")
    if cls is Config:  # the method's published settings where the values leave a field unset
        values = {**METHOD_DEFAULTS.get(values.get("method", "stego"), {}), **values}
    values = coerce_types(values, cls)
    cfg = cls(**values)
    cfg.validate()  # every config class checks its own values
    return cfg
