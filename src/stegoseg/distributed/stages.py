"""The data-parallel stages on Ray: feature extraction into the sharded cache (one shard per
work item), ``segment`` over files (one batch of images per work item), evaluation (a few
protocol batches per work item, their confusion counts summed by the driver) and PriMaPs'
pseudo masks (a chunk of crops per work item). Each actor builds
its backbone or loads its model once; each item's outputs are written by rename by the code
the one-process path runs (:func:`stegoseg.features.cache.extract_shard`,
:func:`stegoseg.segment.segment_and_write`), in the same batches, so both give the same files.
"""
from __future__ import annotations

import json
from pathlib import Path

from stegoseg.distributed.engine import RayOptions, connect, maybe_die_for_test, run_items, worker_setup
from stegoseg.errors import StegosegError


class ExtractShards:
    """Ray actor: computes shards of one feature cache."""

    def __init__(self, build, cache_path: str, threads: int = 1):
        """``build(split)``: (backbone, dataset of that split, device, extraction batch size),
        built in the worker from the run's config (:func:`stegoseg.methods.common.extraction_inputs`)."""
        worker_setup(threads)
        from stegoseg.features.cache import CropView, backbone_weights_id

        self.path = Path(cache_path)
        self.meta = json.loads((self.path / "meta.json").read_text())
        spec = self.meta["spec"]
        backbone, dataset, self.device, self.batch_size = build(spec["split"])
        if backbone_weights_id(backbone) != spec["weights"]:
            raise StegosegError(f"a Ray worker built other backbone weights than the feature cache {self.path} holds: "
                                "give every worker the same --weights file (on a disk they all see)")
        from stegoseg.features.projection import projection_digest

        if projection_digest(backbone) != spec.get("projection"):
            raise StegosegError(f"a Ray worker projects the features otherwise than the feature cache {self.path} "
                                "(--pca-dim): give every worker the same --cache-dir, on a disk they all see")
        self.backbone = backbone.to(self.device).eval()
        self.view = CropView(dataset, spec["resolution"], spec["five_crop"], spec["image_resample"],
                             jpeg=spec["crop_jpeg"])
        if len(self.view) != self.meta["n_items"]:
            raise StegosegError(f"a Ray worker sees {len(self.view)} crops in {spec['root']}, the feature cache "
                                f"{self.path} has {self.meta['n_items']}: give every worker the same data folder")

    def __call__(self, batch):
        import pandas as pd

        from stegoseg.features.cache import extract_shard

        shard = int(batch["shard"].iloc[0])
        n = extract_shard(self.path, self.meta, self.view, shard, self.backbone, self.batch_size, 0, self.device,
                          on_batch=lambda _: maybe_die_for_test())
        return pd.DataFrame({"shard": [shard], "items": [n]})


def extraction_runner(build, options: RayOptions):
    """``run_shards`` for :func:`~stegoseg.features.cache.extract_features`: the missing shards
    on the Ray cluster, one bar over their items; ``build``: see :class:`ExtractShards`."""

    def run(path: Path, todo: list, progress: bool) -> None:
        from stegoseg.features import shards

        meta = json.loads((Path(path) / "meta.json").read_text())
        total = sum(len(shards.shard_range(meta, s)) for s in todo)
        run_items([{"shard": int(s)} for s in todo], ExtractShards,
                  {"build": build, "cache_path": str(path)}, options, total,
                  f"features {meta['spec']['split']} ({options.workers} Ray workers)", progress,
                  count=lambda row: int(row["items"]))

    return run


class SegmentImages:
    """Ray actor: segments batches of image files with one loaded model."""

    def __init__(self, checkpoint: str, weights, replace_backbone: bool, device: str, bf16: bool, settings: dict,
                 threads: int = 1):
        worker_setup(threads)
        from stegoseg.evaluation.crf import crf_pool
        from stegoseg.methods.common import resolve_device
        from stegoseg.model import load

        self.model = load(checkpoint, weights=weights, device=resolve_device(device), replace_backbone=replace_backbone)
        if bf16:
            import torch

            self.model.autocast_dtype = torch.bfloat16
        self.settings = dict(settings)
        workers = min(self.settings.pop("crf_workers"), threads)  # within the actor's CPUs (same labels at any count)
        self.pool = crf_pool(workers) if self.settings["crf"] and workers > 1 else None

    def __call__(self, batch):
        import pandas as pd

        from stegoseg.data.io import load_image
        from stegoseg.segment import segment_and_write

        paths, labels, overlays = (list(batch[k].iloc[0]) for k in ("paths", "labels", "overlays"))
        size = int(batch["batch_size"].iloc[0])
        maybe_die_for_test()
        for s in range(0, len(paths), size):  # the batches the one-process path makes, each written when done
            images = [load_image(p) for p in paths[s:s + size]]
            segment_and_write(self.model, images, list(zip(map(Path, labels[s:s + size]), map(Path, overlays[s:s + size]))),
                              crf_pool=self.pool, **self.settings)
        return pd.DataFrame({"n": [len(paths)]})


