"""The run's ``report.md``.
"""
from __future__ import annotations

import json
from pathlib import Path

from stegoseg.config.stego import PRESETS, Config
from stegoseg.evaluation.protocol import summary_rows
from stegoseg.reporting.tables import metrics_table


# --------------------------------------------------------------------------- main job
def write_report(out: Path, title: str, results: dict, cfg: Config, notes: list) -> Path:
    """A short markdown report: metrics table, similarity histogram, training curves, predictions."""
    out = Path(out)
    lines = [f"# {title}", ""]
    lines += [f"> {n}" for n in notes] + ([""] if notes else [])
    lines += [
        f"Dataset `{cfg.dataset}` ({cfg.data_root or 'generated'}), train split `{cfg.train_split}`, "
        f"evaluated on `{cfg.val_split}`; backbone `{cfg.backbone}` "
        f"({'random init' if not cfg.pretrained and not cfg.weights else cfg.weights or 'pretrained'}); "
        f"{cfg.steps} steps, batch {cfg.batch_size}, code dimension {cfg.dim}, "
        f"{cluster_count(results, cfg)} clusters; CRF {'on' if cfg.crf else 'off'}.",
        "",
    ]
    if cfg.method == "primaps" or cfg.method.endswith("+primaps"):
        lines += primaps_report_lines(out / "train", cfg)
    elif cfg.method != "stego":
        book = out / "train" / "clusterbook.json"
        book_steps = json.loads(book.read_text())["steps"] if book.exists() else "?"
        lines += [f"Method `{cfg.method}` (docs/cause.md): stage 1, a clusterbook of {cfg.cause_concepts} concepts "
                  f"({book_steps} steps); stage 2, the head against its EMA teacher ({cfg.steps} steps); stage 3, "
                  f"the cluster probe by modularity ({cfg.cause_probe_steps} steps); the last step is kept.", ""]
    rows = [{"method": name, **summary_rows(res)} for name, res in results.items()]
    if any(len(r) > 1 for r in rows):
        lines.append(metrics_table(rows, (("method", "method"),)))
        lines.append("")
        lines += per_class_lines(results)
    else:
        lines += ["No metrics: the evaluation split has no labels (a label-free run). The segmentations below and in "
                  "`segment/` are what the run produced; label a few images (`labels/<split>/`) to measure them.", ""]
    lines += timing_lines(out)
    lines += calibration_report_lines(out / "train")
    for caption, rel in (
        ("Code similarity histogram (paper A.11: healthy runs are bimodal)", "train/similarity_histogram.png"),
        ("Code similarity histogram of the selected checkpoint", "train/selected_similarity_histogram.png"),
        ("Checkpoint selection criterion", "train/selection.png"),
        ("Training curves", "train/training_curves.png"),
        (f"{next(iter(results), 'STEGO')} predictions ({prediction_columns(results)})", "eval/predictions.png"),
        ("Raw-feature baseline predictions", "baseline/predictions.png"),
        ("Cluster-probe confusion (rows: ground truth, normalised)", "eval/confusion_cluster.png"),
    ):
        if (out / rel).exists():
            lines += [f"## {caption}", "", f"![{caption}]({rel})", ""]
    lines += ["Resolved config: `config.yaml`. Metrics: `summary.json`, `eval/metrics.json`.", ""]
    path = out / "report.md"
    path.write_text("\n".join(lines))
    return path


