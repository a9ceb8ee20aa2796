"""PriMaPs-EM's objective and teacher update (Hahn et al., TMLR 2024).

Focal loss of student logits z (B, K, H, W) against pseudo labels y (ignored pixels: -):

    w_k  = (1 - mean over all B·H·W pixels of softmax(z)_k) ** gamma       (no gradient; gamma 2)
    loss = (1 / (B·H·W)) * sum over labelled pixels of  w_{y} * (-log softmax(z)_{y})

(the mean runs over every pixel, ignored ones contributing 0, as the reference's
``cross_entropy(..., weight=w, reduction="none").mean()``).

EMA teacher (the reference's ``EMA(seghead, beta=0.98, update_after_step=0, update_every=1)``
called every 10th step): at its c-th update (c = 1, 2, ...) the teacher's gain and direction
become copies of the student's for c <= 2, else

    teacher <- d * teacher + (1 - d) * student,   d = min(decay, 1 - 1 / c)

parameter by parameter (the gain and the direction separately, not their product).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from stegoseg.data.base import IGNORE_INDEX


def focal_loss(logits: torch.Tensor, target: torch.Tensor, gamma: float = 2.0,
               ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """The class-frequency focal loss above (float32 whatever the input precision)."""
    logits = logits.float()
    with torch.no_grad():
        confidence = logits.softmax(1).transpose(0, 1).reshape(logits.shape[1], -1).mean(1)
        weight = (1 - confidence) ** gamma
    per_pixel = F.cross_entropy(logits, target.long(), weight=weight, ignore_index=ignore_index, reduction="none")
    return per_pixel.mean()


def ema_decay(update: int, decay: float) -> float:
    """The decay of the ``update``-th teacher update (1-based): 0 (a copy) for the first two,
    then min(decay, 1 - 1 / update)."""
    if update < 1:
        raise ValueError("updates are counted from 1")
    return 0.0 if update <= 2 else min(float(decay), 1.0 - 1.0 / update)


@torch.no_grad()
def ema_step(student: torch.nn.Module, teacher: torch.nn.Module, update: int, decay: float) -> float:
    """Apply the ``update``-th teacher update (see the module doc); returns the decay used."""
    d = ema_decay(update, decay)
    for s, t in zip(student.parameters(), teacher.parameters()):
        if d == 0.0:
            t.copy_(s.detach())
        else:
            t.lerp_(s.detach(), 1.0 - d)
    return d
