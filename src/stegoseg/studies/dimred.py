"""STEGO's head read as dimensionality reduction (Koenig, Schambach, Otterbach, CVPR-W 2023).

STEGO maps C-dimensional backbone features to a K-dimensional code. This study asks how
much of its gain a plain linear dimensionality reduction to the same K gives. On the
same cached training features it compares, for each target dimension d (swept from the
backbone width C down to a few components):

* **PCA**: the top-d principal components of the training patch features, from a
  covariance streamed over the feature cache in float64 (exact, one pass, memory C x C);
* **RP**: Gaussian random projection, a seeded d x C matrix with N(0, 1/d) entries (the
  distribution of scikit-learn's ``GaussianRandomProjection``), no centring;
* **STEGO** trained with ``dim = d`` (optional: it costs a training run per d);

each read out by the same probes as the "backbone only" baseline
(:func:`stegoseg.methods.baseline.fit_feature_baseline`): spherical k-means cluster probe and
linear probe, fitted on the projected training features, and evaluated with the
project's protocol (:func:`stegoseg.methods.common.evaluate_checkpoint_model`: parity and
strict counting, flip, CRF as configured). PCA and RP are fixed linear heads
(:class:`ProjectionHead`), so each result is an ordinary
:class:`~stegoseg.model.SegmentationModel` that can be saved, loaded and used to segment.

Outputs under ``out``: ``dimred_table.{json,md}`` (one row per method x dimension, plus
the backbone-only row), ``dimred_metrics.png`` (metrics against the number of
components, log x), ``explained_variance.{json,png}`` (cumulative explained variance of
the features' principal components), ``koenig_table1.{json,md}`` (rows backbone only /
STEGO; columns cluster and linear accuracy and mIoU, shaped like Koenig et al.'s Table 1)
and one folder per model with its evaluation outputs.

All models are evaluated on the same backbone, whose features for each evaluation batch
are computed once and reused (:class:`SharedFeatures`); the protocol is unchanged.
"""
from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch.nn as nn

from stegoseg.config.stego import Config, add_config_arguments, replace, resolve_config
from stegoseg.errors import StegosegError, refuse_overwrite
from stegoseg.evaluation.protocol import summary_rows
from stegoseg.methods.baseline import fit_feature_baseline
from stegoseg.methods.common import (
    RANDOM_BACKBONE_WARNING,
    build_backbone_from_config,
    build_split,
    evaluate_checkpoint_model,
    fit_probes,
    n_classes_for,
    prepare,
    resolve_device,
    resolve_run_paths,
)
from stegoseg.methods.stego import train_stego
from stegoseg.reporting.tables import METRIC_COLUMNS, fmt, markdown_table
from stegoseg.studies.pca import PCAResult, fit_pca, random_projection_head, streamed_pca  # noqa: F401 - API
from stegoseg.studies.shared_features import (  # noqa: F401 - part of this module's API
    SharedFeatures,
    load_with_backbone,
    same_weights,
    unwrap_backbone,
)

log = logging.getLogger("stegoseg")


DEFAULT_DIMS = ("C", 128, 64, 32, 16, 8, 4, 2)


PROJECTIONS = ("pca", "rp")


METHOD_LABELS = {
    "backbone": "backbone only",
    "pca": "PCA",
    "rp": "random projection",
    "stego": "STEGO",
}


METRIC_KEYS = (
    "cluster_strict_acc", "cluster_strict_miou", "cluster_parity_acc", "cluster_parity_miou", "linear_acc", "linear_miou",
)


def save_model(model, path) -> Path:
    """Save a model whose backbone may be wrapped in :class:`SharedFeatures`."""
    wrapped = model.backbone
    model.backbone = unwrap_backbone(wrapped)
    try:
        return model.save(path)
    finally:
        model.backbone = wrapped


# --------------------------------------------------------------------------- probes on a head
def fit_probes_with_head(cfg: Config, cache, head: nn.Module, backbone, n_classes: int, class_names=None,
                         method: str = "projection"):
    """Cluster and linear probes fitted on ``head(features)`` of the cached training features:
    :func:`stegoseg.methods.common.fit_probes`, the raw-feature baseline's recipe, with a head (with an
    identity head it gives that baseline's probes exactly)."""

    return fit_probes(cfg, cache, backbone, n_classes, class_names=class_names, head=head, method=method)


