"""CAUSE training (Kim et al. 2023) on the feature cache, in the reference's three stages:

1. the concept clusterbook: ``cause_concepts`` vectors fitted by Adam (lr 1e-3) to maximise
   the soft modularity of the token graphs (:func:`fit_clusterbook`; plain loop, one pass over
   the cache by default, resumable from ``clusterbook.partial.pt``, reused when it exists);
2. the head: a student head + projection trained by the concept-guided contrastive loss
   against an EMA teacher and a per-concept bank of teacher keys (:class:`CauseModule`,
   steps ``[0, steps)``);
3. the cluster probe: ``n_clusters`` centroids fitted by the same modularity objective on the
   teacher's (frozen) code (steps ``[steps, steps + cause_probe_steps)`` of the same run).

The linear probe (with labels) reads the teacher's detached code in stages 2 and 3.

Every random draw of a step (dropout masks, the grid cell each token is read from, the bank's
random halves) comes from the global generator seeded by (seed, step, rank) at the start
of the step, in the reference's order, so a resumed run continues exactly; the bank travels
in the Lightning checkpoint.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import logging
import time
from pathlib import Path
from typing import Optional

import lightning as L
import numpy as np
import torch
import torch.nn as nn
from stegoseg.progress import progress_bar as tqdm

from stegoseg.config.stego import Config
from stegoseg.errors import StegosegError
from stegoseg.features.cache import FeatureCache
from stegoseg.losses.cause import (
    ConceptBank,
    concept_contrastive_loss,
    ema_update,
    grid_sample_tokens,
    modularity_loss,
)
from stegoseg.model import SegmentationModel
from stegoseg.nn.cause import CauseMLPHead, CauseTRHead, TokenDropout, tokens_of
from stegoseg.preflight import atomic_save_npy, atomic_write
from stegoseg.training.steps import batch_indices, fit_step_module, step_seed

log = logging.getLogger("stegoseg")

CLUSTERBOOK = "clusterbook.npy"


# --------------------------------------------------------------------------- stage 1
def clusterbook_settings(cfg: Config, cache: FeatureCache) -> dict:
    """What the clusterbook is a function of (kept beside it; a mismatch refits it)."""
    return {"cache": str(cache.path), "cache_fingerprint": cache.meta.get("fingerprint"), "n": cache.n,
            "feature_shape": list(cache.meta["feature_shape"]), "concepts": cfg.cause_concepts,
            "steps": book_steps(cfg, cache), "temperature": cfg.cause_book_temperature, "grid": cfg.cause_grid,
            "batch_size": cfg.batch_size, "seed": cfg.seed}


def book_steps(cfg: Config, cache: FeatureCache) -> int:
    """Stage 1's steps: ``cause_book_steps``, or one pass over the cache (the reference's one epoch), at least 200."""
    if cfg.cause_book_steps is not None:
        return int(cfg.cause_book_steps)
    return max(200, -(-cache.n // cfg.batch_size))


def init_concepts(n: int, dim: int, seed: int) -> torch.Tensor:
    """The reference's initialisation: uniform in [-1/n, 1/n]."""
    gen = torch.Generator().manual_seed(seed)
    return (torch.rand(n, dim, generator=gen) * 2 - 1) / n


