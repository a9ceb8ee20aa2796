"""Tests for the ``pos_embed`` backbone option: DINO's position-embedding interpolation."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from timm.layers import resample_abs_pos_embed

from stegoseg.backbones.backbone import Backbone, create_backbone
from stegoseg.backbones.pos_embed import dino_resample_pos_embed
from stegoseg.errors import StegosegError


def tiny_vit(pos_embed: str, seed: int = 0) -> Backbone:
    torch.manual_seed(seed)  # same seed -> same weights for both modes
    return create_backbone("dino_vits8", pretrained=False, tiny=True, pos_embed=pos_embed)


def random_pos_embed(side: int = 28, dim: int = 16, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(1, 1 + side * side, dim, generator=gen)


def reference_patch_part(pos_embed: torch.Tensor, h0: int, w0: int) -> torch.Tensor:
    """Patch embeddings resized as written in DINO's interpolate_pos_encoding."""
    n = pos_embed.shape[1] - 1
    dim = pos_embed.shape[-1]
    grid = pos_embed[:, 1:].reshape(1, int(math.sqrt(n)), int(math.sqrt(n)), dim).permute(0, 3, 1, 2)
    out = F.interpolate(
        grid, scale_factor=((h0 + 0.1) / math.sqrt(n), (w0 + 0.1) / math.sqrt(n)), mode="bicubic"
    )
    assert out.shape[-2:] == (h0, w0)
    return out.permute(0, 2, 3, 1).reshape(1, h0 * w0, dim)


# ----------------------------------------------------------------- the pure function


def test_dino_resample_native_square_grid_is_identity():
    pos = random_pos_embed(side=28)
    out = dino_resample_pos_embed(pos, 28, 28)
    assert torch.equal(out, pos)


@pytest.mark.parametrize("grid", [(40, 40), (24, 36), (28, 20)])
def test_dino_resample_other_grid_matches_dino_formula_not_timm(grid):
    h0, w0 = grid
    pos = random_pos_embed(side=28, dim=16)
    out = dino_resample_pos_embed(pos, h0, w0, num_prefix_tokens=1)
    assert out.shape == (1, 1 + h0 * w0, 16)
    assert torch.equal(out[:, :1], pos[:, :1])  # class-token embedding kept
    assert torch.equal(out[:, 1:], reference_patch_part(pos, h0, w0))
    timm_out = resample_abs_pos_embed(pos, new_size=[h0, w0], old_size=[28, 28], num_prefix_tokens=1)
    assert timm_out.shape == out.shape
    assert (out - timm_out).abs().max().item() > 1e-3


def test_dino_resample_same_count_non_square_grid_is_resampled():
    # DINO keeps the stored embedding only for a square input with the same patch count.
    pos = random_pos_embed(side=4, dim=8)
    out = dino_resample_pos_embed(pos, 2, 8)
    assert out.shape == pos.shape
    assert torch.equal(out[:, 1:], reference_patch_part(pos, 2, 8))
    assert not torch.equal(out, pos)


def test_dino_resample_rejects_non_square_stored_grid():
    with pytest.raises(ValueError):
        dino_resample_pos_embed(torch.zeros(1, 1 + 12, 4), 3, 3)


# ------------------------------------------------------------------ in the backbone


def test_option_is_recorded_and_timm_default_untouched():
    default = tiny_vit("timm")
    assert default.pos_embed_mode == "timm"
    assert "_pos_embed" not in vars(default.model)  # timm's own method, nothing patched
    torch.manual_seed(0)
    implicit = create_backbone("dino_vits8", pretrained=False, tiny=True)
    assert implicit.pos_embed_mode == "timm"
    dino = tiny_vit("dino")
    assert dino.pos_embed_mode == "dino"
    assert "_pos_embed" in vars(dino.model)


def test_dino_equals_timm_at_native_size_and_differs_elsewhere():
    timm_bb, dino_bb = tiny_vit("timm"), tiny_vit("dino")
    assert dino_bb.model.patch_embed.grid_size == (28, 28)  # stored grid: 224 px / 8
    gen = torch.Generator().manual_seed(1)
    native = torch.randn(1, 3, 224, 224, generator=gen)
    assert torch.equal(dino_bb(native), timm_bb(native))

    other = torch.randn(1, 3, 160, 96, generator=gen)  # 20x12 grid
    f_timm, f_dino = timm_bb(other), dino_bb(other)
    assert f_dino.shape == f_timm.shape == (1, 32, 20, 12)
    assert (f_dino - f_timm).abs().max().item() > 1e-4


def test_dino_backbone_features_equal_manual_forward():
    backbone = tiny_vit("dino", seed=3)
    vit = backbone.model
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(2, 3, 8 * 10, 8 * 14, generator=gen)
    with torch.no_grad():
        feats = backbone(x)
        tokens = vit.patch_embed.proj(x).flatten(2).transpose(1, 2)  # (B, 10*14, C)
        tokens = torch.cat([vit.cls_token.expand(2, -1, -1), tokens], dim=1)
        tokens = tokens + dino_resample_pos_embed(vit.pos_embed, 10, 14)
        tokens = vit.norm(vit.blocks(tokens))
        manual = tokens[:, 1:].reshape(2, 10, 14, -1).permute(0, 3, 1, 2)
    assert feats.shape == (2, 32, 10, 14)
    assert torch.allclose(feats, manual, atol=1e-5, rtol=0), (feats - manual).abs().max()

    # A deep copy (e.g. a teacher copied from a student) keeps the DINO interpolation.
    clone = copy.deepcopy(backbone)
    assert clone.model._pos_embed.vit is clone.model
    assert torch.equal(clone(x), feats)


# ---------------------------------------------------------------------------- errors


@pytest.mark.parametrize("name", ["resnet50_supervised", "mocov2_resnet50", "dinov2_vits14", "dinov2_vits14_reg"])
def test_dino_pos_embed_refused_for_other_backbones(name):
    with pytest.raises(StegosegError) as err:
        create_backbone(name, pretrained=False, tiny=True, pos_embed="dino")
    message = str(err.value)
    assert name in message and "only DINO ViTs" in message and "--pos-embed" in message
    assert "\n" not in message


def test_unknown_pos_embed_value():
    with pytest.raises(StegosegError) as err:
        create_backbone("dino_vits8", pretrained=False, tiny=True, pos_embed="bilinear")
    message = str(err.value)
    assert "--pos-embed" in message and "'bilinear'" in message
    assert "timm" in message and "dino" in message
    assert "\n" not in message
