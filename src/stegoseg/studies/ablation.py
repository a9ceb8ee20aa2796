"""Ablations of STEGO's components (the paper's Tables 2 and 5), leave-one-out.

Each variant is the configured ("full") setting with one component removed, everything
else fixed and seeded:

==========================  ====================================================
``full``                    the configuration as given
``no-zero-clamp``           code similarities not clamped at 0 (``zero_clamp=False``)
``no-five-crop``            training on whole images (``five_crop=False``; its own cache)
``no-spatial-centering``    no spatial centering of F (``pointwise=False``)
``no-crf``                  evaluation only: the full model without the dense CRF
``no-self``                 no self-correspondence term (``w_self=0``)
``no-knn``                  no KNN term (``w_knn=0``)
``no-rand``                 no random-image term (``w_rand=0``)
==========================  ====================================================

All variants read one feature cache with its KNN (``cache_dir`` shared; the no-five-crop
variant necessarily has its own), use the same (seeded) backbone, and are evaluated with
the project's protocol on the same validation images; each batch's backbone features
are computed once for all variants (:class:`~stegoseg.studies.dimred.SharedFeatures`).

Outputs under ``out``: ``ablation.{json,md}`` (variant, its config changes and resolved
config, cluster accuracy / mIoU strict and parity, linear accuracy / mIoU),
``ablation.png`` (grouped bars), ``config.yaml`` (the full config) and per variant
``<variant>/train/`` (checkpoint, logs, resolved ``config.yaml``) and ``<variant>/eval/``.
"""
from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path
from typing import Sequence

from stegoseg.config.stego import Config, add_config_arguments, replace, resolve_config
from stegoseg.errors import StegosegError, refuse_overwrite
from stegoseg.evaluation.protocol import summary_rows
from stegoseg.methods.common import (
    RANDOM_BACKBONE_WARNING,
    build_backbone_from_config,
    evaluate_checkpoint_model,
    prepare,
    resolve_device,
    resolve_run_paths,
)
from stegoseg.methods.stego import train_stego
from stegoseg.reporting.tables import METRIC_COLUMNS, markdown_table
from stegoseg.studies.dimred import (
    METRIC_KEYS,
    SharedFeatures,
    argument_type,
    load_with_backbone,
)

log = logging.getLogger("stegoseg")

# name -> (config changes, description); the order is the table's order.
VARIANTS = {
    "full": ({}, "all components (the configuration as given)"),
    "no-zero-clamp": ({"zero_clamp": False}, "code similarity S not clamped at 0"),
    "no-five-crop": ({"five_crop": False}, "train on whole images, no five-crop"),
    "no-spatial-centering": ({"pointwise": False}, "no spatial centering of the feature correspondences"),
    "no-crf": ({"crf": False}, "evaluation only: the full model without the dense CRF"),
    "no-self": ({"w_self": 0.0}, "no self-correspondence term"),
    "no-knn": ({"w_knn": 0.0}, "no KNN term"),
    "no-rand": ({"w_rand": 0.0}, "no random-image term"),
}
# Variants that only change the evaluation: they reuse another variant's model.
EVAL_ONLY = {"no-crf": "full"}


def parse_variants(text) -> list:
    """``"full,no-crf"`` (or a sequence; underscores allowed) -> names in the table's order."""
    if text is None:
        return list(VARIANTS)
    items = text.split(",") if isinstance(text, str) else list(text)
    names = []
    for item in items:
        name = str(item).strip().lower().replace("_", "-")
        if not name:
            continue
        if name not in VARIANTS:
            raise StegosegError(f"--variants: unknown variant {name!r}; choose from {', '.join(VARIANTS)}")
        names.append(name)
    if not names:
        raise StegosegError("--variants: give at least one variant, e.g. --variants full,no-crf")
    return [n for n in VARIANTS if n in names]


def variant_config(cfg: Config, name: str) -> Config:
    return replace(cfg, **VARIANTS[name][0])


