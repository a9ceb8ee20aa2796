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


# ------------------------------------------------------------ --primaps-student-augs
#: The reference's student augmentations (``primaps_modules/transforms.py``): a Gaussian blur of
#: kernel 21 and sigma ~ U(0.1, 2) always; then with probability 1/2 colour jitter (0.1 each of
#: brightness, contrast, saturation, hue), itself applied with probability 0.3, else grey with
#: probability 0.1. Its random horizontal flip (probability 0.5) acts on image, masks and labels.
BLUR_KERNEL = 21
BLUR_SIGMA = (0.1, 2.0)
JITTER = 0.1
JITTER_P = 0.3
GREY_P = 0.1
FLIP_P = 0.5


def draw_student_aug(generator: torch.Generator) -> dict:
    """One image's augmentation parameters, drawn from ``generator`` in a fixed order (the same
    draws on every machine and after a resume): ``sigma``, ``branch`` (jitter or grey), whether the
    branch applies, and the jitter's order and factors (as ``torchvision``'s ``ColorJitter``)."""
    u = torch.rand(9, generator=generator, dtype=torch.float64).tolist()
    order = torch.randperm(4, generator=generator).tolist()
    lo, hi = BLUR_SIGMA
    return {"sigma": lo + (hi - lo) * u[0], "branch": "jitter" if u[1] < 0.5 else "grey",
            "jitter": u[2] < JITTER_P, "grey": u[3] < GREY_P, "order": order,
            "brightness": 1 - JITTER + 2 * JITTER * u[4], "contrast": 1 - JITTER + 2 * JITTER * u[5],
            "saturation": 1 - JITTER + 2 * JITTER * u[6], "hue": -JITTER + 2 * JITTER * u[7], "flip": u[8] < FLIP_P}


def student_augment(image: torch.Tensor, params: dict) -> torch.Tensor:
    """The student's copy of one (3, H, W) image as the reference makes it: on the **normalised**
    tensor (the reference applies these after ``Normalize``; torchvision's brightness, contrast
    and saturation then clamp the result to [0, 1], as there)."""
    import torchvision.transforms.functional as TF

    out = TF.gaussian_blur(image, [BLUR_KERNEL, BLUR_KERNEL], [params["sigma"], params["sigma"]])
    if params["branch"] == "jitter":
        if params["jitter"]:
            adjust = {0: (TF.adjust_brightness, "brightness"), 1: (TF.adjust_contrast, "contrast"),
                      2: (TF.adjust_saturation, "saturation"), 3: (TF.adjust_hue, "hue")}
            for fn_id in params["order"]:
                fn, key = adjust[fn_id]
                out = fn(out, params[key])
    elif params["grey"]:
        out = TF.rgb_to_grayscale(out, num_output_channels=3)
    return out