#: Batches of ``segment`` per Ray work item (fewer, larger items: less of Ray's per-item cost;
#: a worker that dies loses at most this many batches' work, the finished batches are on disk).
SEGMENT_BATCHES_PER_ITEM = 4


def segment_on_ray(options: RayOptions, checkpoint, weights, replace_backbone: bool, device: str, bf16: bool,
                   paths: list, targets: list, settings: dict, batch_size: int, progress: bool) -> None:
    """The images still to do, :data:`SEGMENT_BATCHES_PER_ITEM` batches of ``batch_size`` per
    work item (the batches the one-process path makes), through :class:`SegmentImages` actors."""
    rows, step = [], batch_size * SEGMENT_BATCHES_PER_ITEM
    for s in range(0, len(paths), step):
        chunk = slice(s, s + step)
        rows.append({"paths": [str(p) for p in paths[chunk]], "labels": [str(t[0]) for t in targets[chunk]],
                     "overlays": [str(t[1]) for t in targets[chunk]], "batch_size": batch_size})
    run_items(rows, SegmentImages, {"checkpoint": str(checkpoint), "weights": weights,
                                    "replace_backbone": replace_backbone, "device": device, "bf16": bf16,
                                    "settings": settings},
              options, len(paths), f"segment ({options.workers} Ray workers)", progress, count=lambda row: int(row["n"]))


class EvaluateParts:
    """Ray actor: evaluates runs of consecutive images of a split with one model and returns
    each run's counts (:class:`~stegoseg.evaluation.protocol.EvalPart`) as an ``.npz`` blob."""

    def __init__(self, model, build, config: dict, device: str, threads: int = 1):
        """``model``: the model (or its Ray object reference, put once by the driver);
        ``build()``: the split's dataset, built in the worker; ``config``: the EvalConfig's fields;
        ``device``: ``--device`` (auto: the worker's GPU when it has one)."""
        worker_setup(threads)
        import ray

        from stegoseg.evaluation.crf import CRFParams, crf_pool
        from stegoseg.evaluation.protocol import EvalConfig, eval_transform
        from stegoseg.methods.common import resolve_device

        model = ray.get(model) if isinstance(model, ray.ObjectRef) else model
        self.model = model.to(resolve_device(device)).eval()
        self.config = EvalConfig(**dict(config, crf_params=CRFParams(**config["crf_params"])))
        self.dataset = build()
        self.dataset.transform = eval_transform(self.config)
        workers = min(self.config.crf_workers, threads)  # within the actor's CPUs (same labels at any count)
        self.pool = crf_pool(workers) if self.config.crf and workers > 1 else None

    def __call__(self, batch):
        import pandas as pd

        from stegoseg.evaluation.protocol import evaluate_part

        first, indices = int(batch["first"].iloc[0]), [int(i) for i in batch["indices"].iloc[0]]
        grid = {int(g) for g in batch["grid"].iloc[0]}
        maybe_die_for_test()
        part = evaluate_part(self.model, self.dataset, self.config, first, indices, grid, pool=self.pool)
        return pd.DataFrame({"first": [first], "n": [part.n], "blob": [part_blob(part)]})


def part_blob(part) -> bytes:
    """An EvalPart as the bytes of an ``.npz`` file (no pickles)."""
    import io

    import numpy as np

    arrays = {"n": np.array(part.n)}
    for name in ("cluster", "linear"):
        if getattr(part, name) is not None:
            arrays[name] = getattr(part, name)
    for pos, row in part.grid.items():
        for key, value in row.items():
            if value is not None:
                arrays[f"grid_{pos}_{key}"] = value
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


def part_from_file(path: Path):
    import numpy as np

    from stegoseg.evaluation.protocol import EvalPart

    with np.load(path, allow_pickle=False) as z:
        grid = {}
        for name in z.files:
            if name.startswith("grid_"):
                _, pos, key = name.split("_", 2)
                grid.setdefault(int(pos), {"label": None, "linear": None})[key] = z[name]
        return EvalPart(z["cluster"] if "cluster" in z.files else None, z["linear"] if "linear" in z.files else None,
                        grid, int(z["n"]))


#: Batches of the protocol per Ray work item in evaluation.
EVAL_BATCHES_PER_ITEM = 4