# --------------------------------------------------------------------------- the study
def parse_dims(text) -> list:
    """``"384,64,8"`` or a sequence; ``C`` / ``full`` stand for the backbone width."""
    items = text.split(",") if isinstance(text, str) else list(text)
    dims = []
    for item in items:
        item = str(item).strip()
        if not item:
            continue
        if item.lower() in ("c", "full"):
            dims.append("C")
            continue
        try:
            value = int(item)
        except ValueError:
            raise StegosegError(f"--dims: {item!r} is not a whole number (or C for the backbone width)") from None
        if value < 1:
            raise StegosegError(f"--dims: {value} must be >= 1")
        dims.append(value)
    if not dims:
        raise StegosegError("--dims: give at least one dimension, e.g. --dims 384,64,8")
    return dims


def resolve_dims(dims, width: int) -> list:
    """Concrete dimensions, largest first, each clipped to the backbone width, no repeats."""
    out = []
    for d in parse_dims(dims if dims is not None else DEFAULT_DIMS):
        value = width if d == "C" else int(d)
        if value > width:
            log.warning("dimension %d is above the backbone width %d: using %d", value, width, width)
            value = width
        if value not in out:
            out.append(value)
    return sorted(out, reverse=True)


def _row(method: str, dim: int, result: dict, seconds: float, out_dir: Path, root: Path) -> dict:

    summary = summary_rows(result)
    row = {"method": method, "label": METHOD_LABELS.get(method, method), "dim": int(dim)}
    row.update({k: (float(summary[k]) if k in summary else None) for k in METRIC_KEYS})
    row["n_images"] = result.get("n_images")
    row["fit_seconds"] = round(seconds, 2)
    row["eval_seconds"] = round(float(result.get("seconds", 0.0)), 2)
    row["outputs"] = str(Path(out_dir).relative_to(root)) if Path(out_dir).is_relative_to(root) else str(out_dir)
    return row




# Config fields that only STEGO training reads: a backbone-only or projection row does not depend on them.
TRAINING_ONLY_FIELDS = (
    "dim", "steps", "lr", "feature_dropout", "n_samples", "n_random", "knn_topk", "n_neighbors", "knn_backend",
    "pointwise", "zero_clamp", "stabilize", "w_self", "w_knn", "w_rand", "b_self", "b_knn", "b_rand",
    "ckpt_every", "log_every", "live_backbone", "precision", "accelerator", "devices", "strategy", "num_nodes",
)


# Fields that change how fast, not what, a run computes.
RUNTIME_FIELDS = ("progress", "num_workers", "crf_workers")


def row_key(cfg_values: dict, method: str, dim: int) -> dict:
    """The config values a study row depends on (used to decide whether an earlier row can be reused)."""
    # the row's own method names it (the config's ``method`` field is the training method: STEGO here)
    key = {k: v for k, v in cfg_values.items() if k not in RUNTIME_FIELDS and k != "method"}
    if method == "stego":
        key["dim"] = int(dim)
    else:
        key = {k: v for k, v in key.items() if k not in TRAINING_ONLY_FIELDS}
    return {"method": method, "dim": int(dim), **key}


def _earlier_rows(out: Path) -> dict:
    """Rows of an earlier study in ``out``, by their :func:`row_key` (as JSON text)."""
    import yaml

    table, config = out / "dimred_table.json", out / "config.yaml"
    if not (table.exists() and config.exists()):
        return {}
    earlier = yaml.safe_load(config.read_text()) or {}
    found = {}
    for row in json.loads(table.read_text()).get("rows", []):
        if not (out / row["outputs"] / "metrics.json").exists():
            continue
        if row["method"] == "stego" and not (out / row.get("checkpoint", "-")).exists():
            continue
        found[json.dumps(row_key(earlier, row["method"], row["dim"]), sort_keys=True, default=str)] = row
    return found


