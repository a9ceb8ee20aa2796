"""DatUS^2 (Kumar, Sur, Baruah 2024): unsupervised segmentation by graph clustering of
ViT patch embeddings, then dataset-level pseudo-labelling of the discovered segments.

Per image (segment discovery):
  1. dense patch embeddings of the frozen backbone (the project's backbones and
     evaluation transform);
  2. an affinity graph over patches: each patch is joined to its ``knn`` most similar
     patches (cosine similarity), an edge kept only if its similarity is at least
     ``min_similarity``; edge weight = similarity (so the graph is sparse and its
     weights positive, as modularity needs);
  3. Louvain community detection (NetworkX, seeded, ``resolution`` configurable);
  4. degenerate segments: a community with fewer than ``min_patches`` patches is merged
     into the community whose mean embedding is most similar to its own (repeated until
     none is left), so every pixel belongs to a segment;
  5. segments are patch masks upsampled (nearest) to pixels.
Over the dataset (pseudo-labelling):
  6. each segment is cropped on its bounding box with the pixels outside the segment set
     to the image mean colour, resized to ``crop_size`` and embedded with the
     backbone's global feature (L2-normalised mean of its dense features);
  7. spherical k-means over all segments' embeddings with K = number of classes (or more
     to over-cluster);
  8. every pixel of a segment is painted with its segment's cluster.
Optional de-noising: a light decoder (1x1 conv on the frozen backbone's features) or
torchvision's DeepLabV3-ResNet50 trained on the pseudo masks, then used to predict.
"""
from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import networkx as nx
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from stegoseg.progress import progress_bar as tqdm

from stegoseg.data.transforms import EvalTransform
from stegoseg.errors import StegosegError
from stegoseg.evaluation.crf import image_to_uint8
from stegoseg.evaluation.metrics import (
    ConfusionAccumulator,
    plot_confusion,
    save_metrics_json,
)
from stegoseg.evaluation.protocol import summary_rows
from stegoseg.methods.common import (
    build_backbone_from_config,
    build_split,
    n_classes_for,
    resolve_device,
)
from stegoseg.nn.kmeans import spherical_kmeans
from stegoseg.reporting.figures import make_palette, prediction_grid
from stegoseg.reporting.tables import metrics_table

log = logging.getLogger("stegoseg")


@dataclass
class DatusParams:
    knn: int = 10
    min_similarity: float = 0.0
    resolution: float = 1.0  # Louvain resolution: > 1 gives more, smaller segments
    min_patches: int = 4
    crop_size: int = 224
    n_clusters: Optional[int] = None  # default: the dataset's number of classes
    seed: int = 0


def affinity_graph(embeddings: torch.Tensor, knn: int = 10, min_similarity: float = 0.0) -> nx.Graph:
    """Sparse undirected graph over N embeddings (N, D): each node joined to its ``knn``
    most cosine-similar nodes, edges with similarity < ``min_similarity`` dropped; weight = similarity."""
    x = F.normalize(embeddings.float(), dim=1)
    n = x.shape[0]
    sim = x @ x.T
    sim.fill_diagonal_(-2.0)
    k = min(knn, n - 1)
    g = nx.Graph()
    g.add_nodes_from(range(n))
    if k <= 0:
        return g
    vals, idx = sim.topk(k, dim=1)
    floor = max(min_similarity, 1e-6)  # modularity needs positive weights
    rows = torch.arange(n).unsqueeze(1).expand(-1, k)
    keep = vals >= floor
    for a, b, w in zip(rows[keep].tolist(), idx[keep].tolist(), vals[keep].tolist()):
        g.add_edge(a, b, weight=w)
    return g


def louvain_segments(embeddings: torch.Tensor, params: DatusParams = DatusParams()) -> np.ndarray:
    """Community id per embedding (N,), consecutive from 0, after merging small communities."""
    g = affinity_graph(embeddings, params.knn, params.min_similarity)
    communities = nx.community.louvain_communities(g, weight="weight", resolution=params.resolution, seed=params.seed)
    labels = np.empty(embeddings.shape[0], dtype=np.int64)
    for c, members in enumerate(communities):
        labels[list(members)] = c
    return merge_small_segments(labels, embeddings, params.min_patches)


def merge_small_segments(labels: np.ndarray, embeddings: torch.Tensor, min_size: int) -> np.ndarray:
    """Merge every segment smaller than ``min_size`` into the segment with the most similar
    mean embedding (smallest first, repeated); relabel consecutively. One segment stays as is."""
    labels = labels.copy()
    x = F.normalize(embeddings.float(), dim=1)
    while True:
        ids, counts = np.unique(labels, return_counts=True)
        if len(ids) <= 1 or counts.min() >= min_size:
            break
        small = ids[counts.argmin()]
        means = torch.stack([F.normalize(x[torch.from_numpy(labels == i)].mean(0), dim=0) for i in ids])
        sims = means @ means[list(ids).index(small)]
        sims[list(ids).index(small)] = -2
        labels[labels == small] = ids[int(sims.argmax())]
    _, labels = np.unique(labels, return_inverse=True)
    return labels.astype(np.int64)