def check_token_grid(cfg: Config, h: int, w: int) -> None:
    """Training reads one token per ``cause_grid`` cell: at least two per image are needed (the
    token graph of one token has no edge, and no positive pair within the image)."""
    g = max(1, cfg.cause_grid)
    if (h // g) * (w // g) < 2:
        raise StegosegError(f"--cause-grid {cfg.cause_grid} leaves {(h // g) * (w // g)} token(s) per image of the "
                            f"cache's {h}x{w} token grid: raise --resolution or lower --cause-grid")


def fit_clusterbook(cfg: Config, cache: FeatureCache, out, device: str = "cpu") -> torch.Tensor:
    """Stage 1 (see the module docstring): the (cause_concepts, C) clusterbook, written to
    ``<out>/clusterbook.npy`` with its settings in ``clusterbook.json``. An existing one with
    the same settings is reused; an interrupted fit continues from ``clusterbook.partial.pt``
    (saved every 50 steps)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    settings = clusterbook_settings(cfg, cache)
    book_path, meta_path, partial = out / CLUSTERBOOK, out / "clusterbook.json", out / "clusterbook.partial.pt"
    if book_path.is_file() and meta_path.is_file():
        try:
            same = json.loads(meta_path.read_text()) == settings
        except ValueError:
            same = False
        if same:
            log.info("CAUSE stage 1: reusing the clusterbook %s", book_path)
            return torch.from_numpy(np.load(book_path, allow_pickle=False))
        log.warning("CAUSE stage 1: %s was fitted with other settings; fitting it again", book_path)
    c, h, w = cache.meta["feature_shape"]
    check_token_grid(cfg, h, w)
    concepts = nn.Parameter(init_concepts(cfg.cause_concepts, c, cfg.seed).to(device))
    optimizer = torch.optim.Adam([concepts], lr=1e-3)
    steps, start = settings["steps"], 0
    if partial.is_file():
        state = torch.load(partial, map_location=device, weights_only=True)
        if state.get("settings") == json.dumps(settings, sort_keys=True):
            with torch.no_grad():
                concepts.copy_(state["concepts"])
            optimizer.load_state_dict(state["optimizer"])
            start = int(state["step"])
            log.info("CAUSE stage 1: continuing the clusterbook from step %d", start)
    t0 = time.perf_counter()
    bar = tqdm(range(start, steps), desc="CAUSE clusterbook", disable=not cfg.progress, unit="step")
    for step in bar:
        torch.manual_seed(step_seed(cfg.seed, step, 0, 5))
        idx = batch_indices(cache.n, cfg.batch_size, step, cfg.seed)
        feats = cache.feature_batch(idx).to(device).float()
        if cfg.cause_grid > 1:
            feats, _ = grid_sample_tokens(feats, block=cfg.cause_grid)
        loss = modularity_loss(concepts, tokens_of(feats), cfg.cause_book_temperature)
        if not torch.isfinite(loss):
            raise StegosegError(f"CAUSE stage 1: the modularity became {loss.item()} at step {step} (features with NaN?)")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        bar.set_postfix(modularity=f"{-loss.item():.4f}", refresh=False)
        if (step + 1) % 50 == 0 and step + 1 < steps:
            state = {"settings": json.dumps(settings, sort_keys=True), "step": step + 1,
                     "concepts": concepts.detach().cpu(), "optimizer": optimizer.state_dict()}
            atomic_write(partial, lambda tmp: torch.save(state, tmp))
    book = concepts.detach().cpu()
    atomic_save_npy(book_path, book.numpy())
    atomic_write(meta_path, lambda tmp: Path(tmp).write_text(json.dumps(settings, indent=1)))
    partial.unlink(missing_ok=True)
    log.info("CAUSE stage 1: clusterbook of %d concepts in %d steps (%.1fs)", cfg.cause_concepts, steps,
             time.perf_counter() - t0)
    return book


# --------------------------------------------------------------------------- stages 2 and 3
def build_cause_head(method: str, in_dim: int, dim: int, n_concepts: int, grid: tuple, dropout: float) -> nn.Module:
    if method == "cause-tr":
        return CauseTRHead(in_dim, dim, n_concepts=n_concepts, grid=grid, dropout=dropout)
    if method == "cause-mlp":
        return CauseMLPHead(in_dim, dim)
    raise StegosegError(f"unknown CAUSE method {method!r}: use cause-mlp or cause-tr")


class CauseParts(nn.Module):
    """What CAUSE trains: student head + projection, EMA teacher head + projection (the
    teacher's head is ``model.head``, the one inference uses), the clusterbook, the bank, the
    probes (in ``model``). Plain PyTorch: :class:`CauseModule` wires it into Lightning, and a
    test can drive one step of it by hand."""

    def __init__(self, cfg: Config, in_dim: int, grid: tuple, n_clusters: int, n_classes: Optional[int],
                 clusterbook: torch.Tensor):
        super().__init__()
        self.cfg = cfg
        head = build_cause_head(cfg.method, in_dim, cfg.dim, cfg.cause_concepts, grid, cfg.feature_dropout)
        if isinstance(head, CauseTRHead):
            head.set_clusterbook(clusterbook)
        self.student = head
        self.student_projection = nn.Conv2d(cfg.dim, cfg.cause_projection_dim, 1)
        self.model = SegmentationModel(None, {}, head=copy.deepcopy(head), n_clusters=n_clusters,
                                       n_classes=n_classes, method=cfg.method, config=cfg.to_dict())
        self.model.cluster_probe.centroids.data = (torch.rand(n_clusters, cfg.dim) * 2 - 1) / n_clusters
        self.teacher_projection = copy.deepcopy(self.student_projection)
        for p in (*self.model.head.parameters(), *self.teacher_projection.parameters()):
            p.requires_grad_(False)
        self.register_buffer("concepts", clusterbook.clone().float())
        self.dropout = TokenDropout(cfg.feature_dropout)
        self.bank = ConceptBank(cfg.cause_concepts, cfg.cause_projection_dim, cfg.cause_bank_size)

    @property
    def teacher(self) -> nn.Module:
        return self.model.head

    def student_parameters(self) -> list:
        return [*self.student.parameters(), *self.student_projection.parameters()]

    def head_loss(self, feats: torch.Tensor, labels: Optional[torch.Tensor] = None) -> tuple:
        """Stage 2 losses of a batch of features (B, C, h, w): ({name: loss}, the sampled
        tokens and teacher keys for :meth:`after_head_step`). Draws from the global generator:
        the teacher's dropout, the student's, the grid cells (the reference's order)."""
        cfg = self.cfg
        with torch.no_grad():
            teacher_code = self.teacher(feats, self.dropout)
            teacher_keys = self.teacher_projection(teacher_code)
        code = self.student(feats, self.dropout)
        keys = self.student_projection(code)
        if cfg.cause_grid > 1:
            feats, order = grid_sample_tokens(feats, block=cfg.cause_grid)
            keys, _ = grid_sample_tokens(keys, order=order, block=cfg.cause_grid)
            teacher_keys, _ = grid_sample_tokens(teacher_keys, order=order, block=cfg.cause_grid)
        ids, bank_keys = self.bank.entries()
        tokens = tokens_of(feats)
        out = {"contrastive": concept_contrastive_loss(
            tokens, tokens_of(keys), tokens_of(teacher_keys), self.concepts,
            bank_concepts=None if ids is None else self.concepts[ids.to(self.concepts.device)], bank_keys=bank_keys,
            temperature=cfg.cause_temperature, pos_threshold=cfg.cause_pos_threshold,
            neg_threshold=cfg.cause_neg_threshold)}
        if labels is not None and self.model.linear_probe is not None:
            out["linear"] = self.model.linear_probe.loss(teacher_code, labels)
        return out, (tokens.detach(), tokens_of(teacher_keys).detach())

    def after_head_step(self, step: int, pending: tuple) -> None:
        """After the optimiser step of stage-2 step ``step``: the teacher follows the student
        (at step 0 it becomes the student: the reference's teacher shares the student's
        storage until its first update), then the bank takes the step's teacher keys."""
        decay = 0.0 if step == 0 else self.cfg.cause_ema
        ema_update(self.student, self.teacher, decay)
        ema_update(self.student_projection, self.teacher_projection, decay)
        tokens, teacher_keys = pending
        self.bank.update(tokens, teacher_keys, self.concepts)

    def probe_loss(self, feats: torch.Tensor, labels: Optional[torch.Tensor] = None) -> dict:
        """Stage 3: the cluster probe's modularity on the teacher's code (dropout active, grid-sampled, detached)."""
        with torch.no_grad():
            code = self.teacher(feats, self.dropout)
        sampled = grid_sample_tokens(code, block=self.cfg.cause_grid)[0] if self.cfg.cause_grid > 1 else code
        out = {"probe": modularity_loss(self.model.cluster_probe.centroids, tokens_of(sampled),
                                        self.cfg.cause_book_temperature)}
        if labels is not None and self.model.linear_probe is not None:
            out["linear"] = self.model.linear_probe.loss(code, labels)
        return out

    def clip_student(self) -> None:
        torch.nn.utils.clip_grad_norm_(self.student_parameters(), self.cfg.cause_clip)


def probe_lr_factor(step: int, head_steps: int, probe_steps: int) -> float:
    """The probes' learning-rate factor: 1 in stage 2; in stage 3 the reference's StepLR
    (halved every 2 of its 5 epochs), by the fraction of stage 3 done."""
    if step < head_steps:
        return 1.0
    epoch = (5 * (step - head_steps)) // max(1, probe_steps)
    return 0.5 ** (epoch // 2)


class CauseModule(L.LightningModule):
    """Lightning wiring of :class:`CauseParts`: stage 2 for ``steps`` steps, then stage 3."""

    def __init__(self, cfg: Config, in_dim: int, grid: tuple, n_clusters: int, n_classes: Optional[int],
                 clusterbook: torch.Tensor):
        super().__init__()
        self.cfg = cfg
        self.save_hyperparameters({"config": cfg.to_dict(), "in_dim": in_dim, "n_clusters": n_clusters,
                                   "n_classes": n_classes, "grid": list(grid)})
        self.parts = CauseParts(cfg, in_dim, grid, n_clusters, n_classes, clusterbook)
        self.resident = None
        self._pending = None
        # the bank travels in every Lightning checkpoint: at most concepts x size keys (float32)
        self.checkpoint_extra_bytes = cfg.cause_concepts * cfg.cause_bank_size * (cfg.cause_projection_dim * 4 + 8)

    @property
    def model(self) -> SegmentationModel:
        return self.parts.model

    @property
    def head(self) -> nn.Module:
        return self.parts.teacher

    def configure_optimizers(self):
        """One Adam: the student (lr, weight decay), the linear probe (probe lr, weight decay), the
        cluster probe (probe lr; gradients in stage 3 only); the probes' lr follows
        :func:`probe_lr_factor`. Adam's state is per parameter, so the groups are independent."""
        cfg, parts = self.cfg, self.parts
        groups = [{"params": parts.student_parameters(), "lr": cfg.lr, "weight_decay": cfg.cause_weight_decay},
                  {"params": list(parts.model.cluster_probe.parameters()), "lr": cfg.probe_lr, "weight_decay": 0.0}]
        if parts.model.linear_probe is not None:
            groups.append({"params": list(parts.model.linear_probe.parameters()), "lr": cfg.probe_lr,
                           "weight_decay": cfg.cause_weight_decay})
        optimizer = torch.optim.Adam(groups)
        factor = lambda step: probe_lr_factor(step, cfg.steps, cfg.cause_probe_steps)  # noqa: E731
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, [lambda step: 1.0] + [factor] * (len(groups) - 1))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None):
        """The reference clips the head's gradient norm (``cause_clip``); the probes are not clipped."""
        if self.global_step < self.cfg.steps:
            self.parts.clip_student()

    def on_fit_start(self) -> None:
        self.parts.bank.to(self.device)
        if self.resident is not None:
            self.resident.to(self.device)

    def training_step(self, batch: dict, batch_idx: int):
        step = int(batch["step"])
        if step != self.global_step:
            raise RuntimeError(f"batch for step {step} arrived at global step {self.global_step}")
        torch.manual_seed(step_seed(self.cfg.seed, step, self.global_rank, 2))
        if "feats" not in batch:  # indices only: gather the batch from the resident cache
            batch = {**batch, **self.resident.batch(batch["index"])}
        feats = batch["feats"].float()
        labels = batch.get("label")
        if step < self.cfg.steps:
            out, pending = self.parts.head_loss(feats, labels)
            self._pending = (step, pending)
            main = out["contrastive"]
        else:
            out, self._pending = self.parts.probe_loss(feats, labels), None
            main = out["probe"]
        total = main + out.get("linear", 0.0)
        self.log_dict({f"loss/{k}": v.float() for k, v in out.items()}, on_step=True)
        self.log("loss", main.float(), prog_bar=True, on_step=True)
        return total

    def optimizer_step(self, epoch, batch_idx, optimizer, optimizer_closure=None) -> None:
        """The optimiser step, then (stage 2) the teacher's EMA and the bank update: here, not in
        ``on_train_batch_end``, because the checkpoint callbacks run before that hook and a
        checkpoint of step k must hold step k's teacher and bank (exact resume)."""
        super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
        if self._pending is not None:
            step, pending = self._pending
            self.parts.after_head_step(step, pending)
            self._pending = None

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["cause_bank"] = self.parts.bank.state()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        if "cause_bank" in checkpoint:
            self.parts.bank.load_state(checkpoint["cause_bank"], device=self.device)


def fit_cause(cfg: Config, out, cache: FeatureCache, n_classes: int, has_labels: bool, clusterbook: torch.Tensor,
              resume: bool = False, callbacks: Optional[list] = None) -> CauseModule:
    """Stages 2 and 3 with Lightning (checkpoints in ``<out>/lightning/``, CSV log in
    ``<out>/logs/``); ``resume`` continues from ``last.ckpt``. Returns the module on the CPU."""
    out = Path(out)
    n_clusters = n_classes + cfg.extra_clusters
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    c, h, w = cache.meta["feature_shape"]
    check_token_grid(cfg, h, w)
    module = CauseModule(cfg, c, (h, w), n_clusters, n_classes if has_labels else None, clusterbook)
    trainer_cfg = cfg
    if cfg.strategy in ("auto", "ddp") and (cfg.num_nodes > 1 or _device_count(cfg.devices) > 1):
        # each stage leaves some parameters without a gradient (the cluster probe in stage 2, the
        # student in stage 3): DDP must be told to expect that
        trainer_cfg = dataclasses.replace(cfg, strategy="ddp_find_unused_parameters_true")
    return fit_step_module(module, trainer_cfg, out, cache, None, max_steps=cfg.steps + cfg.cause_probe_steps,
                           resume=resume, callbacks=callbacks)


def _device_count(devices: str) -> int:
    from stegoseg.training.trainer import parse_devices

    parsed = parse_devices(devices)
    if isinstance(parsed, list):
        return len(parsed)
    if parsed == "auto" or parsed == -1:
        return max(1, torch.cuda.device_count())
    return int(parsed)