def run_dimred_study(
    cfg: Config,
    out,
    dims=None,
    methods: Sequence[str] = PROJECTIONS,
    with_stego: bool = True,
    stego_dims=None,
    table1: bool = True,
    save_checkpoints: bool = False,
    resume: bool = False,
) -> dict:
    """Run the dimensionality-reduction study into ``out`` (see the module docstring).

    ``dims``: target dimensions (default C, 128, 64, 32, 16, 8, 4, 2, clipped to <= C;
    ``"C"`` = the backbone width). ``methods``: among ``pca``, ``rp``. ``with_stego``:
    also train STEGO with ``dim = d`` for each d of ``stego_dims`` (default: ``dims``).
    ``table1``: write the Koenig-style table (backbone only vs STEGO with ``cfg.dim``,
    trained if not in the sweep and ``with_stego``). The tables are rewritten after every
    model, so an interrupted study leaves the rows it finished; with ``resume`` a row of an
    earlier study in ``out`` is reused when every config value it depends on is the same
    (:func:`row_key`: projection rows ignore STEGO's training options). Returns {"rows", "table1",
    "explained_variance", "dims", "meta"}.
    """

    methods = [m.strip().lower() for m in methods if m.strip()]
    for m in methods:
        if m not in PROJECTIONS:
            raise StegosegError(f"--methods: unknown method {m!r}; choose from {', '.join(PROJECTIONS)}")
    out = Path(out)
    cfg = resolve_run_paths(cfg, out)
    earlier = _earlier_rows(out) if resume else {}
    cfg.save(out / "config.yaml")
    random_backbone = not cfg.pretrained and not cfg.weights
    device = resolve_device(cfg.device)
    t_start = time.perf_counter()

    backbone, _ = build_backbone_from_config(cfg)  # (no --pca-dim: the backbone's own features)
    cache = prepare(cfg, out, backbone)
    train = build_split(cfg, cfg.train_split, out)
    n_classes = n_classes_for(cfg, train)
    class_names = train.class_names if train.has_labels else None
    width = int(cache.meta["feature_shape"][0])
    dims = resolve_dims(dims, width)
    stego_dims = resolve_dims(stego_dims, width) if (with_stego and stego_dims is not None) else (dims if with_stego else [])
    shared = SharedFeatures(backbone)
    rows: list = []

    def reuse(method: str, dim: int) -> Optional[dict]:
        row = earlier.get(json.dumps(row_key(cfg.to_dict(), method, dim), sort_keys=True, default=str))
        if row is not None:
            rows.append(dict(row, reused=True))
            log.info("%s d=%d: reusing the earlier result in %s", method, dim, out / row["outputs"])
        return row

    def evaluate(model, name: str, method: str, dim: int, fit_seconds: float, **extra) -> dict:
        folder = out / name
        model.backbone = shared
        if save_checkpoints:
            save_model(model, folder / "checkpoint.pt")
        result = evaluate_checkpoint_model(cfg, model, folder)
        row = dict(_row(method, dim, result, fit_seconds, folder, out), **extra)
        rows.append(row)
        log.info("%s d=%d: %s", method, dim, ", ".join(f"{k} {fmt(row[k])}" for k in METRIC_KEYS))
        write_dimred_table(rows, ev, out, meta())
        return row

    def meta() -> dict:
        info = {
            "dataset": cfg.dataset, "data_root": cfg.data_root, "backbone": cfg.backbone,
            "random_backbone": random_backbone, "width": width, "n_train_items": cache.n,
            "patch_vectors": pca.n_samples, "dims": dims, "stego_dims": stego_dims, "steps": cfg.steps,
            "crf": cfg.crf, "max_eval_images": cfg.max_eval_images, "five_crop": cfg.five_crop,
            "feature_memo": {"hits": shared.hits, "misses": shared.misses},
            "seconds": round(time.perf_counter() - t_start, 1),
        }
        if random_backbone:
            info["warning"] = RANDOM_BACKBONE_WARNING.format(name=cfg.backbone)
        return info

    # PCA of the training features: the explained-variance curve and the PCA heads.
    t0 = time.perf_counter()
    pca = fit_pca(cache, batch_size=max(8, cfg.batch_size), device=device)
    pca_seconds = time.perf_counter() - t0
    ev = write_explained_variance(pca, out, dims)

    # backbone only = the raw-feature baseline
    base_row = reuse("backbone", width)
    if base_row is None:
        t0 = time.perf_counter()
        base = fit_feature_baseline(cfg, out / "backbone", cache=cache, backbone=backbone)
        base_row = evaluate(base, "backbone", "backbone", width, time.perf_counter() - t0)

    for method in methods:
        for d in dims:
            if reuse(method, d) is not None:
                continue
            t0 = time.perf_counter()
            head = pca.head(d) if method == "pca" else random_projection_head(width, d, cfg.seed)
            model = fit_probes_with_head(cfg, cache, head, backbone, n_classes, class_names, method=method)
            evaluate(model, f"{method}-d{d}", method, d, time.perf_counter() - t0 + (pca_seconds if method == "pca" else 0.0))

    stego_rows = {}

    def stego(d: int) -> dict:
        row = reuse("stego", d)
        if row is not None:
            stego_rows[d] = row
            return row
        t0 = time.perf_counter()
        ckpt = train_stego(replace(cfg, dim=d), out / f"stego-d{d}" / "train")
        model = load_with_backbone(ckpt, shared, device)
        row = evaluate(model, f"stego-d{d}", "stego", d, time.perf_counter() - t0,
                       checkpoint=str(Path(ckpt).relative_to(out)))
        stego_rows[d] = row
        return row

    for d in stego_dims:
        stego(d)

    table = None
    if table1:
        stego_row = stego_rows.get(cfg.dim)
        if stego_row is None and with_stego:
            stego_row = stego(cfg.dim)
        table = write_table1(base_row, stego_row, out, cfg)

    info = meta()
    write_dimred_table(rows, ev, out, info)
    plot_dimred(rows, out / "dimred_metrics.png", width, title=_title(cfg, random_backbone))
    log.info("dimensionality-reduction study done in %.0fs: %s", info["seconds"], out / "dimred_table.md")
    return {"rows": rows, "table1": table, "explained_variance": ev, "dims": dims, "meta": info}


