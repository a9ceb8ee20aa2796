"""Import the Lightning ``.ckpt`` files that STEGO and PriMaPs release, read with
:func:`~stegoseg.foreign_pickle.read_foreign_checkpoint` (no code of theirs runs, neither
Lightning nor their packages are needed).

STEGO (Hamilton et al. 2022; github mhamilton723/STEGO: ``cocostuff27_vit_base_5.ckpt``,
``cityscapes_vit_base_1.ckpt``, ``potsdam_test.ckpt``): a ``LitUnsupervisedSegmenter`` whose
``state_dict`` holds the DINO ViT (``net.model.*``, DINO's own layout), the head
(``net.cluster1.0.*``: the linear part; ``net.cluster2.{0,2}.*``: the nonlinear part when
``projection_type`` is nonlinear), ``cluster_probe.clusters`` and ``linear_probe.*`` (on the
code), and whose ``hyper_parameters`` hold ``n_classes`` and the run's ``cfg``.

PriMaPs (Hahn et al. 2024; github visinf/primaps): an ``UnsupervisedSegmenter`` whose
``state_dict`` holds the DINO ViT (``net.model.*``), the EMA teacher prototypes
(``cluster_probe.ema_model.weight_{g,v}``; ``cluster_probe.cluster_centers.weight_{g,v}`` in a
file of its initialisation stage), the student (``seghead.weight_{g,v}``) and the linear probe
on the backbone features (``linear_probe.*``); ``hyper_parameters["opts"]`` is its argparse
namespace. A PriMaPs model trained on top of STEGO (``opts.stego_ckpt`` set) does not contain
STEGO's network: its STEGO ``.ckpt`` is needed beside it.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Optional, Sequence

import torch

from stegoseg.errors import StegosegError
from stegoseg.foreign_pickle import plain, read_foreign_checkpoint

#: (reference ViT name, patch) -> our preset.
DINO_PRESETS = {("vit_small", 8): "dino_vits8", ("vit_small", 16): "dino_vits16", ("vit_base", 8): "dino_vitb8",
                ("vit_base", 16): "dino_vitb16", ("dino_vits", 8): "dino_vits8", ("dino_vits", 16): "dino_vits16",
                ("dino_vitb", 8): "dino_vitb8", ("dino_vitb", 16): "dino_vitb16",
                ("dinov2_vits", 14): "dinov2_vits14", ("dinov2_vitb", 14): "dinov2_vitb14"}
WHAT = "a released STEGO or PriMaPs .ckpt file"


def read_lightning_checkpoint(path) -> tuple:
    """(kind "stego" | "primaps", state dict, plain hyper-parameters) of a released file."""
    ckpt = read_foreign_checkpoint(Path(path), WHAT)
    state = ckpt.get("state_dict")
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise StegosegError(f"{path} has no state_dict of tensors: it is not a Lightning checkpoint; pass {WHAT}")
    hyper = plain(ckpt.get("hyper_parameters")) or {}
    if "net.cluster1.0.weight" in state and "cluster_probe.clusters" in state:
        return "stego", state, hyper
    if "seghead.weight_v" in state:
        return "primaps", state, hyper
    raise StegosegError(f"{path} is a Lightning checkpoint, but neither STEGO's (net.cluster1.*, "
                        f"cluster_probe.clusters) nor PriMaPs' (seghead.weight_v); its keys start {sorted(state)[:3]}")


def _backbone(state: dict, arch: str, patch: int, path: Path):
    """Our backbone with the file's DINO ViT weights (``net.model.*``) and its spec."""
    from stegoseg.backbones.presets import get_backbone_preset
    from stegoseg.backbones.weights import load_weights_into
    from stegoseg.model import build_backbone

    vit = {k[len("net.model."):]: v for k, v in state.items() if k.startswith("net.model.")}
    if not vit:
        raise StegosegError(f"{path} holds no backbone weights (net.model.*)")
    name = DINO_PRESETS.get((arch, int(patch)))
    if name is None:
        raise StegosegError(f"{path}: backbone {arch} with patch {patch} is not a DINO ViT stegoseg has a preset for")
    width = int(vit["cls_token"].shape[-1])
    depth = len({m.group(1) for k in vit for m in [re.match(r"blocks\.(\d+)\.", k)] if m})
    preset = get_backbone_preset(name)
    tiny = (width, depth) == (32, 2)  # the test-sized architecture (fixtures)
    if not tiny and width != preset.embed_dim:
        raise StegosegError(f"{path}: a {width}-channel, {depth}-block ViT, but {name} has {preset.embed_dim} channels")
    # DINO (v1) code interpolates the position embedding its own way; DINOv2 releases use timm's
    spec = {"name": name, "pretrained": False, "weights": None, "tiny": tiny,
            "pos_embed": "dino" if name.startswith("dino_vit") else "timm"}
    net = build_backbone(spec)
    load_weights_into(net.model, preset, vit, path)
    net.weights_source = f"{path.name} (imported)"
    return net, spec


def _linear(model, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor]) -> None:
    if weight is not None and model.linear_probe is not None:
        with torch.no_grad():
            model.linear_probe.conv.weight.copy_(weight.float().reshape(model.linear_probe.conv.weight.shape))
            model.linear_probe.conv.bias.copy_(bias.float())


