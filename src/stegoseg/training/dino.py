"""DINO self-distillation pretraining of a ViT on the user's own images.

The output is a backbone weights file (``backbone.pt``, format ``stegoseg-backbone``)
that ``create_backbone(name, weights=PATH)`` / ``--weights PATH`` loads, so every method
of the project can run on a backbone that has seen the user's domain.

Built from lightly's DINO components (``DINOProjectionHead``, ``DINOLoss`` with its
centring and teacher-temperature warm-up, ``DINOTransform`` multi-crop augmentation,
``update_momentum`` and ``cosine_schedule``) and a timm ViT; Lightning gives devices,
bf16, DDP and checkpoints.

Schedule (DINO defaults, counted in epochs so they scale with the dataset): AdamW with
base lr 5e-4 x batch/256, linear warm-up over 10 of 100 epochs then cosine to 1e-6;
weight decay cosine 0.04 -> 0.4 (not on biases and norms); teacher momentum cosine
0.996 -> 1; teacher temperature 0.04 (warm-up from ``warmup_teacher_temp`` over 30 epochs,
a no-op at the defaults, as in the ViT-S/16 recipe); student temperature 0.1; centre momentum 0.9; 2 global
crops of 224 and 8 local crops of 96; last layer frozen during the first epoch;
stochastic depth 0.1; gradient clipping 3.0 (Lightning clips the total norm; DINO clips
per parameter).

Determinism: like STEGO training, every batch (items and augmentation draws) is a pure
function of (seed, step, rank), so an interrupted run resumed from ``last.ckpt``
continues bit-identically.
"""
from __future__ import annotations

import copy
import json
import logging
import random
from datetime import timedelta
from pathlib import Path
from typing import Optional

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F

from stegoseg.backbones.backbone import Backbone, build_vit
from stegoseg.backbones.presets import get_backbone_preset
from stegoseg.backbones.weights import file_sha256
from stegoseg.config.pretrain import PretrainConfig
from stegoseg.data import build_dataset
from stegoseg.data.registry import parse_class_names
from stegoseg.data.transforms import EvalTransform
from stegoseg.errors import StegosegError
from stegoseg.evaluation.metrics import ConfusionAccumulator
from stegoseg.reporting.figures import plot_dino_curves, plot_readout
from stegoseg.training.resume import (
    keep_log_before_resume,
    merge_resumed_log,
    resumed_step,
)
from stegoseg.training.steps import batch_indices, step_seed
from stegoseg.training.trainer import build_trainer

log = logging.getLogger("stegoseg")


BACKBONE_FILE_FORMAT = "stegoseg-backbone"


def build_student(cfg: PretrainConfig):
    """(timm ViT returning the CLS embedding, its preset) — trainable, randomly initialised."""

    preset = get_backbone_preset(cfg.arch)
    if preset.family != "vit":
        raise StegosegError(f"--arch {cfg.arch}: DINO pretraining here trains ViTs; choose a dino_vit* preset")
    model, patch, dim = build_vit(preset, cfg.tiny, {"drop_path_rate": cfg.drop_path_rate})
    return model, preset


def cosine_with_warmup(step: int, total: int, warmup: int, base: float, final: float) -> float:
    """Linear warm-up from 0 (step 0) to ``base`` (step ``warmup``), then cosine to ``final`` (step ``total``).

    The cosine is lightly's ``cosine_schedule``, evaluated at the progress
    ``t = (step - warmup) / (total - warmup)`` of a schedule with ``max_steps=2`` (its
    denominator ``max_steps - 1`` is then 1, so it computes ``cos(pi * t)`` exactly as
    before). lightly's integer-step form is not used: it reaches ``final`` one step early
    (at ``max_steps - 1``) and rounds ``pi * step / n`` differently. Neither is the warm-up
    of ``cosine_warmup_schedule``: it starts at ``base / warmup`` (it uses ``step + 1``).
    """
    from lightly.utils.scheduler import cosine_schedule

    if step < warmup:
        return base * step / max(1, warmup)
    return cosine_schedule(min(1.0, (step - warmup) / max(1, total - warmup)), 2, base, final)


