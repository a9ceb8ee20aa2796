"""Feature extraction, the on-disk feature cache, global descriptors and nearest neighbours.

The backbone is frozen, so its features are computed once per training image (or crop)
and stored; every later stage (probe fitting, head training, studies) reads the cache.

Cache layout: ``<cache_root>/<key>/`` where ``key`` names and hashes everything the
features depend on (dataset kind, root and split, backbone preset and weights, patch
size, resolution, five-crop, resampling), so caches of different settings never
collide. Inside:

* ``meta.json``: the spec, item count, shapes, ids;
* ``features.f16``: float16 memory map (N, C, h, w);
* ``labels.u8``: uint8 memory map (N, H, W) when the dataset has labels (255 = unlabelled);
* ``thumbs.u8``: uint8 memory map (N, 3, R/4, R/4) of the crops, for colour-based terms
  (the CRF-kernel Potts loss);
* ``done.npy``: which items are written. Extraction writes a batch, flushes, then
  atomically updates ``done.npy``, so an interrupted run resumes where it stopped and
  never recomputes finished items;
* ``global.npy``: (N, C) L2-normalised spatial means; ``knn_<k>.npy``: (N, k) nearest
  neighbour indices (cosine, self excluded). With the reference's KNN quirk
  (``knn_dropout``) the descriptors see channel dropout: ``global_dropout<p>_s<seed>.npy``
  and ``knn_<k>_dropout<p>_s<seed>.npy``.

A cache cannot go stale: ``meta.json`` records a fingerprint of the split's files (path,
size, modification time of every image and label). When the folder changed since the
cache was built (an image added, removed or replaced), the cache is rebuilt, with a
warning. Writers hold a lock file (``.locks/<key>.lock``), so two ``prepare`` runs into one cache
take turns; the big files are allocated on disk up front (a full disk fails at once with
one line saying how much space is needed, never later with a bus error).
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import json
import logging
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from stegoseg.progress import progress_bar as tqdm

from stegoseg.data.base import IGNORE_INDEX, SegmentationDataset, pil_to_tensor
from stegoseg.data.transforms import TrainTransform, five_crop_boxes
from stegoseg.errors import StegosegError
from stegoseg.features.knn import nearest_neighbors
from stegoseg.features.validate import array_problem, cache_problem, done_flags, file_problems, meta_problem
from stegoseg.preflight import (
    atomic_save_npy,
    check_free_space,
    files_fingerprint,
    human_bytes,
)

log = logging.getLogger("stegoseg")


@dataclass(frozen=True)
class CacheSpec:
    """Everything cached features depend on."""

    dataset: str
    root: str
    split: str
    backbone: str
    weights: str
    patch_size: int
    resolution: int
    five_crop: bool
    image_resample: str = "bilinear"
    crop_jpeg: bool = False  # reference quirk: five-crops round-tripped through JPEG
    pos_embed: str = "timm"  # ViT position-embedding resampling (timm | dino)
    version: int = 3  # 2: thumbnails of the crops are stored too; 3: file fingerprint in meta.json

    def key(self) -> str:
        digest = hashlib.sha1(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:12]
        crop = "5crop" if self.five_crop else "full"
        return f"{self.dataset}-{self.split}-{self.backbone}-p{self.patch_size}-r{self.resolution}-{crop}-{digest}"


class CropView(torch.utils.data.Dataset):
    """Training view of a dataset: optional five-crop, then resize minor side + centre crop.

    Item ``i`` is crop ``i % 5`` of image ``i // 5`` with five-crop (order: top-left,
    top-right, bottom-left, bottom-right, centre), else image ``i``.
    """

    def __init__(self, dataset: SegmentationDataset, resolution: int, five_crop: bool, image_resample: str,
                 jpeg: bool = False):
        self.dataset, self.five_crop = dataset, five_crop
        self.transform = TrainTransform(resolution=resolution, image_resample=image_resample)
        self.n_crops = 5 if five_crop else 1
        # The reference writes its five-crops to disk as JPEG files (PIL's default quality
        # 75) and trains on those: with ``jpeg`` each crop takes the same round trip.
        self.jpeg = jpeg and five_crop

    def __len__(self) -> int:
        return len(self.dataset) * self.n_crops

    def item_id(self, raw_id: str, index: int) -> str:
        return f"{raw_id}#crop{index % 5}" if self.five_crop else raw_id

    def __getitem__(self, index: int) -> dict:
        raw = self.dataset.load(index // self.n_crops)
        image, label = raw.image, raw.label
        if self.five_crop:
            box = five_crop_boxes(image.width, image.height)[index % 5]
            image = image.crop(box)
            if self.jpeg:
                image = jpeg_round_trip(image)
            if label is not None:
                label = np.asarray(label)[box[1] : box[3], box[0] : box[2]]
        image, label = self.transform(image, label)
        out = {"image": image if torch.is_tensor(image) else pil_to_tensor(image), "index": index}
        out["id"] = self.item_id(raw.id, index)
        if label is not None:
            out["label"] = torch.as_tensor(np.asarray(label), dtype=torch.int64)
        return out


def jpeg_round_trip(image, quality: int = 75):
    """``image`` saved as JPEG (PIL's default quality, as the reference's crop files) and read back."""
    from PIL import Image

    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format="JPEG", quality=quality)
    buffer.seek(0)
    with Image.open(buffer) as decoded:
        return decoded.convert("RGB")


@contextlib.contextmanager
def cache_lock(path: Path):
    """An exclusive lock on ``<cache root>/.locks/<key>.lock`` while a cache is created or
    written (other processes preparing the same cache wait; the OS releases it if the
    holder dies)."""
    import fcntl

    try:
        (path.parent / ".locks").mkdir(parents=True, exist_ok=True)
        handle = open(path.parent / ".locks" / (path.name + ".lock"), "a")
    except OSError as exc:
        if exc.errno not in (errno.EROFS, errno.EACCES, errno.EPERM):
            raise
        # a read-only shared cache: nobody can write it, so there is nothing to wait for
        yield
        return
    with handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.warning("another stegoseg process is writing the feature cache %s: waiting for it", path)
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _allocate(path: Path, nbytes: int) -> None:
    """Reserve ``nbytes`` for a memory-mapped file now (a sparse file would fail later, with
    SIGBUS, when the disk fills up)."""
    with open(path, "r+b") as f:
        try:
            os.posix_fallocate(f.fileno(), 0, nbytes)
        except OSError as exc:
            if exc.errno == errno.ENOSPC:
                raise StegosegError(
                    f"disk full while allocating {path} ({human_bytes(nbytes)}): free some space or "
                    "use --cache-dir on another disk"
                ) from None
            if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
                raise


class FeatureCache:
    """A finished or partial feature cache on disk (see the module docstring)."""

    def __init__(self, path, writable: bool = False):
        self.path = Path(path)
        mode = "r+" if writable else "r"  # readers never need write access (a shared, read-only cache works)
        meta_path = self.path / "meta.json"
        if not meta_path.exists():
            raise StegosegError(f"no feature cache at {self.path}: run `stegoseg prepare` first")
        meta, problem = meta_problem(self.path)
        problem = problem or file_problems(self.path, meta)
        if problem:
            raise StegosegError(f"the feature cache {self.path} is damaged ({problem}): delete that folder (or pass "
                                "another --cache-dir) and run again, which rebuilds it")
        self.meta = meta
        self.n = self.meta["n_items"]
        c, h, w = self.meta["feature_shape"]
        self.features = np.memmap(self.path / "features.f16", dtype=np.float16, mode=mode, shape=(self.n, c, h, w))
        self.labels = None
        if self.meta.get("label_shape"):
            lh, lw = self.meta["label_shape"]
            self.labels = np.memmap(self.path / "labels.u8", dtype=np.uint8, mode=mode, shape=(self.n, lh, lw))
        t = self.meta["thumb_size"]
        self.thumbs = np.memmap(self.path / "thumbs.u8", dtype=np.uint8, mode=mode, shape=(self.n, 3, t, t))

    def __getstate__(self):
        # Re-open the memory maps in worker processes instead of pickling their contents.
        return {"path": str(self.path), "writable": self.features.mode == "r+"}

    def __setstate__(self, state):
        self.__init__(state["path"], state.get("writable", False))

    @property
    def spec(self) -> dict:
        return self.meta["spec"]

    @property
    def ids(self) -> list:
        return self.meta["ids"]

    @property
    def done(self) -> np.ndarray:
        done, problem = done_flags(self.path, self.n)
        if problem:
            raise StegosegError(f"the feature cache {self.path} is damaged ({problem}): delete that folder (or pass "
                                "another --cache-dir) and run again, which rebuilds it")
        return done

    @property
    def complete(self) -> bool:
        return bool(self.done.all())

    @property
    def has_labels(self) -> bool:
        return self.labels is not None

    def feature_batch(self, indices) -> torch.Tensor:
        """Float32 features (B, C, h, w) for the given item indices."""
        idx = np.asarray(indices)
        return torch.from_numpy(np.ascontiguousarray(self.features[idx])).float()

    def thumb_batch(self, indices) -> torch.Tensor:
        """Float (B, 3, R/4, R/4) thumbnails of the crops, colours in 0..255."""
        idx = np.asarray(indices)
        return torch.from_numpy(np.ascontiguousarray(self.thumbs[idx])).float()

    def label_batch(self, indices) -> torch.Tensor:
        idx = np.asarray(indices)
        return torch.from_numpy(np.ascontiguousarray(self.labels[idx])).long()

    def iter_batches(self, batch_size: int = 64, with_labels: bool = False):
        """Yield (features,) or (features, labels) batches over all items in order."""
        for start in range(0, self.n, batch_size):
            idx = np.arange(start, min(start + batch_size, self.n))
            if with_labels:
                yield self.feature_batch(idx), self.label_batch(idx)
            else:
                yield self.feature_batch(idx)

    def shuffled_labelled_batches(self, batch_size: int, generator: torch.Generator):
        """Yield (features, labels) batches in an order drawn from ``generator`` (one epoch)."""
        order = torch.randperm(self.n, generator=generator).numpy()
        for s in range(0, self.n, batch_size):
            idx = np.sort(order[s : s + batch_size])
            yield self.feature_batch(idx), self.label_batch(idx)

    def global_descriptors(self, batch_size: int = 256, dropout: float = 0.0, seed: int = 0) -> np.ndarray:
        """(N, C) L2-normalised spatial means of the dense features, computed once and stored.

        ``dropout`` > 0 reproduces the reference's KNN mining, which runs the featurizer
        in training mode: Dropout2d(``dropout``) zeroes whole feature channels (drawn from
        ``seed``) before the spatial mean."""
        path = self.path / ("global.npy" if not dropout else f"global_dropout{dropout:g}_s{seed}.npy")
        if path.exists() and not _stale_array(path, self.n, self.meta["feature_shape"][0]):
            return np.load(path)
        gen = torch.Generator().manual_seed(seed)
        out = np.zeros((self.n, self.meta["feature_shape"][0]), dtype=np.float32)
        for start in range(0, self.n, batch_size):
            f = self.feature_batch(np.arange(start, min(start + batch_size, self.n)))
            mean = f.mean(dim=(2, 3))
            if dropout:
                keep = (torch.rand(mean.shape, generator=gen) >= dropout).float() / (1 - dropout)
                mean = mean * keep
            out[start : start + f.shape[0]] = F.normalize(mean, dim=1).numpy()
        atomic_save_npy(path, out)
        return out

    def neighbors(self, k: int = 30, backend: str = "auto", device: str = "cpu", dropout: float = 0.0,
                  seed: int = 0) -> np.ndarray:
        """(N, k) indices of each item's k nearest neighbours by cosine similarity, self
        excluded; cached. ``dropout``/``seed``: see :meth:`global_descriptors`."""
        path = self.path / (f"knn_{k}.npy" if not dropout else f"knn_{k}_dropout{dropout:g}_s{seed}.npy")
        if path.exists() and not _stale_array(path, self.n, k, below=self.n):
            return np.load(path)
        knn = nearest_neighbors(self.global_descriptors(dropout=dropout, seed=seed), k=k, backend=backend,
                                device=device)
        atomic_save_npy(path, knn)
        return knn


def _stale_array(path: Path, rows: int, columns: int, below=None) -> bool:
    """A stored descriptor / neighbour file that is damaged: warn, and let the caller recompute it."""
    problem = array_problem(path, rows, columns, below)
    if problem:
        log.warning("%s is damaged (%s): computing it again", path, problem)
    return problem is not None


def extract_features(
    backbone,
    dataset: SegmentationDataset,
    cache_root,
    resolution: int = 224,
    five_crop: bool = True,
    batch_size: int = 32,
    num_workers: int = 0,
    device: str = "cpu",
    image_resample: str = "bilinear",
    progress: bool = True,
    dataset_kind: Optional[str] = None,
    crop_jpeg: bool = False,
) -> FeatureCache:
    """Run the frozen backbone over the training view of ``dataset`` into a feature cache.

    Returns the :class:`FeatureCache`. Items already written by an earlier (possibly
    interrupted) run with the same spec and the same files are skipped; a cache built
    from different files (the folder changed since) is rebuilt.
    """
    if resolution % backbone.patch_size:
        raise StegosegError(
            f"--resolution {resolution} is not a multiple of the backbone's patch size {backbone.patch_size}"
        )
    spec = CacheSpec(
        dataset=dataset_kind or type(dataset).__name__,
        root=str(Path(str(dataset.root)).resolve()),
        split=str(dataset.split),
        backbone=backbone.name,
        weights=getattr(backbone, "weights_sha256", None) or weights_fingerprint(backbone),
        patch_size=backbone.patch_size,
        resolution=resolution,
        five_crop=five_crop,
        image_resample=image_resample,
        crop_jpeg=bool(crop_jpeg and five_crop),
        pos_embed=getattr(backbone, "pos_embed_mode", "timm"),
    )
    view = CropView(dataset, resolution, five_crop, image_resample, jpeg=crop_jpeg)
    n = len(view)
    if n == 0:
        raise StegosegError(f"dataset {spec.root} split '{spec.split}' has no images")
    path = Path(cache_root) / spec.key()
    h = w = resolution // backbone.patch_size
    ids = [view.item_id(i, j) for j, i in enumerate(_raw_ids(dataset, view.n_crops))]
    files = dataset_fingerprint(dataset)
    with cache_lock(path):
        problem = cache_problem(path) if (path / "meta.json").exists() else None
        if problem:
            if not os.access(path, os.W_OK):
                raise StegosegError(f"the feature cache {path} is damaged ({problem}) and read-only here: rebuild it "
                                    "where it can be written, or pass another --cache-dir")
            log.warning("the feature cache %s is damaged (%s): rebuilding it", path, problem)
            shutil.rmtree(path)
        keys = item_keys(dataset, view.n_crops)
        previous = None
        if (path / "meta.json").exists():
            old = json.loads((path / "meta.json").read_text())
            if old.get("files") != files or old.get("ids") != ids:
                log.warning(
                    "the files of %s split '%s' changed since its feature cache was built (%d items then, %d now): "
                    "rebuilding %s, reusing the items whose files did not change", spec.root, spec.split,
                    old.get("n_items", 0), n, path,
                )
                previous = path.with_name(path.name + ".previous")
                shutil.rmtree(previous, ignore_errors=True)
                os.replace(path, previous)
        if not (path / "meta.json").exists():
            _create_cache(path, spec, dataset, ids, files, n, backbone.embed_dim, h, w, resolution, keys)
        if previous is not None:
            reuse_items(previous, path)
            shutil.rmtree(previous, ignore_errors=True)
        done = np.load(path / "done.npy")
        todo = np.flatnonzero(~done)
        if len(todo):
            _extract_into(FeatureCache(path, writable=True), view, todo, done, backbone, batch_size, num_workers,
                          device, progress, spec.split)
    return FeatureCache(path)


class ResidentFeatures:
    """A feature cache held in memory on one device (the GPU during GPU training): features
    (float16, as stored), labels and thumbnails as tensors, so that a training step gathers
    its batch with one indexing op on the device instead of reading memory maps on the host
    and copying. The values are the cache's, so training gives the same result either way."""

    def __init__(self, cache: FeatureCache, with_thumbs: bool = False):
        # copies (np.array), not views of the memory maps: the cache is read from disk once
        self.features = torch.from_numpy(np.array(cache.features))
        self.labels = torch.from_numpy(np.array(cache.labels)) if cache.has_labels else None
        self.thumbs = torch.from_numpy(np.array(cache.thumbs)) if with_thumbs else None

    @staticmethod
    def nbytes(cache: FeatureCache, with_thumbs: bool = False) -> int:
        total = cache.features.nbytes + (cache.labels.nbytes if cache.has_labels else 0)
        return total + (cache.thumbs.nbytes if with_thumbs else 0)

    def to(self, device) -> "ResidentFeatures":
        for name in ("features", "labels", "thumbs"):
            t = getattr(self, name)
            if t is not None:
                setattr(self, name, t.to(device, non_blocking=True))
        return self

    def batch(self, index: torch.Tensor, partner: Optional[torch.Tensor] = None) -> dict:
        """The tensors a cached training step reads, gathered on the device (float32 features;
        ``feats_knn`` only with ``partner``)."""
        index = index.to(self.features.device)
        out = {"feats": self.features[index].float()}
        if partner is not None:
            out["feats_knn"] = self.features[partner.to(self.features.device)].float()
        if self.labels is not None:
            out["label"] = self.labels[index].long()
        if self.thumbs is not None:
            out["thumb"] = self.thumbs[index].float()
        return out


