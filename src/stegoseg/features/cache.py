"""Feature extraction, the on-disk feature cache, global descriptors and nearest neighbours.

The backbone is frozen, so its features are computed once per training image (or crop)
and stored; every later stage (probe fitting, head training, studies) reads the cache.

Cache layout: ``<cache_root>/<key>/`` where ``key`` names and hashes everything the
features depend on (dataset kind, root and split, backbone preset and weights, patch
size, resolution, five-crop, resampling), so caches of different settings never
collide. Inside:

* ``meta.json``: the spec, item count, shapes, ids, items per shard;
* ``shards/``: items ``[s*S, (s+1)*S)`` of the features (float16, (N, C, h, w)), the labels
  (uint8, (N, H, W), 255 = unlabelled, when the dataset has labels) and the thumbnails of the
  crops (uint8, (N, 3, R/4, R/4), for colour-based terms such as the CRF-kernel Potts loss) in
  one file each per shard (:mod:`stegoseg.features.shards`). A shard is written whole and
  renamed into place, so an interrupted run resumes at the first missing shard, parallel
  writers (``--ray-address``) never share a file, and a reader opens only the shards it needs;
* ``global.npy``: (N, C) L2-normalised spatial means; ``knn_<k>.npy``: (N, k) nearest
  neighbour indices (cosine, self excluded). With the reference's KNN quirk
  (``knn_dropout``) the descriptors see channel dropout: ``global_dropout<p>_s<seed>.npy``
  and ``knn_<k>_dropout<p>_s<seed>.npy``.

A cache cannot go stale: ``meta.json`` records a fingerprint of the split's files (path,
size, modification time of every image and label). When the folder changed since the
cache was built (an image added, removed or replaced), the cache is rebuilt, with a
warning. Writers hold a lock file (``.locks/<key>.lock``), so two ``prepare`` runs into one cache
take turns; the space the cache needs is checked against the free disk before any work (a
full disk fails at once with one line saying how much space is needed and what to do).
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
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

from stegoseg.data.base import IGNORE_INDEX, SegmentationDataset
from stegoseg.errors import StegosegError
from stegoseg.features import shards
from stegoseg.features.crops import CropView, jpeg_round_trip  # noqa: F401 (the cache's view; re-exported)
from stegoseg.features.knn import approximate_neighbors, index_kind, nearest_neighbors
from stegoseg.features.projection import projection_digest
from stegoseg.features.validate import array_problem, cache_problem, done_flags, file_problems, meta_problem
from stegoseg.preflight import atomic_save_npy, check_free_space, files_fingerprint, free_bytes, human_bytes

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
    version: int = 4  # 2: thumbnails of the crops are stored too; 3: file fingerprint in meta.json; 4: sharded files
    projection: Optional[str] = None  # --pca-dim: digest of the backbone's feature projection

    def key(self) -> str:
        fields = asdict(self)
        if fields["projection"] is None:
            del fields["projection"]  # a full cache keeps the key it had before projections existed
        digest = hashlib.sha1(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:12]
        crop = "5crop" if self.five_crop else "full"
        return f"{self.dataset}-{self.split}-{self.backbone}-p{self.patch_size}-r{self.resolution}-{crop}-{digest}"


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


class FeatureCache:
    """A finished or partial feature cache on disk (see the module docstring)."""

    def __init__(self, path):
        self.path = Path(path)  # opened read-only (a shared, read-only cache works); shards are written by rename
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
        arrays = shards.open_kinds(self.path, meta)
        self.features, self.thumbs = arrays["features"], arrays["thumbs"]
        self.labels = arrays.get("labels")

    def __getstate__(self):
        # Re-open the memory maps in worker processes instead of pickling their contents.
        return {"path": str(self.path)}

    def __setstate__(self, state):
        self.__init__(state["path"])

    @property
    def spec(self) -> dict:
        return self.meta["spec"]

    @property
    def ids(self) -> list:
        return self.meta["ids"]

    @property
    def done(self) -> np.ndarray:
        done, problem = done_flags(self.path, self.meta)
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
                  seed: int = 0, index: str = "exact") -> np.ndarray:
        """(N, k) indices of each item's k nearest neighbours by cosine similarity, self
        excluded; cached. ``dropout``/``seed``: see :meth:`global_descriptors`. ``index``
        (``--knn-index``): exact search, or an HNSW graph whose measured recall is logged and
        recorded in ``neighbors.json`` beside the lists."""
        kind = index_kind(index, self.n)
        name = f"knn_{k}" if not dropout else f"knn_{k}_dropout{dropout:g}_s{seed}"
        path = self.path / (name + ("_hnsw" if kind == "hnsw" else "") + ".npy")
        if path.exists() and not _stale_array(path, self.n, min(k, self.n - 1), below=self.n):
            return np.load(path)
        descriptors = self.global_descriptors(dropout=dropout, seed=seed)
        if kind == "hnsw":
            knn, report = approximate_neighbors(descriptors, k=k, seed=seed)
            log.info("approximate nearest neighbours (FAISS HNSW) of %d items: recall@%d %.3f against exact search "
                     "on %d queries", self.n, report["k"], report["recall_at_k"], report["recall_queries"])
            self._record_neighbors(path.name, report)
        else:
            knn = nearest_neighbors(descriptors, k=k, backend=backend, device=device)
        atomic_save_npy(path, knn)
        return knn

    def _record_neighbors(self, name: str, report: dict) -> None:
        """``neighbors.json``: how each approximate neighbour list was found, and its recall."""
        from stegoseg.preflight import atomic_write

        record = self.path / "neighbors.json"
        try:
            known = json.loads(record.read_text()) if record.exists() else {}
        except (OSError, json.JSONDecodeError):
            known = {}
        known[name] = report
        try:
            atomic_write(record, lambda tmp: Path(tmp).write_text(json.dumps(known, indent=1)))
        except OSError as exc:  # a read-only shared cache: the report is in the log
            log.warning("cannot record the neighbour report in %s (%s)", record, exc.strerror)


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
    shard_items: Optional[int] = None,
    run_shards=None,
) -> FeatureCache:
    """Run the frozen backbone over the training view of ``dataset`` into a feature cache.

    Returns the :class:`FeatureCache`. Shards already written by an earlier (possibly
    interrupted) run with the same spec and the same files are skipped; a cache built
    from different files (the folder changed since) is rebuilt, reusing the items whose files
    did not change. ``shard_items``: items per shard of a new cache (default: about
    :data:`~stegoseg.features.shards.SHARD_BYTES` of features). ``run_shards(path, shards,
    progress)``: computes the missing shards elsewhere (:mod:`stegoseg.distributed`) instead
    of in this process; every shard is computed by :func:`extract_shard` either way.
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
        weights=backbone_weights_id(backbone),
        patch_size=backbone.patch_size,
        resolution=resolution,
        five_crop=five_crop,
        image_resample=image_resample,
        crop_jpeg=bool(crop_jpeg and five_crop),
        pos_embed=getattr(backbone, "pos_embed_mode", "timm"),
        projection=projection_digest(backbone),
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
            _create_cache(path, spec, dataset, ids, files, n, backbone.embed_dim, h, w, resolution, keys, shard_items)
        if previous is not None:
            plan_reuse(previous, path)
        meta = json.loads((path / "meta.json").read_text())
        todo = shards.missing_shards(path, meta)
        if todo and run_shards is not None:
            run_shards(path, todo, progress)
        elif todo:
            done = shards.done_items(path, meta)[0]
            bar = tqdm(total=n, initial=int(done.sum()), desc=f"features {spec.split}", disable=not progress,
                       unit="img")
            backbone = backbone.to(device).eval()
            for shard in todo:
                extract_shard(path, meta, view, shard, backbone, batch_size, num_workers, device, bar.update)
            bar.close()
        if previous is not None:
            shutil.rmtree(previous, ignore_errors=True)
            (path / REUSE_PLAN).unlink(missing_ok=True)
        shards.remove_temporaries(path)
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


