"""Heads that map backbone features to the code: STEGO's segmentation head and a fixed linear
projection (PCA / random projection), with a registry by checkpoint kind.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn

from stegoseg.errors import StegosegError


class SegmentationHead(nn.Module):
    """STEGO's head (paper Sec. 3.2): code = linear(f) + MLP(f), two 1x1-convolution branches."""

    checkpoint_kind = "stego"

    def __init__(self, in_dim: int, dim: int = 70):
        super().__init__()
        self.in_dim, self.dim = in_dim, dim
        self.linear = nn.Conv2d(in_dim, dim, 1)
        self.nonlinear = nn.Sequential(nn.Conv2d(in_dim, in_dim, 1), nn.ReLU(), nn.Conv2d(in_dim, dim, 1))

    def options(self) -> dict:
        """Constructor arguments beyond (in_dim, dim) that a checkpoint records: none."""
        return {}

    def forward(self, features: torch.Tensor, dropout: Optional[nn.Module] = None) -> torch.Tensor:
        """Code (B, K, h, w). During training ``dropout`` (Dropout2d) is drawn separately
        for each branch's input, as the reference does."""
        if dropout is None:
            return self.linear(features) + self.nonlinear(features)
        return self.linear(dropout(features)) + self.nonlinear(dropout(features))


# --------------------------------------------------------------------------- projections
class ProjectionHead(nn.Module):
    """A fixed linear map of features to a ``dim``-dimensional code: ``code = W f + b``.

    A 1x1 convolution with buffers (not parameters): nothing in it is trained. PCA uses
    ``W`` = the top components and ``b = -W mean`` (projection of centred features);
    random projection uses a Gaussian ``W`` and ``b = 0``. Saved and loaded by
    :class:`~stegoseg.model.SegmentationModel` like STEGO's head (checkpoint head kind
    ``"projection"``).
    """

    checkpoint_kind = "projection"

    def __init__(self, in_dim: int, dim: int):
        super().__init__()
        self.in_dim, self.dim = int(in_dim), int(dim)
        self.register_buffer("weight", torch.zeros(self.dim, self.in_dim))
        self.register_buffer("bias", torch.zeros(self.dim))

    @classmethod
    def from_matrix(cls, weight: torch.Tensor, mean: Optional[torch.Tensor] = None) -> "ProjectionHead":
        """``code = weight @ (f - mean)``; ``weight`` is (dim, in_dim)."""
        weight = torch.as_tensor(weight, dtype=torch.float32)
        head = cls(weight.shape[1], weight.shape[0])
        head.weight.copy_(weight)
        if mean is not None:
            head.bias.copy_(-(weight.double() @ torch.as_tensor(mean).double()).float())
        return head

    def forward(self, features: torch.Tensor, dropout: Optional[nn.Module] = None) -> torch.Tensor:
        code = torch.einsum("bchw,dc->bdhw", features, self.weight.to(features.dtype))
        return code + self.bias.to(features.dtype)[None, :, None, None]

    def extra_repr(self) -> str:
        return f"in_dim={self.in_dim}, dim={self.dim}"


#: Head classes by the kind a checkpoint records (``head.kind``).
HEADS = {"stego": SegmentationHead, "projection": ProjectionHead}


def register_head(cls):
    """Add a head class to :data:`HEADS` under its ``checkpoint_kind`` (a decorator)."""
    HEADS[cls.checkpoint_kind] = cls
    return cls


def build_head(kind: str, in_dim: int, dim: int, options: Optional[dict] = None) -> nn.Module:
    """A head of a registered kind (see :data:`HEADS`); ``options`` are the extra constructor
    arguments the head's ``options()`` recorded in the checkpoint."""
    import stegoseg.nn.cause  # noqa: F401 - registers CAUSE's heads

    if kind not in HEADS:
        raise StegosegError(f"unknown head kind {kind!r} (known: {', '.join(HEADS)}): written by a newer stegoseg?")
    return HEADS[kind](in_dim, dim, **(options or {}))