def _title(cfg: Config, random_backbone: bool) -> str:
    name = Path(cfg.data_root).name if cfg.data_root else cfg.dataset
    return f"{name}, {cfg.backbone}" + (" (RANDOM init)" if random_backbone else "")


def write_explained_variance(pca: PCAResult, out: Path, dims: Sequence[int]) -> dict:
    """``explained_variance.json`` and ``.png``: cumulative share of variance against components."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cum = pca.cumulative_ratio.numpy()
    width = len(cum)
    needed = {f"{int(p * 100)}%": int(np.searchsorted(cum, p - 1e-12) + 1) for p in (0.5, 0.8, 0.9, 0.95, 0.99)}
    data = {
        "n_samples": pca.n_samples,
        "explained_variance_ratio": pca.explained_variance_ratio.numpy().round(8).tolist(),
        "cumulative": cum.round(8).tolist(),
        "at_dims": {str(d): float(cum[d - 1]) for d in dims},
        "components_needed": {k: min(v, width) for k, v in needed.items()},
    }
    (out / "explained_variance.json").write_text(json.dumps(data, indent=1))
    fig, ax = plt.subplots(figsize=(5.6, 3.6))
    x = np.arange(1, width + 1)
    ax.plot(x, cum, color="tab:blue", lw=1.8)
    for d in dims:
        ax.plot([d], [cum[d - 1]], "o", color="tab:red", ms=4)
        ax.annotate(f"{d}: {cum[d - 1]:.2f}", (d, cum[d - 1]), textcoords="offset points", xytext=(4, -10), fontsize=7)
    ax.set_xscale("log", base=2)
    ticks = sorted({1, *dims, width})
    ax.set_xticks(ticks)
    ax.set_xticklabels([str(t) for t in ticks], fontsize=7)
    ax.minorticks_off()
    ax.set_xlim(1, width)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("number of principal components (log scale)")
    ax.set_ylabel("cumulative explained variance")
    ax.set_title(f"backbone features, {pca.n_samples} patch vectors", fontsize=9)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "explained_variance.png", dpi=100)
    plt.close(fig)
    return data


def write_dimred_table(rows: Sequence[dict], ev: dict, out: Path, meta: dict) -> None:
    (out / "dimred_table.json").write_text(json.dumps({"meta": meta, "rows": list(rows)}, indent=1))
    columns = (("method", "label"), ("dim", "dim"), *METRIC_COLUMNS,
               ("PCA variance kept", lambda r: ev["at_dims"].get(str(r["dim"])) if r["method"] == "pca" else None))
    lines = ["# STEGO as dimensionality reduction (Koenig et al. 2023)", ""]
    if meta.get("warning"):
        lines += [f"> {meta['warning']}", ""]
    lines += [
        f"Backbone `{meta['backbone']}` (width {meta['width']}), {meta['n_train_items']} training items "
        f"({meta['patch_vectors']} patch vectors), dims {meta['dims']}, STEGO dims {meta['stego_dims']} "
        f"({meta['steps']} steps), CRF {'on' if meta['crf'] else 'off'}"
        + (f", first {meta['max_eval_images']} validation images" if meta.get("max_eval_images") else "") + ".",
        "",
        markdown_table(rows, columns),
        "",
        "Components needed for a share of the variance: "
        + ", ".join(f"{k}: {v}" for k, v in ev["components_needed"].items()) + ".",
        "",
    ]
    (out / "dimred_table.md").write_text("\n".join(lines))


def write_table1(base_row: dict, stego_row: Optional[dict], out: Path, cfg: Config) -> dict:
    """Koenig et al. Table 1 shape: rows backbone only / STEGO; cluster and linear Acc / mIoU."""
    rows = [dict(base_row, label="backbone only")]
    if stego_row is not None:
        rows.append(dict(stego_row, label=f"STEGO (K = {stego_row['dim']}, {cfg.steps} steps)"))
    table = {
        "backbone": cfg.backbone,
        "random_backbone": not cfg.pretrained and not cfg.weights,
        "rows": [{k: r.get(k) for k in ("label", "method", "dim", *METRIC_KEYS)} for r in rows],
    }
    (out / "koenig_table1.json").write_text(json.dumps(table, indent=1))
    columns = (("", "label"), ("cluster Acc", "cluster_strict_acc"), ("cluster mIoU", "cluster_strict_miou"),
               ("linear Acc", "linear_acc"), ("linear mIoU", "linear_miou"))
    text = [
        f"Koenig et al. Table 1 layout, backbone `{cfg.backbone}`"
        + (" (randomly initialised)" if table["random_backbone"] else "")
        + "; cluster metrics strict (parity in koenig_table1.json).",
        "",
        markdown_table(rows, columns),
        "",
    ]
    (out / "koenig_table1.md").write_text("\n".join(text))
    return table


def plot_dimred(rows: Sequence[dict], path: Path, width: int, title: str = "") -> None:
    """Metrics against the number of components, one line per method; backbone only dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("cluster_strict_acc", "cluster accuracy"), ("cluster_strict_miou", "cluster mIoU"),
              ("linear_acc", "linear accuracy"), ("linear_miou", "linear mIoU")]
    panels = [p for p in panels if any(r.get(p[0]) is not None for r in rows)]
    fig, axes = plt.subplots(1, len(panels), figsize=(3.4 * len(panels), 3.2), squeeze=False)
    colours = {"pca": "tab:blue", "rp": "tab:orange", "stego": "tab:green", "backbone": "black"}
    all_dims = sorted({r["dim"] for r in rows})
    for ax, (key, name) in zip(axes[0], panels):
        for method in ("pca", "rp", "stego"):
            pts = sorted((r["dim"], r[key]) for r in rows if r["method"] == method and r.get(key) is not None)
            if pts:
                ax.plot(*zip(*pts), "o-", color=colours[method], label=METHOD_LABELS[method], ms=4)
        for r in rows:
            if r["method"] == "backbone" and r.get(key) is not None:
                ax.axhline(r[key], color="black", ls="--", lw=1, label=f"backbone only (d = {width})")
        ax.set_xscale("log", base=2)
        ax.set_xticks(all_dims)
        ax.set_xticklabels([str(d) for d in all_dims], fontsize=7)
        ax.minorticks_off()
        ax.set_xlabel("dimensions")
        ax.set_title(name, fontsize=9)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("percent")
    axes[0][-1].legend(fontsize=7)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def argument_type(parse):
    """An argparse ``type=`` from a parser that raises StegosegError (argparse reports it as a usage error)."""

    def convert(text):
        try:
            return parse(text)
        except StegosegError as exc:
            raise argparse.ArgumentTypeError(str(exc).split(": ", 1)[-1]) from None

    convert.__name__ = parse.__name__
    return convert


