"""STEGO training: a LightningModule that only wires head, loss and probes together.

Training reads the feature cache (the backbone is frozen, so it never runs), unless
``live_backbone`` is set, in which case each step runs the backbone on the same crops.

Determinism and resume: every batch is a pure function of (seed, global step, rank):
which items (an epoch-style shuffle computed from the step), which KNN partner, the
sampled points, the derangements and the dropout masks. A run killed at step k and
resumed from its checkpoint therefore continues exactly as the uninterrupted run.
"""
from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Optional

import lightning as L
import torch
import torch.nn as nn

from stegoseg.config.stego import Config
from stegoseg.features.cache import CropView, FeatureCache
from stegoseg.features.cache import config_neighbors
from stegoseg.losses.potts import potts_term
from stegoseg.losses.stego import LossWeights, stego_loss
from stegoseg.model import SegmentationModel
from stegoseg.nn.heads import build_head
from stegoseg.reporting.figures import histogram_png
from stegoseg.training.steps import fit_step_module, step_seed

log = logging.getLogger("stegoseg")


def loss_weights(cfg: Config) -> LossWeights:
    """The loss's parameters from the run config (each ``LossWeights`` field is the config field of that name)."""
    return LossWeights(**{f.name: getattr(cfg, f.name) for f in dataclasses.fields(LossWeights)})


class StegoModule(L.LightningModule):
    """Trains ``self.model``, the :class:`~stegoseg.model.SegmentationModel` that inference
    loads (head + cluster/linear probes; its backbone is attached after training, the
    training steps read cached features): correspondence loss + probe losses, each part
    with its own Adam."""

    def __init__(self, cfg: Config, in_dim: int, n_clusters: int, n_classes: Optional[int], backbone=None):
        super().__init__()
        self.cfg = cfg
        self.save_hyperparameters({"config": cfg.to_dict(), "in_dim": in_dim, "n_clusters": n_clusters, "n_classes": n_classes})
        self.model = SegmentationModel(None, {}, head=build_head("stego", in_dim, cfg.dim), n_clusters=n_clusters,
                                       n_classes=n_classes, method="stego", config=cfg.to_dict())
        self.dropout = nn.Dropout2d(cfg.feature_dropout)
        self.weights = loss_weights(cfg)
        self.resident = None  # a ResidentFeatures when the cache is held on the device (--cache-in-memory)
        self._backbone = [backbone]  # a list: not a registered submodule, never saved in checkpoints
        self.sim_samples = {"knn": [], "rand": []}

    @property
    def head(self):
        return self.model.head

    @property
    def cluster_probe(self):
        return self.model.cluster_probe

    @property
    def linear_probe(self):
        return self.model.linear_probe

    def configure_optimizers(self):
        """Adam for the head (lr 5e-4) and for each probe (lr 5e-3).

        One Adam with a parameter group per part: Adam's update and state are per
        parameter, so this is exactly three separate Adam optimisers, while Lightning
        counts one optimiser step per training step. The probes read the detached code,
        so their losses never reach the head.
        """
        groups = [
            {"params": self.head.parameters(), "lr": self.cfg.lr},
            {"params": self.cluster_probe.parameters(), "lr": self.cfg.probe_lr},
        ]
        if self.linear_probe is not None:
            groups.append({"params": self.linear_probe.parameters(), "lr": self.cfg.probe_lr})
        return torch.optim.Adam(groups)

    def features_of(self, batch: dict, key: str) -> torch.Tensor:
        if "feats" in batch:
            return batch[key]
        backbone = self._backbone[0]
        image = batch["image" if key == "feats" else "image_knn"]
        with torch.no_grad():
            return backbone(backbone.normalize(image)).float()

    def on_fit_start(self) -> None:
        if self.resident is not None:
            self.resident.to(self.device)

    def compute_losses(self, batch: dict, step: int) -> dict:
        """All losses of one batch, with every random draw seeded by (seed, step, rank)."""
        torch.manual_seed(step_seed(self.cfg.seed, step, self.global_rank, 2))
        gen = torch.Generator().manual_seed(step_seed(self.cfg.seed, step, self.global_rank, 3))
        if "partner" in batch:  # indices only: gather the batch from the resident cache
            batch = {**batch, **self.resident.batch(batch["index"], batch["partner"])}
        feats = self.features_of(batch, "feats").float()
        feats_knn = self.features_of(batch, "feats_knn").float()
        code = self.head(feats, self.dropout)
        code_knn = self.head(feats_knn, self.dropout)
        out = stego_loss(self.dropout(feats), self.dropout(feats_knn), code, code_knn, self.weights, generator=gen)
        if self.cfg.w_potts > 0:

            out["potts"] = potts_term(code, batch["thumb"], self.cfg.b_potts, self.cfg.n_samples,
                                      image_size=self.cfg.resolution, generator=gen)
            out["loss"] = out["loss"] + self.cfg.w_potts * out["potts"]
        out["cluster"] = self.cluster_probe.loss(code.detach())
        if self.linear_probe is not None and "label" in batch:
            out["linear"] = self.linear_probe.loss(code.detach(), batch["label"])
        return out

    def training_step(self, batch: dict, batch_idx: int):
        step = int(batch["step"])
        if step != self.global_step:
            raise RuntimeError(f"batch for step {step} arrived at global step {self.global_step}")
        out = self.compute_losses(batch, step)
        total = out["loss"] + out["cluster"] + out.get("linear", 0.0)
        logs = {f"loss/{k}": out[k] for k in ("loss", "self", "knn", "rand", "potts", "cluster") if k in out}
        if "linear" in out:
            logs["loss/linear"] = out["linear"]
        logs.update({"sim/knn": out["sim_knn"], "sim/rand": out["sim_rand"]})
        self.log_dict({k: v.float() for k, v in logs.items()}, prog_bar=False, on_step=True, sync_dist=False)
        self.log("loss", out["loss"].float(), prog_bar=True, on_step=True)
        if step % max(1, self.cfg.log_every) == 0:
            self._keep_similarities(out)
        return total

    def _keep_similarities(self, out: dict, per_step: int = 2000) -> None:
        g = torch.Generator().manual_seed(0)
        for key in ("knn", "rand"):
            v = out[f"cd_{key}"].reshape(-1).float().cpu()
            if v.numel():
                self.sim_samples[key].append(v[torch.randperm(v.numel(), generator=g)[:per_step]])
                self.sim_samples[key] = self.sim_samples[key][-50:]


