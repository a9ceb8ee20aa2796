"""Training steps/s: the feature cache held in memory on the training device (the default
when it fits, ``--cache-in-memory``), the cache read from its memory maps each step (the
old path), and the backbone run every step (live).

Same batches (same step indices), same head, same loss; all measured in this run. Prints
the ratios and writes results/train_throughput.json (headline: ``cached.steps_per_s``).

    python benchmarks/bench_train_throughput.py [--data-root DIR] [--backbone dino_vits8] [--tiny] [--steps 20]
"""
import argparse
import tempfile
from pathlib import Path

import torch
from _common import SHARED_DATA, timed, write_result

from stegoseg.config.stego import make_config
from stegoseg.features.cache import CropView
from stegoseg.methods.common import build_backbone_from_config, build_split, prepare
from stegoseg.features.cache import ResidentFeatures
from stegoseg.training.steps import StepBatches
from stegoseg.training.stego import StegoModule


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--data-root", default=str(SHARED_DATA / "camvid"))
    ap.add_argument("--backbone", default="dino_vits8")
    ap.add_argument("--tiny", action="store_true", help="tiny random backbone (quick CPU check)")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--resolution", type=int, default=224)
    ap.add_argument("--cache-dir", default=None)
    args = ap.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    cfg = make_config(dict(
        data_root=args.data_root, backbone=args.backbone, pretrained=False, tiny=args.tiny,
        resolution=args.resolution, five_crop=False, batch_size=args.batch_size, num_workers=0,
        cache_dir=args.cache_dir or tempfile.mkdtemp(prefix="stegoseg-bench-"), device=device, progress=False,
    ))
    backbone, _ = build_backbone_from_config(cfg)
    backbone.to(device)
    cache = prepare(cfg, Path(cfg.cache_dir), backbone)
    train = build_split(cfg, "train")
    knn = cache.neighbors(cfg.n_neighbors)
    view = CropView(train, cfg.resolution, False, "bilinear")
    module = StegoModule(cfg, backbone.embed_dim, train.n_classes, train.n_classes, backbone=backbone).to(device)
    opt = torch.optim.Adam(module.parameters(), lr=cfg.lr)
    sources = {
        "cached": StepBatches(cache, knn, cfg.batch_size, cfg.seed, steps=args.steps, indices_only=True),
        "memmap": StepBatches(cache, knn, cfg.batch_size, cfg.seed, steps=args.steps),
        "live": StepBatches(cache, knn, cfg.batch_size, cfg.seed, steps=args.steps, crop_view=view),
    }
    module.resident = ResidentFeatures(cache).to(device)
    results = {}
    for name, ds in sources.items():
        def run(steps=range(args.steps)):
            for step in steps:
                batch = {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in ds[step].items()}
                with torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda"):
                    out = module.compute_losses(batch, step)
                    loss = out["loss"] + out["cluster"] + out.get("linear", 0.0)
                opt.zero_grad()
                loss.backward()
                opt.step()
        run(range(2))  # warm-up (allocator, autograd graph), not timed
        seconds = timed(run, repeat=1)
        results[name] = {"steps_per_s": args.steps / seconds, "seconds": seconds}
    ratio = results["cached"]["steps_per_s"] / results["live"]["steps_per_s"]
    old = results["cached"]["steps_per_s"] / results["memmap"]["steps_per_s"]
    print(f"in-memory cache / memory-mapped cache (the old path): {old:.2f}x; in-memory cache / live backbone: "
          f"{ratio:.2f}x")
    write_result("train_throughput", {
        "backbone": args.backbone + (" (tiny)" if args.tiny else ""), "batch_size": args.batch_size,
        "resolution": args.resolution, "steps": args.steps, "device": device, **results,
        "ratio_cached_over_memmap": old, "ratio_cached_over_live": ratio,
    })


if __name__ == "__main__":
    main()