def run_ablation(cfg: Config, out, variants=None) -> dict:
    """Train and evaluate the chosen variants (default: all) into ``out``; returns {"rows", "meta"}.

    ``no-crf`` needs the full model: ``full`` is trained (and listed) whenever it is asked for.
    """

    names = parse_variants(variants)
    for name in list(names):
        needed = EVAL_ONLY.get(name)
        if needed and needed not in names:
            log.info("variant %s reuses the %s model: training %s too", name, needed, needed)
            names = [n for n in VARIANTS if n in names or n == needed]
    out = Path(out)
    cfg = resolve_run_paths(cfg, out)
    cfg.save(out / "config.yaml")
    random_backbone = not cfg.pretrained and not cfg.weights
    device = resolve_device(cfg.device)
    t_start = time.perf_counter()

    backbone, _ = build_backbone_from_config(cfg)  # (no --pca-dim: the backbone's own features)
    prepare(cfg, out, backbone)  # the shared cache and KNN, written once for every variant
    shared = SharedFeatures(backbone)
    full_cfg = cfg.to_dict()
    models, checkpoints, rows = {}, {}, []
    for name in names:
        vcfg = variant_config(cfg, name)
        changes, description = VARIANTS[name]
        differs = {k: v for k, v in changes.items() if full_cfg[k] != v}
        if name != "full" and not differs:
            log.warning("variant %s changes nothing: the configuration already has %s", name, changes)
        t0 = time.perf_counter()
        if name in EVAL_ONLY:
            model, checkpoint = models[EVAL_ONLY[name]], checkpoints[EVAL_ONLY[name]]
        else:
            checkpoint = train_stego(vcfg, out / name / "train")
            model = load_with_backbone(checkpoint, shared, device)
            models[name], checkpoints[name] = model, checkpoint
        train_seconds = time.perf_counter() - t0
        result = evaluate_checkpoint_model(vcfg, model, out / name / "eval")
        summary = summary_rows(result)
        row = {
            "variant": name,
            "description": description,
            "changes": changes,
            "changes_anything": bool(differs) or name == "full",
            "trained": name not in EVAL_ONLY,
            "checkpoint": str(Path(checkpoint).relative_to(out)),
            **{k: (float(summary[k]) if k in summary else None) for k in METRIC_KEYS},
            "n_images": result.get("n_images"),
            "train_seconds": round(train_seconds, 2) if name not in EVAL_ONLY else 0.0,
            "eval_seconds": round(float(result.get("seconds", 0.0)), 2),
            "config": vcfg.to_dict(),
        }
        rows.append(row)
        log.info("ablation %s: %s", name, ", ".join(f"{k} {row[k]:.1f}" for k in METRIC_KEYS if row[k] is not None))
    meta = {
        "dataset": cfg.dataset, "data_root": cfg.data_root, "backbone": cfg.backbone, "random_backbone": random_backbone,
        "steps": cfg.steps, "seed": cfg.seed, "dim": cfg.dim, "crf": cfg.crf, "max_eval_images": cfg.max_eval_images,
        "cache_dir": cfg.cache_dir, "feature_memo": {"hits": shared.hits, "misses": shared.misses},
        "seconds": round(time.perf_counter() - t_start, 1),
    }
    if random_backbone:
        meta["warning"] = RANDOM_BACKBONE_WARNING.format(name=cfg.backbone)
    write_ablation_table(rows, out, meta)
    plot_ablation(rows, out / "ablation.png", title=f"{cfg.backbone}{' (RANDOM init)' if random_backbone else ''}, "
                  f"{cfg.steps} steps")
    return {"rows": rows, "meta": meta}


