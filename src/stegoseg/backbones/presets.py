"""The backbone presets table: architecture, patch size, width, normalisation and weights
source of every named backbone (data, not branches).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

from stegoseg.errors import StegosegError

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)


IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)


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
        licence: the licence of the pretrained weights (``stegoseg backbones`` lists it).
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
    licence: str = "Apache-2.0"

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


def _dinov3(name: str, arch: str, dim: int, what: str) -> BackbonePreset:
    # timm's Eva class: patch 16, one CLS and four register tokens, 2-D rotary position
    # embedding (computed for every token grid, so no resampling at any input size).
    return BackbonePreset(
        name=name, family="vit", arch=arch, patch_size=16, embed_dim=dim,
        mean=IMAGENET_MEAN, std=IMAGENET_STD, hf_hub_id=f"timm/{arch}", url=_DINOV3_URL,
        description=what, aliases=(arch, arch.split(".")[0]), tiny=_TINY_VIT, licence=_DINOV3_LICENCE,
    )


_DINO_URL = "https://dl.fbaipublicfiles.com/dino"


_DINOV2_URL = "https://dl.fbaipublicfiles.com/dinov2"


# Meta hands out the original DINOv3 files after a licence request on this page; timm's copies
# on the Hugging Face hub carry the same licence.
_DINOV3_URL = "https://ai.meta.com/resources/models-and-libraries/dinov3-downloads/"


_DINOV3_LICENCE = "DINOv3 License (Meta, custom: https://ai.meta.com/resources/models-and-libraries/dinov3-license/)"


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
        _dinov3("dinov3_vits16", "vit_small_patch16_dinov3.lvd1689m", 384,
                "DINOv3 ViT-S/16 (Simeoni et al. 2025, LVD-1689M), 4 registers, rotary positions"),
        _dinov3("dinov3_vits16plus", "vit_small_plus_patch16_dinov3.lvd1689m", 384,
                "DINOv3 ViT-S+/16 (LVD-1689M), 4 registers, rotary positions"),
        _dinov3("dinov3_vitb16", "vit_base_patch16_dinov3.lvd1689m", 768,
                "DINOv3 ViT-B/16 (LVD-1689M), 4 registers, rotary positions"),
        _dinov3("dinov3_vitl16", "vit_large_patch16_dinov3.lvd1689m", 1024,
                "DINOv3 ViT-L/16 (LVD-1689M), 4 registers, rotary positions"),
        BackbonePreset(
            name="resnet50_supervised", family="resnet", arch="resnet50", patch_size=32,
            embed_dim=2048, mean=IMAGENET_MEAN, std=IMAGENET_STD, hf_hub_id=None,
            # torchvision ResNet50_Weights.IMAGENET1K_V1 (the classic 76.1% top-1 weights,
            # what `pretrained=True` gave before torchvision 0.13).
            url="https://download.pytorch.org/models/resnet50-0676ba61.pth",
            description="Supervised ImageNet ResNet-50 (torchvision IMAGENET1K_V1), layer4",
            aliases=("resnet50", "resnet50.tv_in1k", "supervised_resnet50"),
            tiny=_TINY_RESNET, licence="BSD-3-Clause (torchvision)",
        ),
        BackbonePreset(
            name="mocov2_resnet50", family="resnet", arch="resnet50", patch_size=32,
            embed_dim=2048, mean=IMAGENET_MEAN, std=IMAGENET_STD, hf_hub_id=None,
            url=("https://dl.fbaipublicfiles.com/moco/moco_checkpoints/moco_v2_800ep/"
                 "moco_v2_800ep_pretrain.pth.tar"),
            description="MoCo v2 ResNet-50, 800 epochs (He et al. / Chen et al. 2020), layer4",
            aliases=("moco_v2_resnet50", "mocov2", "moco_v2_800ep"),
            tiny=_TINY_RESNET, licence="CC-BY-NC-4.0",
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
