"""Typed run configuration, the paper's presets, YAML files and command-line overrides.

Resolution order (later wins): dataclass defaults < ``--preset`` < ``--config FILE.yaml``
< explicit command-line options. Every field is a command-line option
(``--field-name``; booleans also ``--no-field-name``), so no value needs a code edit.
A run writes its fully resolved config as ``config.yaml`` next to its outputs.
"""
from __future__ import annotations

import argparse
import dataclasses
import typing
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Optional

import yaml

from .errors import StegosegError


class ConfigBase:
    """What every config dataclass shares (Config, PretrainConfig): a dict, the YAML
    ``config.yaml`` a run writes, and validation that stops at the first failed check."""

    def to_dict(self) -> dict:
        return asdict(self)

    def save(self, path) -> None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))

    def validate(self) -> None:  # overridden with the class's checks
        pass


def raise_first_failure(checks) -> None:
    """``checks``: (condition, one-line message) pairs; raise the message of the first false one."""
    for ok, message in checks:
        if not ok:
            raise StegosegError(message)


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
    # ---- head and correspondence loss
    dim: int = 70
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
    accelerator: str = "auto"
    devices: str = "1"
    strategy: str = "auto"
    num_nodes: int = 1
    precision: str = "auto"  # auto: bf16-mixed on GPU, 32 on CPU
    ckpt_every: int = 500
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
    # ---- misc
    device: str = "auto"  # for prepare / evaluate / segment: auto | cpu | cuda | cuda:N
    progress: bool = True

    def validate(self) -> None:
        validate(self)

    def to_dict(self) -> dict:
        """All fields; with ``shifts: auto`` the b_* values are left out (the calibration chooses them)."""
        values = super().to_dict()
        if self.shifts == "auto":
            for name in SHIFT_FIELDS:
                values.pop(name)
        return values


PRESETS = {
    # Paper Table 6 (CocoStuff column), ViT-S/8 as in the ablations.
    "cocostuff27": dict(
        dataset="cocostuff27", backbone="dino_vits8", dim=70, shifts="fixed", cluster_fit="online",
        w_self=0.10, w_knn=1.00, w_rand=0.15, b_self=0.12, b_knn=0.20, b_rand=1.00,
    ),
    # Released CocoStuff ViT-B/8 checkpoint: K = 90.
    "cocostuff27-vitb8": dict(
        dataset="cocostuff27", backbone="dino_vitb8", dim=90, shifts="fixed", cluster_fit="online",
        w_self=0.10, w_knn=1.00, w_rand=0.15, b_self=0.12, b_knn=0.20, b_rand=1.00,
    ),
    # Paper Table 6 (Cityscapes column); released ViT-B/8 checkpoint: K = 100, pointwise off.
    "cityscapes27": dict(
        dataset="cityscapes27", backbone="dino_vitb8", dim=100, pointwise=False, shifts="fixed", cluster_fit="online",
        w_self=1.00, w_knn=0.58, w_rand=0.91, b_self=0.46, b_knn=0.18, b_rand=0.31,
    ),
    # Released Potsdam ViT-S/8 checkpoint.
    "potsdam3": dict(
        dataset="potsdam3", backbone="dino_vits8", dim=70, pointwise=True, shifts="fixed", cluster_fit="online",
        w_self=0.67, w_knn=0.25, w_rand=0.63, b_self=0.08, b_knn=0.02, b_rand=0.76,
    ),
    # A user's own folder: the CocoStuff term weights, shifts calibrated without labels
    # (--shifts auto), the checkpoint chosen without labels (--select label-free), the
    # cluster probe refitted by k-means on the trained code (stable between runs).
    "directory": dict(dataset="directory", shifts="auto", cluster_fit="kmeans"),
    # The no-download demo of the README: generated images, short schedule sized for a CPU,
    # a user's-folder run otherwise (CocoStuff term weights, --shifts auto, --select
    # label-free among the checkpoints every 50 steps).
    "demo": dict(
        dataset="synthetic", backbone="dino_vits8", resolution=112, steps=300, batch_size=8,
        eval_resolution=160, log_every=10, ckpt_every=50, shifts="auto", cluster_fit="kmeans",
    ),
}