def dataset_fingerprint(dataset: SegmentationDataset) -> str:
    """Fingerprint of the files a dataset reads (see :func:`~stegoseg.preflight.files_fingerprint`);
    datasets without file lists are identified by their ids."""
    paths = list(getattr(dataset, "image_paths", None) or []) + list(getattr(dataset, "label_paths", None) or [])
    if paths:
        return files_fingerprint(paths)
    return hashlib.sha1("\n".join(_raw_ids(dataset, 1)).encode()).hexdigest()


def item_keys(dataset: SegmentationDataset, n_crops: int) -> Optional[list]:
    """Per cached item, what its features depend on besides the spec: its image (and label)
    file's path, size and modification time, and its crop; None for datasets without files."""
    images = list(getattr(dataset, "image_paths", None) or [])
    if not images:
        return None
    labels = list(getattr(dataset, "label_paths", None) or []) or [None] * len(images)
    keys = []
    for image, label in zip(images, labels):
        st = os.stat(image)
        key = f"{Path(image).resolve()}|{st.st_size}|{st.st_mtime_ns}"
        if label is not None:
            sl = os.stat(label)
            key += f"|{sl.st_size}|{sl.st_mtime_ns}"
        keys.extend(f"{key}#{c}" for c in range(n_crops))
    return keys


