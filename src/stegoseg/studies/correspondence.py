"""Do feature correspondences predict label co-occurrence? (STEGO section 3.1, Fig. 2, Fig. 3, A.6)

STEGO rests on one observation: when two pixels' self-supervised features are similar,
the two pixels tend to carry the same label, within an image and across similar images.
This study measures that on a labelled dataset, for several *sources* of correspondence:

* ``features``: the cached backbone features, scored by cosine similarity;
* ``code``: a trained STEGO head's code (``--checkpoint``), cosine similarity;
* ``crf`` (or ``crf:SXY:SRGB``): the dense CRF's bilateral (colour + position) kernel
  ``k = exp(-|p_i - p_j|^2 / (2 sxy^2) - |I_i - I_j|^2 / (2 srgb^2))`` with the CRF's
  published parameters by default (sxy 67, srgb 3), computed at feature-grid resolution
  from the image averaged over each patch; positions are in pixels of the training
  crop, colours in 0..255. Between two images the kernel compares the same position and
  the colours there (scored as ``log k``: most pairs of different colours have ``k``
  below 1e-40 at srgb 3, where float32 ``k`` would underflow to ties).

Pixel pairs: for every studied image, ``n_samples x n_samples`` random points (uniform
coordinates in [-1, 1], bilinear sampling with ``align_corners=True``, as the loss
samples them) or, with ``full_grid``, every feature cell. Settings: ``self`` (all pairs
of distinct points of one image), ``knn`` (the image's points against independent points
of each of its ``knn_topk`` nearest neighbours from the feature cache) and optionally
``random`` (the same against as many random other images). A pair is positive when both
points' ground-truth classes are equal; pairs with an unlabelled point are skipped. Every
source scores the same pairs, so within a setting all sources share one positive rate.

Streaming: scores go into fixed-bin histograms (positives and negatives separately, 2000
bins by default), so memory does not grow with the number of images. Precision-recall
and average precision are computed from the histograms, treating each bin as one
threshold: this is exactly the AP of the scores rounded to the bin grid (pairs within a
bin count as ties), so it differs from the exact AP only through the order of pairs
inside a bin. Bins are uniform in a monotone transform of the score (which changes
neither PR nor AP, only where the bins fall): ``-log(1 + 1e-6 - s)`` for a cosine
similarity ``s`` and ``-log(1 - log k)`` for the kernel. Uniform bins over [-1, 1] were
not enough: randomly initialised ViT features and a collapsed STEGO code put a quarter of
all pairs within 0.001 of cosine 1 (binned AP 0.46 against exact 0.55 on CamVid); in the
transformed space a bin spans 0.7 % of ``1 - s`` (and of ``-log k``). The study keeps
the first ``exact_pairs`` pairs of every source and setting raw and reports their exact
(``average_precision_exact``) and binned AP side by side. AP follows scikit-learn's step
definition ``sum_k (R_k - R_{k-1}) P_k``; a score with no skill has AP equal to the
positive rate.

Outputs (``run_correspondence_study``): ``correspondence_pr.png``,
``correspondence_ap.json``, ``correspondence_ap.md``, ``correspondence_hist.npz``,
``correspondence_maps.png`` (paper Fig. 2: cosine similarity of query points to every
feature of the image and of its nearest neighbours), ``class_coupling.png`` and
``class_coupling.json`` (paper A.6: which ground-truth class pairs the strongest
image/neighbour couplings join), ``config.yaml``.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from stegoseg.data.base import IGNORE_INDEX
from stegoseg.errors import StegosegError, refuse_overwrite
from stegoseg.evaluation.crf import CRFParams
from stegoseg.studies.precision_recall import (  # noqa: F401 - importable from here, as before
    ScoreHistogram,
    average_precision_exact,
    pr_from_counts,
)

log = logging.getLogger("stegoseg")

SETTINGS = ("self", "knn", "random")
DEFAULT_SETTINGS = ("self", "knn")
COSINE_EPS = 1e-6
COSINE_BIN_RANGE = (-math.log(2 + COSINE_EPS), -math.log(COSINE_EPS))  # t = -log(1 + eps - s), s in [-1, 1]
KERNEL_BIN_RANGE = (-16.0, 0.0)  # t = -log(1 - log k): covers log k >= -8.9e6
CRF_SXY = CRFParams.bi_xy_std  # the published CRF's bilateral kernel
CRF_SRGB = CRFParams.bi_rgb_std
OUTPUTS = (
    "correspondence_pr.png", "correspondence_ap.json", "correspondence_ap.md", "correspondence_hist.npz",
    "correspondence_maps.png", "class_coupling.png", "class_coupling.json", "config.yaml",
)


# --------------------------------------------------------------------------- sources
@dataclass
class Source:
    """One source of correspondence: how to make descriptor maps and how to score them."""

    name: str
    kind: str  # "features" | "code" | "crf"
    sxy: float = CRF_SXY
    srgb: float = CRF_SRGB
    patch: float = 8.0  # crop pixels per feature cell (set from the cache)

    @property
    def metric(self) -> str:
        return "log_kernel" if self.kind == "crf" else "cosine"

    @property
    def bin_range(self) -> tuple:
        """Range of :meth:`to_bins` values that the histograms cover."""
        return KERNEL_BIN_RANGE if self.kind == "crf" else COSINE_BIN_RANGE

    def to_bins(self, x: torch.Tensor) -> torch.Tensor:
        """Monotone map of raw scores (cosine, or log k) to the space the bins are uniform in."""
        if self.kind == "crf":
            return -torch.log1p(-x.clamp(max=0.0))
        return -torch.log((1.0 + COSINE_EPS - x.double()).clamp(min=COSINE_EPS)).float()

    def from_bins(self, t) -> np.ndarray:
        """Inverse of :meth:`to_bins` (raw score units), for reporting bin edges."""
        t = np.asarray(t, dtype=np.float64)
        return 1.0 - np.exp(-t) if self.kind == "crf" else 1.0 + COSINE_EPS - np.exp(-t)

    @property
    def needs_images(self) -> bool:
        return self.kind == "crf"

    def maps(self, feats: torch.Tensor, rgb: Optional[torch.Tensor], model=None) -> torch.Tensor:
        """Descriptor maps (M, D, h, w) for features (M, C, h, w) and patch-averaged RGB
        (M, 3, h, w) in 0..255 (crf only)."""
        if self.kind == "features":
            return feats
        if self.kind == "code":
            with torch.no_grad():
                return model.code_from_features(feats).float()
        m, _, h, w = feats.shape
        return torch.cat([position_maps(m, h, w, self.patch, feats.device) / self.sxy, rgb / self.srgb], dim=1)

    def score(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """Scores of every point of ``a`` (..., D, P) against every point of ``b`` (..., D, Q)."""
        if self.kind == "crf":
            return self.log_kernel(a, b)
        a = F.normalize(a, dim=-2, eps=1e-10)
        b = F.normalize(b, dim=-2, eps=1e-10)
        return torch.einsum("...dp,...dq->...pq", a, b)


    @staticmethod
    def squared_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """|a_p - b_q|^2 (..., P, Q); centred first to limit float32 cancellation."""
        centre = a.mean(dim=-1, keepdim=True)
        a, b = a - centre, b - centre
        d2 = (a * a).sum(-2)[..., :, None] + (b * b).sum(-2)[..., None, :] - 2 * torch.einsum("...dp,...dq->...pq", a, b)
        return d2.clamp(min=0.0)

    def log_kernel(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """log k of the bilateral kernel between the points of two descriptor sets (crf only)."""
        return -0.5 * self.squared_distance(a, b)


def parse_source(text: str, has_checkpoint: bool) -> Source:
    """``features``, ``code`` (needs a checkpoint), ``crf`` or ``crf:SXY:SRGB``."""
    t = text.strip()
    if t == "features":
        return Source("features", "features")
    if t == "code":
        if not has_checkpoint:
            raise StegosegError("--sources code needs --checkpoint (a trained STEGO head)")
        return Source("code", "code")
    if t == "crf" or t.startswith("crf:"):
        parts = t.split(":")[1:]
        try:
            sxy, srgb = (float(parts[0]), float(parts[1])) if parts else (CRF_SXY, CRF_SRGB)
        except (ValueError, IndexError) as exc:
            raise StegosegError(f"--sources {t!r}: write crf or crf:SXY:SRGB, e.g. crf:67:3") from exc
        if len(parts) not in (0, 2) or sxy <= 0 or srgb <= 0:
            raise StegosegError(f"--sources {t!r}: write crf or crf:SXY:SRGB with positive numbers")
        return Source(f"crf(sxy={sxy:g},srgb={srgb:g})", "crf", sxy=sxy, srgb=srgb)
    raise StegosegError(f"unknown correspondence source {t!r}: use features, code, crf or crf:SXY:SRGB")


def position_maps(m: int, h: int, w: int, patch: float, device=None) -> torch.Tensor:
    """(m, 2, h, w): x and y of each feature cell's centre in crop pixels."""
    ys = (torch.arange(h, device=device, dtype=torch.float32) + 0.5) * patch
    xs = (torch.arange(w, device=device, dtype=torch.float32) + 0.5) * patch
    gy, gx = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack([gx, gy])[None].expand(m, 2, h, w)


