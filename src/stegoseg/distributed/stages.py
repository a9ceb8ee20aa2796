"""The data-parallel stages on Ray: feature extraction into the sharded cache (one shard per
work item) and ``segment`` over files (one batch of images per work item). Each actor builds
its backbone or loads its model once; each item's outputs are written by rename by the code
the one-process path runs (:func:`stegoseg.features.cache.extract_shard`,
:func:`stegoseg.segment.segment_and_write`), in the same batches, so both give the same files.
"""
from __future__ import annotations

import json
from pathlib import Path

from stegoseg.distributed.engine import RayOptions, maybe_die_for_test, run_items, worker_setup
from stegoseg.errors import StegosegError


class ExtractShards:
    """Ray actor: computes shards of one feature cache."""

    def __init__(self, build, cache_path: str, threads: int = 1):
        """``build(split)``: (backbone, dataset of that split, device, extraction batch size),
        built in the worker from the run's config (:func:`stegoseg.methods.common.extraction_inputs`)."""
        worker_setup(threads)
        from stegoseg.features.cache import CropView, weights_fingerprint

        self.path = Path(cache_path)
        self.meta = json.loads((self.path / "meta.json").read_text())
        spec = self.meta["spec"]
        backbone, dataset, self.device, self.batch_size = build(spec["split"])
        weights = getattr(backbone, "weights_sha256", None) or weights_fingerprint(backbone)
        if weights != spec["weights"]:
            raise StegosegError(f"a Ray worker built other backbone weights than the feature cache {self.path} holds: "
                                "give every worker the same --weights file (on a disk they all see)")
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
        workers = self.settings.pop("crf_workers")
        self.pool = crf_pool(workers) if self.settings["crf"] and workers > 1 else None

    def __call__(self, batch):
        import pandas as pd

        from stegoseg.data.io import load_image
        from stegoseg.segment import segment_and_write

        paths, labels, overlays = (list(batch[k].iloc[0]) for k in ("paths", "labels", "overlays"))
        images = [load_image(p) for p in paths]
        maybe_die_for_test()
        segment_and_write(self.model, images, list(zip(map(Path, labels), map(Path, overlays))),
                          crf_pool=self.pool, **self.settings)
        return pd.DataFrame({"n": [len(paths)]})


def segment_on_ray(options: RayOptions, checkpoint, weights, replace_backbone: bool, device: str, bf16: bool,
                   paths: list, targets: list, settings: dict, batch_size: int, progress: bool) -> None:
    """The images still to do, ``batch_size`` per work item (the batches the one-process path
    makes), through :class:`SegmentImages` actors."""
    rows = []
    for s in range(0, len(paths), batch_size):
        chunk = slice(s, s + batch_size)
        rows.append({"paths": [str(p) for p in paths[chunk]], "labels": [str(t[0]) for t in targets[chunk]],
                     "overlays": [str(t[1]) for t in targets[chunk]]})
    run_items(rows, SegmentImages, {"checkpoint": str(checkpoint), "weights": weights,
                                    "replace_backbone": replace_backbone, "device": device, "bf16": bf16,
                                    "settings": settings},
              options, len(paths), f"segment ({options.workers} Ray workers)", progress, count=lambda row: int(row["n"]))