def reuse_items(previous: Path, path: Path, chunk: int = 256) -> int:
    """Copy into the new cache at ``path`` every finished item of the ``previous`` cache of the
    same spec whose files did not change (:func:`item_keys`); returns how many."""
    try:
        old = FeatureCache(previous)
        old_done = old.done
    except StegosegError:
        return 0
    new = FeatureCache(path, writable=True)
    old_keys, new_keys = old.meta.get("item_keys"), new.meta.get("item_keys")
    if not old_keys or not new_keys or old.has_labels != new.has_labels:
        return 0
    where = {k: i for i, k in enumerate(old_keys) if old_done[i]}
    pairs = np.asarray([(i, where[k]) for i, k in enumerate(new_keys) if k in where], dtype=np.int64).reshape(-1, 2)
    done = new.done
    for start in range(0, len(pairs), chunk):
        dst, src = pairs[start:start + chunk, 0], pairs[start:start + chunk, 1]
        new.features[dst] = old.features[src]
        new.thumbs[dst] = old.thumbs[src]
        if new.has_labels:
            new.labels[dst] = old.labels[src]
    for name in ("features", "thumbs", "labels"):
        if getattr(new, name) is not None:
            getattr(new, name).flush()
    done[pairs[:, 0]] = True
    atomic_save_npy(path / "done.npy", done)
    log.info("reused %d of %d items from the earlier cache (their files did not change)", len(pairs), new.n)
    return len(pairs)


