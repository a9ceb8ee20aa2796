"""Measured effect of each reference-pipeline quirk (docs/reference_mode.md) on CamVid.

For each quirk, the clean and the reference behaviour are run on the same inputs with the
same backbone and compared:

* KNN descriptors with Dropout2d(0.1) active: agreement of the top-7 neighbour lists with
  the clean lists (and of two dropout draws with each other);
* five-crops through JPEG, and NEAREST instead of bilinear resizing of the training crops:
  mean cosine similarity of the patch features and top-7 KNN agreement with the clean crops;
* DINO's position-embedding interpolation instead of timm's at 320 px (evaluation size):
  patch-feature cosine and the fraction of equal cluster labels;
* the CRF fed BGR (uint8 by truncation) instead of RGB: fraction of equal labels after the CRF.

The backbone is a randomly initialised ViT-S/8 (seed 0; no pretrained weights can be
downloaded here), like the reference measurements in ../shared/docs/reference.md; the
cluster labels come from a spherical k-means (11 clusters) on the validation features.

    python benchmarks/reference_mode.py [--n-train 120] [--n-val 20]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import SHARED_DATA, write_result  # noqa: E402

from stegoseg.backbones.backbone import create_backbone
from stegoseg.data import build_dataset
from stegoseg.data.transforms import EvalTransform
from stegoseg.evaluation.crf import CRFParams, crf_job
from stegoseg.features.cache import CropView
from stegoseg.features.knn import nearest_neighbors
from stegoseg.nn.kmeans import spherical_kmeans


def knn_agreement(a: np.ndarray, b: np.ndarray, k: int = 7) -> float:
    """Mean fraction of shared entries between the top-k lists of two KNN tables."""
    return float(np.mean([len(set(x[:k]) & set(y[:k])) / k for x, y in zip(a, b)]))


def dropout_descriptors(means: torch.Tensor, p: float, seed: int) -> np.ndarray:
    gen = torch.Generator().manual_seed(seed)
    keep = (torch.rand(means.shape, generator=gen) >= p).float() / (1 - p)
    return F.normalize(means * keep, dim=1).numpy()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n-train", type=int, default=120, help="CamVid training images (x5 crops)")
    ap.add_argument("--n-val", type=int, default=20, help="CamVid validation images at 320 px")
    ap.add_argument("--batch-size", type=int, default=20)
    args = ap.parse_args()
    root = SHARED_DATA / "camvid"
    torch.manual_seed(0)
    timm_bb = create_backbone("dino_vits8", pretrained=False)
    torch.manual_seed(0)
    dino_bb = create_backbone("dino_vits8", pretrained=False, pos_embed="dino")
    dino_bb.load_state_dict(timm_bb.state_dict())
    t0 = time.perf_counter()

    # ---- training crops: clean vs JPEG vs NEAREST; descriptors for KNN
    train = build_dataset("directory", root, "train")
    n_items = min(args.n_train, len(train)) * 5
    views = {
        "clean": CropView(train, 224, True, "bilinear"),
        "jpeg": CropView(train, 224, True, "bilinear", jpeg=True),
        "nearest": CropView(train, 224, True, "nearest"),
    }
    means = {k: [] for k in views}
    cosines = {"jpeg": [], "nearest": []}
    with torch.inference_mode():
        for start in range(0, n_items, args.batch_size):
            idx = range(start, min(start + args.batch_size, n_items))
            feats = {}
            for name, view in views.items():
                x = torch.stack([view[i]["image"] for i in idx])
                feats[name] = timm_bb(timm_bb.normalize(x))
                means[name].append(feats[name].mean(dim=(2, 3)))
            for name in cosines:
                cosines[name].append(F.cosine_similarity(feats[name], feats["clean"], dim=1).mean().item())
            print(f"train crops {idx.stop}/{n_items} ({time.perf_counter() - t0:.0f}s)", flush=True)
    means = {k: torch.cat(v) for k, v in means.items()}
    clean_desc = F.normalize(means["clean"], dim=1).numpy()
    knn = {"clean": nearest_neighbors(clean_desc, k=7, backend="faiss")}
    for name in ("jpeg", "nearest"):
        knn[name] = nearest_neighbors(F.normalize(means[name], dim=1).numpy(), k=7, backend="faiss")
    knn["dropout_a"] = nearest_neighbors(dropout_descriptors(means["clean"], 0.1, 0), k=7, backend="faiss")
    knn["dropout_b"] = nearest_neighbors(dropout_descriptors(means["clean"], 0.1, 1), k=7, backend="faiss")

    # ---- validation images at 320 px: position-embedding interpolation and the CRF input
    val = build_dataset("directory", root, "val")
    val.transform = EvalTransform(resolution=320, crop="center", image_resample="nearest")
    n_val = min(args.n_val, len(val))
    images = torch.stack([val[i]["image"] for i in range(n_val)])
    with torch.inference_mode():
        f_timm = torch.cat([timm_bb(timm_bb.normalize(images[i:i + 4])) for i in range(0, n_val, 4)])
        f_dino = torch.cat([dino_bb(dino_bb.normalize(images[i:i + 4])) for i in range(0, n_val, 4)])
    pos_cos = F.cosine_similarity(f_timm, f_dino, dim=1)
    centroids = spherical_kmeans(lambda: iter([f_timm]), 11, n_iter=30, seed=0, device="cpu", progress=False)

    def labels_of(feats):
        code = F.interpolate(feats, size=images.shape[-2:], mode="bilinear", align_corners=False)
        logits = 2 * torch.einsum("bchw,kc->bkhw", F.normalize(code, dim=1), F.normalize(centroids, dim=1))
        return logits

    logits_timm, logits_dino = labels_of(f_timm), labels_of(f_dino)
    pos_label_equal = (logits_timm.argmax(1) == logits_dino.argmax(1)).float().mean().item()
    rgb = [np.ascontiguousarray((im.permute(1, 2, 0) * 255).round().byte().numpy()) for im in images]
    crf_rgb = [crf_job((img, lg.numpy(), CRFParams())) for img, lg in zip(rgb, logits_timm)]
    crf_bgr = [crf_job((img, lg.numpy(), CRFParams(reference_input=True))) for img, lg in zip(rgb, logits_timm)]
    crf_equal = float(np.mean([(a == b).mean() for a, b in zip(crf_rgb, crf_bgr)]))
    crf_dino = [crf_job((img, lg.numpy(), CRFParams())) for img, lg in zip(rgb, logits_dino)]
    pos_crf_equal = float(np.mean([(a == b).mean() for a, b in zip(crf_rgb, crf_dino)]))

    rows = {
        "knn_dropout": {"top7_agreement_with_clean": knn_agreement(knn["dropout_a"], knn["clean"]),
                        "top7_agreement_two_dropout_draws": knn_agreement(knn["dropout_a"], knn["dropout_b"])},
        "crop_jpeg": {"patch_feature_cosine": float(np.mean(cosines["jpeg"])),
                      "top7_agreement_with_clean": knn_agreement(knn["jpeg"], knn["clean"])},
        "train_resample_nearest": {"patch_feature_cosine": float(np.mean(cosines["nearest"])),
                                   "top7_agreement_with_clean": knn_agreement(knn["nearest"], knn["clean"])},
        "pos_embed_dino": {"patch_feature_cosine_mean": pos_cos.mean().item(),
                           "patch_feature_cosine_min": pos_cos.min().item(),
                           "cluster_labels_equal": pos_label_equal, "crf_labels_equal": pos_crf_equal},
        "crf_reference_input": {"crf_labels_equal": crf_equal},
    }
    write_result("reference_mode", {
        "data": f"CamVid: {n_items} train crops ({n_items // 5} images, 224 px), {n_val} val images (320 px)",
        "backbone": "dino_vits8, random init (seed 0)", "seconds": time.perf_counter() - t0, "rows": rows,
    })


if __name__ == "__main__":
    main()