def write_ablation_table(rows: Sequence[dict], out: Path, meta: dict) -> None:
    (out / "ablation.json").write_text(json.dumps({"meta": meta, "rows": list(rows)}, indent=1, default=float))

    def change_text(r):
        if not r["changes"]:
            return "-"
        text = ", ".join(f"{k}={v}" for k, v in r["changes"].items())
        return text if r["changes_anything"] else text + " (already so: same as full)"

    lines = ["# STEGO ablation (leave one component out)", ""]
    if meta.get("warning"):
        lines += [f"> {meta['warning']}", ""]
    if not meta["crf"] and any(r["variant"] == "no-crf" for r in rows):
        lines += ["> The configuration already has the CRF off, so `no-crf` equals `full`.", ""]
    lines += [
        f"Backbone `{meta['backbone']}`, {meta['steps']} steps, K = {meta['dim']}, seed {meta['seed']}, "
        f"CRF {'on' if meta['crf'] else 'off'} for the trained variants"
        + (f", first {meta['max_eval_images']} validation images" if meta.get("max_eval_images") else "") + ".",
        "",
        markdown_table(rows, (("variant", "variant"), ("change", change_text), *METRIC_COLUMNS)),
        "",
        "Resolved configs: `ablation.json` (`config` of each row) and `<variant>/train/config.yaml`.",
        "",
    ]
    (out / "ablation.md").write_text("\n".join(lines))


def plot_ablation(rows: Sequence[dict], path: Path, title: str = "") -> None:
    """Grouped bars: cluster accuracy / mIoU (strict) and linear accuracy / mIoU per variant."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    metrics = [("cluster_strict_acc", "cluster acc"), ("cluster_strict_miou", "cluster mIoU"),
               ("linear_acc", "linear acc"), ("linear_miou", "linear mIoU")]
    metrics = [m for m in metrics if any(r.get(m[0]) is not None for r in rows)]
    x = np.arange(len(rows))
    width = 0.8 / max(1, len(metrics))
    fig, ax = plt.subplots(figsize=(max(5.0, 1.1 * len(rows) + 2), 3.6))
    for i, (key, label) in enumerate(metrics):
        values = [r.get(key) if r.get(key) is not None else 0.0 for r in rows]
        bars = ax.bar(x + (i - (len(metrics) - 1) / 2) * width, values, width, label=label)
        ax.bar_label(bars, fmt="%.0f", fontsize=6, padding=1)
    ax.set_xticks(x)
    ax.set_xticklabels([r["variant"] for r in rows], rotation=20, ha="right", fontsize=8)
    ax.set_ylabel("percent")
    ax.set_ylim(0, 118)
    ax.set_yticks(range(0, 101, 20))
    ax.legend(fontsize=7, ncol=len(metrics), loc="upper center", frameon=False)
    if title:
        ax.set_title(title, fontsize=9)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def cmd_ablate(args) -> int:

    cfg = resolve_config(args)
    out = Path(args.out)
    refuse_overwrite(out, "ablation.json", args.overwrite)
    result = run_ablation(cfg, out, variants=args.variants)
    print((out / "ablation.md").read_text())
    print(f"outputs: {out} (ablation.md, ablation.json, ablation.png)")
    return 0 if result["rows"] else 1


def add_cli(subparsers) -> argparse.ArgumentParser:
    """Register ``stegoseg ablate``."""

    p = subparsers.add_parser(
        "ablate",
        help="ablate STEGO's components (zero clamp, five-crop, spatial centering, CRF, each loss term)",
        description="Train and evaluate STEGO with one component removed at a time, everything else fixed and "
        "seeded, sharing one feature cache and KNN. Variants: " + ", ".join(VARIANTS) + ". Writes "
        "ablation.{md,json} and ablation.png under --out, and each variant's run under --out/<variant>/.",
    )
    p.add_argument("--out", default="runs/ablation", help="output folder (default: runs/ablation)")
    p.add_argument("--variants", type=argument_type(parse_variants), default=None, metavar="A,B,...",
                   help="variants to run (default: all); no-crf also trains full")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier ablation's outputs in --out")
    add_config_arguments(p)
    p.set_defaults(func=cmd_ablate)
    return p


__all__ = ["VARIANTS", "EVAL_ONLY", "parse_variants", "variant_config", "run_ablation", "add_cli"]
