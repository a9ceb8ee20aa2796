"""A frozen backbone whose features are memoised, shared by the models a study or benchmark
evaluates on the same images, and loading a checkpoint onto it."""
from __future__ import annotations

import hashlib

import torch
import torch.nn as nn

from stegoseg.errors import StegosegError
from stegoseg.model import load


class SharedFeatures(nn.Module):
    """A frozen backbone whose ``features`` are memoised by the exact input tensor.

    Evaluating several models that share one frozen backbone on the same images (same
    protocol, same batches) would run the backbone once per model; through this wrapper
    each batch's features are computed once and reused, so the results are identical to
    recomputing them. Entries are kept on the CPU up to ``max_bytes`` in total (later
    batches are then computed every time). Every other attribute is the backbone's.
    """

    def __init__(self, backbone: nn.Module, max_bytes: int = 4 << 30):
        super().__init__()
        self.inner = backbone
        self.max_bytes = int(max_bytes)
        self._memo: dict = {}
        self._bytes = 0
        self.hits = self.misses = 0

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["inner"], name)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x)

    def features(self, x01: torch.Tensor, mode: str = "pad") -> torch.Tensor:
        data = x01.detach().cpu().contiguous()
        key = (mode, str(data.dtype), tuple(data.shape), hashlib.sha1(data.numpy().tobytes()).hexdigest())
        found = self._memo.get(key)
        if found is not None:
            self.hits += 1
            return found.to(x01.device).clone()
        self.misses += 1
        feats = self.inner.features(x01, mode=mode)
        size = feats.numel() * feats.element_size()
        if self._bytes + size <= self.max_bytes:
            self._memo[key] = feats.detach().cpu().clone()
            self._bytes += size
        return feats


def same_weights(a: nn.Module, b: nn.Module) -> bool:
    """The same weights and the same feature projection (``--pca-dim``), if any."""
    sa, sb = a.state_dict(), b.state_dict()
    pa, pb = (getattr(m, "projection_state", lambda: None)() for m in (a, b))
    if (pa is None) != (pb is None) or (pa is not None and not all(torch.equal(pa[k], pb[k]) for k in pa)):
        return False
    return sa.keys() == sb.keys() and all(torch.equal(sa[k].cpu(), sb[k].cpu()) for k in sa)


def unwrap_backbone(backbone: nn.Module) -> nn.Module:
    return backbone.inner if isinstance(backbone, SharedFeatures) else backbone


def load_with_backbone(checkpoint, backbone: nn.Module, device: str):
    """Load a checkpoint and put ``backbone`` (e.g. a :class:`SharedFeatures`) in place of its own
    backbone, after checking that the weights are the same."""

    model = load(checkpoint, device="cpu")
    if not same_weights(model.backbone, unwrap_backbone(backbone)):
        raise StegosegError(
            f"{checkpoint}: its backbone differs from the study's backbone (random backbones are seeded with --seed)"
        )
    model.backbone = backbone
    return model.to(device).eval()