def _create_cache(path: Path, spec: CacheSpec, dataset, ids: list, files: str, n: int, c: int, h: int, w: int,
                  resolution: int, keys: Optional[list] = None) -> None:
    """Allocate a new cache's files (after checking the free space) and write meta.json last."""
    has_labels = dataset.has_labels
    t = thumb_size(resolution)
    sizes = {"features.f16": (np.float16, (n, c, h, w)), "thumbs.u8": (np.uint8, (n, 3, t, t))}
    if has_labels:
        sizes["labels.u8"] = (np.uint8, (n, resolution, resolution))
    needed = sum(int(np.prod(shape)) * np.dtype(dt).itemsize for dt, shape in sizes.values())
    check_free_space(path, needed, f"the feature cache ({n} items)", option="--cache-dir")
    path.mkdir(parents=True, exist_ok=True)
    try:
        for name, (dt, shape) in sizes.items():
            np.memmap(path / name, dtype=dt, mode="w+", shape=shape).flush()
            _allocate(path / name, int(np.prod(shape)) * np.dtype(dt).itemsize)
    except BaseException:
        shutil.rmtree(path, ignore_errors=True)
        raise
    meta = {
        "spec": asdict(spec),
        "n_items": n,
        "feature_shape": [c, h, w],
        "label_shape": [resolution, resolution] if has_labels else None,
        "ids": ids,
        "files": files,
        "item_keys": keys,
        "thumb_size": t,
        "n_classes": dataset.n_classes if has_labels else None,
        "class_names": list(dataset.class_names) if has_labels else None,
    }
    atomic_save_npy(path / "done.npy", np.zeros(n, dtype=bool))
    (path / "meta.json.tmp").write_text(json.dumps(meta, indent=1))
    os.replace(path / "meta.json.tmp", path / "meta.json")