# --------------------------------------------------------------------------- points
def grid_coords(m: int, h: int, w: int, device=None) -> torch.Tensor:
    """(m, h, w, 2) coordinates hitting every feature cell exactly (align_corners=True)."""
    ys = torch.linspace(-1, 1, h, device=device) if h > 1 else torch.zeros(1, device=device)
    xs = torch.linspace(-1, 1, w, device=device) if w > 1 else torch.zeros(1, device=device)
    gy, gx = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack([gx, gy], dim=-1)[None].expand(m, h, w, 2).contiguous()


def sample_flat(maps: torch.Tensor, coords: torch.Tensor) -> torch.Tensor:
    """Bilinear samples (M, D, P) of maps (M, D, h, w) at coords (M, n, n', 2)."""
    from stegoseg.losses.stego import sample_points

    s = sample_points(maps, coords)
    return s.reshape(s.shape[0], s.shape[1], -1)


def labels_at(labels: torch.Tensor, coords: torch.Tensor, grid: tuple) -> torch.Tensor:
    """Ground-truth class (M, P) at each point: the label pixel nearest the point.

    A coordinate in [-1, 1] addresses the feature grid (align_corners=True): cell
    position u = (x + 1) / 2 (w - 1), whose centre is pixel (u + 0.5) W / w - 0.5.
    """
    m, hh, ww = labels.shape
    h, w = grid
    x = ((coords[..., 0] + 1) / 2 * (w - 1) + 0.5) * (ww / w) - 0.5
    y = ((coords[..., 1] + 1) / 2 * (h - 1) + 0.5) * (hh / h) - 0.5
    px = x.round().long().clamp_(0, ww - 1)
    py = y.round().long().clamp_(0, hh - 1)
    idx = (py * ww + px).reshape(m, -1)
    return labels.reshape(m, -1).gather(1, idx.to(labels.device))