_FIELD_HELP = {
    "dataset": "dataset format: directory, cocostuff27, cityscapes27, potsdam3, suim, voc2012, or synthetic",
    "data_root": "dataset folder (for directory: imgs/{split}/ and optional labels/{split}/)",
    "weights": "local backbone weights file (timm/safetensors, official DINO .pth, or stegoseg file)",
    "pretrained": "use pretrained weights (--no-pretrained: random init, numbers not meaningful)",
    "class_names": "directory dataset class names: 'sky,road,...' or a file with one name per line",
    "cache_dir": "feature cache folder (default: <out>/cache); shared between runs with the same settings",
    "n_classes": "number of classes/clusters; required for label-free data",
    "devices": "Lightning devices: a count, 'auto', or a list like '0,1'",
    "live_backbone": "run the backbone each training step instead of reading cached features",
    "shifts": "auto: choose b_self, b_knn, b_rand without labels from the feature cache (each at the quantile of its "
    "pair type's feature correspondence that a k-means partition of the features calls same-cluster; written to "
    "calibration.json and the run's config.yaml); fixed: use --b-self/--b-knn/--b-rand as given (the paper presets)",
    "auto_centring": "with --shifts auto: calibrate and train with the spatial centring of F (on), without it (off), "
    "or both (default) and let --select choose among the checkpoints of the two runs",
    "select": "which checkpoint becomes checkpoint.pt: label-free (best agreement of the code's clusters with the "
    "feature correspondences, training images only), val-miou (best validation cluster mIoU: needs val labels, the "
    "reference's way), last; default: label-free with --shifts auto, else last",
    "cluster_fit": "STEGO's cluster probe: 'kmeans' (after training, seeded spherical k-means++ over the cached "
    "training code: stable between runs; the default) or 'online' (the reference's minibatch probe trained alongside "
    "the head; the paper presets)",
}


def _base_type(tp):
    """Unwrap Optional[X] -> X."""
    if typing.get_origin(tp) is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0]
    return tp


def _parse_optional(kind):
    def parse(text: str):
        if text.lower() in ("none", "null", ""):
            return None
        return kind(text)

    parse.__name__ = kind.__name__
    return parse


def _cls_and_presets(cls, presets: Optional[dict]):
    """The config class (default :class:`Config`) and its presets (default: PRESETS for Config, none otherwise)."""
    cls = cls or Config
    return cls, (PRESETS if presets is None and cls is Config else (presets or {}))


def add_config_arguments(parser: argparse.ArgumentParser, cls=None, presets: Optional[dict] = None) -> None:
    """Add ``--preset`` (if any), ``--config`` and one option per field of ``cls`` (default: not given)."""
    cls, presets = _cls_and_presets(cls, presets)
    if presets:
        parser.add_argument("--preset", choices=sorted(presets), help="named settings (the paper's presets)")
    parser.add_argument("--config", metavar="YAML", help="YAML file of config values")
    hints = typing.get_type_hints(cls)
    group = parser.add_argument_group("config (every value of the resolved config)")
    for f in fields(cls):
        tp = hints[f.name]
        base = _base_type(tp)
        flag = "--" + f.name.replace("_", "-")
        help_text = _FIELD_HELP.get(f.name, "") + f" (default: {f.default})"
        if base is bool:
            group.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        else:
            kind = _parse_optional(base) if tp is not base else base
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
    for f in fields(cls):
        v = getattr(args, f.name, None)
        if v is not None:
            given[f.name] = v
    values.update(given)
    values.update({k: v for k, v in overrides.items() if v is not None})
    cfg = make_config(values, cls)
    if getattr(cfg, "shifts", None) == "auto":
        mine = [k for k in SHIFT_FIELDS if k in given]
        if mine:
            flag = "--" + mine[0].replace("_", "-")
            raise StegosegError(f"{flag} was given, but --shifts auto chooses the shifts itself: add --shifts fixed "
                                f"to train with your values")
    return cfg


SHIFT_FIELDS = ("b_self", "b_knn", "b_rand")


def load_yaml(path) -> dict:
    p = Path(path)
    if not p.is_file():
        raise StegosegError(f"--config {p}: file not found")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as exc:
        raise StegosegError(f"--config {p}: not valid YAML ({exc.__class__.__name__})") from exc
    if not isinstance(data, dict):
        raise StegosegError(f"--config {p}: expected a mapping of option: value")
    return data


def make_config(values: dict, cls=None):
    """Build a config dataclass, rejecting unknown keys with a one-line error."""
    cls = cls or Config
    names = {f.name for f in fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise StegosegError(f"unknown config option(s): {', '.join(unknown)} (see the command's --help)")
    cfg = cls(**values)
    cfg.validate()  # every config class checks its own values
    return cfg


def validate(cfg: Config) -> None:
    checks = [
        (cfg.steps >= 1, "--steps must be >= 1"),
        (cfg.batch_size >= 2, "--batch-size must be >= 2 (the random term needs a partner image)"),
        (cfg.n_samples >= 1, "--n-samples must be >= 1"),
        (cfg.knn_topk >= 1, "--knn-topk must be >= 1"),
        (cfg.n_neighbors >= cfg.knn_topk, "--n-neighbors must be >= --knn-topk"),
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
    ]
    raise_first_failure(checks)


def selection_mode(cfg: Config) -> str:
    """``cfg.select`` with its default resolved: label-free with ``--shifts auto``, else last."""
    if cfg.select is not None:
        return cfg.select
    return "label-free" if cfg.shifts == "auto" else "last"


def replace(cfg: Config, **changes) -> Config:
    return dataclasses.replace(cfg, **changes)


__all__ = ["Config", "PRESETS", "selection_mode", "add_config_arguments", "resolve_config", "make_config", "load_yaml", "replace", "field"]
