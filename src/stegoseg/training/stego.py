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
import json
import logging
import os
from pathlib import Path
from typing import Optional

import lightning as L
import numpy as np
import torch
import torch.nn as nn

from stegoseg.config.stego import Config
from stegoseg.features.cache import CropView, FeatureCache, ResidentFeatures
from stegoseg.features.knn import config_neighbors
from stegoseg.losses.potts import potts_term
from stegoseg.losses.stego import LossWeights, stego_loss
from stegoseg.model import SegmentationModel
from stegoseg.nn.heads import build_head
from stegoseg.preflight import check_free_space
from stegoseg.reporting.figures import histogram_png
from stegoseg.training.resume import (
    RUN_CONFIG,
    keep_log_before_resume,
    merge_resumed_log,
    refuse_unfinished_run,
    resume_checkpoint,
)
from stegoseg.training.trainer import build_trainer

log = logging.getLogger("stegoseg")


def loss_weights(cfg: Config) -> LossWeights:
    """The loss's parameters from the run config (each ``LossWeights`` field is the config field of that name)."""
    return LossWeights(**{f.name: getattr(cfg, f.name) for f in dataclasses.fields(LossWeights)})


def step_seed(seed: int, step: int, rank: int, salt: int = 0) -> int:
    return (seed * 1_000_003 + step * 7_919 + rank * 104_729 + salt * 15_485_863) % (2**62)


def batch_indices(n: int, batch_size: int, step: int, seed: int, rank: int = 0, world: int = 1) -> np.ndarray:
    """Item indices of the batch of (step, rank): consecutive slices of per-epoch permutations."""
    start = (step * world + rank) * batch_size
    out = []
    while len(out) < batch_size:
        epoch, offset = divmod(start + len(out), n)
        perm = np.random.default_rng([seed, epoch]).permutation(n)
        out.extend(perm[offset : offset + batch_size - len(out)].tolist())
    return np.asarray(out, dtype=np.int64)


class StepBatches(torch.utils.data.Dataset):
    """Item ``step`` is the whole training batch of that step (features or images, KNN partners, labels)."""

    def __init__(
        self,
        cache: FeatureCache,
        knn: np.ndarray,
        batch_size: int,
        seed: int,
        knn_topk: int = 7,
        start_step: int = 0,
        steps: int = 1,
        rank: int = 0,
        world: int = 1,
        crop_view: Optional[CropView] = None,
        with_thumbs: bool = False,
        indices_only: bool = False,
    ):
        self.cache, self.knn = cache, knn
        self.indices_only = indices_only  # the features are resident on the device: the batch is its indices
        self.batch_size, self.seed, self.topk = batch_size, seed, min(knn_topk, knn.shape[1])
        self.start_step, self.steps, self.rank, self.world = start_step, steps, rank, world
        self.crop_view = crop_view
        self.with_thumbs = with_thumbs  # crop thumbnails in each batch (for the CRF-kernel Potts term)

    def __len__(self) -> int:
        return max(0, self.steps - self.start_step)

    def indices(self, step: int) -> tuple:
        idx = batch_indices(self.cache.n, self.batch_size, step, self.seed, self.rank, self.world)
        rng = np.random.default_rng([self.seed, step, self.rank, 1])
        partner = self.knn[idx, rng.integers(0, self.topk, size=len(idx))]
        return idx, partner

    def __getitem__(self, i: int) -> dict:
        step = self.start_step + i
        idx, partner = self.indices(step)
        out = {"step": torch.tensor(step), "index": torch.from_numpy(idx)}
        if self.indices_only:
            out["partner"] = torch.from_numpy(np.asarray(partner, dtype=np.int64))
            return out
        if self.crop_view is None:
            out["feats"] = self.cache.feature_batch(idx)
            out["feats_knn"] = self.cache.feature_batch(partner)
        else:
            out["image"] = torch.stack([self.crop_view[int(j)]["image"] for j in idx])
            out["image_knn"] = torch.stack([self.crop_view[int(j)]["image"] for j in partner])
        if self.with_thumbs:
            out["thumb"] = self.cache.thumb_batch(idx)
        if self.cache.has_labels:
            out["label"] = self.cache.label_batch(idx)
        return out