#: In a cache rebuilt because its folder changed: per item, its index in ``<cache>.previous``
#: (the same files, so the same features) or -1 (computed afresh); read by :func:`extract_shard`.
REUSE_PLAN = "reuse_from_previous.npy"


def plan_reuse(previous: Path, path: Path) -> int:
    """Record which items of the new cache at ``path`` the ``previous`` cache of the same spec
    holds, finished, with unchanged files (:func:`item_keys`); returns how many."""
    try:
        old = FeatureCache(previous)
        old_done = old.done
    except StegosegError:
        return 0
    new = FeatureCache(path)
    old_keys, new_keys = old.meta.get("item_keys"), new.meta.get("item_keys")
    if not old_keys or not new_keys or old.has_labels != new.has_labels:
        return 0
    where = {k: i for i, k in enumerate(old_keys) if old_done[i]}
    plan = np.asarray([where.get(k, -1) for k in new_keys], dtype=np.int64)
    atomic_save_npy(path / REUSE_PLAN, plan)
    log.info("reusing %d of %d items from the earlier cache (their files did not change)", int((plan >= 0).sum()),
             new.n)
    return int((plan >= 0).sum())


def extract_shard(path: Path, meta: dict, view: "CropView", shard: int, backbone, batch_size: int, num_workers: int,
                  device: str, on_batch=None) -> int:
    """Compute one shard of the cache at ``path`` (its items in batches of ``batch_size``, in
    order, so every engine batches alike) and write it by rename; items the reuse plan maps to
    the previous cache are copied from it. Returns the number of items."""
    items = shards.shard_range(meta, shard)
    shapes = shards.item_shapes(meta)
    arrays = {k: np.zeros((len(items), *shape), dtype=shards.KINDS[k][1]) for k, shape in shapes.items()}
    compute = list(items)
    plan_file = Path(path) / REUSE_PLAN
    if plan_file.exists():
        plan = np.load(plan_file)[items.start:items.stop]
        if (plan >= 0).any():
            old = FeatureCache(Path(path).with_name(Path(path).name + ".previous"))
            rows = np.flatnonzero(plan >= 0)
            for kind in arrays:
                arrays[kind][rows] = getattr(old, kind)[plan[rows]]
            compute = [items.start + int(r) for r in np.flatnonzero(plan < 0)]
            if on_batch:
                on_batch(len(rows))
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(view, compute), batch_size=batch_size,
                                         num_workers=num_workers, shuffle=False)
    t = shapes["thumbs"][-1]
    with torch.inference_mode():
        for batch in loader:
            rows = batch["index"].numpy() - items.start
            feats = backbone(backbone.normalize(batch["image"].to(device)))
            arrays["features"][rows] = feats.float().cpu().numpy().astype(np.float16)
            thumbs = F.interpolate(batch["image"], size=(t, t), mode="bilinear", align_corners=False, antialias=True)
            arrays["thumbs"][rows] = (thumbs * 255).round().clamp(0, 255).byte().numpy()
            if "labels" in arrays:
                lab = batch["label"].clone()
                lab[(lab < 0) | (lab > 255)] = IGNORE_INDEX
                arrays["labels"][rows] = lab.numpy().astype(np.uint8)
            if on_batch:
                on_batch(len(rows))
    shards.write_shard(path, meta, shard, arrays)
    return len(items)


