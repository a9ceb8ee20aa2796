"""STEGO's segmentation head.

code = Conv1x1(C -> K)(f) + Conv1x1(C -> K)(ReLU(Conv1x1(C -> C)(f)))

a linear projection plus a two-layer 1x1 MLP, both from the (dropout-regularised)
backbone features ``f`` to a K-dimensional code (K = 70 by default).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn


class SegmentationHead(nn.Module):
    def __init__(self, in_dim: int, dim: int = 70):
        super().__init__()
        self.in_dim, self.dim = in_dim, dim
        self.linear = nn.Conv2d(in_dim, dim, 1)
        self.nonlinear = nn.Sequential(nn.Conv2d(in_dim, in_dim, 1), nn.ReLU(), nn.Conv2d(in_dim, dim, 1))

    def forward(self, features: torch.Tensor, dropout: Optional[nn.Module] = None) -> torch.Tensor:
        """Code (B, K, h, w). During training ``dropout`` (Dropout2d) is drawn separately
        for each branch's input, as the reference does."""
        if dropout is None:
            return self.linear(features) + self.nonlinear(features)
        return self.linear(dropout(features)) + self.nonlinear(dropout(features))
