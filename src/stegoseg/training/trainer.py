"""Lightning Trainer settings shared by STEGO training and DINO pretraining.
"""
from __future__ import annotations

import logging
import time
import warnings
from datetime import timedelta
from pathlib import Path
from typing import Optional

import lightning as L
import torch
from lightning.pytorch.plugins import TorchCheckpointIO

from stegoseg.progress import _duration, on_terminal

log = logging.getLogger("stegoseg")


def quiet_lightning() -> None:
    """Lightning's and PyTorch's messages that are no news to a stegoseg user (the "GPU
    available" lines, the LitLogger tip, deprecation notes from inside Lightning, warnings about
    folders stegoseg resumes into on purpose) are kept out of the log; ``-v`` shows Lightning's
    INFO lines again."""
    if not logging.getLogger("stegoseg").isEnabledFor(logging.DEBUG):
        for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero",
                     "lightning.pytorch.accelerators.cuda", "lightning.pytorch.trainer.connectors.checkpoint_connector"):
            logger = logging.getLogger(name)
            if not any(isinstance(f, _LightningNoise) for f in logger.filters):
                logger.addFilter(_LightningNoise())
    for pattern in (r".*LeafSpec.*", r".*module\(s\) in eval mode.*", r".*exists and is not empty.*",
                    r".*litlogger.*", r".*does not have many workers.*"):
        warnings.filterwarnings("ignore", message=pattern)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint files written by rename (a temporary file beside the checkpoint):
    a full disk never leaves a 0-byte or partial ``stepNNNNNN.ckpt``, and the error names the
    checkpoint, not a temporary file."""

    def save_checkpoint(self, checkpoint, path, storage_options=None) -> None:
        import errno

        from stegoseg.errors import StegosegError
        from stegoseg.preflight import atomic_write

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            atomic_write(path, lambda tmp: torch.save(checkpoint, tmp), suffix=".ckpt.tmp")
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise StegosegError(f"disk full while writing the training checkpoint {path}: free some space and "
                                    "run the same command with --resume (it continues from the last complete "
                                    "checkpoint)") from None
            raise


#: Steps measured before the training time is estimated.
WARMUP_STEPS = 5


class _LightningNoise(logging.Filter):
    """Drops Lightning's lines that say nothing to a stegoseg user; keeps the rest (e.g. how
    many distributed processes started)."""

    NOISE = ("GPU available", "TPU available", "HPU available", "IPU available", "Tip:", "litlogger",
             "`Trainer.fit` stopped", "Restoring states from the checkpoint", "Restored all states",
             "LOCAL_RANK:", "You are using a CUDA device")

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(n in message for n in self.NOISE)


class LogTrainingProgress(L.Callback):
    """Training progress as log lines when there is no progress bar (a log file): the start,
    every 10% of the steps (at most one line per 10 s) with the step rate and the time left,
    and the end.

    The step count is the trainer's own at the start of training (a caller may set the fit
    loop's ``max_steps`` after building the trainer, as DINO pretraining does once the world
    size is known); with a ``max_time`` the time left is the earlier of the two ends."""

    def __init__(self, max_steps: int, max_time: Optional[timedelta] = None):
        self.max_steps, self.next_mark, self.t0, self.start, self.last = max_steps, 0, 0.0, 0, 0.0
        self.max_seconds = None if max_time is None else max_time.total_seconds()

    def _left(self, steps_left: int, rate: float, now: float) -> str:
        """The time to the end of the steps, or to the time limit when that comes first."""
        by_steps = steps_left / rate if rate else float("nan")
        if self.max_seconds is not None and self.max_seconds - (now - self.t0) < by_steps:
            return f"{_duration(max(0.0, self.max_seconds - (now - self.t0)))} left (time limit)"
        return f"{_duration(by_steps)} left"

    def on_train_start(self, trainer, pl_module) -> None:
        if trainer.max_steps is not None and trainer.max_steps > 0:
            self.max_steps = trainer.max_steps
        self.t0 = self.last = time.monotonic()
        self.start = trainer.global_step
        self.next_mark = self.start + max(1, self.max_steps // 10)
        if trainer.is_global_zero:
            limit = "" if self.max_seconds is None else f", at most {_duration(self.max_seconds)}"
            log.info("training: steps %d..%d of %d%s", self.start, self.max_steps, self.max_steps, limit)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step, now = trainer.global_step, time.monotonic()
        if step == self.start + WARMUP_STEPS and step < self.max_steps and trainer.is_global_zero:
            rate = WARMUP_STEPS / max(now - self.t0, 1e-9)
            need = (self.max_steps - self.start) / rate
            cut = (f"; the time limit ends it in {_duration(self.max_seconds - (now - self.t0))}"
                   if self.max_seconds is not None and self.max_seconds - (now - self.t0) < need else "")
            log.info("training: %.2f steps/s over the first %d steps: about %s for the %d steps%s", rate, WARMUP_STEPS,
                     _duration(need), self.max_steps - self.start, cut)
        if step < self.next_mark or now - self.last < 10 or not trainer.is_global_zero:
            return
        self.last, self.next_mark = now, step + max(1, self.max_steps // 10)
        rate = (step - self.start) / max(now - self.t0, 1e-9)
        loss = trainer.callback_metrics.get("loss")
        log.info("training: step %d/%d (%.0f%%), %.2f steps/s, about %s%s", step, self.max_steps,
                 100 * step / self.max_steps, rate, self._left(self.max_steps - step, rate, now),
                 f", loss {float(loss):.4f}" if loss is not None else "")

    def on_train_end(self, trainer, pl_module) -> None:
        if trainer.is_global_zero:
            log.info("training: %d steps in %s", trainer.global_step - self.start, _duration(time.monotonic() - self.t0))


def default_precision(precision: str, accelerator: str) -> str:
    """``auto``: bf16 mixed precision on a GPU, full float32 on the CPU."""
    if precision != "auto":
        return precision
    return "bf16-mixed" if torch.cuda.is_available() and accelerator in ("auto", "gpu", "cuda") else "32-true"


def parse_devices(text: str):
    text = str(text)
    if text == "auto":
        return "auto"
    if "," in text:
        return [int(t) for t in text.split(",") if t.strip()]
    return int(text)


def build_trainer(cfg, out, max_steps: int, callbacks: Optional[list] = None, **options):
    """The one Lightning Trainer builder: devices, precision (bf16 on a GPU by default),
    step-indexed Lightning checkpoints every ``cfg.ckpt_every`` steps plus ``last.ckpt`` in
    ``<out>/lightning/``, the CSV log in ``<out>/logs/metrics.csv``, progress bar. ``cfg``
    is any config with the shared trainer fields (STEGO's and DINO pretraining's);
    ``options`` go to ``lightning.Trainer`` (e.g. ``max_time``, ``gradient_clip_val``)."""
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.loggers import CSVLogger

    checkpoint = ModelCheckpoint(
        dirpath=Path(out) / "lightning", filename="step{step:06d}", every_n_train_steps=max(1, cfg.ckpt_every),
        save_last=True, save_top_k=-1, auto_insert_metric_name=False,
    )
    quiet_lightning()
    options.setdefault("plugins", [AtomicCheckpointIO()])
    bar = bool(cfg.progress) and on_terminal()
    if not bar:
        callbacks = [*(callbacks or []), LogTrainingProgress(max_steps, options.get("max_time"))]
    return L.Trainer(
        max_steps=max_steps,
        max_epochs=-1,
        accelerator=cfg.accelerator,
        devices=parse_devices(cfg.devices),
        strategy=cfg.strategy,
        num_nodes=cfg.num_nodes,
        precision=default_precision(cfg.precision, cfg.accelerator),
        callbacks=[checkpoint, *(callbacks or [])],
        logger=CSVLogger(str(out), name="logs", version=""),
        log_every_n_steps=max(1, cfg.log_every),
        enable_progress_bar=bar,
        enable_model_summary=False,
        use_distributed_sampler=False,
        num_sanity_val_steps=0,
        **options,
    )
