"""CAUSE's segmentation heads (Kim et al. 2023): CAUSE-MLP and CAUSE-TR.

Both map backbone features (B, C, h, w) to a code (B, K, h, w) like STEGO's head, so the
rest of the pipeline (probes, CRF, evaluation, ``segment``) is shared.

* CAUSE-MLP: the same two-branch 1x1-convolution head as STEGO's (linear + conv-ReLU-conv),
  fed element-wise dropout in training.
* CAUSE-TR: one transformer-decoder layer whose queries are the features quantised to the
  concept clusterbook (plus a learned query position embedding) and whose memory is the
  features; the layer's output, added to the features, goes through the two-branch head.
  Post-norm, one attention head, a 2048-wide feed-forward, dropout 0.1 (the reference's
  ``TRDecoder``). The clusterbook is a buffer of the head (it is part of inference).

The query position embedding is learned for the training grid (``grid``). For another
grid (another resolution or aspect ratio at inference) it is resampled bicubically as a
2-D map, as ViT position embeddings are; on the training grid it is used as it is.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from stegoseg.nn.heads import SegmentationHead, register_head


def tokens_of(maps: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w) -> (B, h*w, C), tokens in row-major grid order."""
    return maps.flatten(2).transpose(1, 2)


def concept_index(tokens: torch.Tensor, concepts: torch.Tensor) -> torch.Tensor:
    """Index of the most similar concept (cosine) of every token: (..., C) -> (...)."""
    sim = F.normalize(tokens, dim=-1) @ F.normalize(concepts, dim=-1).t()
    return sim.argmax(-1)


def quantize(tokens: torch.Tensor, concepts: torch.Tensor) -> torch.Tensor:
    """Each token replaced by its most similar concept vector (vector quantisation)."""
    return concepts[concept_index(tokens, concepts)]


class TokenDropout(nn.Dropout):
    """Element-wise dropout of a (B, C, h, w) map with the mask drawn in token-major order
    (B, h, w, C), as the reference draws it on its (B, tokens, C) features: the same seed
    gives the same mask."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0:
            return x
        return super().forward(x.permute(0, 2, 3, 1).contiguous()).permute(0, 3, 1, 2)


@register_head
class CauseMLPHead(SegmentationHead):
    """CAUSE-MLP's head: STEGO's architecture (``linear`` + ``nonlinear`` 1x1 branches), code width 90 by default."""

    checkpoint_kind = "cause-mlp"


@register_head
class CauseTRHead(nn.Module):
    """CAUSE-TR's head (see the module docstring)."""

    checkpoint_kind = "cause-tr"

    def __init__(self, in_dim: int, dim: int = 90, n_concepts: int = 2048, grid: tuple = (40, 40),
                 hidden_dim: int = 2048, dropout: float = 0.1):
        super().__init__()
        self.in_dim, self.dim, self.n_concepts = int(in_dim), int(dim), int(n_concepts)
        self.grid, self.hidden_dim, self.dropout_p = tuple(int(g) for g in grid), int(hidden_dim), float(dropout)
        self.register_buffer("clusterbook", torch.zeros(self.n_concepts, self.in_dim))
        self.query_pos = nn.Parameter(torch.randn(self.grid[0] * self.grid[1], self.in_dim))
        self.self_attn = nn.MultiheadAttention(self.in_dim, 1, dropout=dropout)
        self.cross_attn = nn.MultiheadAttention(self.in_dim, 1, dropout=dropout)
        self.ffn_in = nn.Linear(self.in_dim, self.hidden_dim)
        self.ffn_out = nn.Linear(self.hidden_dim, self.in_dim)
        self.ffn_dropout = nn.Dropout(dropout)
        self.norm_self, self.norm_cross, self.norm_ffn = (nn.LayerNorm(self.in_dim) for _ in range(3))
        self.dropout_self, self.dropout_cross, self.dropout_ffn = (nn.Dropout(dropout) for _ in range(3))
        self.out = SegmentationHead(self.in_dim, self.dim)

    def options(self) -> dict:
        return {"n_concepts": self.n_concepts, "grid": list(self.grid), "hidden_dim": self.hidden_dim,
                "dropout": self.dropout_p}

    def positions(self, h: int, w: int) -> torch.Tensor:
        """The query position embedding for an h x w grid, (h*w, C)."""
        if (h, w) == self.grid:
            return self.query_pos
        grid = self.query_pos.reshape(*self.grid, self.in_dim).permute(2, 0, 1)[None]
        grid = F.interpolate(grid, size=(h, w), mode="bicubic", align_corners=False)
        return grid[0].permute(1, 2, 0).reshape(h * w, self.in_dim)

    def forward(self, features: torch.Tensor, dropout: Optional[nn.Module] = None) -> torch.Tensor:
        """Code (B, K, h, w) of features (B, C, h, w); ``dropout`` as in STEGO's head (training)."""
        b, c, h, w = features.shape
        memory = tokens_of(features).transpose(0, 1)  # (T, B, C), sequence first
        query = quantize(memory, self.clusterbook.to(memory.dtype))
        pos = self.positions(h, w).to(memory.dtype).unsqueeze(1)
        q = query + pos
        x = self.norm_self(query + self.dropout_self(self.self_attn(q, q, value=query)[0]))
        x = self.norm_cross(x + self.dropout_cross(self.cross_attn(x + pos, memory, value=memory)[0]))
        x = x + self.dropout_ffn(self.ffn_out(self.ffn_dropout(F.relu(self.ffn_in(x)))))
        x = memory + self.norm_ffn(x)
        return self.out(x.permute(1, 2, 0).reshape(b, c, h, w), dropout)

    def set_clusterbook(self, concepts: torch.Tensor) -> None:
        if tuple(concepts.shape) != (self.n_concepts, self.in_dim):
            raise ValueError(f"a clusterbook of shape {tuple(concepts.shape)} does not fit this head "
                             f"({self.n_concepts} x {self.in_dim})")
        with torch.no_grad():
            self.clusterbook.copy_(concepts.to(self.clusterbook.dtype))

    def extra_repr(self) -> str:
        return f"in_dim={self.in_dim}, dim={self.dim}, n_concepts={self.n_concepts}, grid={self.grid}"
