"""Lightning Trainer settings shared by STEGO training and DINO pretraining.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch


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
    import lightning as L
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.loggers import CSVLogger

    checkpoint = ModelCheckpoint(
        dirpath=Path(out) / "lightning", filename="step{step:06d}", every_n_train_steps=max(1, cfg.ckpt_every),
        save_last=True, save_top_k=-1, auto_insert_metric_name=False,
    )
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
        enable_progress_bar=cfg.progress,
        enable_model_summary=False,
        use_distributed_sampler=False,
        num_sanity_val_steps=0,
        **options,
    )
