"""Segmentation inference images/s: bfloat16 autocast vs float32 (GPU), same model, same
images, same run. On CPU only float32 is measured (autocast is CUDA-only here).

    python benchmarks/bench_inference.py [--backbone dino_vits8] [--batch 8] [--n 64]
"""
import argparse

import torch
from _common import timed, write_result

from stegoseg.backbones.backbone import create_backbone
from stegoseg.model import SegmentationModel
from stegoseg.nn.heads import SegmentationHead


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--backbone", default="dino_vits8")
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--n", type=int, default=64)
    ap.add_argument("--size", type=int, default=320)
    args = ap.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    bb = create_backbone(args.backbone, pretrained=False, tiny=args.tiny)
    model = SegmentationModel(bb, {"name": args.backbone}, SegmentationHead(bb.embed_dim, 70), n_clusters=27, n_classes=27)
    model.to(device).eval()
    x = torch.rand(args.batch, 3, args.size, args.size, device=device)

    def run():
        for _ in range(args.n // args.batch):
            model.predict(x, flip=True, crf=False)

    result = {"backbone": args.backbone, "batch": args.batch, "size": args.size, "device": device, "flip": True}
    model.autocast_dtype = None
    run()  # warm-up
    t32 = timed(run, repeat=3)
    result["fp32_images_per_s"] = args.n / t32
    if device == "cuda":
        model.autocast_dtype = torch.bfloat16
        run()
        tbf = timed(run, repeat=3)
        result["bf16_images_per_s"] = args.n / tbf
        result["speedup_bf16_over_fp32"] = t32 / tbf
        a = model.predict(x[:2], flip=False)["cluster"]
        model.autocast_dtype = None
        b = model.predict(x[:2], flip=False)["cluster"]
        result["bf16_fp32_label_agreement"] = float((a == b).float().mean())
        print(f"inference: fp32 {args.n / t32:.1f} img/s, bf16 {args.n / tbf:.1f} img/s ({t32 / tbf:.2f}x)")
    else:
        print(f"inference (CPU, fp32): {args.n / t32:.2f} img/s")
    write_result("inference", result)


if __name__ == "__main__":
    main()
