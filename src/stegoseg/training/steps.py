"""Step-indexed training on the feature cache, shared by every method's LightningModule.

Every batch is a pure function of (seed, global step, rank): which items (an epoch-style
shuffle computed from the step), which KNN partner; a module seeds its own random draws from
:func:`step_seed`. A run killed at step k and resumed from its checkpoint therefore continues
exactly as the uninterrupted run. :func:`fit_step_module` is the one resumable fit: settings
checked against the interrupted run, checkpoint space checked, the log kept across resumes,
the cache held on the training device when it fits (``--cache-in-memory``).
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import signal
import threading
from pathlib import Path
from typing import Optional

import lightning as L
import numpy as np
import torch

from stegoseg.errors import RunInterrupted
from stegoseg.features.cache import CropView, FeatureCache, ResidentFeatures
from stegoseg.preflight import check_free_space
from stegoseg.training.resume import (
    RUN_CONFIG,
    keep_log_before_resume,
    merge_resumed_log,
    refuse_unfinished_run,
    resume_checkpoint,
)
from stegoseg.training.trainer import build_trainer

log = logging.getLogger("stegoseg")


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
        self.cache, self.knn = cache, knn  # knn None: no KNN partner in the batches (CAUSE)
        self.indices_only = indices_only  # the features are resident on the device: the batch is its indices
        self.batch_size, self.seed = batch_size, seed
        self.topk = min(knn_topk, knn.shape[1]) if knn is not None else 0
        self.start_step, self.steps, self.rank, self.world = start_step, steps, rank, world
        self.crop_view = crop_view
        self.with_thumbs = with_thumbs  # crop thumbnails in each batch (for the CRF-kernel Potts term)

    def __len__(self) -> int:
        return max(0, self.steps - self.start_step)

    def indices(self, step: int) -> tuple:
        idx = batch_indices(self.cache.n, self.batch_size, step, self.seed, self.rank, self.world)
        if self.knn is None:
            return idx, None
        rng = np.random.default_rng([self.seed, step, self.rank, 1])
        partner = self.knn[idx, rng.integers(0, self.topk, size=len(idx))]
        return idx, partner

    def __getitem__(self, i: int) -> dict:
        step = self.start_step + i
        idx, partner = self.indices(step)
        out = {"step": torch.tensor(step), "index": torch.from_numpy(idx)}
        if self.indices_only:
            if partner is not None:
                out["partner"] = torch.from_numpy(np.asarray(partner, dtype=np.int64))
            return out
        if self.crop_view is None:
            out["feats"] = self.cache.feature_batch(idx)
            if partner is not None:
                out["feats_knn"] = self.cache.feature_batch(partner)
        else:
            out["image"] = torch.stack([self.crop_view[int(j)]["image"] for j in idx])
            if partner is not None:
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


class StepDataModule(L.LightningDataModule):
    """Builds the step-indexed loader once the trainer knows the restored step, rank and world size."""

    def __init__(self, cfg, cache: FeatureCache, knn: np.ndarray, crop_view: Optional[CropView],
                 indices_only: bool = False, with_thumbs: bool = False):
        super().__init__()
        self.cfg, self.cache, self.knn, self.crop_view = cfg, cache, knn, crop_view
        self.indices_only, self.with_thumbs = indices_only, with_thumbs

    def train_dataloader(self):
        t = self.trainer
        ds = StepBatches(
            self.cache, self.knn, self.cfg.batch_size, self.cfg.seed, self.cfg.knn_topk,
            start_step=t.global_step, steps=self.cfg.steps, rank=t.global_rank, world=t.world_size,
            crop_view=self.crop_view, with_thumbs=self.with_thumbs, indices_only=self.indices_only,
        )
        return torch.utils.data.DataLoader(
            StepStream(ds), batch_size=None, num_workers=0 if self.indices_only else self.cfg.num_workers,
            persistent_workers=False, pin_memory=torch.cuda.is_available(),
        )


# --cache-in-memory auto: hold the cache on the training device when it takes at most this
# fraction of the device's free memory
RESIDENT_MEMORY_FRACTION = 0.4


def use_resident_cache(cfg, cache: FeatureCache, with_thumbs: bool = False) -> bool:
    """Whether training reads the cache from memory on its device (``--cache-in-memory``)."""
    if cfg.live_backbone or cfg.cache_in_memory == "off":
        return False
    if cfg.cache_in_memory == "on":
        return True
    need = ResidentFeatures.nbytes(cache, with_thumbs=with_thumbs)
    accelerator = cfg.accelerator
    if torch.cuda.is_available() and accelerator in ("auto", "gpu", "cuda"):
        free = torch.cuda.mem_get_info()[0]
    else:
        free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    use = need <= RESIDENT_MEMORY_FRACTION * free
    log.info("feature cache %s: %.2f GB, %.1f GB free on the training device (--cache-in-memory auto)",
             "held in memory" if use else "read from disk", need / 1e9, free / 1e9)
    return use


def fit_step_module(module: L.LightningModule, cfg, out: Path, cache: FeatureCache, knn: np.ndarray, max_steps: int,
                    resume: bool = False, callbacks: Optional[list] = None, crop_view: Optional[CropView] = None,
                    with_thumbs: bool = False) -> L.LightningModule:
    """Fit ``module`` for ``max_steps`` step-indexed batches of ``cache`` with Lightning; returns it on the CPU.

    Writes Lightning checkpoints to ``<out>/lightning/`` (every ``ckpt_every`` steps and
    ``last.ckpt``) and the CSV log to ``<out>/logs/``; ``resume`` continues from
    ``last.ckpt`` (refused when the settings differ from the interrupted run's). A module
    with a ``resident`` attribute gets the cache held on its device when it fits."""
    out = Path(out)
    ckpt_dir = out / "lightning"
    point = resume_checkpoint(ckpt_dir, cfg) if resume else None
    if point is None:
        refuse_unfinished_run(ckpt_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / RUN_CONFIG).write_text(json.dumps(cfg.to_dict(), indent=1))
    check_checkpoint_space(module, out, cfg, max_steps)
    trainer = build_trainer(cfg, out, max_steps=max_steps, callbacks=callbacks, deterministic=False)
    log_dir = out / "logs"
    if point is not None and trainer.is_global_zero:  # one process rewrites the log
        keep_log_before_resume(log_dir, point.step)
    resident = crop_view is None and use_resident_cache(cfg, cache, with_thumbs)
    if resident:
        module.resident = ResidentFeatures(cache, with_thumbs=with_thumbs)
    data = StepDataModule(dataclasses.replace(cfg, steps=max_steps), cache, knn, crop_view, indices_only=resident,
                          with_thumbs=with_thumbs)
    stop = StopAtStepEnd()
    trainer.callbacks.append(stop)
    with stop.catching_signals():
        trainer.fit(module, datamodule=data, ckpt_path=point.path if point is not None else None, weights_only=True)
    module.resident = None
    if stop.signum is not None:
        trainer.save_checkpoint(ckpt_dir / "last.ckpt")
        name = signal.Signals(stop.signum).name
        raise RunInterrupted(f"stopped by {name} after step {trainer.global_step} of {max_steps}; "
                             f"{ckpt_dir / 'last.ckpt'} holds it: run the same command with --resume to continue",
                             stop.signum)
    if trainer.is_global_zero:
        merge_resumed_log(log_dir)
    module.is_global_zero = trainer.is_global_zero
    return module.cpu()


class StopAtStepEnd(L.Callback):
    """Ctrl-C (SIGINT) or SIGTERM during training: finish the current step, then stop (a second
    Ctrl-C stops at once). :func:`fit_step_module` then saves ``last.ckpt`` and raises
    :class:`~stegoseg.errors.RunInterrupted`: the work is kept and ``--resume`` continues
    exactly, instead of a lost run reported as a success."""

    def __init__(self):
        self.signum: Optional[int] = None

    @contextlib.contextmanager
    def catching_signals(self):
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
        for s in previous:
            signal.signal(s, self._handler)
        try:
            yield
        finally:
            for s, h in previous.items():
                signal.signal(s, h)

    def _handler(self, signum, frame) -> None:
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum
        log.warning("%s: stopping after the current training step (Ctrl-C again stops at once)",
                    signal.Signals(signum).name)

    def on_train_start(self, trainer, pl_module) -> None:
        # Lightning's own SIGTERM handler ends the process with status 0 at the next step (its
        # SIGTERMException is a SystemExit): ours replaces it for the fit (Lightning restores its
        # predecessor, ours, at teardown)
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, self._handler)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.signum is not None:
            trainer.should_stop = True


def check_checkpoint_space(module: torch.nn.Module, out: Path, cfg, steps: Optional[int] = None) -> None:
    """Lightning's checkpoints (weights + Adam's two moments) every ``ckpt_every`` steps plus
    last.ckpt must fit on the disk before training starts."""

    params = sum(p.numel() for p in module.parameters())
    per_ckpt = params * 4 * 3 + 64 * 1024 + int(getattr(module, "checkpoint_extra_bytes", 0))
    n_ckpt = (cfg.steps if steps is None else steps) // max(1, cfg.ckpt_every) + 2
    check_free_space(out, per_ckpt * n_ckpt, f"{n_ckpt} training checkpoints")