def stego_model(state: dict, hyper: dict, path: Path, class_names=None):
    from stegoseg.model import SegmentationModel
    from stegoseg.nn.heads import SegmentationHead

    cfg = hyper.get("cfg") or {}
    if cfg.get("dino_feat_type", "feat") != "feat":
        raise StegosegError(f"{path} was trained on DINO's {cfg.get('dino_feat_type')} features; stegoseg's backbones "
                            "give the last block's tokens ('feat')")
    if cfg.get("arch", "dino") != "dino":
        raise StegosegError(f"{path} uses STEGO's {cfg.get('arch')} backbone; only its DINO models are supported")
    net, spec = _backbone(state, cfg.get("model_type", "vit_small"), cfg.get("dino_patch_size", 8), path)
    w1, b1 = state["net.cluster1.0.weight"], state["net.cluster1.0.bias"]
    dim, in_dim = int(w1.shape[0]), int(w1.shape[1])
    head = SegmentationHead(in_dim, dim)
    with torch.no_grad():
        head.linear.weight.copy_(w1.float().reshape(head.linear.weight.shape))
        head.linear.bias.copy_(b1.float())
        if "net.cluster2.0.weight" in state:
            for ours, theirs in ((0, 0), (2, 2)):
                layer = head.nonlinear[ours]
                layer.weight.copy_(state[f"net.cluster2.{theirs}.weight"].float().reshape(layer.weight.shape))
                layer.bias.copy_(state[f"net.cluster2.{theirs}.bias"].float())
        else:  # projection_type linear: the nonlinear part outputs zero
            for param in head.nonlinear.parameters():
                param.zero_()
    clusters = state["cluster_probe.clusters"].float()
    n_classes = int(hyper.get("n_classes") or state["linear_probe.weight"].shape[0])
    _check_names(class_names, n_classes, path)
    model = SegmentationModel(net, spec, head, n_clusters=int(clusters.shape[0]), n_classes=n_classes,
                              class_names=class_names, method="stego")
    with torch.no_grad():
        model.cluster_probe.centroids.copy_(clusters)
    _linear(model, state.get("linear_probe.weight"), state.get("linear_probe.bias"))
    return model.eval(), {"dim": dim, "resolution": int(cfg.get("res", 224)), "extra_clusters": int(cfg.get(
        "extra_clusters", 0)), "n_classes": n_classes}


def _teacher(state: dict, path: Path) -> torch.Tensor:
    for prefix in ("cluster_probe.ema_model.", "cluster_probe.cluster_centers.", "cluster_probe."):
        if f"{prefix}weight_v" in state:
            v, g = state[f"{prefix}weight_v"].float(), state[f"{prefix}weight_g"].float()
            v = v.reshape(v.shape[0], -1)
            return g.reshape(-1, 1) * v / v.norm(dim=1, keepdim=True)
    raise StegosegError(f"{path} holds no cluster probe (cluster_probe.ema_model.weight_v): not a PriMaPs model file")


def primaps_model(state: dict, hyper: dict, path: Path, stego: Optional[tuple], class_names=None):
    from stegoseg.model import SegmentationModel

    opts = hyper.get("opts") or {}
    on_stego = bool(opts.get("stego_ckpt"))
    prototypes = _teacher(state, path)
    if on_stego:
        if stego is None:
            raise StegosegError(f"{path} is PriMaPs trained on top of STEGO ({opts.get('stego_ckpt')}): pass that STEGO "
                                ".ckpt too (the PriMaPs file does not contain STEGO's network)")
        base, _ = stego_model(*stego[1:], path=stego[0])
        net, spec, head = base.backbone, base.backbone_spec, base.head
        method = "stego+primaps"
    else:
        net, spec = _backbone(state, opts.get("backbone_arch", "dino_vits"), opts.get("backbone_patch", 8), path)
        head, method = None, "primaps"
    code_dim = head.dim if head is not None else net.embed_dim
    if prototypes.shape[1] != code_dim:
        raise StegosegError(f"the prototypes in {path} take {prototypes.shape[1]}-channel input, the model's code has "
                            f"{code_dim}: files of two different models?")
    weight = state.get("linear_probe.weight")
    n_classes = int(weight.shape[0]) if weight is not None else None
    if weight is not None and weight.shape[1] != code_dim:
        weight = None  # PriMaPs' linear probe on STEGO reads the backbone features, not the code: not kept
        n_classes = None
    _check_names(class_names, int(prototypes.shape[0]), path)
    model = SegmentationModel(net, spec, head, n_clusters=int(prototypes.shape[0]), n_classes=n_classes,
                              class_names=class_names, method=method)
    with torch.no_grad():
        model.cluster_probe.centroids.copy_(prototypes)
    _linear(model, weight, state.get("linear_probe.bias"))
    return model.eval(), {"resolution": int((opts.get("crop_size") or [320])[0]), "n_classes": int(prototypes.shape[0]),
                          "dim": code_dim}


def _check_names(names, n: int, path: Path) -> None:
    if names is not None and len(names) != n:
        raise StegosegError(f"{len(names)} class names for the {n} classes of {path}")


def import_lightning(paths: Sequence, class_names=None) -> tuple:
    """(model, config values) from one STEGO .ckpt, one PriMaPs .ckpt, or a PriMaPs .ckpt trained on
    STEGO with its STEGO .ckpt (any order)."""
    files = {}
    for raw in paths:
        path = Path(raw)
        kind, state, hyper = read_lightning_checkpoint(path)
        if kind in files:
            raise StegosegError(f"{path} and {files[kind][0]} are both {kind} files: pass one of each")
        files[kind] = (path, state, hyper)
    if "primaps" in files:
        path, state, hyper = files["primaps"]
        return primaps_model(state, hyper, path, files.get("stego"), class_names)
    path, state, hyper = files["stego"]
    return stego_model(state, hyper, path, class_names)