class MultiCropBatches(torch.utils.data.IterableDataset):
    """Streams the multi-crop batch of every step from ``start_step`` on; each a pure function of (seed, step, rank)."""

    def __init__(self, dataset, transform, batch_size, seed, start_step, total_steps, rank=0, world=1):
        self.dataset, self.transform = dataset, transform
        self.batch_size, self.seed = batch_size, seed
        self.start_step, self.total_steps, self.rank, self.world = start_step, total_steps, rank, world

    def batch(self, step: int) -> dict:

        idx = batch_indices(len(self.dataset), self.batch_size, step, self.seed, self.rank, self.world)
        views_per_item = []
        for j, i in enumerate(idx):
            image = self.dataset.load(int(i)).image
            seed = (self.seed * 1_000_003 + step * 7_919 + self.rank * 104_729 + j * 31) % (2**31)
            views_per_item.append(_seeded_call(self.transform, image, seed))
        views = [torch.stack([v[k] for v in views_per_item]) for k in range(len(views_per_item[0]))]
        return {"step": torch.tensor(step), "views": views}

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        worker, n_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        for step in range(self.start_step + worker, self.total_steps, n_workers):
            yield self.batch(step)


def _seeded_call(transform, image, seed: int):
    """Run a random transform under a fixed seed without disturbing the caller's RNG state."""
    py_state, np_state = random.getstate(), np.random.get_state()
    try:
        with torch.random.fork_rng(devices=[]):
            random.seed(seed)
            np.random.seed(seed)
            torch.manual_seed(seed)
            return transform(image)
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)