class _SimilarityHistogram(L.Callback):
    """Saves the A.11 histogram of code similarities (KNN vs random pairs) every ``every`` steps."""

    def __init__(self, path: Path, every: int):
        self.path, self.every = path, max(1, every)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.is_global_zero and trainer.global_step % self.every == 0:
            save_similarity_histogram(pl_module, self.path, trainer.global_step)

    def on_train_end(self, trainer, pl_module):
        if trainer.is_global_zero:
            save_similarity_histogram(pl_module, self.path, trainer.global_step)


def save_similarity_histogram(module: StegoModule, path: Path, step: int) -> None:

    values = {
        f"{name} pairs": torch.cat(v).numpy() for name, v in (("KNN", module.sim_samples["knn"]), ("random", module.sim_samples["rand"])) if v
    }
    if values:
        histogram_png(values, path, title=f"code similarity S (step {step})", xlabel="cosine similarity of codes")


def fit_stego(cfg: Config, out, cache: FeatureCache, n_classes: int, has_labels: bool, resume: bool = False,
              backbone=None, crop_view: Optional[CropView] = None, callbacks: Optional[list] = None) -> StegoModule:
    """Train the head and probes with Lightning; returns the trained module (on CPU).

    Writes Lightning checkpoints to ``<out>/lightning/`` (every ``ckpt_every`` steps and
    ``last.ckpt``), CSV logs to ``<out>/logs/`` and ``similarity_histogram.png``.
    ``resume`` continues from ``<out>/lightning/last.ckpt``.
    """

    out = Path(out)
    knn = config_neighbors(cfg, cache)
    n_clusters = n_classes + cfg.extra_clusters
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    module = StegoModule(cfg, cache.meta["feature_shape"][0], n_clusters, n_classes if has_labels else None,
                         backbone=backbone if cfg.live_backbone else None)
    if cfg.live_backbone and crop_view is None:
        raise ValueError("live_backbone needs the dataset's crop view")
    callbacks = [_SimilarityHistogram(out / "similarity_histogram.png", cfg.ckpt_every), *(callbacks or [])]
    return fit_step_module(module, cfg, out, cache, knn, max_steps=cfg.steps, resume=resume, callbacks=callbacks,
                           crop_view=crop_view if cfg.live_backbone else None, with_thumbs=cfg.w_potts > 0)
