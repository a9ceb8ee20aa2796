"""The configuration of DINO pretraining (``stegoseg pretrain``)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from stegoseg.config.base import ConfigBase, raise_first_failure


@dataclass
class PretrainConfig(ConfigBase):
    # ---- data
    dataset: str = "directory"
    data_root: Optional[str] = None
    train_split: str = "train"
    val_split: Optional[str] = "val"  # labelled split for the periodic k-NN readout (None: no readout)
    class_names: Optional[str] = None
    # ---- model
    arch: str = "dino_vits16"  # ViT preset to train: dino_vits8 or dino_vits16 (any ViT preset works)
    tiny: bool = False
    out_dim: int = 65536
    hidden_dim: int = 2048
    bottleneck_dim: int = 256
    drop_path_rate: float = 0.1
    # ---- schedule
    epochs: int = 100
    max_steps: Optional[int] = None  # stop early at this many steps (the schedule still spans `epochs`)
    max_minutes: Optional[float] = None  # stop after this much training time (bounded runs); weights are still exported
    batch_size: int = 64
    base_lr: float = 5e-4  # scaled by batch_size * world / 256
    min_lr: float = 1e-6
    warmup_epochs: int = 10
    weight_decay: float = 0.04
    weight_decay_end: float = 0.4
    momentum_teacher: float = 0.996
    teacher_temp: float = 0.04
    warmup_teacher_temp: float = 0.04
    warmup_teacher_temp_epochs: int = 30
    student_temp: float = 0.1
    center_momentum: float = 0.9
    freeze_last_layer_epochs: int = 1
    clip_grad: float = 3.0
    # ---- multi-crop
    global_crop_size: int = 224
    local_crop_size: int = 96
    n_local_views: int = 8
    global_crop_scale_min: float = 0.4  # global crops cover [min, 1] of the image; local [0.05, min]
    # ---- run
    seed: int = 0
    accelerator: str = "auto"
    devices: str = "1"
    strategy: str = "auto"
    num_nodes: int = 1
    precision: str = "auto"
    num_workers: int = 4
    ckpt_every: int = 200
    log_every: int = 10
    readout_every: int = 200  # steps between k-NN readouts (0: only at the end)
    readout_images: int = 64  # train and val images used by the readout
    readout_resolution: int = 224
    progress: bool = True

    def validate(self) -> None:
        raise_first_failure([
            (self.epochs >= 1, "--epochs must be >= 1"),
            (self.batch_size >= 2, "--batch-size must be >= 2"),
            (self.n_local_views >= 0, "--n-local-views must be >= 0"),
            (0 < self.global_crop_scale_min < 1, "--global-crop-scale-min must be in (0, 1)"),
            (self.warmup_epochs < self.epochs or self.epochs == 1, "--warmup-epochs must be < --epochs"),
        ])
