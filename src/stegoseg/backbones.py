"""Frozen feature extractors ("backbones") that turn images into dense patch features.

One factory, :func:`create_backbone`, builds every supported backbone from a named
preset. The presets are data (:data:`BACKBONE_PRESETS`), not code branches: each row
says which architecture to build, its patch size (output stride), width, input
normalisation, where the pretrained weights live and what they are.

Every backbone is a :class:`Backbone` module that is frozen (no parameter requires a
gradient) and always in eval mode. Its :meth:`Backbone.forward` maps a normalised batch
``(B, 3, H, W)`` whose sides are multiples of ``patch_size`` to dense features
``(B, C, H / p, W / p)``:

* ViTs (DINO, DINOv2, DINOv2 with registers): the patch tokens of the last block after
  the final layer norm; the CLS token and any register tokens are dropped. The timm
  model is created with ``dynamic_img_size=True`` so the absolute position embedding is
  resampled (bicubic) to the token grid of every input, i.e. any multiple of the patch
  size works. ``pos_embed="dino"`` (DINO v1 presets only) resamples it the way the
  original DINO code does instead (see :func:`dino_resample_pos_embed`).
* ResNets (supervised torchvision ResNet-50, MoCo v2 ResNet-50): the last stage
  (``layer4``) feature map, output stride 32.

Weights come from one of three places (recorded in ``Backbone.weights_source``):

* ``"random"``: ``pretrained=False`` and no ``weights``;
* a download: ``"timm:<model>@hub"`` for ViTs (Hugging Face hub repository of timm) and
  ``"url:<URL>"`` for the ResNets (torchvision / official MoCo URL, via ``torch.hub``'s
  cache directory). Without network access this raises one :class:`StegosegError`
  saying which file to fetch and how to pass it with ``weights=PATH``;
* a local file given as ``weights=PATH`` (the path is recorded, with its SHA-256).

Accepted local weight files: timm state dicts (``.safetensors`` or torch ``.pth/.bin``),
official DINO / DINOv2 checkpoints (plain, or DINO training checkpoints with a
``"teacher"``/``"student"`` entry whose keys carry ``module.``/``backbone.`` prefixes and
``head.`` keys), the official MoCo checkpoint (``"state_dict"`` with keys prefixed
``module.encoder_q.``), torchvision ResNet state dicts, and stegoseg checkpoints
(``{"format": "stegoseg", "backbone": {"name", "state_dict"}}``) or backbone exports
(``{"format": "stegoseg-backbone", "name", "state_dict"}``).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import math
import os
import socket
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping
from urllib.parse import urlparse

import torch
import torch.nn.functional as F
from torch import nn

from stegoseg.errors import StegosegError

__all__ = [
    "Backbone",
    "BackbonePreset",
    "BACKBONE_PRESETS",
    "POS_EMBED_MODES",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "create_backbone",
    "dino_resample_pos_embed",
    "file_sha256",
    "get_backbone_preset",
    "global_descriptor",
    "list_backbones",
    "resolve_backbone_name",
]

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)

# Seconds allowed for the quick "can we reach the download host at all" check made before
# any download, so that an offline machine fails fast with one clear message instead of
# waiting through the hub client's retries. Override with this environment variable.
NETWORK_PROBE_TIMEOUT_ENV = "STEGOSEG_NETWORK_TIMEOUT_S"
_DEFAULT_NETWORK_PROBE_TIMEOUT_S = 5.0

_HF_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")

#: How a ViT's absolute position embedding is resampled to the token grid of an input:
#: ``"timm"`` (timm's antialiased bicubic resize to the grid size) or ``"dino"`` (the
#: original DINO code's bicubic resize by a scale factor, see
#: :func:`dino_resample_pos_embed`; DINO v1 presets only).
POS_EMBED_MODES: tuple[str, ...] = ("timm", "dino")


# --------------------------------------------------------------------------------------
# Preset table
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BackbonePreset:
    """One named backbone: what to build and where its pretrained weights come from.

    Attributes:
        name: preset name, e.g. ``"dino_vits8"``.
        family: ``"vit"`` (built with timm) or ``"resnet"`` (built with torchvision).
        arch: timm model name with pretrained tag (``"vit_small_patch8_224.dino"``) for
            ViTs; torchvision constructor name (``"resnet50"``) for ResNets.
        patch_size: patch size of the ViT, or output stride of the ResNet's last stage.
        embed_dim: channels of the dense features at full size.
        mean, std: input normalisation (per RGB channel, for inputs in [0, 1]).
        hf_hub_id: Hugging Face hub repository with the timm weights (ViTs), or None.
        url: official download URL of the original checkpoint.
        description: one line for listings and docs.
        aliases: other accepted names (e.g. the timm model name).
        tiny: architecture overrides that make the test-sized variant (``tiny=True``).
    """

    name: str
    family: str
    arch: str
    patch_size: int
    embed_dim: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    hf_hub_id: str | None
    url: str | None
    description: str
    aliases: tuple[str, ...] = ()
    tiny: Mapping[str, Any] = field(default_factory=dict, hash=False)

    @property
    def download_source(self) -> str:
        """Where ``pretrained=True`` downloads from: ``"hf"`` (timm hub) or ``"url"``."""
        return "hf" if self.hf_hub_id else "url"


_TINY_VIT = {"embed_dim": 32, "depth": 2, "num_heads": 2}
# Same torchvision ResNet class and Bottleneck blocks as ResNet-50 (so the state-dict
# keys and the output stride of 32 are the same), one block per stage and narrow 3x3s.
_TINY_RESNET = {"layers": (1, 1, 1, 1), "width_per_group": 8}


def _dino(name: str, arch: str, patch: int, dim: int, url: str, what: str) -> BackbonePreset:
    return BackbonePreset(
        name=name, family="vit", arch=arch, patch_size=patch, embed_dim=dim,
        mean=IMAGENET_MEAN, std=IMAGENET_STD, hf_hub_id=f"timm/{arch}", url=url,
        description=what, aliases=(arch, arch.split(".")[0] + "_dino"), tiny=_TINY_VIT,
    )


def _dinov2(name: str, arch: str, dim: int, url: str, what: str) -> BackbonePreset:
    return BackbonePreset(
        name=name, family="vit", arch=arch, patch_size=14, embed_dim=dim,
        mean=IMAGENET_MEAN, std=IMAGENET_STD, hf_hub_id=f"timm/{arch}", url=url,
        description=what, aliases=(arch, arch.split(".")[0]), tiny=_TINY_VIT,
    )


_DINO_URL = "https://dl.fbaipublicfiles.com/dino"
_DINOV2_URL = "https://dl.fbaipublicfiles.com/dinov2"

#: All named backbones, in display order.
BACKBONE_PRESETS: dict[str, BackbonePreset] = {
    p.name: p
    for p in (
        _dino("dino_vits8", "vit_small_patch8_224.dino", 8, 384,
              f"{_DINO_URL}/dino_deitsmall8_pretrain/dino_deitsmall8_pretrain.pth",
              "DINO ViT-S/8 (Caron et al. 2021), STEGO's main ablation backbone"),
        _dino("dino_vits16", "vit_small_patch16_224.dino", 16, 384,
              f"{_DINO_URL}/dino_deitsmall16_pretrain/dino_deitsmall16_pretrain.pth",
              "DINO ViT-S/16"),
        _dino("dino_vitb8", "vit_base_patch8_224.dino", 8, 768,
              f"{_DINO_URL}/dino_vitbase8_pretrain/dino_vitbase8_pretrain.pth",
              "DINO ViT-B/8, STEGO's best published backbone"),
        _dino("dino_vitb16", "vit_base_patch16_224.dino", 16, 768,
              f"{_DINO_URL}/dino_vitbase16_pretrain/dino_vitbase16_pretrain.pth",
              "DINO ViT-B/16"),
        _dinov2("dinov2_vits14", "vit_small_patch14_dinov2.lvd142m", 384,
                f"{_DINOV2_URL}/dinov2_vits14/dinov2_vits14_pretrain.pth",
                "DINOv2 ViT-S/14 (LVD-142M)"),
        _dinov2("dinov2_vitb14", "vit_base_patch14_dinov2.lvd142m", 768,
                f"{_DINOV2_URL}/dinov2_vitb14/dinov2_vitb14_pretrain.pth",
                "DINOv2 ViT-B/14 (LVD-142M)"),
        _dinov2("dinov2_vitl14", "vit_large_patch14_dinov2.lvd142m", 1024,
                f"{_DINOV2_URL}/dinov2_vitl14/dinov2_vitl14_pretrain.pth",
                "DINOv2 ViT-L/14 (LVD-142M)"),
        _dinov2("dinov2_vits14_reg", "vit_small_patch14_reg4_dinov2.lvd142m", 384,
                f"{_DINOV2_URL}/dinov2_vits14/dinov2_vits14_reg4_pretrain.pth",
                "DINOv2 ViT-S/14 with 4 register tokens"),
        _dinov2("dinov2_vitb14_reg", "vit_base_patch14_reg4_dinov2.lvd142m", 768,
                f"{_DINOV2_URL}/dinov2_vitb14/dinov2_vitb14_reg4_pretrain.pth",
                "DINOv2 ViT-B/14 with 4 register tokens"),
        _dinov2("dinov2_vitl14_reg", "vit_large_patch14_reg4_dinov2.lvd142m", 1024,
                f"{_DINOV2_URL}/dinov2_vitl14/dinov2_vitl14_reg4_pretrain.pth",
                "DINOv2 ViT-L/14 with 4 register tokens"),
        BackbonePreset(
            name="resnet50_supervised", family="resnet", arch="resnet50", patch_size=32,
            embed_dim=2048, mean=IMAGENET_MEAN, std=IMAGENET_STD, hf_hub_id=None,
            # torchvision ResNet50_Weights.IMAGENET1K_V1 (the classic 76.1% top-1 weights,
            # what `pretrained=True` gave before torchvision 0.13).
            url="https://download.pytorch.org/models/resnet50-0676ba61.pth",
            description="Supervised ImageNet ResNet-50 (torchvision IMAGENET1K_V1), layer4",
            aliases=("resnet50", "resnet50.tv_in1k", "supervised_resnet50"),
            tiny=_TINY_RESNET,
        ),
        BackbonePreset(
            name="mocov2_resnet50", family="resnet", arch="resnet50", patch_size=32,
            embed_dim=2048, mean=IMAGENET_MEAN, std=IMAGENET_STD, hf_hub_id=None,
            url=("https://dl.fbaipublicfiles.com/moco/moco_checkpoints/moco_v2_800ep/"
                 "moco_v2_800ep_pretrain.pth.tar"),
            description="MoCo v2 ResNet-50, 800 epochs (He et al. / Chen et al. 2020), layer4",
            aliases=("moco_v2_resnet50", "mocov2", "moco_v2_800ep"),
            tiny=_TINY_RESNET,
        ),
    )
}


def _normalise_name(name: str) -> str:
    return name.strip().lower().replace("-", "_")


def _build_alias_table() -> dict[str, str]:
    table: dict[str, str] = {}
    for preset in BACKBONE_PRESETS.values():
        for alias in (preset.name, *preset.aliases):
            key = _normalise_name(alias)
            if key in table and table[key] != preset.name:
                raise RuntimeError(f"backbone alias {alias!r} is ambiguous")
            table[key] = preset.name
    return table


_ALIASES = _build_alias_table()


def list_backbones() -> list[str]:
    """Names of all backbone presets, in display order."""
    return list(BACKBONE_PRESETS)


def resolve_backbone_name(name: str) -> str:
    """Map a preset name or alias (e.g. a timm model name) to the preset name.

    Raises:
        StegosegError: for an unknown name; the message lists the valid names.
    """
    key = _normalise_name(str(name))
    if key not in _ALIASES:
        raise StegosegError(
            f"unknown backbone {name!r}; valid names: {', '.join(list_backbones())}"
        )
    return _ALIASES[key]


def get_backbone_preset(name: str) -> BackbonePreset:
    """The :class:`BackbonePreset` for a preset name or alias."""
    return BACKBONE_PRESETS[resolve_backbone_name(name)]


# --------------------------------------------------------------------------------------
# The module
# --------------------------------------------------------------------------------------


def global_descriptor(features: torch.Tensor) -> torch.Tensor:
    """Global image descriptor from dense features: spatial mean, L2-normalised.

    ``(B, C, h, w) -> (B, C)``. This is what STEGO uses to find nearest neighbours (the
    CLS token is not used).
    """
    return F.normalize(features.mean(dim=(2, 3)), dim=1)


class Backbone(nn.Module):
    """A frozen dense feature extractor.

    Attributes:
        name: preset name (e.g. ``"dino_vits8"``).
        family: ``"vit"`` or ``"resnet"``.
        patch_size: ViT patch size, or output stride of a ResNet (32).
        embed_dim: channels ``C`` of the dense features.
        mean, std: input normalisation for images in [0, 1] (RGB tuples).
        weights_source: ``"random"``, ``"timm:<model>@hub"``, ``"url:<URL>"`` or the path
            of the local weights file.
        weights_sha256: SHA-256 of the weights file (local or downloaded), else None.
        tiny: whether this is the test-sized architecture.
        pos_embed_mode: how a ViT's position embedding is resampled to the input's token
            grid, one of :data:`POS_EMBED_MODES` (always ``"timm"`` for ResNets).
        model: the wrapped timm ``VisionTransformer`` / torchvision ``ResNet``.

    The module is frozen: all parameters have ``requires_grad=False`` and ``train()``
    keeps it in eval mode (dropout off, BatchNorm statistics fixed). Gradients can still
    flow to an input that requires them.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        name: str,
        family: str,
        patch_size: int,
        embed_dim: int,
        mean: tuple[float, float, float],
        std: tuple[float, float, float],
        weights_source: str = "random",
        weights_sha256: str | None = None,
        tiny: bool = False,
        pos_embed_mode: str = "timm",
    ) -> None:
        super().__init__()
        if family not in ("vit", "resnet"):
            raise ValueError(f"unknown backbone family {family!r}")
        if pos_embed_mode not in POS_EMBED_MODES:
            raise ValueError(f"unknown pos_embed_mode {pos_embed_mode!r}")
        self.model = model
        self.name = name
        self.family = family
        self.patch_size = int(patch_size)
        self.embed_dim = int(embed_dim)
        self.mean = tuple(float(v) for v in mean)
        self.std = tuple(float(v) for v in std)
        self.weights_source = weights_source
        self.weights_sha256 = weights_sha256
        self.tiny = tiny
        self.pos_embed_mode = pos_embed_mode
        # Not persistent: they are derived from mean/std and must not enter state dicts.
        self.register_buffer("_mean_t", torch.tensor(self.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("_std_t", torch.tensor(self.std).view(1, 3, 1, 1), persistent=False)
        self.freeze()

    # -- frozen / eval ------------------------------------------------------------------

    def freeze(self) -> "Backbone":
        """Turn off gradients of all parameters and switch to eval mode."""
        for param in self.parameters():
            param.requires_grad_(False)
        return self.train(False)

    def train(self, mode: bool = True) -> "Backbone":
        """Always eval: a frozen backbone never uses dropout or updates BatchNorm stats."""
        return super().train(False)

    # -- input handling -----------------------------------------------------------------

    def normalize(self, x01: torch.Tensor) -> torch.Tensor:
        """Normalise images in [0, 1] (``(B, 3, H, W)`` or ``(3, H, W)``) with mean/std."""
        x01 = _as_float(x01)
        mean = self._mean_t.to(device=x01.device, dtype=x01.dtype)
        std = self._std_t.to(device=x01.device, dtype=x01.dtype)
        if x01.dim() == 3:
            mean, std = mean[0], std[0]
        return (x01 - mean) / std

    def prepare(self, x01: torch.Tensor, mode: str = "pad") -> tuple[torch.Tensor, tuple[int, int]]:
        """Normalise images in [0, 1] and make their size a multiple of the patch size.

        Args:
            x01: ``(B, 3, H, W)`` images in [0, 1] (uint8 input is divided by 255).
            mode: ``"pad"`` normalises, then pads the bottom and right with zeros up to
                the next multiple of ``patch_size``. Zero after normalisation is the mean
                colour; the image content is not resampled, and the feature cells
                ``[:ceil(H/p), :ceil(W/p)]`` cover the original image (the last row /
                column partly covers padding; nothing needs to be cropped when the
                padding is less than one patch, which it always is).
                ``"resize"`` bilinearly resizes (``align_corners=False``, antialias off)
                to the nearest multiple, ``max(p, round(H/p) * p)`` per side, then
                normalises; the feature grid then covers exactly the original image.

        Returns:
            ``(x, (H, W))``: the batch ready for :meth:`forward` and the original size.
        """
        if x01.dim() != 4 or x01.shape[1] != 3:
            raise ValueError(f"expected images of shape (B, 3, H, W), got {tuple(x01.shape)}")
        height, width = int(x01.shape[-2]), int(x01.shape[-1])
        p = self.patch_size
        if mode == "pad":
            x = self.normalize(x01)
            pad_h = (-height) % p
            pad_w = (-width) % p
            if pad_h or pad_w:
                x = F.pad(x, (0, pad_w, 0, pad_h), value=0.0)
        elif mode == "resize":
            new_h = max(p, int(round(height / p)) * p)
            new_w = max(p, int(round(width / p)) * p)
            x = _as_float(x01)
            if (new_h, new_w) != (height, width):
                x = F.interpolate(x, size=(new_h, new_w), mode="bilinear", align_corners=False)
            x = self.normalize(x)
        else:
            raise StegosegError(f"unknown prepare mode {mode!r}; use 'pad' or 'resize'")
        return x, (height, width)

    # -- features -----------------------------------------------------------------------

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Dense features ``(B, C, H/p, W/p)`` of a normalised batch ``(B, 3, H, W)``.

        ``H`` and ``W`` must be multiples of ``patch_size`` (see :meth:`prepare`).
        """
        if x.dim() != 4:
            raise ValueError(f"expected a batch of shape (B, 3, H, W), got {tuple(x.shape)}")
        batch, _, height, width = x.shape
        p = self.patch_size
        if height % p or width % p:
            raise StegosegError(
                f"input size {height}x{width} is not a multiple of the patch size {p} of "
                f"backbone '{self.name}'; use Backbone.prepare()/features() or pick a size "
                f"that is a multiple of {p}"
            )
        if self.family == "vit":
            tokens = self.model.forward_features(x)  # (B, prefix + h*w, C), after final norm
            tokens = tokens[:, self.model.num_prefix_tokens:]  # drop CLS + register tokens
            grid_h, grid_w = height // p, width // p
            return tokens.reshape(batch, grid_h, grid_w, tokens.shape[-1]).permute(0, 3, 1, 2).contiguous()
        model = self.model
        x = model.maxpool(model.relu(model.bn1(model.conv1(x))))
        x = model.layer1(x)
        x = model.layer2(x)
        x = model.layer3(x)
        return model.layer4(x)

    def features(self, x01: torch.Tensor, mode: str = "pad") -> torch.Tensor:
        """Dense features of images in [0, 1] of any size (no gradients).

        :meth:`prepare` + :meth:`forward`; in ``"pad"`` mode the map is cropped to
        ``ceil(H/p) x ceil(W/p)``, in ``"resize"`` mode it has the resized grid
        ``round(H/p) x round(W/p)``.
        """
        x, (height, width) = self.prepare(x01, mode=mode)
        with torch.no_grad():
            feats = self(x)
        if mode == "pad":
            p = self.patch_size
            feats = feats[:, :, : math.ceil(height / p), : math.ceil(width / p)]
        return feats

    def global_features(self, x: torch.Tensor) -> torch.Tensor:
        """Global descriptor ``(B, C)`` of a normalised batch: the spatial mean of the
        dense features, L2-normalised (see :func:`global_descriptor`)."""
        return global_descriptor(self(x))

    def extra_repr(self) -> str:
        return (
            f"name={self.name!r}, patch_size={self.patch_size}, embed_dim={self.embed_dim}, "
            f"weights_source={self.weights_source!r}, tiny={self.tiny}, "
            f"pos_embed_mode={self.pos_embed_mode!r}"
        )


def _as_float(x: torch.Tensor) -> torch.Tensor:
    if x.dtype == torch.uint8:
        return x.float() / 255.0
    if not torch.is_floating_point(x):
        return x.float()
    return x


# --------------------------------------------------------------------------------------
# Building
# --------------------------------------------------------------------------------------


def create_backbone(
    name: str,
    pretrained: bool = True,
    weights: str | os.PathLike[str] | None = None,
    tiny: bool = False,
    *,
    pos_embed: str = "timm",
    **overrides: Any,
) -> Backbone:
    """Build a frozen :class:`Backbone` from a preset name (or alias).

    Args:
        name: one of :func:`list_backbones` or an alias (e.g. the timm model name).
        pretrained: download the preset's pretrained weights (timm hub for ViTs,
            torchvision / official MoCo URL for ResNets) unless ``weights`` is given.
            Downloads are cached (Hugging Face cache, ``torch.hub`` cache) and a cached
            file is used without any network access.
        weights: local weights file to load instead of downloading (see module docs
            for accepted formats). Loaded with strict key matching.
        tiny: build the test-sized architecture of the same family and patch size (ViT:
            2 blocks, width 32, 2 heads; ResNet: one Bottleneck per stage, stride 32).
            Cannot be combined with a download; combine it with ``weights`` to load a
            file saved from a tiny backbone.
        pos_embed: how the ViT's absolute position embedding is resampled to the token
            grid of each input (CLI ``--pos-embed``): ``"timm"`` (default, timm's
            antialiased bicubic resize) or ``"dino"`` (the original DINO code's
            interpolation, which the published STEGO numbers used; identical to
            ``"timm"`` at the stored grid, see :func:`dino_resample_pos_embed`). Only the
            DINO v1 ViT presets support ``"dino"``.
        **overrides: passed to ``timm.create_model`` (ViTs) or the torchvision
            ``ResNet`` constructor (ResNets).

    Raises:
        StegosegError: unknown name or ``pos_embed`` value, ``pos_embed="dino"`` for a
            backbone other than a DINO v1 ViT, unreadable / non-matching weights file, or
            the download is impossible (offline): the message names the file to fetch and
            says to pass it as ``weights=PATH`` (CLI ``--weights PATH``).
    """
    preset = get_backbone_preset(name)
    pos_embed = _check_pos_embed_option(pos_embed, preset)
    if tiny and pretrained and weights is None:
        raise StegosegError(
            f"tiny=True builds an untrained test-sized '{preset.name}'; pass pretrained=False "
            "(or weights=PATH with a file saved from a tiny backbone)"
        )
    # Find and read the weights before building, so that a bad path or an impossible
    # download fails at once.
    path: Path | None = None
    state: dict[str, torch.Tensor] | None = None
    weights_source, weights_sha256 = "random", None
    if weights is not None:
        path = Path(weights).expanduser()
        weights_source = str(path.resolve())
    elif pretrained:
        path, weights_source = _download_weights(preset)
    if path is not None:
        obj = _read_weights_file(path)
        if isinstance(obj, Mapping) and obj.get("format") == "stegoseg-backbone" and obj.get("tiny"):
            tiny = True  # a file exported by `stegoseg pretrain --tiny` records its architecture
        state = _extract_state_dict(obj, preset, path)
        weights_sha256 = file_sha256(path)

    if preset.family == "vit":
        model, patch_size, embed_dim = _build_vit(preset, tiny, overrides, pos_embed=pos_embed)
    else:
        model, patch_size, embed_dim = _build_resnet(preset, tiny, overrides)
    if state is not None:
        assert path is not None
        _load_state_dict(model, preset, state, path)

    return Backbone(
        model, name=preset.name, family=preset.family, patch_size=patch_size,
        embed_dim=embed_dim, mean=preset.mean, std=preset.std,
        weights_source=weights_source, weights_sha256=weights_sha256, tiny=tiny,
        pos_embed_mode=pos_embed,
    )


def _build_vit(
    preset: BackbonePreset, tiny: bool, overrides: dict[str, Any], *, pos_embed: str = "timm"
) -> tuple[nn.Module, int, int]:
    import timm

    kwargs: dict[str, Any] = {"num_classes": 0, "dynamic_img_size": True}
    if tiny:
        kwargs.update(preset.tiny)
    kwargs.update(overrides)
    try:
        model = timm.create_model(preset.arch, pretrained=False, **kwargs)
    except TypeError as exc:
        raise StegosegError(f"invalid option for backbone '{preset.name}': {exc}") from exc
    if pos_embed == "dino":
        _use_dino_pos_embed(model, preset)
    patch = model.patch_embed.patch_size
    patch_size = int(patch[0] if isinstance(patch, (tuple, list)) else patch)
    return model, patch_size, int(model.embed_dim)


def _build_resnet(preset: BackbonePreset, tiny: bool, overrides: dict[str, Any]) -> tuple[nn.Module, int, int]:
    from torchvision.models import resnet as tv_resnet

    if tiny:
        kwargs = dict(preset.tiny)
        layers = list(kwargs.pop("layers"))
        kwargs.update(overrides)
        try:
            model = tv_resnet.ResNet(tv_resnet.Bottleneck, layers, **kwargs)
        except TypeError as exc:
            raise StegosegError(f"invalid option for backbone '{preset.name}': {exc}") from exc
    else:
        constructor = getattr(tv_resnet, preset.arch)
        try:
            model = constructor(weights=None, **overrides)
        except TypeError as exc:
            raise StegosegError(f"invalid option for backbone '{preset.name}': {exc}") from exc
    embed_dim = int(model.fc.in_features)
    model.fc = nn.Identity()  # classifier is not part of the backbone
    dilated = overrides.get("replace_stride_with_dilation") or (False, False, False)
    stride = 32 // (2 ** sum(bool(d) for d in dilated))
    return model, stride, embed_dim


# --------------------------------------------------------------------------------------
# Position embedding: DINO's interpolation
# --------------------------------------------------------------------------------------


def dino_resample_pos_embed(
    pos_embed: torch.Tensor, grid_h: int, grid_w: int, num_prefix_tokens: int = 1
) -> torch.Tensor:
    """Resample a ViT position embedding to a ``grid_h x grid_w`` token grid as DINO does.

    Reproduces ``interpolate_pos_encoding`` of the original DINO code
    (facebookresearch/dino), which produced the published STEGO numbers: when the grid
    has as many cells as the stored (square) one and is square, ``pos_embed`` is
    returned as is. Otherwise the prefix (class token) embeddings are kept and the
    stored ``sqrt(N) x sqrt(N)`` patch embeddings are resized by bicubic interpolation
    (no antialiasing, ``align_corners=False``) with the *scale factor*
    ``((grid_h + 0.1) / sqrt(N), (grid_w + 0.1) / sqrt(N))``. The 0.1 keeps the output
    size exactly ``grid_h x grid_w`` despite rounding, but the sampling positions follow
    the slightly larger scale, so the result differs from a resize to that size
    (timm's ``resample_abs_pos_embed``) everywhere except at the stored grid.

    Args:
        pos_embed: ``(1, num_prefix_tokens + N, C)`` with ``N`` a square number.
        grid_h, grid_w: token grid of the input (image size / patch size).
        num_prefix_tokens: leading embeddings not on the grid (DINO: 1, the class token).

    Returns:
        ``(1, num_prefix_tokens + grid_h * grid_w, C)``, same dtype as ``pos_embed``.
    """
    if pos_embed.dim() != 3 or pos_embed.shape[0] != 1:
        raise ValueError(f"expected a position embedding of shape (1, T, C), got {tuple(pos_embed.shape)}")
    grid_h, grid_w = int(grid_h), int(grid_w)
    if grid_h < 1 or grid_w < 1:
        raise ValueError(f"grid must be at least 1x1, got {grid_h}x{grid_w}")
    num_patches = pos_embed.shape[1] - num_prefix_tokens
    side = math.isqrt(num_patches) if num_patches > 0 else 0
    if side < 1 or side * side != num_patches:
        raise ValueError(f"stored position embedding has {num_patches} patch entries, not a square grid")
    if grid_h * grid_w == num_patches and grid_h == grid_w:
        return pos_embed
    dim = pos_embed.shape[-1]
    prefix, patches = pos_embed[:, :num_prefix_tokens], pos_embed[:, num_prefix_tokens:]
    patches = patches.reshape(1, side, side, dim).permute(0, 3, 1, 2)
    scale = ((grid_h + 0.1) / math.sqrt(num_patches), (grid_w + 0.1) / math.sqrt(num_patches))
    # Bicubic needs float32 or float64 on every device; half precision is upcast.
    work = patches if patches.dtype in (torch.float32, torch.float64) else patches.float()
    resized = F.interpolate(work, scale_factor=scale, mode="bicubic").to(pos_embed.dtype)
    if tuple(resized.shape[-2:]) != (grid_h, grid_w):  # cannot happen for sane grids
        raise RuntimeError(f"DINO position-embedding resize gave {tuple(resized.shape[-2:])}, not {(grid_h, grid_w)}")
    resized = resized.permute(0, 2, 3, 1).reshape(1, grid_h * grid_w, dim)
    return torch.cat([prefix, resized], dim=1)


class _DinoPosEmbedStep:
    """Replaces ``VisionTransformer._pos_embed`` of one timm ViT instance.

    Same as timm's step for a ViT with one class token, no register tokens and
    ``no_embed_class=False`` (concatenate the class token, add the position embedding,
    position dropout), except that the embedding is resampled with
    :func:`dino_resample_pos_embed`. A plain object rather than a bound method so that
    the instance can be deep-copied and pickled with the override intact.
    """

    def __init__(self, vit: nn.Module) -> None:
        self.vit = vit

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        vit = self.vit
        if x.dim() == 4:  # dynamic_img_size: (B, H, W, C) patch grid
            batch, grid_h, grid_w, dim = x.shape
        else:  # fixed size: (B, N, C) on the stored grid
            batch, _, dim = x.shape
            grid_h, grid_w = vit.patch_embed.grid_size
        pos_embed = dino_resample_pos_embed(vit.pos_embed, grid_h, grid_w, num_prefix_tokens=1)
        x = torch.cat([vit.cls_token.expand(batch, -1, -1), x.reshape(batch, -1, dim)], dim=1)
        return vit.pos_drop(x + pos_embed)

    def __repr__(self) -> str:
        return "DINO position-embedding interpolation"


def _dino_pos_embed_error(preset: BackbonePreset, why: str = "") -> StegosegError:
    supported = ", ".join(n for n, p in BACKBONE_PRESETS.items() if _is_dino_v1(p))
    return StegosegError(
        f"--pos-embed dino is not supported by backbone '{preset.name}'{why}: only DINO ViTs "
        f"({supported}) support it; use --pos-embed timm"
    )


def _is_dino_v1(preset: BackbonePreset) -> bool:
    return preset.family == "vit" and preset.arch.endswith(".dino")


def _check_pos_embed_option(pos_embed: str, preset: BackbonePreset) -> str:
    """Validate the ``pos_embed`` option (CLI ``--pos-embed``) for a preset."""
    mode = str(pos_embed).strip().lower()
    if mode not in POS_EMBED_MODES:
        raise StegosegError(
            f"unknown --pos-embed {pos_embed!r}; allowed values: {', '.join(POS_EMBED_MODES)}"
        )
    if mode == "dino" and not _is_dino_v1(preset):
        raise _dino_pos_embed_error(preset)
    return mode


def _use_dino_pos_embed(model: nn.Module, preset: BackbonePreset) -> None:
    """Make this ViT instance resample its position embedding the DINO way.

    Only plain ViTs qualify: one class token, no register tokens, a position embedding
    that covers the class token (``no_embed_class=False``) on a square grid.
    """
    from timm.models.vision_transformer import VisionTransformer

    if not isinstance(model, VisionTransformer):
        raise _dino_pos_embed_error(preset, f" (built as {type(model).__name__})")
    if getattr(model, "cls_token", None) is None or getattr(model, "reg_token", None) is not None \
            or model.num_prefix_tokens != 1:
        raise _dino_pos_embed_error(preset, " (needs exactly one class token and no register tokens)")
    if model.no_embed_class or model.pos_embed is None:
        raise _dino_pos_embed_error(preset, " (needs a position embedding that includes the class token)")
    grid = tuple(model.patch_embed.grid_size)
    if grid[0] != grid[1]:
        raise _dino_pos_embed_error(preset, f" (stored position grid {grid[0]}x{grid[1]} is not square)")
    model._pos_embed = _DinoPosEmbedStep(model)


# --------------------------------------------------------------------------------------
# Loading local weight files
# --------------------------------------------------------------------------------------


def file_sha256(path: str | os.PathLike[str], chunk_bytes: int = 1 << 20) -> str:
    """Hex SHA-256 of a file."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while True:
            block = handle.read(chunk_bytes)
            if not block:
                break
            digest.update(block)
    return digest.hexdigest()


def _read_weights_file(path: Path) -> Any:
    if not path.exists():
        raise StegosegError(f"weights file not found: {path}")
    if not path.is_file():
        raise StegosegError(f"weights path is not a file: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device="cpu")
        except Exception as exc:  # safetensors raises its own error types
            raise StegosegError(f"cannot read safetensors weights file {path}: {exc}") from exc
    try:
        # weights_only=True: tensors and plain containers only, no arbitrary code. DINO
        # training checkpoints also store their argparse.Namespace of arguments, which
        # is allowed explicitly. MoCo's .pth.tar holds epoch/arch/state_dict/optimizer
        # (plain types), so no unsafe fallback is needed for it.
        with _allow_namespace_unpickling():
            return torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise StegosegError(
            f"cannot read weights file {path} as a weights-only torch file ({first}); "
            "save a plain state dict (torch.save(model.state_dict(), ...)) or a .safetensors file"
        ) from exc


def _allow_namespace_unpickling() -> Any:
    """Context allowing ``argparse.Namespace`` in weights-only loading (torch >= 2.5)."""
    safe_globals = getattr(torch.serialization, "safe_globals", None)
    return safe_globals([argparse.Namespace]) if safe_globals else contextlib.nullcontext()


def _strip_prefix(state: dict[str, Any], prefix: str) -> dict[str, Any]:
    """Keep only keys starting with ``prefix`` if any do, with the prefix removed."""
    if any(k.startswith(prefix) for k in state):
        return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    return state


def _extract_state_dict(obj: Any, preset: BackbonePreset, path: Path) -> dict[str, torch.Tensor]:
    """Unwrap any supported checkpoint container into a flat backbone state dict."""
    if not isinstance(obj, Mapping):
        raise StegosegError(f"weights file {path} does not hold a state dict (got {type(obj).__name__})")
    fmt = obj.get("format")
    if fmt in ("stegoseg", "stegoseg-backbone"):
        entry = obj.get("backbone") if fmt == "stegoseg" else obj
        if not isinstance(entry, Mapping) or not isinstance(entry.get("state_dict"), Mapping):
            raise StegosegError(
                f"stegoseg checkpoint {path} holds no backbone weights; pass the backbone's "
                "original weights file with weights=PATH"
            )
        stored = entry.get("name")
        if stored is not None:
            try:
                stored_preset = resolve_backbone_name(str(stored))
            except StegosegError:
                stored_preset = str(stored)
            if stored_preset != preset.name:
                raise StegosegError(
                    f"weights file {path} holds backbone '{stored}', not '{preset.name}'; "
                    f"use create_backbone('{stored}', weights=...)"
                )
        state = dict(entry["state_dict"])
        state = _strip_prefix(state, "model.")  # Backbone.state_dict() keys
    else:
        state = obj
        for container in ("teacher", "student", "state_dict", "model"):
            inner = state.get(container) if isinstance(state, Mapping) else None
            if isinstance(inner, Mapping):
                state = inner
                break
        state = dict(state)
        # DDP wrappers, MoCo's query encoder, DINO's MultiCropWrapper (backbone + head).
        state = _strip_prefix(state, "module.")
        state = _strip_prefix(state, "encoder_q.")
        state = _strip_prefix(state, "backbone.")
        state = _strip_prefix(state, "model.")

    # The classifier / projection head is not part of the backbone.
    head = "head." if preset.family == "vit" else "fc."
    state = {k: v for k, v in state.items() if not k.startswith(head)}
    bad = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise StegosegError(f"weights file {path} is not a state dict of tensors (e.g. key {bad[0]!r})")
    return state


def _load_state_dict(
    model: nn.Module, preset: BackbonePreset, state: dict[str, torch.Tensor], path: Path
) -> None:
    """Load an extracted state dict into the model with strict key and shape matching."""
    if preset.family == "vit" and state:
        # timm's ViT filter converts official DINOv2 checkpoints (mask token, registers,
        # SwiGLU names), reshapes linear patch embeddings and resamples pos_embed when
        # the checkpoint's grid differs from the model's.
        from timm.models.vision_transformer import checkpoint_filter_fn

        try:
            state = checkpoint_filter_fn(state, model)
        except Exception as exc:
            raise StegosegError(
                f"weights file {path} does not fit backbone '{preset.name}': {exc}"
            ) from exc

    expected = model.state_dict()
    for key, value in expected.items():
        # Old BatchNorm checkpoints have no step counter; it is unused in eval mode.
        if key.endswith("num_batches_tracked") and key not in state:
            state[key] = value.clone()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    mismatched = [
        f"{k} {tuple(state[k].shape)} vs {tuple(expected[k].shape)}"
        for k in expected
        if k in state and tuple(state[k].shape) != tuple(expected[k].shape)
    ]
    if missing or unexpected or mismatched:
        parts = []
        if mismatched:
            parts.append(f"shape mismatch (file vs model): {', '.join(mismatched[:3])}")
        if missing:
            parts.append(f"missing keys: {', '.join(missing[:5])}")
        if unexpected:
            parts.append(f"unexpected keys: {', '.join(unexpected[:5])}")
        raise StegosegError(
            f"weights file {path} does not fit backbone '{preset.name}' "
            f"({'; '.join(parts)}); check the backbone name (and tiny=) matches the file"
        )
    model.load_state_dict(state, strict=True)


# --------------------------------------------------------------------------------------
# Downloading
# --------------------------------------------------------------------------------------


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _hub_offline() -> bool:
    """True when the user asked the Hugging Face hub client to stay offline."""
    if _env_flag("HF_HUB_OFFLINE") or _env_flag("TRANSFORMERS_OFFLINE"):
        return True
    try:
        from huggingface_hub import constants

        return bool(getattr(constants, "HF_HUB_OFFLINE", False))
    except Exception:
        return False


def _probe_timeout_s() -> float:
    try:
        return float(os.environ.get(NETWORK_PROBE_TIMEOUT_ENV, _DEFAULT_NETWORK_PROBE_TIMEOUT_S))
    except ValueError:
        return _DEFAULT_NETWORK_PROBE_TIMEOUT_S


def _network_available(url: str) -> tuple[bool, str]:
    """Quick check that the host of ``url`` accepts TCP connections.

    Runs in a daemon thread bounded by the probe timeout, so a hanging DNS lookup cannot
    block. Skipped (assumed reachable) when an HTTP(S) proxy is configured, because the
    download then goes through the proxy and the host may not be reachable directly.
    Returns ``(ok, reason)``.
    """
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True, ""
    parsed = urlparse(url)
    host = parsed.hostname or ""
    port = parsed.port or (80 if parsed.scheme == "http" else 443)
    timeout_s = _probe_timeout_s()
    outcome: dict[str, str] = {}

    def probe() -> None:
        try:
            with socket.create_connection((host, port), timeout=timeout_s):
                outcome["ok"] = ""
        except OSError as exc:
            outcome["error"] = str(exc) or type(exc).__name__

    thread = threading.Thread(target=probe, name="stegoseg-network-probe", daemon=True)
    thread.start()
    thread.join(timeout_s + 0.5)
    if "ok" in outcome:
        return True, ""
    return False, f"cannot reach {host} ({outcome.get('error', f'no answer within {timeout_s:g} s')})"


def _cached_hub_file(repo_id: str) -> str | None:
    """Path of the preset's weights in the local Hugging Face cache, or None (no network)."""
    try:
        from huggingface_hub import hf_hub_download
    except ImportError:
        return None
    for filename in _HF_WEIGHT_FILES:
        try:
            return hf_hub_download(repo_id, filename, local_files_only=True)
        except Exception:
            continue
    return None


def _download_hub_file(repo_id: str) -> str:
    """Download the preset's weights from the Hugging Face hub (safetensors preferred)."""
    from huggingface_hub import hf_hub_download

    try:
        from huggingface_hub.errors import EntryNotFoundError
    except ImportError:  # huggingface_hub < 0.23
        from huggingface_hub.utils import EntryNotFoundError

    for filename in _HF_WEIGHT_FILES[:-1]:
        try:
            return hf_hub_download(repo_id, filename)
        except EntryNotFoundError:
            continue
    return hf_hub_download(repo_id, _HF_WEIGHT_FILES[-1])


def _url_cache_path(url: str) -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints" / Path(urlparse(url).path).name


def _cached_url_file(url: str) -> str | None:
    """Path of a URL download in torch.hub's checkpoint cache, or None."""
    path = _url_cache_path(url)
    return str(path) if path.is_file() else None


def _download_url_file(url: str) -> str:
    path = _url_cache_path(url)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.hub.download_url_to_file(url, str(path), progress=True)
    return str(path)


def _offline_error(preset: BackbonePreset, reason: str) -> StegosegError:
    if preset.download_source == "hf":
        what = (
            f"model.safetensors from https://huggingface.co/{preset.hf_hub_id} "
            f"(or the official checkpoint {preset.url})"
        )
    else:
        what = str(preset.url)
    return StegosegError(
        f"cannot download pretrained weights for backbone '{preset.name}' ({reason}); "
        f"download {what} on a machine with internet access and pass the file with "
        f"create_backbone('{preset.name}', weights=PATH) or the CLI option --weights PATH "
        f"(or use --no-pretrained / pretrained=False for a random backbone: numbers then are not meaningful)"
    )


def _download_weights(preset: BackbonePreset) -> tuple[Path, str]:
    """Local path of the preset's pretrained weights (cached or downloaded) and the
    ``weights_source`` string. Never waits long when offline."""
    if preset.download_source == "hf":
        assert preset.hf_hub_id is not None
        source = f"timm:{preset.arch}@hub"
        cached = _cached_hub_file(preset.hf_hub_id)
        if cached:
            return Path(cached), source
        if _hub_offline():
            raise _offline_error(preset, "HF_HUB_OFFLINE is set and the file is not in the local cache")
        endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
        ok, reason = _network_available(endpoint)
        if not ok:
            raise _offline_error(preset, reason)
        try:
            return Path(_download_hub_file(preset.hf_hub_id)), source
        except Exception as exc:  # connection, HTTP and cache errors of the hub client
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            raise _offline_error(preset, f"{type(exc).__name__}: {first}") from exc

    assert preset.url is not None
    source = f"url:{preset.url}"
    cached = _cached_url_file(preset.url)
    if cached:
        return Path(cached), source
    ok, reason = _network_available(preset.url)
    if not ok:
        raise _offline_error(preset, reason)
    try:
        return Path(_download_url_file(preset.url)), source
    except Exception as exc:  # urllib / HTTP / disk errors
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise _offline_error(preset, f"{type(exc).__name__}: {first}") from exc
