"""PriMaPs-EM's stages on the feature cache: the pseudo masks (cached, fingerprinted,
resumable, their CRF on the CRF workers), the prototypes' start, and the EM training
(:class:`PrimapsModule`, resumable through :func:`~stegoseg.training.steps.fit_step_module`).
"""
from __future__ import annotations

import copy
import hashlib
import json
import logging
import shutil
import time
from dataclasses import asdict
from pathlib import Path
from typing import Optional

import lightning as L
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from stegoseg.progress import progress_bar as tqdm

from stegoseg.config.stego import Config
from stegoseg.errors import StegosegError
from stegoseg.evaluation.crf import crf_available, crf_params_from, crf_pool, image_to_uint8, run_crf_jobs
from stegoseg.features.cache import FeatureCache, cache_lock
from stegoseg.losses.primaps import ema_step
from stegoseg.nn.primaps import PrototypeHead, mask_unaries, principal_masks
from stegoseg.nn.probes import ClusterProbe, LinearProbe
from stegoseg.preflight import atomic_save_npy, check_free_space
from stegoseg.training.primaps_em import draw_student_aug, em_loss, em_pseudo_label, student_augment
from stegoseg.training.steps import fit_step_module, step_seed

log = logging.getLogger("stegoseg")

MASKS_VERSION = 1
#: Crops whose masks are computed and written together (one CRF batch, one ``done`` update).
MASK_CHUNK = 16
#: The PCA start reads at most this many feature vectors (the reference: 93 batches of 32 images).
PCA_INIT_VECTORS = 1 << 18
PCA_INIT_CROPS = 93 * 32


# ------------------------------------------------------------------------------ pseudo masks
def mask_spec(cfg: Config, cache: FeatureCache) -> dict:
    """What the pseudo masks depend on: the feature cache (its folder key and files), the
    proposal settings, the seed of the randomised PCA, the CRF settings."""
    return {"cache": cache.path.name, "files": cache.meta.get("files"), "threshold": cfg.primaps_threshold,
            "coverage": cfg.primaps_coverage, "pca_iters": 100, "gain": 10.0, "seed": cfg.seed,
            "crf": asdict(crf_params_from(cfg.to_dict())), "version": MASKS_VERSION}


def masks_folder(cfg: Config, cache: FeatureCache) -> Path:
    key = hashlib.sha256(json.dumps(mask_spec(cfg, cache), sort_keys=True).encode()).hexdigest()[:12]
    return cache.path / f"primaps-{key}"


def build_pseudo_masks(cfg: Config, cache: FeatureCache, view, progress: bool = True, runner=None) -> np.ndarray:
    """The mask ids (N, R, R) uint8 of every cached crop (0: background), computed once per
    fingerprint (:func:`mask_spec`) into ``<cache>/primaps-<key>/masks.u8`` and reused; an
    interrupted build continues with the crops not yet written. ``view``: the crops' images
    (a :class:`~stegoseg.features.cache.CropView` of the cached split). ``runner``
    (``--ray-address``: :func:`stegoseg.distributed.stages.pseudo_mask_runner`): computes the
    chunks elsewhere and hands each one's masks to this process, which writes them."""
    if not crf_available():
        raise StegosegError("PriMaPs' pseudo masks are refined by the dense CRF: install pydensecrf2 "
                            "(`pip install pydensecrf2`, needs a C++ compiler)")
    spec = mask_spec(cfg, cache)
    folder = masks_folder(cfg, cache)
    n, r = cache.n, int(cache.meta["spec"]["resolution"])  # (label_shape is None without labels)
    if len(view) != n:
        raise StegosegError(f"the feature cache {cache.path} holds {n} crops but the dataset gives {len(view)}: "
                            "run prepare again")
    with cache_lock(folder):
        meta_path = folder / "meta.json"
        if meta_path.exists() and json.loads(meta_path.read_text()).get("spec") != spec:
            shutil.rmtree(folder)
        if not meta_path.exists():
            folder.parent.mkdir(parents=True, exist_ok=True)
            check_free_space(folder.parent, n * r * r, "PriMaPs' pseudo masks", option="--cache-dir")
            folder.mkdir(parents=True, exist_ok=True)
            np.memmap(folder / "masks.u8", dtype=np.uint8, mode="w+", shape=(n, r, r)).flush()
            atomic_save_npy(folder / "done.npy", np.zeros(n, dtype=bool))
            atomic_save_npy(folder / "n_masks.npy", np.zeros(n, dtype=np.int16))
            meta_path.write_text(json.dumps({"spec": spec, "n_items": n, "size": r}, indent=1))
        done = np.load(folder / "done.npy")
        todo = np.flatnonzero(~done)
        if len(todo):
            _write_masks(cfg, cache, view, folder, todo, done, r, progress, runner)
    return np.memmap(folder / "masks.u8", dtype=np.uint8, mode="r", shape=(n, r, r))


