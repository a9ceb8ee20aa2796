"""Frozen feature extractors: the presets table (``presets``), the :class:`Backbone` wrapper and
its factory :func:`create_backbone` (``backbone``), weights files and downloads (``weights``),
and DINO's own position-embedding interpolation (``pos_embed``)."""
from stegoseg.backbones.backbone import Backbone, create_backbone, global_descriptor
from stegoseg.backbones.pos_embed import POS_EMBED_MODES, dino_resample_pos_embed
from stegoseg.backbones.presets import (
    BACKBONE_PRESETS,
    IMAGENET_MEAN,
    IMAGENET_STD,
    BackbonePreset,
    get_backbone_preset,
    list_backbones,
    resolve_backbone_name,
)
from stegoseg.backbones.weights import file_sha256

__all__ = ["Backbone", "BackbonePreset", "BACKBONE_PRESETS", "POS_EMBED_MODES", "IMAGENET_MEAN", "IMAGENET_STD",
           "create_backbone", "dino_resample_pos_embed", "file_sha256", "get_backbone_preset", "global_descriptor",
           "list_backbones", "resolve_backbone_name"]