class DinoPretrainModule(L.LightningModule):
    def __init__(self, cfg: PretrainConfig, n_images: int):
        super().__init__()
        from lightly.loss import DINOLoss
        from lightly.models.modules import DINOProjectionHead
        from lightly.models.utils import deactivate_requires_grad

        self.cfg = cfg
        self.save_hyperparameters({"config": cfg.to_dict(), "n_images": n_images})
        self.student, self.preset = build_student(cfg)
        dim = self.student.embed_dim
        self.student_head = DINOProjectionHead(dim, cfg.hidden_dim, cfg.bottleneck_dim, cfg.out_dim,
                                               freeze_last_layer=cfg.freeze_last_layer_epochs)
        self.teacher = copy.deepcopy(self.student)
        self.teacher_head = DINOProjectionHead(dim, cfg.hidden_dim, cfg.bottleneck_dim, cfg.out_dim)
        self.teacher_head.load_state_dict(self.student_head.state_dict())
        deactivate_requires_grad(self.teacher)
        deactivate_requires_grad(self.teacher_head)
        self.n_images = n_images
        self.world = 1
        self.criterion = DINOLoss(
            output_dim=cfg.out_dim, warmup_teacher_temp=cfg.warmup_teacher_temp, teacher_temp=cfg.teacher_temp,
            warmup_teacher_temp_epochs=cfg.warmup_teacher_temp_epochs, student_temp=cfg.student_temp,
            center_momentum=cfg.center_momentum,
        )

    @property
    def steps_per_epoch(self) -> int:
        return max(1, self.n_images // (self.cfg.batch_size * self.world))

    @property
    def total_steps(self) -> int:
        return self.cfg.epochs * self.steps_per_epoch

    @property
    def stop_step(self) -> int:
        """Where training stops: the end of the schedule, or ``max_steps`` if earlier."""
        return self.total_steps if self.cfg.max_steps is None else min(self.cfg.max_steps, self.total_steps)

    def momentum(self, step: int) -> float:
        """Teacher EMA momentum: cosine from momentum_teacher to 1 over the schedule."""
        from lightly.utils.scheduler import cosine_schedule

        return cosine_schedule(step, self.total_steps, self.cfg.momentum_teacher, 1.0)

    def configure_optimizers(self):
        decay, no_decay = [], []
        for module in (self.student, self.student_head):
            for name, p in module.named_parameters():
                if not p.requires_grad:
                    continue
                (no_decay if p.ndim <= 1 or name.endswith(".bias") else decay).append(p)
        return torch.optim.AdamW([{"params": decay}, {"params": no_decay, "weight_decay": 0.0}], lr=0.0)

    def _set_schedules(self, step: int) -> None:
        cfg = self.cfg
        lr = cosine_with_warmup(step, self.total_steps, cfg.warmup_epochs * self.steps_per_epoch,
                                cfg.base_lr * cfg.batch_size * self.world / 256, cfg.min_lr)
        wd = cosine_with_warmup(step, self.total_steps, 0, cfg.weight_decay, cfg.weight_decay_end) if step else cfg.weight_decay
        opt = self.trainer.optimizers[0]
        opt.param_groups[0]["lr"] = lr
        opt.param_groups[0]["weight_decay"] = wd
        opt.param_groups[1]["lr"] = lr
        self.log("lr", lr, on_step=True)

    def training_step(self, batch, batch_idx):
        from lightly.models.utils import update_momentum


        step = int(batch["step"])
        if step != self.global_step:
            raise RuntimeError(f"batch for step {step} arrived at global step {self.global_step}")
        torch.manual_seed(step_seed(self.cfg.seed, step, self.global_rank))
        m = self.momentum(step)
        update_momentum(self.student, self.teacher, m)
        update_momentum(self.student_head, self.teacher_head, m)
        self._set_schedules(step)
        views = batch["views"]
        with torch.no_grad():
            teacher_out = [self.teacher_head(self.teacher(v)) for v in views[:2]]
        student_out = [self.student_head(self.student(v)) for v in views]
        epoch = step // self.steps_per_epoch
        loss = self.criterion(teacher_out, student_out, epoch=epoch)
        self.log("loss", loss, prog_bar=True, on_step=True)
        self.log("momentum", m, on_step=True)
        return loss

    def on_after_backward(self):
        self.student_head.cancel_last_layer_gradients(self.global_step // self.steps_per_epoch)

    def export_backbone(self, path) -> Path:
        """Write the teacher's backbone (DINO evaluates the teacher) as a stegoseg-backbone file."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().cpu().clone() for k, v in self.teacher.state_dict().items()}
        tmp = path.with_suffix(path.suffix + ".tmp")
        torch.save({"format": BACKBONE_FILE_FORMAT, "name": self.preset.name, "tiny": self.cfg.tiny,
                    "state_dict": state, "steps": int(self.global_step), "config": self.cfg.to_dict()}, tmp)
        tmp.replace(path)
        return path


def teacher_as_backbone(module: DinoPretrainModule):
    """A frozen :class:`~stegoseg.backbones.Backbone` view of (a copy of) the current teacher."""

    p = module.preset
    model = copy.deepcopy(module.teacher).float()
    patch = model.patch_embed.patch_size
    return Backbone(model, name=p.name, family=p.family, patch_size=int(patch[0] if isinstance(patch, (tuple, list)) else patch),
                    embed_dim=model.embed_dim, mean=p.mean, std=p.std, weights_source="pretraining", weights_sha256=None,
                    tiny=module.cfg.tiny)


def patch_knn_readout(backbone, train_ds, val_ds, n_images: int, resolution: int, k: int = 10,
                      device="cpu", max_train_patches: int = 100_000) -> dict:
    """Dense k-NN readout: each labelled val patch takes the similarity-weighted vote of its
    k nearest labelled train patches (cosine); patch labels are the labels at patch centres.
    Returns accuracy and mIoU (percent). A quick, label-using probe of feature quality."""

    tf = EvalTransform(resolution=resolution, crop="center", image_resample="bilinear")
    n_classes = train_ds.n_classes

    def patches(ds):
        feats, labels = [], []
        picks = np.linspace(0, len(ds) - 1, min(n_images, len(ds))).round().astype(int)
        for i in picks:
            raw = ds.load(int(i))
            image, label = tf(raw.image, raw.label)
            f = backbone.features(image[None].to(device))[0]  # (C, h, w)
            lab = F.interpolate(label[None, None].float(), size=f.shape[-2:], mode="nearest")[0, 0].long()
            f = f.permute(1, 2, 0).reshape(-1, f.shape[0])
            lab = lab.reshape(-1).to(f.device)
            keep = lab != 255
            feats.append(F.normalize(f[keep].float(), dim=1))
            labels.append(lab[keep])
        return torch.cat(feats), torch.cat(labels)

    with torch.no_grad():
        tf_feats, tf_labels = patches(train_ds)
        if tf_feats.shape[0] > max_train_patches:
            sel = torch.randperm(tf_feats.shape[0], generator=torch.Generator().manual_seed(0))[:max_train_patches]
            tf_feats, tf_labels = tf_feats[sel.to(tf_feats.device)], tf_labels[sel.to(tf_feats.device)]
        vf, vl = patches(val_ds)
        acc = ConfusionAccumulator(n_classes, n_classes, hungarian=False)
        for s in range(0, vf.shape[0], 4096):
            sim = vf[s : s + 4096] @ tf_feats.T
            top, idx = sim.topk(min(k, tf_feats.shape[0]), dim=1)
            votes = torch.zeros(sim.shape[0], n_classes, device=sim.device)
            votes.scatter_add_(1, tf_labels[idx], top.exp())
            acc.update(votes.argmax(1).cpu(), vl[s : s + 4096].cpu())
    m = acc.compute("strict")
    return {"acc": m["accuracy"], "miou": m["miou"]}


class _Readout(L.Callback):
    def __init__(self, cfg: PretrainConfig, train_ds, val_ds, history: list, path: Optional[Path] = None):
        self.cfg, self.train_ds, self.val_ds, self.history = cfg, train_ds, val_ds, history
        self.path = path  # the history is written here after every readout (a resumed run keeps it)

    def _run(self, trainer, module):
        if not trainer.is_global_zero:
            return
        bb = teacher_as_backbone(module).to(module.device)
        r = patch_knn_readout(bb, self.train_ds, self.val_ds, self.cfg.readout_images, self.cfg.readout_resolution,
                              device=module.device)
        r["step"] = int(trainer.global_step)
        self.history.append(r)
        if self.path is not None:
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text(json.dumps(self.history, indent=1))
            tmp.replace(self.path)
        log.info("k-NN readout at step %d: patch accuracy %.1f, mIoU %.1f", r["step"], r["acc"], r["miou"])
        for key in ("acc", "miou"):
            trainer.logger.log_metrics({f"readout/{key}": r[key]}, step=trainer.global_step)

    def on_train_start(self, trainer, module):
        if trainer.global_step == 0:
            self._run(trainer, module)  # the randomly initialised teacher: the starting point

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        every = self.cfg.readout_every
        if every and trainer.global_step % every == 0:
            self._run(trainer, module)

    def on_train_end(self, trainer, module):
        if not self.history or self.history[-1]["step"] != trainer.global_step:
            self._run(trainer, module)


class _PretrainData(L.LightningDataModule):
    def __init__(self, cfg: PretrainConfig, dataset, transform, module: DinoPretrainModule):
        super().__init__()
        self.cfg, self.dataset, self.transform, self.module = cfg, dataset, transform, module

    def train_dataloader(self):
        t = self.trainer
        stream = MultiCropBatches(self.dataset, self.transform, self.cfg.batch_size, self.cfg.seed, t.global_step,
                                  self.module.stop_step, rank=t.global_rank, world=t.world_size)
        return torch.utils.data.DataLoader(stream, batch_size=None, num_workers=self.cfg.num_workers,
                                           pin_memory=torch.cuda.is_available())


def make_transform(cfg: PretrainConfig, mean, std):
    from lightly.transforms.dino_transform import DINOTransform

    return DINOTransform(
        global_crop_size=cfg.global_crop_size, global_crop_scale=(cfg.global_crop_scale_min, 1.0),
        local_crop_size=cfg.local_crop_size, local_crop_scale=(0.05, cfg.global_crop_scale_min),
        n_local_views=cfg.n_local_views, normalize={"mean": list(mean), "std": list(std)},
    )


def pretrain(cfg: PretrainConfig, out, resume: bool = False, callbacks: Optional[list] = None) -> Optional[dict]:
    """Run DINO pretraining; writes ``<out>/backbone.pt``, ``config.yaml``, ``readout.json``,
    ``readout.png``, Lightning checkpoints and CSV logs. Returns a summary on the main process."""
    import json
    import time


    out = Path(out)
    if not cfg.data_root:
        raise StegosegError("--data-root is required (a folder of images in the directory layout)")
    ckpt_dir = out / "lightning"
    if resume and not (ckpt_dir / "last.ckpt").exists():
        raise StegosegError(f"--resume: no {ckpt_dir / 'last.ckpt'} to continue from")
    options = {"class_names": parse_class_names(cfg.class_names)} if cfg.dataset == "directory" else {}
    train = build_dataset(cfg.dataset, cfg.data_root, cfg.train_split, **options)
    val = None
    if cfg.val_split and train.has_labels:
        try:
            val = build_dataset(cfg.dataset, cfg.data_root, cfg.val_split, **options)
        except StegosegError as exc:
            log.warning("no k-NN readout: %s", exc)
        if val is not None and not val.has_labels:
            val = None
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    module = DinoPretrainModule(cfg, len(train))
    transform = make_transform(cfg, module.preset.mean, module.preset.std)
    out.mkdir(parents=True, exist_ok=True)
    cfg.save(out / "config.yaml")
    ckpt_path = str(ckpt_dir / "last.ckpt") if resume else None
    history: list = []
    history_path = out / "readout_history.json"
    if resume:
        step = resumed_step(ckpt_path)
        if history_path.exists():  # the readouts before the interruption (later ones are run again)
            history.extend(r for r in json.loads(history_path.read_text()) if r["step"] <= step)
        keep_log_before_resume(out / "logs", step)
    cbs = [_Readout(cfg, train, val, history, history_path)] if val is not None else []
    trainer = build_trainer(
        cfg, out, max_steps=-1, callbacks=cbs + list(callbacks or []),
        max_time=None if cfg.max_minutes is None else timedelta(minutes=cfg.max_minutes),
        gradient_clip_val=cfg.clip_grad or None,
    )
    # The schedule length depends on the world size, known once the trainer exists.
    module.world = trainer.world_size
    trainer.fit_loop.epoch_loop.max_steps = module.stop_step
    t0 = time.perf_counter()
    trainer.fit(module, datamodule=_PretrainData(cfg, train, transform, module), ckpt_path=ckpt_path,
                weights_only=True)
    if not trainer.is_global_zero:
        return None

    merge_resumed_log(out / "logs")
    path = module.export_backbone(out / "backbone.pt")

    summary = {"backbone_file": str(path), "sha256": file_sha256(path), "arch": module.preset.name,
               "tiny": cfg.tiny, "steps": int(trainer.global_step), "seconds": time.perf_counter() - t0,
               "readout": history}
    (out / "readout.json").write_text(json.dumps(summary, indent=2))
    if history:
        plot_readout(history, out / "readout.png")
    plot_dino_curves(out / "logs" / "metrics.csv", out / "training_curves.png", cfg.out_dim)
    return summary
