"""Where the time goes: every stage of the pipeline timed on the same data and machine.

Stages: JPEG decode + resize (the training crops), backbone extraction into the cache,
KNN, training steps from the cache (in memory and memory-mapped), evaluation without CRF,
the dense CRF alone (per image, one process), and `segment` on image files. Writes
results/profile_<device>.json and prints a markdown table (seconds, per-item rate, share).

    python benchmarks/profile_stages.py [--n-train 60] [--n-val 12] [--tiny]
"""
from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import SHARED_DATA, write_result  # noqa: E402

from stegoseg.config.stego import make_config  # noqa: E402
from stegoseg.data.transforms import EvalTransform  # noqa: E402
from stegoseg.evaluation.crf import CRFParams, crf_job  # noqa: E402
from stegoseg.features.cache import CropView, ResidentFeatures  # noqa: E402
from stegoseg.methods.common import (  # noqa: E402
    build_backbone_from_config,
    build_split,
    evaluate_checkpoint_model,
    fit_probes,
    prepare,
)
from stegoseg.segment import segment_images  # noqa: E402
from stegoseg.training.steps import StepBatches  # noqa: E402
from stegoseg.training.stego import StegoModule  # noqa: E402


def subset(root: Path, dst: Path, n_train: int, n_val: int) -> Path:
    """A folder with the first images (and labels) of CamVid's train and val splits (links)."""
    for split, n in (("train", n_train), ("val", n_val)):
        for kind, suffix in (("imgs", None), ("labels", ".png")):
            (dst / kind / split).mkdir(parents=True, exist_ok=True)
        for img in sorted((root / "imgs" / split).iterdir())[:n]:
            (dst / "imgs" / split / img.name).symlink_to(img)
            lab = root / "labels" / split / (img.stem + ".png")
            (dst / "labels" / split / lab.name).symlink_to(lab)
    return dst


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n-train", type=int, default=60)
    ap.add_argument("--n-val", type=int, default=12)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--tiny", action="store_true")
    args = ap.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    work = Path(tempfile.mkdtemp(prefix="stegoseg-profile-"))
    data = subset(SHARED_DATA / "camvid", work / "data", args.n_train, args.n_val)
    cfg = make_config(dict(
        data_root=str(data), backbone="dino_vits8", pretrained=False, tiny=args.tiny, resolution=224, five_crop=True,
        batch_size=16, num_workers=0, cache_dir=str(work / "cache"), device=device, progress=False,
        eval_resolution=320, crf=False, max_eval_images=None, eval_batch_size=8,
    ))
    stages = {}

    def record(name, seconds, items, unit):
        stages[name] = {"seconds": seconds, "items": items, "per_s": items / seconds if seconds else None, "unit": unit}
        print(f"{name}: {seconds:.2f} s for {items} {unit}", flush=True)

    backbone, _ = build_backbone_from_config(cfg)
    backbone.to(device)
    train = build_split(cfg, "train")
    view = CropView(train, 224, True, "bilinear")
    t0 = time.perf_counter()
    for i in range(len(view)):
        view[i]
    record("decode + crop + resize (training crops)", time.perf_counter() - t0, len(view), "crops")

    t0 = time.perf_counter()
    cache = prepare(cfg, work, backbone)  # extraction + KNN
    total = time.perf_counter() - t0
    t0 = time.perf_counter()
    (cache.path / f"knn_{cfg.n_neighbors}.npy").unlink()
    (cache.path / "global.npy").unlink()
    knn = cache.neighbors(cfg.n_neighbors)
    knn_s = time.perf_counter() - t0
    record("extract features (decode + backbone + write cache)", total - knn_s, cache.n, "crops")
    record("global descriptors + KNN", knn_s, cache.n, "crops")

    module = StegoModule(cfg, backbone.embed_dim, 11, 11).to(device)
    opt = torch.optim.Adam(module.parameters(), lr=cfg.lr)
    for name, ds, resident in (
        ("train step, cache in memory", StepBatches(cache, knn, 16, 0, steps=args.steps + 2, indices_only=True), True),
        ("train step, cache memory-mapped", StepBatches(cache, knn, 16, 0, steps=args.steps + 2), False),
    ):
        module.resident = ResidentFeatures(cache).to(device) if resident else None
        for step in range(args.steps + 2):
            if step == 2:
                t0 = time.perf_counter()
            batch = {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in ds[step].items()}
            out = module.compute_losses(batch, step)
            opt.zero_grad()
            (out["loss"] + out["cluster"] + out["linear"]).backward()
            opt.step()
        record(name, time.perf_counter() - t0, args.steps, "steps")

    model = fit_probes(cfg, cache, backbone, 11, class_names=train.class_names)
    t0 = time.perf_counter()
    result = evaluate_checkpoint_model(cfg, model, work / "eval")
    record("evaluate, no CRF (320 px, flip)", time.perf_counter() - t0, result["n_images"], "images")

    val = build_split(cfg, "val")
    jobs = []
    val.transform = EvalTransform(resolution=320, crop="center", image_resample="nearest")
    for i in range(len(val)):
        image = val[i]["image"]
        with torch.no_grad():
            code = model.code(image[None].to(model.device))
            logits = model.cluster_probe.log_probs(torch.nn.functional.interpolate(code, size=image.shape[-2:],
                                                                                   mode="bilinear"))
        jobs.append(((image.permute(1, 2, 0) * 255).round().byte().numpy(), logits[0].cpu().numpy(), CRFParams()))
    t0 = time.perf_counter()
    for job in jobs:
        crf_job(job)
    record("dense CRF (pydensecrf2, 1 process)", time.perf_counter() - t0, len(jobs), "images")

    paths = sorted((data / "imgs" / "val").iterdir())
    t0 = time.perf_counter()
    segment_images(model, paths, work / "seg", crf=False, progress=False, num_workers=0)
    record("segment image files (320 px, flip, no CRF)", time.perf_counter() - t0, len(paths), "images")

    total = sum(s["seconds"] for s in stages.values())
    print("\n| stage | seconds | rate | share |\n|---|---|---|---|")
    for name, s in stages.items():
        print(f"| {name} | {s['seconds']:.2f} | {s['per_s']:.2f} {s['unit']}/s | {100 * s['seconds'] / total:.0f}% |")
    old = stages["train step, cache memory-mapped"]["seconds"] / stages["train step, cache in memory"]["seconds"]
    print(f"\ntraining from the in-memory cache: {old:.2f}x the memory-mapped path (measured in this run)")
    write_result(f"profile_{device}", {
        "data": f"CamVid: first {args.n_train} train images (five-cropped, 224 px), first {args.n_val} val images",
        "backbone": "dino_vits8" + (" tiny" if args.tiny else "") + ", random init", "stages": stages,
        "ratio_in_memory_over_memmap_train": old,
    })
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