# --------------------------------------------------------------------------- the study
@dataclass
class StudyOptions:
    sources: Optional[Sequence[str]] = None  # default: features, code (with a checkpoint), crf
    settings: Sequence[str] = DEFAULT_SETTINGS
    n_images: int = 200
    full_grid: bool = False
    bins: int = 2000
    queries: object = 3  # int (evenly placed) or a list of (x, y) crop pixels
    map_image: int = 0
    map_neighbors: int = 3
    map_source: str = "features"
    threshold: Optional[float] = None  # coupling threshold; None: use top_fraction
    top_fraction: float = 0.01
    coupling_source: str = "features"
    coupling_bins: Optional[int] = None  # default: --bins, fewer when classes are many (memory)
    batch_size: Optional[int] = None  # source images per step (default: from the number of pairs)
    exact_pairs: int = 2_000_000  # per source and setting, the first pairs also kept raw: exact vs binned AP


class _PatchRGB:
    """Patch-averaged RGB (3, h, w) in 0..255 of cache items, decoded once and kept."""

    def __init__(self, view, grid: tuple):
        self.view, self.grid, self.store = view, grid, {}

    def __call__(self, items) -> torch.Tensor:
        out = []
        for i in np.asarray(items).tolist():
            if i not in self.store:
                image = self.view[i]["image"][None]
                self.store[i] = (F.adaptive_avg_pool2d(image, self.grid)[0] * 255).half()
            out.append(self.store[i].float())
        return torch.stack(out)


def _choose_items(n: int, n_images: int, seed: int) -> np.ndarray:
    if n_images <= 0 or n_images >= n:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, size=n_images, replace=False))


def _random_partners(items: np.ndarray, n: int, k: int, gen: torch.Generator) -> np.ndarray:
    """(len(items), k) random other items (never the item itself)."""
    r = torch.randint(0, n - 1, (len(items), k), generator=gen).numpy()
    return r + (r >= items[:, None])


def _evenly_placed(n: int, size: int) -> list:
    side = math.ceil(math.sqrt(n))
    pts = []
    for r in range(side):
        for c in range(side):
            pts.append((int((c + 0.5) / side * size), int((r + 0.5) / side * size)))
    return pts[:n]


def parse_queries(text) -> object:
    """``"3"`` -> 3 evenly placed points; ``"40,60;120,100"`` -> [(40, 60), (120, 100)] crop pixels."""
    if isinstance(text, (int, list, tuple)):
        return text
    t = str(text).strip()
    if t.isdigit():
        n = int(t)
        if n < 1:
            raise StegosegError("--queries must be >= 1 or a list of x,y pixel coordinates")
        return n
    pts = []
    for part in t.split(";"):
        try:
            x, y = (float(v) for v in part.split(","))
        except ValueError as exc:
            raise StegosegError(f"--queries {text!r}: give a count or pixel coordinates 'x,y;x,y'") from exc
        pts.append((x, y))
    return pts


