"""What each way of shrinking the feature cache costs in results, on CamVid.

When a cache does not fit, the run offers (``features.cache.check_cache_space``): fewer crops
(``--no-five-crop``), fewer channels (``--pca-dim D``: features projected onto D directions
fitted on a sample of crops), or both. This script measures each on the ``camvid-vits8-random``
setting of ``bench_methods.py`` (its fixed seed-0 random ViT-S/8, CamVid's 367 training images,
224 px crops, 50 validation images at 320 px): the cache's bytes on disk and per crop, the
share of the features' energy the projection keeps, and the cluster / linear mIoU of the
raw-feature baseline and of STEGO as a user runs it (``--shifts auto --select label-free``),
for seeds 0, 1, 2. Every row goes through the commands' own code path (the projected cache is
extracted by the projected backbone, as ``stegoseg run --pca-dim`` does).

The backbone is random, so the absolute numbers say nothing about segmentation quality; the
differences between choices (against the full cache, in the same run) are what is measured.
Rows finished earlier with the same config are reused (``--runs`` as ``bench_methods.py``: the
full cache and the full-cache rows are that script's, when it ran into the same folder).

    PYTHONPATH=src python3 benchmarks/bench_cache_choices.py
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import write_result  # noqa: E402
from bench_label_free import PUBLISHED, REPO, metrics, reuse, settings  # noqa: E402
from bench_methods import with_fixed_backbone  # noqa: E402

from stegoseg.config.stego import make_config
from stegoseg.features.cache import FeatureCache
from stegoseg.methods.baseline import fit_feature_baseline
from stegoseg.methods.common import build_backbone_from_config, evaluate_checkpoint_model, prepare
from stegoseg.methods.stego import train_stego
from stegoseg.studies.dimred import SharedFeatures, load_with_backbone

SETTING = "camvid-vits8-random"
#: name -> config overrides; "full" is the cache as the other benchmarks build it
CHOICES = {
    "full": {},
    "pca-64": {"pca_dim": 64},
    "no-five-crop": {"five_crop": False},
    "no-five-crop+pca-64": {"five_crop": False, "pca_dim": 64},
    "pca-128": {"pca_dim": 128},
}
METRICS = ("cluster_acc", "cluster_miou", "linear_acc", "linear_miou")


def cache_bytes(cache: FeatureCache) -> int:
    """The cache's own files: its shards, meta, descriptors and neighbour lists (not the folders
    later stages keep inside it, such as PriMaPs' pseudo masks)."""
    root = Path(cache.path)
    files = [f for f in root.iterdir() if f.is_file()] + [f for f in (root / "shards").iterdir() if f.is_file()]
    return sum(f.stat().st_size for f in files)