class StepStream(torch.utils.data.IterableDataset):
    """Streams ``StepBatches`` in step order, with no length.

    Lightning treats a loader with a length as an epoch; after a mid-epoch resume it
    would end that epoch early and restart the loader. A stream has no epochs: training
    stops at ``max_steps``. Loader workers take interleaved steps (worker w of W yields
    steps start + w, start + w + W, ...), which the DataLoader returns in order.
    """

    def __init__(self, batches: StepBatches):
        self.batches = batches

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        worker, n_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        for i in range(worker, len(self.batches), n_workers):
            yield self.batches[i]


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


class StepDataModule(L.LightningDataModule):
    """Builds the step-indexed loader once the trainer knows the restored step, rank and world size."""

    def __init__(self, cfg: Config, cache: FeatureCache, knn: np.ndarray, crop_view: Optional[CropView],
                 indices_only: bool = False):
        super().__init__()
        self.cfg, self.cache, self.knn, self.crop_view = cfg, cache, knn, crop_view
        self.indices_only = indices_only

    def train_dataloader(self):
        t = self.trainer
        ds = StepBatches(
            self.cache, self.knn, self.cfg.batch_size, self.cfg.seed, self.cfg.knn_topk,
            start_step=t.global_step, steps=self.cfg.steps, rank=t.global_rank, world=t.world_size,
            crop_view=self.crop_view, with_thumbs=self.cfg.w_potts > 0, indices_only=self.indices_only,
        )
        return torch.utils.data.DataLoader(
            StepStream(ds), batch_size=None, num_workers=0 if self.indices_only else self.cfg.num_workers,
            persistent_workers=False, pin_memory=torch.cuda.is_available(),
        )


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


# --cache-in-memory auto: hold the cache on the training device when it takes at most this
# fraction of the device's free memory
RESIDENT_MEMORY_FRACTION = 0.4


def use_resident_cache(cfg: Config, cache: FeatureCache) -> bool:
    """Whether training reads the cache from memory on its device (``--cache-in-memory``)."""
    if cfg.live_backbone or cfg.cache_in_memory == "off":
        return False
    if cfg.cache_in_memory == "on":
        return True
    need = ResidentFeatures.nbytes(cache, with_thumbs=cfg.w_potts > 0)
    accelerator = cfg.accelerator
    if torch.cuda.is_available() and accelerator in ("auto", "gpu", "cuda"):
        free = torch.cuda.mem_get_info()[0]
    else:
        free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    use = need <= RESIDENT_MEMORY_FRACTION * free
    log.info("feature cache %s: %.2f GB, %.1f GB free on the training device (--cache-in-memory auto)",
             "held in memory" if use else "read from disk", need / 1e9, free / 1e9)
    return use


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
    ckpt_dir = out / "lightning"
    point = resume_checkpoint(ckpt_dir, cfg) if resume else None
    ckpt_path = point.path if point is not None else None
    if point is None:
        refuse_unfinished_run(ckpt_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / RUN_CONFIG).write_text(json.dumps(cfg.to_dict(), indent=1))
    check_checkpoint_space(module, out, cfg)
    trainer = build_trainer(
        cfg, out, max_steps=cfg.steps,
        callbacks=[_SimilarityHistogram(out / "similarity_histogram.png", cfg.ckpt_every), *(callbacks or [])],
        deterministic=False,
    )
    if cfg.live_backbone and crop_view is None:
        raise ValueError("live_backbone needs the dataset's crop view")
    log_dir = out / "logs"
    if point is not None and trainer.is_global_zero:  # one process rewrites the log
        keep_log_before_resume(log_dir, point.step)
    resident = use_resident_cache(cfg, cache)
    if resident:
        module.resident = ResidentFeatures(cache, with_thumbs=cfg.w_potts > 0)
    data = StepDataModule(cfg, cache, knn, crop_view if cfg.live_backbone else None, indices_only=resident)
    trainer.fit(module, datamodule=data, ckpt_path=ckpt_path, weights_only=True)
    module.resident = None
    if trainer.is_global_zero:
        merge_resumed_log(log_dir)
    module.is_global_zero = trainer.is_global_zero
    return module.cpu()


def check_checkpoint_space(module: StegoModule, out: Path, cfg: Config) -> None:
    """Lightning's checkpoints (weights + Adam's two moments) every ``ckpt_every`` steps plus
    last.ckpt must fit on the disk before training starts."""

    params = sum(p.numel() for p in module.parameters())
    per_ckpt = params * 4 * 3 + 64 * 1024
    n_ckpt = cfg.steps // max(1, cfg.ckpt_every) + 2
    check_free_space(out, per_ckpt * n_ckpt, f"{n_ckpt} training checkpoints")