def run_correspondence_study(cfg, out, checkpoint=None, sources=None, n_images: int = 200, **options) -> dict:
    """Measure how well correspondences predict label co-occurrence; write figures and tables to ``out``.

    ``cfg``: a :class:`stegoseg.config.Config` (dataset, backbone, crops, ``knn_topk``,
    ``n_samples``, ``seed``, device; with ``checkpoint``, its backbone is the one whose
    features are cached and studied). ``sources``: names as in :func:`parse_source`
    (default: features, code when a checkpoint is given, crf). Other options: the fields of
    :class:`StudyOptions`. Returns the content of ``correspondence_ap.json``.
    """
    from stegoseg.progress import progress_bar as tqdm

    from stegoseg.features.cache import CropView
    from stegoseg.methods.common import (
        build_backbone_from_config,
        build_split,
        prepare,
        resolve_device,
    )

    opts = StudyOptions(sources=sources, n_images=n_images, **options)
    out = Path(out)
    settings = list(dict.fromkeys(s.strip() for s in opts.settings if s.strip()))
    for s in settings:
        if s not in SETTINGS:
            raise StegosegError(f"unknown setting {s!r}: use {', '.join(SETTINGS)}")
    if not settings:
        raise StegosegError("--settings is empty: use self, knn and/or random")
    if opts.top_fraction is not None and not 0 < opts.top_fraction <= 1:
        raise StegosegError("--top-fraction must be in (0, 1]")
    if opts.map_neighbors < 0:
        raise StegosegError("--map-neighbors must be >= 0")
    queries = parse_queries(opts.queries)
    device = resolve_device(cfg.device)

    has_ckpt = checkpoint is not None
    names = list(opts.sources) if opts.sources else (["features"] + (["code"] if has_ckpt else []) + ["crf"])
    srcs = [parse_source(n, has_ckpt) for n in names]
    if len({s.name for s in srcs}) != len(srcs):
        raise StegosegError(f"--sources lists a source twice: {','.join(names)}")
    map_src = parse_source(opts.map_source, has_ckpt)
    if map_src.kind == "crf":
        raise StegosegError("--map-source must be features or code (cosine similarity maps)")
    cpl = parse_source(opts.coupling_source, has_ckpt)
    out.mkdir(parents=True, exist_ok=True)
    train = build_split(cfg, cfg.train_split, out)  # a bad --data-root fails before any work

    model = None
    if has_ckpt:
        from stegoseg.model import load

        model = load(checkpoint, device=device)
        backbone = model.backbone
    else:
        backbone, _ = build_backbone_from_config(cfg)
    cfg.save(out / "config.yaml")

    cache = prepare(cfg, out, backbone)
    if not cache.has_labels:
        raise StegosegError(
            f"the {cfg.train_split} split has no labels: the correspondence study compares with ground truth"
        )
    spec = cache.spec
    view = CropView(train, spec["resolution"], spec["five_crop"], spec.get("image_resample", "bilinear"))
    _, h, w = cache.meta["feature_shape"]
    patch = spec["resolution"] / w
    if not 0 <= opts.map_image < cache.n:
        raise StegosegError(f"--map-image {opts.map_image} is out of range: the cache has {cache.n} items")
    if not isinstance(queries, int):
        query_coords(queries, int(spec["resolution"]), (h, w))  # fails early on a point outside the crop
    for s in srcs:
        s.patch = patch
    class_names = list(cache.meta.get("class_names") or [])
    n_classes = len(class_names) or int(cfg.n_classes or 0)
    if n_classes < 1:
        raise StegosegError("the number of classes is unknown: pass --n-classes or --class-names")
    if not class_names:
        class_names = [f"class_{i}" for i in range(n_classes)]
    k = min(cfg.knn_topk, cache.n - 1)
    knn_all = cache.neighbors(cfg.n_neighbors, backend=cfg.knn_backend, device=device)
    knn = knn_all[:, :k]
    rgb = _PatchRGB(view, (h, w))
    items = _choose_items(cache.n, opts.n_images, cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)

    hists = {(s.name, st): ScoreHistogram(opts.bins, *s.bin_range) for s in srcs for st in settings}
    kept = {key: ([], [], [0]) for key in hists}  # raw scores, labels, count: the binning check
    cpl.patch = patch
    cpl_src = next((s for s in srcs if s.name == cpl.name), cpl)
    cpl_setting = "knn" if "knn" in settings else settings[0]
    # joint counts (class, class, score bin), at most ~2e7 counters (160 MB)
    n_cbins = opts.coupling_bins or int(max(100, min(opts.bins, 2e7 // (n_classes * n_classes))))
    cpl_hist = ScoreHistogram(n_cbins, *cpl_src.bin_range)  # for its bin grid
    joint = np.zeros(n_classes * n_classes * n_cbins, dtype=np.int64)
    all_srcs = srcs + ([] if any(s is cpl_src for s in srcs) else [cpl_src])

    n_pts = h * w if opts.full_grid else cfg.n_samples ** 2
    bs = opts.batch_size or int(max(1, min(16, 2e7 // (n_pts * n_pts * (k + 1)))))
    bar = tqdm(total=len(items), desc="correspondence pairs", unit="img", disable=not cfg.progress)
    with torch.no_grad():
        for start in range(0, len(items), bs):
            src = items[start : start + bs]
            b = len(src)
            partners = {}
            if "knn" in settings:
                partners["knn"] = knn[src]
            if "random" in settings:
                partners["random"] = _random_partners(src, cache.n, k, gen)
            needed = np.unique(np.concatenate([src] + [p.reshape(-1) for p in partners.values()]))
            where = {int(i): j for j, i in enumerate(needed)}
            feats = cache.feature_batch(needed).to(device)
            labels = cache.label_batch(needed).to(device)
            img = rgb(needed).to(device) if any(s.needs_images for s in all_srcs) else None

            def pos(idx):
                return torch.as_tensor([where[int(i)] for i in np.asarray(idx).reshape(-1)], device=device)

            if opts.full_grid:
                c_src = grid_coords(b, h, w, device)
            else:
                from stegoseg.losses.stego import random_coords

                c_src = random_coords(b, cfg.n_samples, generator=gen).to(device)
            lab_src = labels_at(labels[pos(src)], c_src, (h, w))  # (b, P)
            pair_coords = {}
            for st, p in partners.items():
                m = p.size
                if opts.full_grid:
                    c = grid_coords(m, h, w, device)
                else:
                    c = random_coords(m, cfg.n_samples, generator=gen).to(device)
                pair_coords[st] = (pos(p), c, labels_at(labels[pos(p)], c, (h, w)).reshape(b, k, -1))
            for s in all_srcs:
                maps = s.maps(feats, img, model)
                a = sample_flat(maps[pos(src)], c_src)  # (b, D, P)
                studied = any(s is t for t in srcs)
                for st in settings if studied else [cpl_setting]:
                    if st == "self":
                        scores = s.score(a, a)  # (b, P, P)
                        iu = torch.triu_indices(a.shape[-1], a.shape[-1], offset=1, device=device)
                        scores = scores[:, iu[0], iu[1]]
                        la, lb = lab_src[:, iu[0]], lab_src[:, iu[1]]
                    else:
                        pidx, c, lab_p = pair_coords[st]
                        bb = sample_flat(maps[pidx], c).reshape(b, k, maps.shape[1], -1)
                        scores = s.score(a[:, None], bb)  # (b, k, P, Q)
                        la = lab_src[:, None, :, None].expand_as(scores)
                        lb = lab_p[:, :, None, :].expand_as(scores)
                    valid = (la != IGNORE_INDEX) & (lb != IGNORE_INDEX) & (la < n_classes) & (lb < n_classes)
                    sv, la_v, lb_v = scores[valid], la[valid], lb[valid]
                    if studied:
                        hists[(s.name, st)].add(s.to_bins(sv), la_v == lb_v)
                        ks, ky, kn = kept[(s.name, st)]
                        if kn[0] < opts.exact_pairs:
                            take = min(sv.numel(), opts.exact_pairs - kn[0])
                            ks.append(sv[:take].float().cpu().numpy())
                            ky.append((la_v == lb_v)[:take].cpu().numpy())
                            kn[0] += take
                    if s is cpl_src and st == cpl_setting:
                        key = (la_v * n_classes + lb_v) * n_cbins + cpl_hist.bin_index(s.to_bins(sv))
                        joint += torch.bincount(key, minlength=joint.size).cpu().numpy()
            bar.update(b)
    bar.close()

    results = []
    for (name, st), hist in hists.items():
        ks, ky, kn = kept[(name, st)]
        check = None
        if kn[0]:
            ks, ky = np.concatenate(ks), np.concatenate(ky)
            sub = ScoreHistogram(hist.bins, hist.lo, hist.hi)
            sub.add(next(s for s in srcs if s.name == name).to_bins(torch.from_numpy(ks)), torch.from_numpy(ky))
            check = {"n_pairs": int(kn[0]), "ap_exact": _num(average_precision_exact(ks, ky)),
                     "ap_binned": _num(sub.average_precision())}
        results.append({
            "source": name, "setting": st, "ap": _num(hist.average_precision()), "positive_rate": _num(hist.positive_rate),
            "n_pairs": hist.n, "n_positive": hist.n_pos,
            "metric": next(s.metric for s in srcs if s.name == name),
            "binning_check": check,
        })
    random_backbone = getattr(backbone, "weights_source", "random") == "random"
    summary = {
        "results": results,
        "sources": [s.name for s in srcs],
        "settings": settings,
        "n_images": int(len(items)),
        "n_cache_items": int(cache.n),
        "points": "full feature grid" if opts.full_grid else f"{cfg.n_samples}x{cfg.n_samples} random",
        "knn_topk": int(k),
        "bins": opts.bins,
        "feature_grid": [h, w],
        "backbone": {"name": backbone.name, "weights_source": getattr(backbone, "weights_source", None),
                     "randomly_initialised": bool(random_backbone)},
        "checkpoint": str(checkpoint) if checkpoint else None,
        "dataset": {"name": cfg.dataset, "root": cfg.data_root, "split": cfg.train_split},
        "notes": (
            f"AP and PR from {opts.bins}-bin histograms (pairs inside one bin count as ties), bins uniform in "
            "-log(1 + 1e-6 - s) for cosine similarity s and in -log(1 - log k) for the CRF kernel k (monotone: "
            "AP unchanged, only the bin placement). All sources score the same pairs."
        ),
    }
    np.savez_compressed(
        out / "correspondence_hist.npz",
        **{f"{name}|{st}|pos": h_.pos for (name, st), h_ in hists.items()},
        **{f"{name}|{st}|neg": h_.neg for (name, st), h_ in hists.items()},
        **{f"{name}|{st}|edges": h_.edges for (name, st), h_ in hists.items()},
    )
    _write_ap_markdown(out / "correspondence_ap.md", summary)
    plot_pr_curves(hists, settings, out / "correspondence_pr.png", title=_title(summary))

    coupling = coupling_from_joint(
        joint.reshape(n_classes, n_classes, n_cbins), cpl_src.from_bins(cpl_hist.edges), class_names,
        threshold=opts.threshold, top_fraction=opts.top_fraction,
    )
    coupling.update({"source": cpl_src.name, "setting": cpl_setting, "metric": cpl_src.metric,
                     "randomly_initialised_backbone": bool(random_backbone)})
    (out / "class_coupling.json").write_text(json.dumps(coupling, indent=2))
    plot_coupling(coupling, out / "class_coupling.png")
    summary["coupling"] = {k_: coupling[k_] for k_ in ("source", "setting", "threshold", "fraction_of_pairs",
                                                        "same_class_share", "same_class_share_all_pairs")}
    (out / "correspondence_ap.json").write_text(json.dumps(summary, indent=2))

    correspondence_maps(
        cache, view, knn_all, map_src, opts.map_image, queries, opts.map_neighbors,
        out / "correspondence_maps.png", model=model, device=device,
    )
    return summary


def _num(x: float) -> Optional[float]:
    """NaN (no pairs / no positives) as None, so the JSON stays valid."""
    return None if x is None or not math.isfinite(x) else float(x)


def _fmt(x: Optional[float], digits: int = 3) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def _title(summary: dict) -> str:
    bb = summary["backbone"]
    tag = " (RANDOMLY INITIALISED)" if bb["randomly_initialised"] else ""
    return f"{bb['name']}{tag}, {summary['n_images']} images, {summary['points']} points"


def _write_ap_markdown(path: Path, summary: dict) -> None:
    lines = [
        f"Backbone `{summary['backbone']['name']}`"
        + (" — **randomly initialised**" if summary["backbone"]["randomly_initialised"] else "")
        + f"; {summary['n_images']} images of `{summary['dataset']['split']}`; points: {summary['points']}; "
        f"KNN partners: {summary['knn_topk']}.",
        "",
        "| source | setting | AP | positive rate | AP / positive rate | pairs |",
        "|---|---|---|---|---|---|",
    ]
    for r in summary["results"]:
        lift = r["ap"] / r["positive_rate"] if r["ap"] is not None and r["positive_rate"] else None
        lines.append(
            f"| {r['source']} | {r['setting']} | {_fmt(r['ap'])} | {_fmt(r['positive_rate'])} | {_fmt(lift, 2)} "
            f"| {r['n_pairs']:,} |"
        )
    checks = [r for r in summary["results"] if r.get("binning_check")]
    if checks:
        lines += [
            "", "Binning check: exact AP of the first pairs (raw scores) against the histogram AP of the same pairs.",
            "", "| source | setting | pairs | exact AP | binned AP |", "|---|---|---|---|---|",
        ]
        for r in checks:
            c = r["binning_check"]
            lines.append(f"| {r['source']} | {r['setting']} | {c['n_pairs']:,} | {_fmt(c['ap_exact'], 4)} "
                         f"| {_fmt(c['ap_binned'], 4)} |")
    lines += ["", summary["notes"], ""]
    path.write_text("\n".join(lines))


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_pr_curves(hists: dict, settings: Sequence[str], path, title: str = "") -> None:
    """One panel per setting, one curve per source (legend with AP), chance level dashed."""
    plt = _plt()
    fig, axes = plt.subplots(1, len(settings), figsize=(4.2 * len(settings), 3.8), squeeze=False)
    for ax, st in zip(axes[0], settings):
        rate = None
        for (name, s), hist in hists.items():
            if s != st:
                continue
            precision, recall, _ = hist.pr_curve()
            ax.plot(np.concatenate([[0.0], recall]), np.concatenate([[precision[0] if len(precision) else 1.0], precision]),
                    label=f"{name} (AP {hist.average_precision():.3f})")
            rate = hist.positive_rate
        if rate is not None:
            ax.axhline(rate, ls="--", c="grey", lw=1, label=f"chance ({rate:.3f})")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1.02)
        ax.set_xlabel("recall")
        ax.set_ylabel("precision")
        ax.set_title({"self": "within an image", "knn": "image vs its nearest neighbours",
                      "random": "image vs random images"}[st], fontsize=10)
        ax.legend(fontsize=7, loc="lower left")
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


# --------------------------------------------------------------------------- class coupling (A.6)
def coupling_from_joint(joint: np.ndarray, edges: np.ndarray, class_names: Sequence[str],
                        threshold: Optional[float] = None, top_fraction: Optional[float] = 0.01) -> dict:
    """Class x class coupling matrices from joint counts (classes, classes, bins).

    ``edges``: the bins' edges in score units (increasing, possibly non-uniform). With
    ``threshold``: pairs in bins whose lower edge is >= the threshold moved to the
    nearest bin edge. Otherwise the top ``top_fraction`` of pairs: whole bins from
    the top until at least that fraction is reached (the achieved fraction is reported).
    Rows are normalised (a row of zeros stays zeros).
    """
    per_bin = joint.sum(axis=(0, 1))
    total = int(per_bin.sum())
    lower = edges[:-1]
    if threshold is not None:
        first = int(np.argmin(np.abs(lower - threshold)))
    else:
        tail = np.cumsum(per_bin[::-1])
        need = top_fraction * total
        hit = np.flatnonzero(tail >= need)
        first = len(lower) - 1 - (int(hit[0]) if len(hit) else len(lower) - 1)
    counts = joint[:, :, first:].sum(axis=2)
    all_counts = joint.sum(axis=2)
    coupled = int(counts.sum())

    def rownorm(c):
        s = c.sum(axis=1, keepdims=True).astype(np.float64)
        return np.divide(c, s, out=np.zeros(c.shape, dtype=np.float64), where=s > 0)

    matrix = rownorm(counts)
    off = [(matrix[i, j], i, j) for i in range(len(matrix)) for j in range(len(matrix)) if i != j and matrix[i, j] > 0]
    off.sort(reverse=True)
    return {
        "class_names": list(class_names),
        "threshold": float(lower[first]),
        "requested_threshold": threshold,
        "requested_top_fraction": None if threshold is not None else top_fraction,
        "fraction_of_pairs": coupled / total if total else 0.0,
        "n_pairs": total,
        "n_pairs_coupled": coupled,
        "same_class_share": float(np.trace(counts) / coupled) if coupled else None,
        "same_class_share_all_pairs": float(np.trace(all_counts) / total) if total else None,
        "matrix": matrix.tolist(),
        "counts": counts.tolist(),
        "all_pairs_matrix": rownorm(all_counts).tolist(),
        "all_pairs_counts": all_counts.tolist(),
        "top_confusions": [
            {"class": class_names[i], "coupled_with": class_names[j], "share": float(v)} for v, i, j in off[:10]
        ],
    }


def plot_coupling(coupling: dict, path) -> None:
    """Row-normalised class-pair matrices: strongest couplings, and all pairs for reference."""
    plt = _plt()
    names = coupling["class_names"]
    n = len(names)
    size = max(3.6, 0.36 * n + 1.6)
    fig, axes = plt.subplots(1, 2, figsize=(2 * size + 1.6, size), constrained_layout=True)
    panels = (
        (coupling["matrix"], f"strongest couplings ({coupling['metric']} >= {coupling['threshold']:.3g}, "
                             f"{100 * coupling['fraction_of_pairs']:.2g}% of pairs)"),
        (coupling["all_pairs_matrix"], "all pairs (reference)"),
    )
    for ax, (m, title) in zip(axes, panels):
        m = np.asarray(m)
        im = ax.imshow(m, vmin=0, vmax=1, cmap="viridis")
        ax.set_xticks(range(n))
        ax.set_yticks(range(n))
        ax.set_xticklabels(names, rotation=90, fontsize=7)
        ax.set_yticklabels(names, fontsize=7)
        ax.set_xlabel(f"class of the coupled pixel ({'neighbour' if coupling['setting'] != 'self' else 'same image'})",
                      fontsize=8)
        ax.set_ylabel("class of the source pixel", fontsize=8)
        ax.set_title(title, fontsize=8)
        if n <= 15:
            for i in range(n):
                for j in range(n):
                    if m[i, j] >= 0.005:
                        ax.text(j, i, f"{m[i, j]:.2f}", ha="center", va="center", fontsize=5,
                                color="white" if m[i, j] < 0.5 else "black")
    fig.colorbar(im, ax=list(axes), shrink=0.8)
    tag = " — RANDOMLY INITIALISED backbone" if coupling.get("randomly_initialised_backbone") else ""
    fig.suptitle(f"class coupling, {coupling['source']}, {coupling['setting']} pairs{tag}", fontsize=9)
    fig.savefig(path, dpi=90, bbox_inches="tight")
    plt.close(fig)


# --------------------------------------------------------------------------- correspondence maps (Fig. 2)
def query_coords(points: Sequence, size: int, grid: tuple) -> torch.Tensor:
    """(n, 2) grid_sample coordinates of pixel points (x, y) of a ``size`` px square crop."""
    h, w = grid
    out = []
    for x, y in points:
        if not (0 <= x < size and 0 <= y < size):
            raise StegosegError(f"--queries point ({x:g}, {y:g}) lies outside the {size}x{size} training crop")
        u = (x + 0.5) / (size / w) - 0.5
        v = (y + 0.5) / (size / h) - 0.5
        out.append((float(np.clip(u / max(w - 1, 1) * 2 - 1, -1, 1)), float(np.clip(v / max(h - 1, 1) * 2 - 1, -1, 1))))
    return torch.tensor(out, dtype=torch.float32)


def correspondence_maps(cache, view, knn, source: Source, item: int, queries, n_neighbors: int, path,
                        model=None, device="cpu") -> None:
    """Rows: queries; columns: the image with the query marked, the cosine similarity of the
    query's descriptor to every cell of the image, then of each of ``n_neighbors`` nearest
    neighbours (heat maps overlaid on the images)."""
    from matplotlib import colormaps

    plt = _plt()
    if not 0 <= item < cache.n:
        raise StegosegError(f"--map-image {item} is out of range: the cache has {cache.n} items (0..{cache.n - 1})")
    size = int(cache.spec["resolution"])
    _, h, w = cache.meta["feature_shape"]
    points = _evenly_placed(queries, size) if isinstance(queries, int) else list(queries)
    coords = query_coords(points, size, (h, w))
    neigh = [int(j) for j in knn[item][: max(0, n_neighbors)]]
    shown = [item] + neigh
    with torch.no_grad():
        maps = source.maps(cache.feature_batch(shown).to(device), None, model).float()
        maps = F.normalize(maps, dim=1, eps=1e-10)
        q = F.grid_sample(maps[:1], coords.to(device)[None, :, None], mode="bilinear", align_corners=True)[0, :, :, 0]
        q = F.normalize(q, dim=0, eps=1e-10)  # (D, n_queries)
        sims = torch.einsum("dq,mdhw->qmhw", q, maps)
        sims = F.interpolate(sims, size=(size, size), mode="bilinear", align_corners=False).cpu().numpy()
    images = [view[i]["image"].permute(1, 2, 0).numpy() for i in shown]
    ids = cache.ids
    ncol = 1 + len(shown)
    fig, axes = plt.subplots(len(points), ncol, figsize=(2.3 * ncol, 2.4 * len(points)), squeeze=False)
    cmap = colormaps["inferno"]
    for r, (x, y) in enumerate(points):
        lo, hi = float(sims[r].min()), float(sims[r].max())
        axes[r][0].imshow(images[0])
        _mark(axes[r][0], x, y, 14)
        axes[r][0].set_title(f"query ({x:.0f}, {y:.0f})" if r else f"{ids[item]}\nquery ({x:.0f}, {y:.0f})", fontsize=7)
        for c, img in enumerate(images):
            ax = axes[r][c + 1]
            heat = cmap((sims[r, c] - lo) / max(hi - lo, 1e-8))[..., :3]
            ax.imshow(0.35 * img + 0.65 * heat)
            if c == 0:
                _mark(ax, x, y, 10)
            label = "same image" if c == 0 else f"neighbour {c}"
            ax.set_title(f"{label}\ncos {lo:.2f}..{hi:.2f}" if r == 0 else f"cos {lo:.2f}..{hi:.2f}", fontsize=7)
        for ax in axes[r]:
            ax.axis("off")
    fig.suptitle(f"cosine similarity of the query's {source.name} to every feature (colour scale per row)", fontsize=9)
    fig.tight_layout()
    _save_quantised(fig, path, dpi=80)
    plt.close(fig)


def _mark(ax, x, y, size) -> None:
    ax.plot([x], [y], marker="+", color="black", ms=size + 3, mew=4.5)
    ax.plot([x], [y], marker="+", color="cyan", ms=size, mew=2)


def _save_quantised(fig, path, dpi: int) -> None:
    """Save a figure as a 256-colour palette PNG (photos + heat maps: a few times smaller)."""
    import io

    from PIL import Image

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    buf.seek(0)
    Image.open(buf).convert("RGB").quantize(colors=256, method=Image.Quantize.FASTOCTREE).save(path, optimize=True)


# --------------------------------------------------------------------------- command line


def cmd_study_correspondence(args) -> int:
    from stegoseg.config.stego import resolve_config

    if args.checkpoint:
        from stegoseg.methods.common import config_for_checkpoint
        from stegoseg.model import load

        cfg = config_for_checkpoint(load(args.checkpoint, device="cpu"), args)
    else:
        cfg = resolve_config(args)
    out = Path(args.out)
    refuse_overwrite(out, "correspondence_ap.json", args.overwrite)
    summary = run_correspondence_study(
        cfg, out, checkpoint=args.checkpoint,
        sources=[s for s in args.sources.split(",") if s.strip()] if args.sources else None,
        n_images=args.n_images, settings=[s for s in args.settings.split(",") if s.strip()],
        full_grid=args.full_grid, bins=args.bins, queries=parse_queries(args.queries), map_image=args.map_image,
        map_neighbors=args.map_neighbors, map_source=args.map_source, threshold=args.threshold,
        top_fraction=args.top_fraction, coupling_source=args.coupling_source, exact_pairs=args.exact_pairs,
    )
    print("| source | setting | AP | positive rate |\n|---|---|---|---|")
    for r in summary["results"]:
        print(f"| {r['source']} | {r['setting']} | {_fmt(r['ap'])} | {_fmt(r['positive_rate'])} |")
    c = summary["coupling"]
    print(f"class coupling: top {100 * c['fraction_of_pairs']:.2g}% of pairs, same class {_fmt(c['same_class_share'])} "
          f"(all pairs {_fmt(c['same_class_share_all_pairs'])})")
    print(f"outputs: {out}")
    return 0


def add_cli(subparsers) -> argparse.ArgumentParser:
    """Register ``study-correspondence`` on an argparse sub-parsers object; returns its parser."""
    from stegoseg.config.stego import add_config_arguments

    p = subparsers.add_parser(
        "study-correspondence",
        help="do feature correspondences predict label co-occurrence? PR/AP, correspondence maps, class coupling",
        description="STEGO section 3.1 / Fig. 2-3 / A.6 on a labelled training split: precision-recall of "
        "'same ground-truth class' predicted by feature (or code, or CRF-kernel) correspondences of pixel pairs "
        "within images and between images and their nearest neighbours; correspondence heat maps; which classes "
        "the strongest couplings join. Writes " + ", ".join(OUTPUTS) + " under --out.",
    )
    p.add_argument("--out", default="runs/study-correspondence", help="output folder")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier study's outputs in --out")
    p.add_argument("--checkpoint", default=None,
                   help="a STEGO checkpoint: adds the 'code' source; its backbone and config are used")
    p.add_argument("--sources", default=None,
                   help="comma-separated: features, code (needs --checkpoint), crf or crf:SXY:SRGB "
                        "(default: features[,code],crf)")
    p.add_argument("--settings", default=",".join(DEFAULT_SETTINGS), help="comma-separated: self, knn, random")
    p.add_argument("--n-images", type=int, default=200, help="training items studied, drawn with --seed (0: all)")
    p.add_argument("--full-grid", action="store_true",
                   help="score every feature cell instead of --n-samples x --n-samples random points per image")
    p.add_argument("--bins", type=int, default=2000, help="histogram bins for PR / AP (default 2000)")
    p.add_argument("--queries", default="3",
                   help="correspondence maps: N evenly placed query points, or 'x,y;x,y' pixels of the training crop")
    p.add_argument("--map-image", type=int, default=0, help="cache item shown in the correspondence maps")
    p.add_argument("--map-neighbors", type=int, default=3, help="nearest neighbours shown in the maps")
    p.add_argument("--map-source", default="features", help="features or code")
    p.add_argument("--threshold", type=float, default=None,
                   help="class coupling: score threshold, cosine (log k for crf); default: the top --top-fraction of pairs")
    p.add_argument("--top-fraction", type=float, default=0.01, help="class coupling: fraction of strongest pairs")
    p.add_argument("--coupling-source", default="features", help="source for the class coupling (features, code, crf)")
    p.add_argument("--exact-pairs", type=int, default=2_000_000,
                   help="per source and setting, keep this many pairs raw to compare exact and binned AP (0: off)")
    add_config_arguments(p)
    p.set_defaults(func=cmd_study_correspondence)
    return p


__all__ = [
    "ScoreHistogram", "average_precision_exact", "pr_from_counts", "Source", "parse_source", "parse_queries",
    "run_correspondence_study", "coupling_from_joint", "correspondence_maps", "add_cli", "cmd_study_correspondence",
]
