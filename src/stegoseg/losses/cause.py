"""CAUSE's objectives (Kim et al., "Causal Unsupervised Semantic Segmentation", 2023) as plain
functions of tensors, and its per-concept key bank.

Notation: backbone features f (B, C, h, w) with tokens f_i; a concept clusterbook
M = {m_n} (N, C) (the "mediator"); the head's code s and its projection z (student) and z'
(EMA teacher); cos(a, b) is the cosine similarity.

Modularity of the clusterbook (paper Eq. 4; stage 1, and the cluster probe in stage 3):

    A_ij = max(cos(f_i, f_j), 0) with A_ii = 0,   d_i = sum_j A_ij,   e = sum_ij A_ij
    W_ij = A_ij - d_i d_j / e                      (the modularity matrix)
    C_in = max(cos(f_i, m_n), 0)                   (soft assignment of token i to concept n)
    delta_ij = max_n tanh(C_in C_jn / tau)         (tau = 0.1: "are i and j in one concept")
    Q = (1 / e) sum_ij W_ij delta_ji,   loss = -mean over images of Q

Concept-guided contrastive loss (paper Eq. 6; stage 2): for a token i of an anchor image
with concept vector q_i = M[argmax_n cos(f_i, m_n)], the keys j are every teacher token of
the batch (and, separately, every key of the bank) with their concept vectors q_j;
j is a positive of i when cos(q_i, q_j) > 0.3 and a negative when cos(q_i, q_j) < 0.1
(between the two: neither). With l_ij = cos(z_i, z'_j) / T (T = 0.07):

    L_i = mean over positives j of  -l_ij + log sum_{k in positives and negatives} exp(l_ik)

averaged over the anchor image's tokens with a positive, one term per anchor image for the
batch keys and one for the bank keys, and the terms averaged.

Training reads a random token from each 4 x 4 block of the grid (``grid_sample_tokens``),
as the reference does to bound memory.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from stegoseg.nn.cause import concept_index, quantize


def grid_sample_tokens(maps: torch.Tensor, order: Optional[torch.Tensor] = None, block: int = 4) -> tuple:
    """One token from each ``block`` x ``block`` cell of a (B, C, h, w) map (the reference's
    ``stochastic_sampling``): returns ((B, C, h // block, w // block), order) with ``order``
    the index in [0, block^2) picked in each cell (row-major within the cell), drawn
    uniformly from the global generator (as the reference does) unless given. Pass the same ``order`` to sample several
    maps of one batch at the same tokens. Rows and columns past a whole cell are dropped."""
    b, c, h, w = maps.shape
    gh, gw = h // block, w // block
    if gh == 0 or gw == 0:
        raise ValueError(f"a {h}x{w} token grid has no whole {block}x{block} cell to sample from")
    cells = maps[:, :, : gh * block, : gw * block].reshape(b, c, gh, block, gw, block)
    cells = cells.permute(0, 2, 4, 3, 5, 1).reshape(b * gh * gw, block * block, c)
    if order is None:
        order = torch.randint(block * block, (b * gh * gw,))
    picked = cells[torch.arange(b * gh * gw, device=maps.device), order.to(maps.device)]
    return picked.reshape(b, gh, gw, c).permute(0, 3, 1, 2), order


def modularity_loss(concepts: torch.Tensor, tokens: torch.Tensor, temperature: float = 0.1,
                    chunk: int = 256) -> torch.Tensor:
    """Minus the mean soft modularity (see the module docstring) of ``concepts`` (N, C) on the
    token graphs of ``tokens`` (B, T, C); the tokens are detached (only the concepts learn).

    ``max_n tanh(C_in C_jn / tau)`` is computed as ``tanh(max_n C_in C_jn / tau)`` (tanh is
    increasing), in chunks of ``chunk`` concepts so that memory stays (B, T, T, chunk). An
    image whose token graph has no edge (e = 0: one token, or no two with a positive cosine)
    has modularity 0 here; the reference divides by e = 0 (NaN)."""
    with torch.autocast(tokens.device.type, enabled=False):  # W = A - dd^T/e cancels: float32, not bf16
        return _modularity_loss(concepts.float(), tokens.detach().float(), temperature, chunk)


def _modularity_loss(concepts: torch.Tensor, tokens: torch.Tensor, temperature: float, chunk: int) -> torch.Tensor:
    x = F.normalize(tokens, dim=-1)
    a = (x @ x.transpose(1, 2)).clamp(min=0)
    a = a * (1 - torch.eye(a.shape[1], device=a.device, dtype=a.dtype))
    d = a.sum(dim=2, keepdim=True)
    has_edges = a.sum(dim=(1, 2), keepdim=True) > 0
    e = torch.where(has_edges, a.sum(dim=(1, 2), keepdim=True), torch.ones_like(d[:, :1]))
    w = a - (d @ d.transpose(1, 2)) / e
    assign = (x @ F.normalize(concepts, dim=-1).t().to(x.dtype)).clamp(min=0)  # (B, T, N)
    best = []
    for start in range(0, assign.shape[-1], chunk):
        part = assign[..., start : start + chunk]
        best.append((part.unsqueeze(2) * part.unsqueeze(1)).max(dim=-1).values)  # (B, T, T)
    same = torch.tanh(torch.stack(best, dim=-1).max(dim=-1).values / temperature)
    q = ((w / e) * same.transpose(1, 2)).sum(dim=(1, 2))
    return -q.mean()


def _masked_nce(logits: torch.Tensor, positive: torch.Tensor, negative: torch.Tensor) -> torch.Tensor:
    """Per row i: -l_ij + log sum_{k pos or neg} exp(l_ik) at every positive j (rows shifted by
    their detached max for stability, as in the reference; the shift cancels)."""
    shifted = logits - logits.max(dim=1, keepdim=True).values.detach()
    denominator = (shifted.exp() * (positive | negative)).sum(dim=1, keepdim=True)
    return -shifted + torch.log(denominator)


def concept_contrastive_loss(
    tokens: torch.Tensor,
    student: torch.Tensor,
    teacher: torch.Tensor,
    concepts: torch.Tensor,
    bank_concepts: Optional[torch.Tensor] = None,
    bank_keys: Optional[torch.Tensor] = None,
    temperature: float = 0.07,
    pos_threshold: float = 0.3,
    neg_threshold: float = 0.1,
) -> torch.Tensor:
    """CAUSE's contrastive loss (module docstring) for a batch of sampled tokens.

    ``tokens`` (B, T, C) backbone features (they choose the concepts), ``student`` and
    ``teacher`` (B, T, P) projections, ``concepts`` (N, C); ``bank_concepts`` (K, C) and
    ``bank_keys`` (K, P) the bank's concept vector and teacher key per entry (see
    :class:`ConceptBank`), or None / empty. A term with no positive at all (all its
    concept similarities below ``pos_threshold``) is left out of the average instead of
    making the loss NaN as the reference's empty mean does; None is never returned: with
    no term at all the loss is zero (with a gradient path)."""
    with torch.autocast(tokens.device.type, enabled=False):  # concept choices in float32, as the bank's
        return _contrastive(tokens.float(), student.float(), teacher.float(), concepts.float(),
                            None if bank_concepts is None else bank_concepts.float(),
                            None if bank_keys is None else bank_keys.float(), temperature, pos_threshold,
                            neg_threshold)


def _contrastive(tokens, student, teacher, concepts, bank_concepts, bank_keys, temperature, pos_threshold,
                 neg_threshold) -> torch.Tensor:
    b, t, _ = tokens.shape
    q = F.normalize(quantize(tokens, concepts), dim=-1)  # (B, T, C)
    flat_q = q.reshape(b * t, -1)
    z = F.normalize(student, dim=-1)  # (B, T, P)
    flat_z_teacher = F.normalize(teacher, dim=-1).reshape(b * t, -1)
    logits = (z.reshape(b * t, -1) @ flat_z_teacher.t()) / temperature  # (B*T, B*T)
    concept_sim = flat_q @ flat_q.t()
    positive = concept_sim > pos_threshold
    negative = concept_sim < neg_threshold
    positive &= ~torch.eye(b * t, dtype=torch.bool, device=tokens.device)  # a token is not its own positive
    loss_rows = _masked_nce(logits, positive, negative)
    terms = []
    image_of_row = torch.arange(b * t, device=tokens.device) // t
    has_bank = bank_keys is not None and len(bank_keys) > 0
    if has_bank:  # normalised once for every anchor image
        bank_keys = F.normalize(bank_keys.to(z.device), dim=-1)
        bank_concepts = F.normalize(bank_concepts.to(q.device), dim=-1)
    for image in range(b):
        rows = image_of_row == image
        pos = positive[rows]
        if pos.any():
            terms.append(loss_rows[rows][pos].mean())
        if has_bank:
            bank_pos, bank_loss = _bank_rows(z[image], q[image], bank_concepts, bank_keys, temperature,
                                             pos_threshold, neg_threshold)
            if bank_pos.any():
                terms.append(bank_loss[bank_pos].mean())
    if not terms:
        return student.sum() * 0.0
    return sum(terms) / float(len(terms))


def _bank_rows(z: torch.Tensor, q: torch.Tensor, bank_concepts: torch.Tensor, bank_keys: torch.Tensor,
               temperature: float, pos_threshold: float, neg_threshold: float) -> tuple:
    """(positive mask, per-pair loss) of one anchor image's tokens against the (normalised) bank."""
    concept_sim = q @ bank_concepts.t()
    positive = concept_sim > pos_threshold
    negative = concept_sim < neg_threshold
    return positive, _masked_nce((z @ bank_keys.t()) / temperature, positive, negative)


class ConceptBank:
    """A first-in-first-out bank of teacher keys per concept (at most ``size`` each).

    ``update`` files each sampled teacher token under its token's concept, keeping a random
    half of each concept's new keys (the reference's "50% random cutting"), concepts in
    increasing index order, keys in token order, each concept's half drawn by one
    ``torch.randperm`` of the global generator. ``entries`` gives every key with its concept id,
    concepts in increasing order, oldest key first. ``state``/``load_state`` carry it
    through a training checkpoint (so a resumed run continues exactly)."""

    def __init__(self, n_concepts: int, key_dim: int, size: int = 100, keep_fraction: float = 0.5):
        self.n_concepts, self.key_dim, self.size, self.keep_fraction = n_concepts, key_dim, size, keep_fraction
        self.keys: dict = {}

    def __len__(self) -> int:
        return sum(len(v) for v in self.keys.values())

    def update(self, tokens: torch.Tensor, teacher: torch.Tensor, concepts: torch.Tensor) -> None:
        """``tokens`` (..., C) and ``teacher`` (..., P) of the same sampled tokens; the random halves
        come from the global generator (as the reference's)."""
        index = concept_index(tokens.float(), concepts.float()).reshape(-1)
        keys_all = teacher.detach().reshape(-1, teacher.shape[-1])
        for concept in index.unique().tolist():
            keys = keys_all[index == concept]
            keep = int(len(keys) * self.keep_fraction)
            keys = keys[torch.randperm(len(keys)).to(keys.device)][:keep]
            old = self.keys.get(concept)
            merged = keys if old is None else torch.cat([old, keys.to(old.device, old.dtype)])
            if len(merged) >= self.size:
                merged = merged[len(merged) - self.size:]
            self.keys[concept] = merged

    def entries(self) -> tuple:
        """(concept ids (K,), keys (K, P)) of the whole bank, or (None, None) when empty."""
        filled = [c for c in sorted(self.keys) if len(self.keys[c])]
        if not filled:
            return None, None
        ids = torch.cat([torch.full((len(self.keys[c]),), c, dtype=torch.long) for c in filled])
        return ids, torch.cat([self.keys[c] for c in filled])

    def state(self) -> dict:
        ids, keys = self.entries()
        if ids is None:
            return {"ids": torch.zeros(0, dtype=torch.long), "keys": torch.zeros(0, self.key_dim)}
        return {"ids": ids, "keys": keys.detach().cpu()}

    def load_state(self, state: dict, device=None) -> None:
        ids, keys = state["ids"], state["keys"]
        self.keys = {int(c): keys[ids == c].to(device) for c in ids.unique().tolist()}

    def to(self, device) -> "ConceptBank":
        self.keys = {c: v.to(device) for c, v in self.keys.items()}
        return self


@torch.no_grad()
def ema_update(student: torch.nn.Module, teacher: torch.nn.Module, decay: float) -> None:
    """teacher <- decay * teacher + (1 - decay) * student, parameter by parameter."""
    for s, t in zip(student.parameters(), teacher.parameters()):
        t.mul_(decay).add_(s.detach(), alpha=1 - decay)
