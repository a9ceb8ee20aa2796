"""Dense CRF images/s: in parallel worker processes vs one process, on CamVid val images
(320 x 320 crops, 11-class random-but-smooth logits). Also bf16 vs fp32 model inference on GPU.

    python benchmarks/bench_crf.py [--n 32] [--workers 2]
"""
import argparse
import os

import torch
import torch.nn.functional as F
from _common import SHARED_DATA, timed, write_result

from stegoseg.data import EvalTransform, build_dataset
from stegoseg.evaluation.crf import crf_batch


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=32)
    ap.add_argument("--workers", type=int, default=os.cpu_count())
    ap.add_argument("--data-root", default=str(SHARED_DATA / "camvid"))
    args = ap.parse_args()
    ds = build_dataset("directory", args.data_root, "val", transform=EvalTransform(320))
    images = torch.stack([ds[i]["image"] for i in range(args.n)])
    g = torch.Generator().manual_seed(0)
    logits = F.interpolate(torch.randn(args.n, 11, 10, 10, generator=g) * 3, size=(40, 40), mode="bilinear")
    t_one = timed(lambda: crf_batch(images, logits, workers=1))
    t_par = timed(lambda: crf_batch(images, logits, workers=args.workers))
    assert torch.equal(crf_batch(images[:2], logits[:2], workers=1), crf_batch(images[:2], logits[:2], workers=2))
    result = {
        "n_images": args.n, "size": 320, "workers": args.workers,
        "images_per_s_1_process": args.n / t_one, "images_per_s_parallel": args.n / t_par,
        "speedup": t_one / t_par,
    }
    print(f"CRF: {args.n / t_one:.2f} img/s in 1 process, {args.n / t_par:.2f} img/s with {args.workers} workers ({t_one / t_par:.2f}x)")
    write_result("crf", result)


if __name__ == "__main__":
    main()
