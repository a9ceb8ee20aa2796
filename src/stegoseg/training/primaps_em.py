"""One PriMaPs-EM step on cached features: the EMA teacher's class map, the per-mask pseudo
label, the student's focal loss (see :mod:`stegoseg.losses.primaps`).

Logits are computed on the feature grid and upsampled bilinearly to the masks' size; the
reference upsamples the features first. Both maps are bias-free and linear, so the two orders
agree up to float rounding, and the upsampled map costs K instead of C channels.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from stegoseg.data.base import IGNORE_INDEX
from stegoseg.losses.primaps import focal_loss
from stegoseg.nn.primaps import PrototypeHead, mask_pseudo_label


def upsampled_logits(head: PrototypeHead, features: torch.Tensor, size) -> torch.Tensor:
    """Logits (B, K, H, W) of a (B, C, h, w) map, bilinearly upsampled to ``size``."""
    return F.interpolate(head(features.float()), size=tuple(size), mode="bilinear", align_corners=False)


@torch.no_grad()
def em_pseudo_label(teacher: PrototypeHead, features: torch.Tensor, masks: torch.Tensor,
                    ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """E step: every mask of ``masks`` (B, H, W; background 0 or ``ignore_index``) takes the
    teacher's most frequent class inside it."""
    classes = upsampled_logits(teacher, features, masks.shape[-2:]).argmax(1)
    return mask_pseudo_label(masks, classes, ignore_index)


def em_loss(student: PrototypeHead, features: torch.Tensor, pseudo: torch.Tensor, gamma: float = 2.0,
            ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """M step's objective: the focal loss of the student's upsampled logits."""
    return focal_loss(upsampled_logits(student, features, pseudo.shape[-2:]), pseudo, gamma, ignore_index)