def segment_crops(image: np.ndarray, segments: np.ndarray, crop_size: int) -> list:
    """Masked bounding-box crops of each segment, resized to ``crop_size`` square: list of (3, s, s) in [0, 1].

    ``image`` (H, W, 3) uint8; ``segments`` (H, W) ids. Pixels outside the segment take
    the image's mean colour (a neutral fill that carries no edge of its own).
    """
    fill = image.reshape(-1, 3).mean(0)
    crops = []
    for s in range(int(segments.max()) + 1):
        mask = segments == s
        if not mask.any():
            raise StegosegError(f"segment {s} is empty: segments must be numbered consecutively")
        ys, xs = np.nonzero(mask)
        y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
        crop = np.where(mask[y0:y1, x0:x1, None], image[y0:y1, x0:x1], fill).astype(np.uint8)
        crop = Image.fromarray(crop).resize((crop_size, crop_size), Image.BILINEAR)
        crops.append(torch.from_numpy(np.asarray(crop).copy()).permute(2, 0, 1).float() / 255)
    return crops


def paint(segments: np.ndarray, cluster_of_segment: np.ndarray) -> np.ndarray:
    """Pseudo label map: every pixel of segment s gets ``cluster_of_segment[s]``."""
    return np.asarray(cluster_of_segment)[segments]


def discover(backbone, image01: torch.Tensor, params: DatusParams, device="cpu") -> np.ndarray:
    """Pixel segment ids (H, W) of one image (3, H, W) in [0, 1]."""
    h, w = image01.shape[-2:]
    p = backbone.patch_size
    if h < p or w < p:
        raise StegosegError(f"image of {w}x{h} px is smaller than one {p}x{p} patch: use a larger --eval-resolution")
    feats = backbone.features(image01[None].to(device))[0]  # (C, gh, gw), padded grid (no gradients)
    gh, gw = feats.shape[-2:]
    labels = louvain_segments(feats.permute(1, 2, 0).reshape(gh * gw, -1).cpu(), params).reshape(gh, gw)
    up = np.repeat(np.repeat(labels, p, axis=0), p, axis=1)[:h, :w]
    _, up = np.unique(up, return_inverse=True)  # a segment can vanish in the cropped padding
    return up.reshape(h, w).astype(np.int64)


def run_datus(cfg, out, params: Optional[DatusParams] = None, split: Optional[str] = None,
              denoise: Optional[str] = None, denoise_epochs: int = 20) -> dict:
    """DatUS^2 on a dataset split (default: the config's val split): discovery, pseudo-labels,
    optional de-noising, evaluation (parity + strict). Writes metrics.json, confusion and
    prediction PNGs, config.yaml under ``out``."""

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    cfg.save(out / "config.yaml")
    params = params or DatusParams(seed=cfg.seed)
    device = resolve_device(cfg.device)
    ds = build_split(cfg, split or cfg.val_split, out)
    ds.transform = EvalTransform(resolution=cfg.eval_resolution, crop=cfg.eval_crop, image_resample=cfg.eval_resample)
    n_classes = n_classes_for(cfg, ds)
    k = params.n_clusters or n_classes
    backbone, _ = build_backbone_from_config(cfg, out)
    backbone.to(device)
    t0 = time.perf_counter()
    segs, embeds, owners = [], [], []
    for i in tqdm(range(len(ds) if cfg.max_eval_images is None else min(len(ds), cfg.max_eval_images)),
                  desc="DatUS discover", disable=not cfg.progress):
        sample = ds[i]
        seg = discover(backbone, sample["image"], params, device)
        crops = segment_crops(image_to_uint8(sample["image"]), seg, params.crop_size)
        with torch.no_grad():
            e = backbone.global_features(backbone.normalize(torch.stack(crops).to(device))).cpu()
        segs.append(seg)
        embeds.append(e)
        owners.extend([i] * len(crops))
    all_embeds = torch.cat(embeds)
    if all_embeds.shape[0] < k:
        raise StegosegError(
            f"only {all_embeds.shape[0]} segments were found but K = {k} clusters were asked for: "
            "use more images, a larger --louvain-resolution, or fewer clusters"
        )
    centroids = spherical_kmeans(lambda: [all_embeds], k, n_iter=50, seed=params.seed, device=device,
                                 progress=False, init_sample=all_embeds.shape[0])
    seg_cluster = (F.normalize(all_embeds.to(device), dim=1) @ centroids.T).argmax(1).cpu().numpy()
    pseudo, start = [], 0
    for seg in segs:
        n_seg = int(seg.max()) + 1
        pseudo.append(paint(seg, seg_cluster[start : start + n_seg]))
        start += n_seg
    discover_s = time.perf_counter() - t0
    preds = pseudo
    if denoise:
        preds = _denoise(denoise, backbone, ds, pseudo, k, device, denoise_epochs, cfg.seed)
    result = {"method": "datus2" + (f"+{denoise}" if denoise else ""), "n_images": len(pseudo),
              "n_segments": int(all_embeds.shape[0]), "n_clusters": k, "seconds_discovery": discover_s,
              "params": params.__dict__, "backbone": {"name": cfg.backbone,
              "weights_source": getattr(backbone, "weights_source", None)}}
    rows = []
    grid_at = set(np.linspace(0, len(preds) - 1, min(cfg.n_grid, len(preds))).round().astype(int).tolist())
    if ds.has_labels:
        acc = ConfusionAccumulator(k, n_classes)
        for i, pred in enumerate(preds):
            acc.update(torch.from_numpy(pred), ds[i]["label"])
        result["cluster"] = {m: acc.compute(m, ds.class_names) for m in ("parity", "strict")}
        strict = result["cluster"]["strict"]
        plot_confusion(strict, out / "confusion_cluster.png", title=f"DatUS^2 (strict) mIoU {strict['miou']:.1f}")
        mapping = np.asarray(strict["assignment"])
        remap = np.where(mapping >= 0, mapping, n_classes + np.arange(len(mapping)))
    else:
        remap = np.arange(k)
    for i in sorted(grid_at):
        s = ds[i]
        rows.append({"image": image_to_uint8(s["image"]),
                     "label": s["label"].numpy() if "label" in s else None,
                     "segments": segs[i] % 255, "cluster": remap[preds[i]]})
    palette = make_palette(max(int(remap.max()) + 1, int(max(r["segments"].max() for r in rows)) + 1))
    prediction_grid(rows, out / "predictions.png", palette, columns=("image", "label", "segments", "cluster"))
    save_metrics_json(result, out / "metrics.json")
    return result