def _write_masks(cfg: Config, cache: FeatureCache, view, folder: Path, todo: np.ndarray, done: np.ndarray, size: int,
                 progress: bool, runner=None) -> None:
    params = crf_params_from(cfg.to_dict())
    store = np.memmap(folder / "masks.u8", dtype=np.uint8, mode="r+", shape=(cache.n, size, size))
    counts = np.load(folder / "n_masks.npy")
    t0 = time.perf_counter()
    chunks = [todo[start:start + MASK_CHUNK] for start in range(0, len(todo), MASK_CHUNK)]

    def keep(chunk: np.ndarray, masks: np.ndarray, n_masks: np.ndarray) -> None:
        """One chunk's masks into the store, then its crops marked done (both flushed first)."""
        store[chunk] = masks
        store.flush()
        counts[chunk] = n_masks
        done[chunk] = True
        atomic_save_npy(folder / "n_masks.npy", counts)
        atomic_save_npy(folder / "done.npy", done)

    if runner is not None:
        log.info("PriMaPs pseudo masks: %d of %d crops to compute on Ray into %s", len(todo), cache.n, folder)
        flips = runner(cfg, cache.path, chunks, keep, progress)
    else:
        log.info("PriMaPs pseudo masks: %d of %d crops to compute (CRF on %d worker(s)) into %s", len(todo), cache.n,
                 cfg.crf_workers, folder)
        flips = 0
        pool = crf_pool(cfg.crf_workers) if cfg.crf_workers > 1 else None
        try:
            bar = tqdm(total=len(todo), desc="pseudo masks", disable=not progress, leave=False)
            for chunk in chunks:
                masks, n_masks, flipped = chunk_masks(cfg, cache, view, chunk, size, params, pool)
                keep(chunk, masks, n_masks)
                flips += flipped
                bar.update(len(chunk))
            bar.close()
        finally:
            if pool is not None:
                pool.shutdown()
    # the flips and seconds are those of this build (a continued one: of the crops it wrote); a
    # run that reuses the masks copies this file as it stands
    stats = {"crops": int(cache.n), "masks_per_crop": float(counts.mean()),
             "one_mask_crops": int((counts == 1).sum()), "sign_flips_last_build": int(flips),
             "seconds_last_build": time.perf_counter() - t0}
    (folder / "stats.json").write_text(json.dumps(stats, indent=1))
    log.info("PriMaPs pseudo masks: %.1f masks per crop on average, written in %.1fs", stats["masks_per_crop"],
             stats["seconds_last_build"])


def chunk_masks(cfg: Config, cache: FeatureCache, view, chunk: np.ndarray, size: int, params, pool=None) -> tuple:
    """The pseudo masks of the crops ``chunk`` (their ids, (len, size, size) uint8 after the CRF),
    their mask counts and how many principal directions had their sign flipped. Each crop's
    randomised PCA has its own seed (from ``cfg.seed`` and the crop), so a crop's masks do not
    depend on which chunk or worker computes it."""
    flips: dict = {}
    feats = cache.feature_batch(chunk).float()
    jobs, n_masks = [], np.zeros(len(chunk), dtype=np.int16)
    for j, i in enumerate(chunk):
        masks = principal_masks(feats[j], cfg.primaps_threshold, cfg.primaps_coverage,
                                generator_seed=step_seed(cfg.seed, int(i), 0, 5), stats=flips)
        if masks.shape[0] > 254:
            raise StegosegError(f"crop {i} of {cache.path} gives {masks.shape[0]} masks, more than 254")
        n_masks[j] = masks.shape[0]
        unary = F.interpolate(mask_unaries(masks)[None], size=(size, size), mode="bilinear",
                              align_corners=False)[0]
        jobs.append((_crop_uint8(view[int(i)]["image"]), unary.numpy(), params))
    return np.stack(run_crf_jobs(jobs, pool)).astype(np.uint8), n_masks, int(flips.get("sign_flips", 0))


def _crop_uint8(image: torch.Tensor) -> np.ndarray:
    """(3, R, R) uint8 or float [0, 1] crop -> (R, R, 3) uint8 RGB."""
    if image.dtype == torch.uint8:
        return image.permute(1, 2, 0).contiguous().numpy()
    return image_to_uint8(image.float())