def _extract_into(cache: FeatureCache, view: CropView, todo: np.ndarray, done: np.ndarray, backbone, batch_size: int,
                  num_workers: int, device: str, progress: bool, split: str) -> None:
    backbone = backbone.to(device).eval()
    loader = torch.utils.data.DataLoader(
        torch.utils.data.Subset(view, todo.tolist()),
        batch_size=batch_size,
        num_workers=num_workers,
        shuffle=False,
    )
    bar = tqdm(total=cache.n, initial=int(done.sum()), desc=f"features {split}", disable=not progress, unit="img")
    with torch.inference_mode():
        for batch in loader:
            idx = batch["index"].numpy()
            feats = backbone(backbone.normalize(batch["image"].to(device)))
            cache.features[idx] = feats.float().cpu().numpy().astype(np.float16)
            t = cache.thumbs.shape[-1]
            thumbs = F.interpolate(batch["image"], size=(t, t), mode="bilinear", align_corners=False, antialias=True)
            cache.thumbs[idx] = (thumbs * 255).round().clamp(0, 255).byte().numpy()
            if cache.labels is not None:
                lab = batch["label"].clone()
                lab[(lab < 0) | (lab > 255)] = IGNORE_INDEX
                cache.labels[idx] = lab.numpy().astype(np.uint8)
            cache.features.flush()
            cache.thumbs.flush()
            if cache.labels is not None:
                cache.labels.flush()
            done[idx] = True
            atomic_save_npy(cache.path / "done.npy", done)
            bar.update(len(idx))
    bar.close()


def weights_fingerprint(module: torch.nn.Module) -> str:
    """SHA-1 of a module's parameters and buffers: identifies weights that have no file
    (a random initialisation), so caches of different random backbones never collide."""
    h = hashlib.sha1()
    for name, t in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return "params:" + h.hexdigest()


def thumb_size(resolution: int) -> int:
    return max(8, resolution // 4)


def _raw_ids(dataset: SegmentationDataset, n_crops: int) -> list:
    """Sample ids repeated per crop, without decoding images when the dataset exposes ids."""
    ids = getattr(dataset, "ids", None)
    if ids is None:
        ids = [dataset.load(i).id for i in range(len(dataset))]
    return [i for i in ids for _ in range(n_crops)]


def config_neighbors(cfg, cache: FeatureCache, device: str = "cpu") -> np.ndarray:
    """The KNN lists a run's config asks for: ``cfg.n_neighbors`` per item, with the
    reference's dropout-perturbed descriptors when ``cfg.knn_dropout`` is on."""
    dropout = cfg.feature_dropout if getattr(cfg, "knn_dropout", False) else 0.0
    return cache.neighbors(cfg.n_neighbors, backend=cfg.knn_backend, device=device, dropout=dropout, seed=cfg.seed)