def calibration_report_lines(train_dir: Path) -> list:
    """Markdown: the shifts the run used (and how --shifts auto chose them), and the
    checkpoint --select picked with every candidate's criterion."""
    lines = []
    cal_path, sel_path, cfg_path = train_dir / "calibration.json", train_dir / "selection.json", train_dir / "config.yaml"
    if cal_path.exists():
        cal = json.loads(cal_path.read_text())
        lines += [
            f"## Loss shifts (`--shifts auto`, chosen without labels; spatial centring "
            f"{'on' if cal['pointwise'] else 'off'} in the selected run)", "",
            "Each shift b sits at the quantile of its pair type's feature correspondence F that leaves above it "
            "the fraction of pairs a k-means partition of the features puts in one cluster "
            "(see docs/label_free.md).", "",
            "| pair type | same-cluster rate | mean F | chosen shift | published CocoStuff shift |",
            "|---|---|---|---|---|",
        ]
        published = PRESETS["cocostuff27"]
        for t, name in (("self", "within image"), ("knn", "nearest neighbour"), ("rand", "random image")):
            lines.append(f"| {name} | {cal['same_rate'][t]:.3f} | {cal['feature_similarity'][t]['mean']:.3f} | "
                         f"{cal['b_' + t]:.3f} | {published['b_' + t]:.2f} |")
        lines.append("")
    elif cfg_path.exists():
        import yaml

        c = yaml.safe_load(cfg_path.read_text())
        if c and "b_knn" in c:
            lines += [f"Loss shifts as given (`--shifts fixed`): b_self {c['b_self']}, b_knn {c['b_knn']}, "
                      f"b_rand {c['b_rand']}.", ""]
    if sel_path.exists():
        sel = json.loads(sel_path.read_text())
        lines += [f"## Checkpoint selection (`--select {sel['mode']}`): {sel['chosen']}", ""]
        if sel["mode"] == "label-free":
            lines += ["The label-free score of a checkpoint: how much of STEGO's own objective its hard cluster map "
                      "reaches on pairs drawn as in training (within an image, with a nearest neighbour, with a random "
                      "image), as a fraction of the best possible, averaged over the three pair types. 1 would join "
                      "exactly the pairs whose feature correspondence is above its shift; 0 or below: a collapsed or "
                      "over-split code. Higher is better; no label is read (docs/label_free.md).", ""]
        rows = sel["candidates"]
        if len(rows) > 1:
            has_val = any("val_cluster_miou" in r for r in rows.values())
            lines += ["| candidate (run/step) | label-free score | mean S, KNN pairs | mean S, random pairs | clusters used |"
                      + (" val cluster mIoU |" if has_val else ""),
                      "|---|---|---|---|---|" + ("---|" if has_val else "")]
            for key, r in rows.items():
                mark = " **(chosen)**" if key == sel["chosen"] else ""
                lines.append(f"| {key}{mark} | {r['label_free_score']:.3f} | {r['mean_code_similarity']['knn']:.3f} | "
                             f"{r['mean_code_similarity']['rand']:.3f} | {r['clusters_used']} |"
                             + (f" {r.get('val_cluster_miou', float('nan')):.1f} |" if has_val else ""))
            lines.append("")
    return lines


def primaps_report_lines(train: Path, cfg) -> list:
    """What the PriMaPs-EM stages did: the base model (if any), the pseudo masks, the EM steps."""
    stats = train / "pseudo_masks.json"
    masks = json.loads(stats.read_text()) if stats.exists() else {}
    if cfg.method.endswith("+primaps"):
        start = f"the code of a `{cfg.method[:-len('+primaps')]}` model trained first (`train/base/`)"
    elif cfg.init_from:
        start = f"the code of `{cfg.init_from}`"
    else:
        start = f"the backbone features (prototypes started by `{cfg.primaps_init}`)"
    per_crop = f"{masks['masks_per_crop']:.1f} masks per crop" if masks else "masks"
    return [f"Method `{cfg.method}` (docs/primaps.md): PriMaPs pseudo masks from the backbone features "
            f"({per_crop}, threshold {cfg.primaps_threshold}, coverage {cfg.primaps_coverage}, dense CRF), then "
            f"{cfg.primaps_steps or cfg.steps} EM steps on {start}; the cluster probe is the EMA teacher's "
            "prototypes at the last step.", ""]


def cluster_count(results: dict, cfg) -> str:
    """The number of clusters the report's models have (classes + extra clusters)."""
    n = cfg.n_classes
    for res in results.values():
        assignment = ((res.get("cluster") or {}).get("strict") or {}).get("assignment")
        if assignment:
            return str(len(assignment))
    return str(n + cfg.extra_clusters) if n else "?"


def per_class_lines(results: dict) -> list:
    """A per-class IoU table (strict counting) of every result that has one."""
    per = {name: ((res.get("cluster") or {}).get("strict") or {}).get("per_class_iou") for name, res in results.items()}
    per = {name: v for name, v in per.items() if v}
    if not per:
        return []
    classes = list(next(iter(per.values())))
    lines = ["Per-class IoU of the cluster probe (strict counting, percent):", "",
             "| class | " + " | ".join(per) + " |", "|---|" + "---|" * len(per)]
    for c in classes:
        lines.append(f"| {c} | " + " | ".join(f"{v.get(c, float('nan')):.1f}" for v in per.values()) + " |")
    return lines + [""]


def timing_lines(out: Path) -> list:
    """The run's time per stage (``timings.json``, written by the main job)."""
    path = out / "timings.json"
    if not path.exists():
        return []
    stages = json.loads(path.read_text())
    total = sum(stages.values())
    cells = ", ".join(f"{name} {seconds:.0f} s" for name, seconds in stages.items())
    return [f"Time per stage: {cells} (total {total:.0f} s).", ""]


def prediction_columns(results: dict) -> str:
    """The columns of the evaluation's predictions figure: ground truth and linear probe only with labels."""
    first = next(iter(results.values()), {}) if results else {}
    columns = ["image"] + (["ground truth"] if "cluster" in first else []) + ["cluster probe"]
    return " | ".join(columns + (["linear probe"] if "linear" in first else []))