# ------------------------------------------------------------------------- prototypes' start
def code_batches(cache: FeatureCache, head: Optional[nn.Module], batch_size: int, device: str, order=None):
    """(code (B, D, h, w) float32, item indices) over the cache, in ``order`` (default: cache order)."""
    order = np.arange(cache.n) if order is None else order
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        feats = cache.feature_batch(idx).to(device).float()
        with torch.no_grad():
            code = head(feats) if head is not None else feats
        yield code, idx  # outside no_grad: the caller may train on it


def pca_prototypes(cfg: Config, cache: FeatureCache, head: Optional[nn.Module], n_clusters: int,
                   device: str) -> torch.Tensor:
    """The reference's start (``--pcainit`` then the baseline state): the first K principal
    directions of the code (``torch.pca_lowrank``, q = 2K, 200 iterations; at most
    :data:`PCA_INIT_VECTORS` vectors of the first :data:`PCA_INIT_CROPS` crops of a seeded
    shuffle), then ``primaps_init_epochs`` epochs of the cluster loss (minus the mean cosine to
    the nearest prototype; Adam, ``primaps_lr``) over the cache. Returns (K, D)."""
    rng = np.random.default_rng([cfg.seed, 17])
    order = rng.permutation(cache.n)[:PCA_INIT_CROPS]
    vectors = []
    for code, _ in code_batches(cache, head, max(8, cfg.batch_size), device, order):
        vectors.append(code.permute(0, 2, 3, 1).reshape(-1, code.shape[1]).cpu())
    sample = torch.cat(vectors)
    if len(sample) > PCA_INIT_VECTORS:
        sample = sample[torch.from_numpy(rng.permutation(len(sample))[:PCA_INIT_VECTORS])]
    q = min(2 * n_clusters, sample.shape[1], sample.shape[0])
    if q < n_clusters:
        raise StegosegError(f"--primaps-init pca needs at least {n_clusters} code channels for {n_clusters} "
                            f"prototypes (the code has {sample.shape[1]}): use --primaps-init kmeans")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        _, _, v = torch.pca_lowrank(sample.to(device), q=q, niter=200)
    probe = ClusterProbe(sample.shape[1], n_clusters).to(device)
    with torch.no_grad():
        probe.centroids.copy_(v[:, :n_clusters].T)
    optimizer = torch.optim.Adam(probe.parameters(), lr=cfg.primaps_lr)
    for epoch in range(cfg.primaps_init_epochs):
        shuffle = np.random.default_rng([cfg.seed, 18, epoch]).permutation(cache.n)
        for code, _ in code_batches(cache, head, cfg.batch_size, device, shuffle):
            loss = probe.loss(code)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    return probe.centroids.detach().cpu()