def _denoise(kind, backbone, ds, pseudo, k, device, epochs, seed):
    """Train a segmentation network on the pseudo masks and return its predictions."""
    torch.manual_seed(seed)
    images = torch.stack([ds[i]["image"] for i in range(len(pseudo))])
    targets = torch.from_numpy(np.stack(pseudo)).long()
    if kind == "light":
        with torch.no_grad():
            feats = torch.cat([backbone.features(images[i : i + 8].to(device)).cpu() for i in range(0, len(images), 8)])
        net = torch.nn.Conv2d(feats.shape[1], k, 1).to(device)

        def forward(idx):
            return net(feats[idx].to(device))
    elif kind == "deeplabv3":
        from torchvision.models.segmentation import deeplabv3_resnet50

        net = deeplabv3_resnet50(weights=None, weights_backbone=None, num_classes=k).to(device)
        mean = torch.tensor(backbone.mean).view(1, 3, 1, 1)
        std = torch.tensor(backbone.std).view(1, 3, 1, 1)

        def forward(idx):
            return net(((images[idx] - mean) / std).to(device))["out"]
    else:
        raise StegosegError(f"unknown --denoise '{kind}': use light or deeplabv3")
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(seed)
    net.train()
    for _ in tqdm(range(epochs), desc=f"de-noise ({kind})", leave=False):
        for idx in torch.randperm(len(images), generator=g).split(4):
            if len(idx) < 2 and kind == "deeplabv3":
                continue  # batch norm needs two samples
            logits = F.interpolate(forward(idx), size=targets.shape[-2:], mode="bilinear", align_corners=False)
            loss = F.cross_entropy(logits, targets[idx].to(device))
            opt.zero_grad()
            loss.backward()
            opt.step()
    net.eval()
    preds = []
    with torch.no_grad():
        for i in range(len(images)):
            logits = F.interpolate(forward(torch.tensor([i])), size=targets.shape[-2:], mode="bilinear", align_corners=False)
            preds.append(logits.argmax(1)[0].cpu().numpy())
    return preds


def compare_runs(run_dirs, out_md=None) -> str:
    """A markdown table of headline metrics from several run folders' metrics.json
    (e.g. STEGO eval/, baseline/, DatUS^2)."""

    rows = []
    for d in run_dirs:
        p = Path(d) / "metrics.json"
        if not p.is_file():
            raise StegosegError(f"{p} not found: pass folders written by run/evaluate/baseline/datus")
        m = json.loads(p.read_text())
        rows.append({"run": str(Path(d)), "method": m.get("method", "?"), **summary_rows(m)})
    lines = [metrics_table(rows, (("run", "run"), ("method", "method")))]
    text = "\n".join(lines) + "\n"
    if out_md:
        Path(out_md).write_text(text)
    return text