def cmd_study_dimred(args) -> int:

    cfg = resolve_config(args)
    out = Path(args.out)
    if not args.resume:
        refuse_overwrite(out, "dimred_table.json", args.overwrite)
    methods = [m for m in args.methods.split(",") if m.strip()]
    result = run_dimred_study(
        cfg, out, dims=args.dims, methods=methods, with_stego=args.stego_sweep, stego_dims=args.stego_dims,
        table1=args.table1, save_checkpoints=args.save_checkpoints, resume=args.resume,
    )
    print((out / "dimred_table.md").read_text())
    if (out / "koenig_table1.md").exists():
        print((out / "koenig_table1.md").read_text())
    print(f"outputs: {out} (dimred_table.md, dimred_metrics.png, explained_variance.png, koenig_table1.md)")
    return 0 if result["rows"] else 1


def add_cli(subparsers) -> argparse.ArgumentParser:
    """Register ``stegoseg study-dimred``."""

    p = subparsers.add_parser(
        "study-dimred",
        help="STEGO as dimensionality reduction: PCA / random projection / STEGO at equal dimension (Koenig et al. 2023)",
        description="On the cached training features, fit PCA (streamed covariance) and Gaussian random projections "
        "to each target dimension, fit the cluster (spherical k-means) and linear probes on the projected features, "
        "optionally train STEGO with --dim equal to each target dimension, and evaluate everything with the "
        "project's protocol. Writes dimred_table.{json,md}, dimred_metrics.png, explained_variance.{json,png}, "
        "koenig_table1.{json,md} and one folder per model under --out.",
    )
    p.add_argument("--out", default="runs/study-dimred", help="output folder (default: runs/study-dimred)")
    p.add_argument("--dims", type=argument_type(parse_dims), default=None, metavar="D,D,...",
                   help="target dimensions, e.g. 384,64,8; C = backbone width (default: C,128,64,32,16,8,4,2, "
                   "clipped to <= C). Not the same as --dim, STEGO's code size for the Table-1 row")
    p.add_argument("--methods", default="pca,rp", help="projections to sweep: pca, rp (default: pca,rp)")
    p.add_argument("--stego-sweep", action=argparse.BooleanOptionalAction, default=True,
                   help="train STEGO at each target dimension (--no-stego-sweep: projections only; default: on)")
    p.add_argument("--stego-dims", type=argument_type(parse_dims), default=None, metavar="D,D,...",
                   help="train STEGO only at these dimensions (default: all of --dims)")
    p.add_argument("--table1", action=argparse.BooleanOptionalAction, default=True,
                   help="write koenig_table1 (backbone only vs STEGO with --dim; trains it if not in the sweep)")
    p.add_argument("--save-checkpoints", action="store_true",
                   help="save every fitted model as checkpoint.pt (random backbones are stored in each file)")
    p.add_argument("--resume", action="store_true",
                   help="reuse the finished rows of an earlier study in --out whose config values are the same "
                   "(projection rows ignore STEGO's training options, so a STEGO sweep can be changed or added)")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier study's outputs in --out")
    add_config_arguments(p)
    p.set_defaults(func=cmd_study_dimred)
    return p
