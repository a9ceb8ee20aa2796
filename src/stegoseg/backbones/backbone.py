"""Frozen feature extractors ("backbones") that turn images into dense patch features.

One factory, :func:`create_backbone`, builds every supported backbone from a named
preset. The presets are data (:data:`~stegoseg.backbones.presets.BACKBONE_PRESETS`), not code branches: each row
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
  original DINO code does instead (see :func:`~stegoseg.backbones.pos_embed.dino_resample_pos_embed`).
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

import math
import os
from pathlib import Path
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from stegoseg.backbones.pos_embed import (
    POS_EMBED_MODES,
    check_pos_embed_option,
    use_dino_pos_embed,
)
from stegoseg.backbones.presets import BackbonePreset, get_backbone_preset
from stegoseg.backbones.weights import (
    download_weights,
    extract_state_dict,
    file_sha256,
    load_weights_into,
    read_weights_file,
)
from stegoseg.errors import StegosegError


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
        embed_dim: channels ``C`` of the dense features (``D`` after :meth:`project_onto`).
        raw_dim: channels of the network's own features (``embed_dim`` without a projection).
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
        # A fixed linear projection of the features (``--pca-dim``; see :meth:`project_onto`).
        # Not in the state dict: the weights stay those of the preset; a checkpoint stores the
        # projection in its own entry.
        self.raw_dim = self.embed_dim
        self.register_buffer("proj_mean", None, persistent=False)
        self.register_buffer("proj_weight", None, persistent=False)
        self.freeze()

    # -- projection -----------------------------------------------------------------------

    def project_onto(self, mean: torch.Tensor, weight: torch.Tensor) -> "Backbone":
        """From now on :meth:`forward` returns ``weight @ (features - mean)`` per cell: ``D``
        channels instead of ``C`` (``weight`` is ``(D, C)``, e.g. a PCA's components, ``mean``
        ``(C,)``). :attr:`embed_dim` becomes ``D``; :attr:`raw_dim` stays ``C``."""
        weight = torch.as_tensor(weight, dtype=torch.float32)
        mean = torch.as_tensor(mean, dtype=torch.float32).reshape(-1)
        if weight.dim() != 2 or weight.shape[1] != self.raw_dim or mean.numel() != self.raw_dim:
            raise StegosegError(f"a projection of {tuple(weight.shape)} with a mean of {mean.numel()} values does not "
                                f"fit the {self.raw_dim}-channel features of {self.name}")
        if weight.shape[0] > self.raw_dim:
            raise StegosegError(f"a projection to {weight.shape[0]} channels is larger than {self.name}'s "
                                f"{self.raw_dim}")
        device = self._mean_t.device
        self.register_buffer("proj_mean", mean.to(device).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("proj_weight", weight.to(device), persistent=False)
        self.embed_dim = int(weight.shape[0])
        return self

    def projection_state(self) -> dict | None:
        """``{"mean": (C,), "weight": (D, C)}`` of :meth:`project_onto`, or None without one."""
        if self.proj_weight is None:
            return None
        return {"mean": self.proj_mean.detach().reshape(-1).cpu().clone(), "weight": self.proj_weight.detach().cpu().clone()}

    def _project(self, feats: torch.Tensor) -> torch.Tensor:
        if self.proj_weight is None:
            return feats
        centred = feats.float() - self.proj_mean
        return torch.einsum("dc,bchw->bdhw", self.proj_weight, centred).to(feats.dtype)

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
        height, width = x.shape[-2:]
        p = self.patch_size
        if height % p or width % p:
            raise StegosegError(
                f"input size {height}x{width} is not a multiple of the patch size {p} of "
                f"backbone '{self.name}'; use Backbone.prepare()/features() or pick a size "
                f"that is a multiple of {p}"
            )
        if self.family == "vit":
            # timm: the last block's patch tokens after the final norm (CLS and register
            # tokens dropped) as a (B, C, h, w) map; it goes through model._pos_embed, so
            # pos_embed="dino" applies. Bit-identical to forward_features + drop + reshape.
            (feats,) = self.model.forward_intermediates(
                x, indices=1, norm=True, output_fmt="NCHW", intermediates_only=True
            )
            return self._project(feats)
        model = self.model
        x = model.maxpool(model.relu(model.bn1(model.conv1(x))))
        x = model.layer1(x)
        x = model.layer2(x)
        x = model.layer3(x)
        return self._project(model.layer4(x))

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
            + (f", projected from {self.raw_dim} channels" if self.proj_weight is not None else "")
        )


def _as_float(x: torch.Tensor) -> torch.Tensor:
    if x.dtype == torch.uint8:
        return x.float() / 255.0
    if not torch.is_floating_point(x):
        return x.float()
    return x


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
        name: one of :func:`~stegoseg.backbones.presets.list_backbones` or an alias (e.g. the timm model name).
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
            ``"timm"`` at the stored grid, see :func:`~stegoseg.backbones.pos_embed.dino_resample_pos_embed`). Only the
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
    pos_embed = check_pos_embed_option(pos_embed, preset)
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
        path, weights_source = download_weights(preset)
    if path is not None:
        obj = read_weights_file(path)
        if isinstance(obj, Mapping) and obj.get("format") == "stegoseg-backbone" and obj.get("tiny"):
            tiny = True  # a file exported by `stegoseg pretrain --tiny` records its architecture
        state = extract_state_dict(obj, preset, path)
        weights_sha256 = file_sha256(path)

    if preset.family == "vit":
        model, patch_size, embed_dim = build_vit(preset, tiny, overrides, pos_embed=pos_embed)
    else:
        model, patch_size, embed_dim = build_resnet(preset, tiny, overrides)
    if state is not None:
        assert path is not None
        load_weights_into(model, preset, state, path)

    return Backbone(
        model, name=preset.name, family=preset.family, patch_size=patch_size,
        embed_dim=embed_dim, mean=preset.mean, std=preset.std,
        weights_source=weights_source, weights_sha256=weights_sha256, tiny=tiny,
        pos_embed_mode=pos_embed,
    )


def build_vit(
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
        use_dino_pos_embed(model, preset)
    patch = model.patch_embed.patch_size
    patch_size = int(patch[0] if isinstance(patch, (tuple, list)) else patch)
    return model, patch_size, int(model.embed_dim)


def build_resnet(preset: BackbonePreset, tiny: bool, overrides: dict[str, Any]) -> tuple[nn.Module, int, int]:
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