def evaluation_parts(options: RayOptions, model, build, config, device: str = "auto", parts_dir: Path = None,
                     progress: bool = True, data_key: str = ""):
    """``parts`` for :func:`~stegoseg.evaluation.protocol.evaluate_model`: the images in runs of
    :data:`EVAL_BATCHES_PER_ITEM` protocol batches (the batches one process makes, so the
    predictions are the same) on :class:`EvaluateParts` actors. With ``parts_dir``, each
    finished run's counts are written there by rename as they arrive, under a key of the model
    (its weights and inference precision), the protocol and the images (``data_key``: the split's
    files, sizes and times, from the caller), so that a rerun after the driver was killed
    evaluates only the runs that are missing; the folder goes once the metrics are written."""
    import hashlib
    import shutil
    from dataclasses import asdict

    from stegoseg.features.cache import weights_fingerprint
    from stegoseg.preflight import atomic_write

    def run(indices: list, grid_at: set) -> list:
        import ray

        step = (config.batch_size if config.crop == "center" else 1) * EVAL_BATCHES_PER_ITEM
        rows = [{"first": s, "indices": indices[s:s + step], "grid": sorted(g for g in grid_at if s <= g < s + step)}
                for s in range(0, len(indices), step)]
        folder, done = None, {}
        if parts_dir is not None:
            from stegoseg.features.projection import projection_digest

            key = hashlib.sha256(json.dumps({"model": weights_fingerprint(model), "autocast": str(model.autocast_dtype),
                                             "projection": projection_digest(model.backbone),
                                             "config": asdict(config), "data": data_key, "indices": indices,
                                             "step": step}, sort_keys=True).encode()).hexdigest()
            folder = Path(parts_dir) / key[:16]
            if Path(parts_dir).exists():
                for other in Path(parts_dir).iterdir():  # counts of another model or protocol: not this job's
                    if other != folder:
                        shutil.rmtree(other, ignore_errors=True)
            folder.mkdir(parents=True, exist_ok=True)
            for row in rows:
                path = folder / f"part-{row['first']:08d}.npz"
                if path.exists():
                    done[row["first"]] = part_from_file(path)
        todo = [row for row in rows if row["first"] not in done]

        def keep(row) -> None:
            if folder is not None:
                path = folder / f"part-{int(row['first']):08d}.npz"
                atomic_write(path, lambda tmp: Path(tmp).write_bytes(row["blob"]), suffix=".tmp.npz")
                done[int(row["first"])] = part_from_file(path)
            else:
                import io

                done[int(row["first"])] = part_from_file(io.BytesIO(row["blob"]))

        if todo:
            connect(options)
            where = next(iter(model.state_dict().values())).device
            ref = ray.put(model.cpu())  # once; every actor reads it (the driver's copy goes back where it was)
            model.to(where)
            run_items(todo, EvaluateParts, {"model": ref, "build": build, "config": asdict(config), "device": device},
                      options,
                      sum(len(r["indices"]) for r in todo), f"evaluate ({options.workers} Ray workers)", progress,
                      count=lambda row: int(row["n"]), on_row=keep)
        return [done[row["first"]] for row in rows]

    return run


class PseudoMasks:
    """Ray actor: PriMaPs' pseudo masks of chunks of cached crops (principal masks + CRF),
    returned to the driver, which writes them into the masks file."""

    def __init__(self, build, config: dict, cache_path: str, view: dict, threads: int = 1):
        """``build()``: the cached split's dataset; ``view``: its crops' CropView settings."""
        worker_setup(threads)
        from stegoseg.config.stego import Config
        from stegoseg.evaluation.crf import crf_params_from, crf_pool
        from stegoseg.features.cache import CropView, FeatureCache

        self.cfg = Config(**config)
        self.cache = FeatureCache(Path(cache_path))
        self.view = CropView(build(), **view)
        if len(self.view) != self.cache.n:
            raise StegosegError(f"a Ray worker sees {len(self.view)} crops, the feature cache {cache_path} has "
                                f"{self.cache.n}: give every worker the same data folder")
        self.size = int(self.cache.meta["spec"]["resolution"])  # (label_shape is None without labels)
        self.params = crf_params_from(config)
        workers = min(self.cfg.crf_workers, threads)  # within the actor's CPUs (same masks at any count)
        self.pool = crf_pool(workers) if workers > 1 else None

    def __call__(self, batch):
        import io

        import numpy as np
        import pandas as pd

        from stegoseg.training.primaps import chunk_masks

        chunk = np.asarray(list(batch["crops"].iloc[0]), dtype=np.int64)
        maybe_die_for_test()
        masks, counts, flips = chunk_masks(self.cfg, self.cache, self.view, chunk, self.size, self.params, self.pool)
        buffer = io.BytesIO()
        np.savez(buffer, crops=chunk, masks=masks, counts=counts, flips=np.array(flips))
        return pd.DataFrame({"n": [len(chunk)], "blob": [buffer.getvalue()]})


def pseudo_mask_runner(options: RayOptions, build, view: dict):
    """``runner`` for :func:`~stegoseg.training.primaps.build_pseudo_masks`: the chunks on
    :class:`PseudoMasks` actors; each chunk's masks are handed to ``keep`` as they arrive (so a
    rerun after the driver was killed computes only the crops not yet marked done)."""

    def run(cfg, cache_path: Path, chunks: list, keep, progress: bool) -> int:
        import io

        import numpy as np

        flips = [0]

        def arrived(row) -> None:
            with np.load(io.BytesIO(row["blob"]), allow_pickle=False) as z:
                keep(z["crops"], z["masks"], z["counts"])
                flips[0] += int(z["flips"])

        run_items([{"crops": [int(i) for i in chunk]} for chunk in chunks], PseudoMasks,
                  {"build": build, "config": cfg.to_dict(), "cache_path": str(cache_path), "view": view}, options,
                  sum(len(c) for c in chunks), f"pseudo masks ({options.workers} Ray workers)", progress,
                  unit="crop", count=lambda row: int(row["n"]), on_row=arrived)
        return flips[0]

    return run
