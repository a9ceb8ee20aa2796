"""The measured effect of PriMaPs' deliberate differences from its reference (docs/primaps.md),
on the crops of a feature cache:

* sign flips: how many proposals met "no free feature has a positive cosine with the principal
  direction", where the reference divides by a zero maximum (NaN masks; the crop ends all
  'ignore'), and how many crops that would have cost;
* one-mask crops: the reference computes the background of a single mask from column sums (a
  squeeze of the mask stack); the share of pixels whose pseudo mask id changes with that formula
  (after the same CRF) against ours.

    PYTHONPATH=src python3 benchmarks/primaps_differences.py CACHE_FOLDER [--crops 400]

CACHE_FOLDER: a feature cache of a directory dataset (its meta.json names the images). Writes
benchmarks/results/primaps_differences_<cache>.json with the machine named.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine  # noqa: E402

from stegoseg.data.registry import build_dataset
from stegoseg.evaluation.crf import CRFParams, crf_job
from stegoseg.features.cache import CropView, FeatureCache
from stegoseg.nn.primaps import mask_unaries, median_filter3x3, principal_masks
from stegoseg.training.primaps import _crop_uint8


def reference_single_mask_unaries(masks: torch.Tensor) -> torch.Tensor:
    """The reference's CRF input for k = 1: ``squeeze()`` drops the mask axis and the
    background becomes mean - column sums (``sum(dim=0)`` over rows)."""
    filtered = (median_filter3x3(masks) * 10).clamp(0, 1)[0]
    level = filtered[filtered != 0].mean()
    background = (level - filtered.sum(dim=0)).expand_as(filtered).clamp(0, 1)
    return F.log_softmax(torch.stack([background, filtered]), dim=0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("cache")
    parser.add_argument("--crops", type=int, default=400)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    cache = FeatureCache(Path(args.cache))
    spec = cache.meta["spec"]
    dataset = build_dataset(spec["dataset"], spec["root"], spec["split"])
    view = CropView(dataset, spec["resolution"], spec["five_crop"], spec.get("image_resample", "bilinear"))
    picks = np.random.default_rng(args.seed).permutation(cache.n)[: args.crops]
    size = int(cache.meta["label_shape"][0])
    flips_total, crops_flipped, one_mask, changed, pixels = 0, 0, 0, 0, 0
    for i in picks:
        stats: dict = {}
        masks = principal_masks(cache.feature_batch([int(i)])[0].float(), generator_seed=int(i), stats=stats)
        flips_total += stats.get("sign_flips", 0)
        crops_flipped += bool(stats.get("sign_flips", 0))
        if masks.shape[0] != 1:
            continue
        one_mask += 1
        image = _crop_uint8(view[int(i)]["image"])
        labels = []
        for unary in (mask_unaries(masks), reference_single_mask_unaries(masks)):
            up = F.interpolate(unary[None], size=(size, size), mode="bilinear", align_corners=False)[0]
            labels.append(crf_job((image, up.numpy(), CRFParams())))
        changed += int((labels[0] != labels[1]).sum())
        pixels += labels[0].size
    result = {"machine": machine(), "cache": str(cache.path), "crops": len(picks), "sign_flips": flips_total,
              "crops_with_a_sign_flip": crops_flipped, "one_mask_crops": one_mask,
              "one_mask_pixels_changed_by_the_reference_background": changed / pixels if pixels else None}
    out = Path(__file__).resolve().parent / "results" / f"primaps_differences_{cache.path.parent.parent.name}.json"
    out.write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