def _create_cache(path: Path, spec: CacheSpec, dataset, ids: list, files: str, n: int, c: int, h: int, w: int,
                  resolution: int, keys: Optional[list] = None, shard_items: Optional[int] = None) -> None:
    """Check the free space for a new cache, then write its meta.json (the shards come as they
    are computed)."""
    has_labels = dataset.has_labels
    check_cache_space(path.parent, n, c, h * w, resolution, has_labels, spec.five_crop)
    t = thumb_size(resolution)
    path.mkdir(parents=True, exist_ok=True)
    meta = {
        "spec": asdict(spec),
        "n_items": n,
        "feature_shape": [c, h, w],
        "label_shape": [resolution, resolution] if has_labels else None,
        "ids": ids,
        "files": files,
        "item_keys": keys,
        "thumb_size": t,
        "shard_items": int(shard_items or shards.default_shard_items(c * h * w * 2, n)),
        "n_classes": dataset.n_classes if has_labels else None,
        "class_names": list(dataset.class_names) if has_labels else None,
    }
    (path / "meta.json.tmp").write_text(json.dumps(meta, indent=1))
    os.replace(path / "meta.json.tmp", path / "meta.json")


def cache_item_bytes(channels: int, cells: int, resolution: int, has_labels: bool) -> int:
    """Bytes of one cached item: float16 features, the thumbnail, the uint8 label."""
    t = thumb_size(resolution)
    return channels * cells * 2 + 3 * t * t + (resolution * resolution if has_labels else 0)


def check_cache_space(folder: Path, n: int, channels: int, cells: int, resolution: int, has_labels: bool,
                      five_crop: bool) -> None:
    """Stop with one line when a cache of ``n`` items does not fit on ``folder``'s disk, naming
    the choices that shrink it with the size each gives."""
    per_item = cache_item_bytes(channels, cells, resolution, has_labels)
    choices = ["point --cache-dir at a larger disk"]
    if five_crop:
        choices.append(f"--no-five-crop ({human_bytes(n // 5 * per_item)}: 5x fewer items)")
    for dim in (128, 64):
        if dim < channels:
            size = n * cache_item_bytes(dim, cells, resolution, has_labels)
            choices.append(f"--pca-dim {dim} ({human_bytes(size)})")
    if five_crop and channels > 64:
        choices.append(f"both --no-five-crop and --pca-dim 64 "
                       f"({human_bytes(n // 5 * cache_item_bytes(64, cells, resolution, has_labels))})")
    check_free_space(folder, n * per_item, f"the feature cache ({n:,} items, {human_bytes(per_item)} each)",
                     advice="; ".join(choices) + " (docs/scaling.md: their measured effect on CamVid)")
    log.info("the feature cache: %s items x %s = %s (%s free in %s)", f"{n:,}", human_bytes(per_item),
             human_bytes(n * per_item), human_bytes(free_bytes(folder)), folder)


def weights_fingerprint(module: torch.nn.Module) -> str:
    """SHA-1 of a module's parameters and buffers: identifies weights that have no file
    (a random initialisation), so caches of different random backbones never collide."""
    return state_fingerprint(module.state_dict())


def state_fingerprint(state: dict) -> str:
    """SHA-1 of a state dict's names and tensor bytes (:func:`weights_fingerprint` of its module)."""
    h = hashlib.sha1()
    for name, t in sorted(state.items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return "params:" + h.hexdigest()


def backbone_weights_id(backbone) -> str:
    """What identifies a backbone's weights: its weights file's SHA-256, else (no file: a random
    initialisation) :func:`weights_fingerprint`."""
    return getattr(backbone, "weights_sha256", None) or weights_fingerprint(backbone)


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
    return cache.neighbors(cfg.n_neighbors, backend=cfg.knn_backend, device=device, dropout=dropout, seed=cfg.seed,
                           index=getattr(cfg, "knn_index", "exact"))
