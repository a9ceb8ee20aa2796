"""DINO's own position-embedding interpolation (the reference-exact ``--pos-embed dino``).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from stegoseg.backbones.presets import BACKBONE_PRESETS, BackbonePreset
from stegoseg.errors import StegosegError

#: How a ViT's absolute position embedding is resampled to the token grid of an input:
#: ``"timm"`` (timm's antialiased bicubic resize to the grid size) or ``"dino"`` (the
#: original DINO code's bicubic resize by a scale factor, see
#: :func:`dino_resample_pos_embed`; DINO v1 presets only).
POS_EMBED_MODES: tuple[str, ...] = ("timm", "dino")


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


def check_pos_embed_option(pos_embed: str, preset: BackbonePreset) -> str:
    """Validate the ``pos_embed`` option (CLI ``--pos-embed``) for a preset."""
    mode = str(pos_embed).strip().lower()
    if mode not in POS_EMBED_MODES:
        raise StegosegError(
            f"unknown --pos-embed {pos_embed!r}; allowed values: {', '.join(POS_EMBED_MODES)}"
        )
    if mode == "dino" and not _is_dino_v1(preset):
        raise _dino_pos_embed_error(preset)
    return mode


def use_dino_pos_embed(model: nn.Module, preset: BackbonePreset) -> None:
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