def measure_choice(name: str, values: dict, runs: Path, seeds: list) -> dict:
    """One choice: its cache (built or reused), the raw baseline and STEGO for each seed."""
    setting_dir = runs / SETTING
    cache_dir = setting_dir / "cache"
    values = dict(values, **CHOICES[name])
    base = make_config(dict(values, cache_dir=str(cache_dir), shifts="fixed", **PUBLISHED))
    # the full choice is bench_methods' own rows (same folders: reused when that script ran here)
    folder = setting_dir / ("methods" if name == "full" else f"cache-choices/{name}")
    t0 = time.perf_counter()
    backbone, _ = build_backbone_from_config(base, setting_dir / "prepare")
    cache = prepare(base, setting_dir / "prepare", backbone)
    seconds = time.perf_counter() - t0
    shared = SharedFeatures(backbone)
    info = getattr(backbone, "projection_info", None)
    row = {"overrides": CHOICES[name], "items": cache.n, "channels": backbone.embed_dim,
           "cache_bytes": cache_bytes(cache), "bytes_per_item": cache_bytes(cache) / cache.n,
           "prepare_seconds_this_invocation": seconds, "energy_kept": info["energy_kept"] if info else 1.0,
           "raw": {}, "stego": {}}
    for seed in seeds:
        raw_cfg = replace(base, seed=seed)
        raw_dir = folder / f"seed{seed}" / "raw"
        found = reuse(raw_cfg, raw_dir)
        if found is None:
            model = fit_feature_baseline(raw_cfg, raw_dir, backbone=shared)
            found = metrics(evaluate_checkpoint_model(base, model, raw_dir / "eval"))
            raw_dir.mkdir(parents=True, exist_ok=True)
            (raw_dir / "bench_row.json").write_text(json.dumps({"config": raw_cfg.to_dict(), "metrics": found}))
            print(f"  {name} raw seed {seed}: {json.dumps(found)}", flush=True)
        row["raw"][str(seed)] = {k: found[k] for k in METRICS}
        cfg = make_config(dict(values, seed=seed, cache_dir=str(cache_dir), shifts="auto", select="label-free"))
        stego_dir = folder / f"seed{seed}" / "stego"
        found = reuse(cfg, stego_dir)
        if found is None:
            ckpt = train_stego(cfg, stego_dir)
            found = metrics(evaluate_checkpoint_model(base, load_with_backbone(ckpt, shared, "cpu"),
                                                      stego_dir / "eval"))
            (stego_dir / "bench_row.json").write_text(json.dumps({"config": cfg.to_dict(), "metrics": found}))
            print(f"  {name} stego seed {seed}: {json.dumps(found)}", flush=True)
        row["stego"][str(seed)] = {k: found[k] for k in METRICS}
    for method in ("raw", "stego"):
        per = list(row[method].values())
        row[f"{method}_mean"] = {k: statistics.fmean(m[k] for m in per) for k in METRICS}
    return row


def table(rows: dict) -> str:
    full = rows.get("full")
    lines = ["| choice | items | channels | cache | per crop | x smaller | energy kept | raw cluster / linear mIoU | "
             "STEGO cluster mIoU (seeds) | STEGO linear mIoU | STEGO cluster mIoU vs full |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in rows.items():
        smaller = f"{full['cache_bytes'] / r['cache_bytes']:.1f}" if full else "-"
        per = "/".join(f"{m['cluster_miou']:.1f}" for m in r["stego"].values())
        delta = f"{r['stego_mean']['cluster_miou'] - full['stego_mean']['cluster_miou']:+.1f}" if full else "-"
        lines.append(f"| {name} | {r['items']} | {r['channels']} | {r['cache_bytes'] / 2**20:.0f} MB | "
                     f"{r['bytes_per_item'] / 2**10:.0f} KB | {smaller} | {100 * r['energy_kept']:.1f}% | "
                     f"{r['raw_mean']['cluster_miou']:.1f} / {r['raw_mean']['linear_miou']:.1f} | "
                     f"{r['stego_mean']['cluster_miou']:.1f} ({per}) | {r['stego_mean']['linear_miou']:.1f} | {delta} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", default=str(REPO / "runs" / "bench-methods"))
    parser.add_argument("--choices", default=",".join(CHOICES))
    parser.add_argument("--seeds", default="0,1,2")
    args = parser.parse_args()
    runs = Path(args.runs)
    values = with_fixed_backbone(SETTING, settings(runs)[SETTING], runs)
    seeds = [int(s) for s in args.seeds.split(",")]
    out = REPO / "benchmarks" / "results" / "cache_choices.json"
    rows = json.loads(out.read_text())["choices"] if out.exists() else {}
    for name in args.choices.split(","):
        print(f"[{name}]", flush=True)
        rows[name] = measure_choice(name, values, runs, seeds)
        rows = {n: rows[n] for n in CHOICES if n in rows}
        write_result("cache_choices", {"setting": SETTING, "seeds": seeds, "choices": rows,
                                       "note": "random ViT-S/8: differences between choices are measured, "
                                               "absolute numbers are not segmentation quality"})
        print(table(rows), flush=True)


if __name__ == "__main__":
    main()