# ------------------------------------------------------------------------------- EM training
class PrimapsModule(L.LightningModule):
    """PriMaPs-EM with Lightning: student prototypes trained by the focal loss against the
    per-mask pseudo labels of the EMA teacher (updated every ``primaps_ema_every`` steps, see
    :mod:`stegoseg.losses.primaps`), and the linear probe on the same code. ``head``: the frozen
    head of the model being boosted (None: the backbone features are the code)."""

    def __init__(self, cfg: Config, code_dim: int, n_clusters: int, n_classes: Optional[int],
                 init: torch.Tensor, head: Optional[nn.Module] = None):
        super().__init__()
        self.cfg = cfg
        self.save_hyperparameters({"config": cfg.to_dict(), "code_dim": code_dim, "n_clusters": n_clusters,
                                   "n_classes": n_classes})
        self.student = PrototypeHead(code_dim, n_clusters)
        self.student.reset(init)
        self.teacher = copy.deepcopy(self.student).requires_grad_(False)
        self.head = head.eval().requires_grad_(False) if head is not None else None
        self.linear_probe = LinearProbe(code_dim, n_classes) if n_classes else None
        self.masks: Optional[np.ndarray] = None  # (N, R, R) mask ids, set before fitting
        self.resident = None
        self.live: Optional[list] = None  # [backbone] with --primaps-student-augs (a list: never saved), set before fitting
        self._step: Optional[int] = None  # the step whose optimiser step runs next

    def configure_optimizers(self):
        groups = [{"params": list(self.student.parameters()), "lr": self.cfg.primaps_lr}]
        if self.linear_probe is not None:
            groups.append({"params": list(self.linear_probe.parameters()), "lr": self.cfg.probe_lr})
        return torch.optim.Adam(groups)

    def on_fit_start(self) -> None:
        if self.resident is not None:
            self.resident.to(self.device)
        if self.live is not None:
            self.live[0].to(self.device).eval()

    def live_batch(self, batch: dict, step: int) -> dict:
        """``--primaps-student-augs``: the batch's crops (``image``, decoded by the step loader from
        the crop view) through the backbone as the reference's student-augs training sees them:
        each crop, its masks and labels flipped with probability 1/2; the teacher (and the linear
        probe) read the clean crop's code, the student the code of its augmented copy
        (:func:`~stegoseg.training.primaps_em.student_augment`). The draws come from a generator
        seeded by (seed, step, rank): a resumed run draws the same."""
        backbone = self.live[0]
        rows = batch["index"].cpu().numpy()
        generator = torch.Generator().manual_seed(step_seed(self.cfg.seed, step, self.global_rank, 11))
        params = [draw_student_aug(generator) for _ in rows]
        flip = torch.tensor([p["flip"] for p in params], dtype=torch.bool)

        def flipped(x: torch.Tensor) -> torch.Tensor:
            x, which = x.to(self.device).clone(), flip.to(self.device)
            x[which] = x[which].flip(-1)
            return x

        clean = backbone.normalize(flipped(batch["image"]))
        augmented = torch.stack([student_augment(image, p) for image, p in zip(clean, params)])
        with torch.no_grad():
            feats = backbone(torch.cat([clean, augmented])).float()
        out = {"code": self.code(feats[: len(rows)]), "student_code": self.code(feats[len(rows):]),
               "masks": flipped(torch.from_numpy(np.asarray(self.masks[rows])))}
        if "label" in batch:  # the cache's labels of these crops (ignore already mapped)
            out["label"] = flipped(batch["label"])
        return out

    def code(self, feats: torch.Tensor) -> torch.Tensor:
        if self.head is None:
            return feats
        self.head.eval()
        with torch.no_grad():
            return self.head(feats)

    def training_step(self, batch: dict, batch_idx: int):
        step = int(batch["step"])
        if step != self.global_step:
            raise RuntimeError(f"batch for step {step} arrived at global step {self.global_step}")
        if self.live is not None:
            live = self.live_batch(batch, step)
            code, student_code, masks, labels = live["code"], live["student_code"], live["masks"], live.get("label")
        else:
            if "feats" not in batch:
                batch = {**batch, **self.resident.batch(batch["index"])}
            labels = batch.get("label")
            code = student_code = self.code(batch["feats"].float())
            masks = torch.from_numpy(np.asarray(self.masks[batch["index"].cpu().numpy()])).to(self.device)
        pseudo = em_pseudo_label(self.teacher, code, masks)
        self._step = step
        out = {"focal": em_loss(self.student, student_code, pseudo, self.cfg.primaps_focal)}
        if labels is not None and self.linear_probe is not None:
            out["linear"] = self.linear_probe.loss(code, labels)
        self.log_dict({f"loss/{k}": v.float() for k, v in out.items()}, on_step=True)
        self.log("loss", out["focal"].float(), prog_bar=True, on_step=True)
        return out["focal"] + out.get("linear", 0.0)

    def optimizer_step(self, epoch, batch_idx, optimizer, optimizer_closure=None) -> None:
        """The optimiser step, then (every ``primaps_ema_every`` steps) the teacher's update;
        here so that the checkpoint of step k holds step k's teacher (exact resume)."""
        super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
        step, every = self._step, self.cfg.primaps_ema_every
        if step is not None and step > 0 and step % every == 0:  # the reference: global_step > 0 and % 10 == 0
            ema_step(self.student, self.teacher, step // every, self.cfg.primaps_ema)
        self._step = None

    def prototypes(self) -> torch.Tensor:
        """The teacher's effective (K, D) weight: the trained model's cluster probe."""
        return self.teacher.weight().detach().cpu()


def fit_primaps(cfg: Config, out, cache: FeatureCache, masks: np.ndarray, code_dim: int, n_clusters: int,
                n_classes: Optional[int], init: torch.Tensor, head: Optional[nn.Module] = None,
                resume: bool = False, live: Optional[tuple] = None) -> PrimapsModule:
    """EM for ``primaps_steps`` (default ``--steps``) steps into ``out`` (Lightning checkpoints in
    ``<out>/lightning/``); returns the module on the CPU. ``live``: (backbone, crop view of the
    cached split) for ``--primaps-student-augs``."""
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    module = PrimapsModule(cfg, code_dim, n_clusters, n_classes, init, head)
    module.masks = masks
    backbone, view = live if live is not None else (None, None)
    module.live = [backbone] if live is not None else None
    steps = cfg.primaps_steps or cfg.steps
    return fit_step_module(module, cfg, Path(out), cache, None, max_steps=steps, resume=resume, crop_view=view)
