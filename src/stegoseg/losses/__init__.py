"""Losses as plain functions of tensors: STEGO's correspondence distillation loss (``stego``)
and the CRF kernel as a Potts term (``potts``, paper A.9)."""
from stegoseg.losses.potts import potts_term
from stegoseg.losses.stego import LossWeights, stego_loss

__all__ = ["LossWeights", "potts_term", "stego_loss"]
