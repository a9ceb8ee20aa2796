"""Label-free shift calibration and model selection against the published settings and a labelled oracle.

For each labelled setting, with one seed, one feature cache, one schedule and one evaluation:

* ``raw``: the raw-feature baseline (k-means cluster probe + linear probe on the backbone features);
* ``published``: STEGO with the paper's CocoStuff loss settings (``--shifts fixed``), last checkpoint;
* ``oracle``: the best (by validation cluster mIoU, i.e. WITH labels) of a hand grid of shifts:
  b_knn x b_rand x pointwise, the other settings as published, last checkpoint;
* ``auto``: ``--shifts auto --select label-free`` (no labels anywhere in training or selection).

Every STEGO row refits its cluster probe by k-means on the trained code (``--cluster-fit kmeans``),
as the raw baseline does, so the rows differ only in the loss settings and checkpoint choice.
Metrics are strict (every labelled pixel counts), in percent. The backbone features of the
validation images are computed once per setting and reused by every row
(:class:`~stegoseg.studies.dimred.SharedFeatures`, memoised by the exact input tensor: the
same numbers as running the backbone each time).

A seed check (``--replicate-seeds``) trains the published and auto rows again with other
seeds (head initialisation, batch order, feature dropout, k-means seeds; the backbone and so
its features, the schedule and the evaluation stay): single-run differences of a few cluster-mIoU points on CamVid
are within that noise.

Writes ``benchmarks/results/label_free.json`` and ``benchmarks/results/label_free.md``.
On the project's 2-core CPU: about 55 minutes for the four settings when their feature
caches exist (plus about 15 for the CamVid ViT-S/8 cache), and about 35 more for the seed
check with two seeds (15 of them extracting the CamVid cache again, keyed by the weights file).

    PYTHONPATH=src python3 benchmarks/bench_label_free.py                  # all settings
    PYTHONPATH=src python3 benchmarks/bench_label_free.py --settings demo  # one
    PYTHONPATH=src python3 benchmarks/bench_label_free.py --replicates-only --replicate-seeds 1,2  # seed check
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Optional

from scipy.stats import spearmanr

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import SHARED_DATA, machine, save_backbone_file  # noqa: E402

from stegoseg.config.stego import PRESETS, make_config
from stegoseg.data.synthetic import make_synthetic_dataset
from stegoseg.evaluation.protocol import summary_rows
from stegoseg.features.cache import FeatureCache
from stegoseg.methods.baseline import fit_feature_baseline
from stegoseg.methods.common import (
    build_backbone_from_config,
    evaluate_checkpoint_model,
    prepare,
)
from stegoseg.methods.stego import train_stego
from stegoseg.model import load
from stegoseg.studies.dimred import SharedFeatures, load_with_backbone, unwrap_backbone
from stegoseg.training.calibration import calibrate_for_config
from stegoseg.training.selection import score_for_config

REPO = Path(__file__).resolve().parents[1]
CAMVID = SHARED_DATA / "camvid"
CAMVID_CLASSES = "sky,building,pole,road,pavement,tree,sign/symbol,fence,car,pedestrian,bicyclist"
PUBLISHED = {k: PRESETS["cocostuff27"][k] for k in ("w_self", "w_knn", "w_rand", "b_self", "b_knn", "b_rand")} | {
    "pointwise": True}
# The tiny ViT-S/8 DINO-pretrained on the CamVid train images by `benchmarks/pretrain_cpu.sh`'s
# `stegoseg pretrain` command (time-bounded, so not reproducible bit for bit): committed (a few
# hundred KB) so that the stored rows of bench_methods, keyed by the weights' tensors, stay reusable
# on another machine. `pretrain_cpu.sh` writes it once (never overwriting it); without the file
# the setting is refused with one line.
TINY_DINO_WEIGHTS = REPO / "benchmarks" / "results" / "backbones" / "camvid-tiny-dino.pt"
# 8 grid points: b_knn x b_rand with spatial centring (the published default), and two without it
GRID = [dict(b_knn=bk, b_rand=br, pointwise=True) for bk in (0.2, 0.5, 0.8) for br in (0.5, 1.0)] + [
    dict(b_knn=0.5, b_rand=0.5, pointwise=False), dict(b_knn=0.8, b_rand=1.0, pointwise=False)]


def settings(runs: Path) -> dict:
    """name -> config values (everything but the loss settings)."""
    common = dict(seed=0, crf=False, cluster_fit="kmeans", progress=False, num_workers=0, crf_workers=1,
                  accelerator="cpu", device="cpu")
    return {
        "demo": dict(common, dataset="directory", data_root=str(runs / "data-demo"), backbone="dino_vits8",
                     pretrained=False, resolution=112, steps=300, batch_size=8, eval_resolution=160,
                     ckpt_every=50, log_every=10),
        "synthetic-small-objects": dict(common, dataset="directory", data_root=str(runs / "data-small-objects"),
                                        backbone="dino_vits8", pretrained=False, resolution=112, steps=300,
                                        batch_size=8, eval_resolution=160, ckpt_every=50, log_every=10),
        "camvid-vits8-random": dict(common, dataset="directory", data_root=str(CAMVID), class_names=CAMVID_CLASSES,
                                    backbone="dino_vits8", pretrained=False, resolution=224, steps=100,
                                    batch_size=16, eval_resolution=320, max_eval_images=50, ckpt_every=50,
                                    log_every=10, kmeans_iters=15),
        "camvid-tiny-dino": dict(common, dataset="directory", data_root=str(CAMVID), class_names=CAMVID_CLASSES,
                                 backbone="dino_vits8", tiny=True, pretrained=False,
                                 weights=str(TINY_DINO_WEIGHTS),
                                 resolution=224, steps=300, batch_size=16, eval_resolution=320,
                                 max_eval_images=50, ckpt_every=50, log_every=10),
    }


def require_weights(names: list, table: dict) -> None:
    """Exit with one line when a chosen setting is unknown or its weights file is missing (before any work)."""
    for name in names:
        if name not in table:
            sys.exit(f"error: unknown setting {name!r} in --settings; choose from {', '.join(table)}")
        weights = table[name].get("weights")
        if weights and not Path(weights).is_file():
            sys.exit(f"error: setting {name} reads the backbone {weights}, which is missing: run "
                     f"`bash benchmarks/pretrain_cpu.sh` and copy runs/pretrain-camvid-tiny/backbone.pt there "
                     f"(or leave {name} out with --settings)")


def make_data(runs: Path) -> None:
    """The two generated sets: the demo's images, and one with more classes and small objects."""
    if not (runs / "data-demo" / "imgs").exists():
        make_synthetic_dataset(runs / "data-demo")  # the demo preset's generator settings
    if not (runs / "data-small-objects" / "imgs").exists():
        make_synthetic_dataset(runs / "data-small-objects", n_train=60, n_val=16, size=(128, 160), n_classes=8,
                               seed=1, object_scale=(0.06, 0.16), n_objects=(4, 9))


def metrics(result: dict) -> dict:
    s = summary_rows(result)
    return {"cluster_acc": s["cluster_strict_acc"], "cluster_miou": s["cluster_strict_miou"],
            "linear_acc": s.get("linear_acc"), "linear_miou": s.get("linear_miou")}


class Setting:
    """One setting's shared pieces: the published-settings config, the feature cache, and the
    validation features (computed once for every row; exact)."""

    def __init__(self, name: str, values: dict, runs: Path):
        self.name, self.values, self.out = name, values, runs / name
        self.cache_dir = self.out / "cache"
        self.base = make_config(dict(values, cache_dir=str(self.cache_dir), shifts="fixed", **PUBLISHED))
        t0 = time.perf_counter()
        backbone, _ = build_backbone_from_config(self.base)
        self.cache = prepare(self.base, self.out / "prepare", backbone)
        self.prepare_s = time.perf_counter() - t0
        self.shared = SharedFeatures(backbone)

    def evaluate(self, model, folder: Path) -> dict:
        return metrics(evaluate_checkpoint_model(self.base, model, folder))

    def stego(self, cfg, folder: Path) -> dict:
        """Train (or reuse a finished identical run) and evaluate one STEGO row."""
        finished = reuse(cfg, folder)
        if finished is not None:
            return finished
        t = time.perf_counter()
        ckpt = train_stego(cfg, folder)
        result = self.evaluate(load_with_backbone(ckpt, self.shared, "cpu"), folder / "eval")
        result["seconds"] = time.perf_counter() - t
        print(f"  {folder.name}: {result}", flush=True)
        (folder / "bench_row.json").write_text(json.dumps({"config": cfg.to_dict(), "metrics": result}))
        return result

    def auto_config(self, seed: int):
        return make_config(dict(self.values, seed=seed, cache_dir=str(self.cache_dir), shifts="auto",
                                select="label-free"))


def fixed_backbone(setting: Setting) -> dict:
    """Config values that keep the setting's backbone when the seed changes. A randomly
    initialised backbone is drawn from ``--seed``, so for a seed check its seed-0 weights are
    written once to a ``stegoseg-backbone`` file and passed as ``--weights`` (the features
    are those of the main rows; the cache is keyed by the file, so it is extracted once more)."""
    if setting.base.weights or setting.base.pretrained:
        return {}
    path = setting.out / "replicates" / "backbone-seed0.pt"
    if not path.exists():
        save_backbone_file(unwrap_backbone(setting.shared), setting.base.tiny, path)
    return {"weights": str(path)}


def run_replicates(setting: Setting, seeds: list) -> dict:
    """The published and auto rows again with other seeds (head initialisation, batch order,
    feature dropout, k-means seeds; same backbone, schedule and evaluation): how much of a
    difference between the two rows is seed noise. ``{seed: {"published": M, "auto": M}}``."""
    out = {}
    keep = fixed_backbone(setting)
    for seed in seeds:
        folder = setting.out / "replicates" / f"seed{seed}"
        print(f"  [seed {seed}]", flush=True)
        published = setting.stego(replace(setting.base, seed=seed, select="last", **keep), folder / "published")
        auto_cfg = replace(setting.auto_config(seed), **keep)
        auto = reuse(auto_cfg, folder / "auto")
        if auto is None:  # an interrupted or older auto run of this script is run afresh
            shutil.rmtree(folder / "auto", ignore_errors=True)
            auto = setting.stego(auto_cfg, folder / "auto")
        out[str(seed)] = {"published": published, "auto": auto}
    return out


def run_setting(name: str, values: dict, runs: Path, previous: Optional[dict] = None,
                replicate_seeds: tuple = ()) -> dict:
    """All rows of a setting; with ``previous`` (that setting's row from an earlier invocation)
    only the auto row is run again and the others are kept."""
    t0 = time.perf_counter()
    setting = Setting(name, values, runs)
    out, base, cache, stego = setting.out, setting.base, setting.cache, setting.stego
    timings = {"prepare_s": setting.prepare_s}
    evaluate, shared = setting.evaluate, setting.shared

    if previous is not None:
        # the seed check's auto rows came from the same auto code as the old auto row: dropped with it
        row = {k: v for k, v in previous.items() if k not in ("auto", "auto_chosen", "timings", "replicates")}
    else:
        row = {"name": name, "config": {k: v for k, v in values.items() if k not in ("progress",)}}
        row["raw"] = reuse(base, out / "raw")
        if row["raw"] is None:
            raw_model = fit_feature_baseline(base, out / "raw", backbone=shared)
            row["raw"] = evaluate(raw_model, out / "raw")
            (out / "raw" / "bench_row.json").write_text(json.dumps({"config": base.to_dict(), "metrics": row["raw"]}))
        print(f"  raw: {row['raw']}", flush=True)
        row["published"] = stego(replace(base, select="last"), out / "published")
        grid = {}
        for point in GRID:
            key = f"b_knn={point['b_knn']},b_rand={point['b_rand']},pointwise={'on' if point['pointwise'] else 'off'}"
            folder = out / "grid" / key.replace(",", "_").replace("=", "")
            grid[key] = stego(replace(base, select="last", **point), folder)
        best = max(grid, key=lambda k: grid[k]["cluster_miou"])
        row["oracle"] = dict(grid[best], grid_point=best)
        row["grid"] = grid
    auto_cfg = setting.auto_config(base.seed)
    if (out / "auto").exists():
        shutil.rmtree(out / "auto")  # this script's own work folder: a fresh auto run
    row["auto"] = stego(auto_cfg, out / "auto")
    calibration = json.loads((out / "auto" / "calibration.json").read_text())
    selection = json.loads((out / "auto" / "selection.json").read_text())
    row["auto_chosen"] = {
        "b_self": calibration["b_self"], "b_knn": calibration["b_knn"], "b_rand": calibration["b_rand"],
        "pointwise": calibration["pointwise"], "same_rate": calibration["same_rate"],
        "selected": selection["chosen"], "selected_step": selection["chosen_step"],
        "label_free_score": {k: v["label_free_score"] for k, v in selection["candidates"].items()},
    }
    row["criterion_vs_miou"] = criterion_vs_miou(base, out, cache)
    if replicate_seeds:
        row["replicates"] = run_replicates(setting, replicate_seeds)
    timings["total_s"] = time.perf_counter() - t0
    row["timings"] = timings
    return row


def add_replicates(row: dict, values: dict, runs: Path, seeds: list) -> dict:
    """``row`` (from an earlier invocation) with the replicate seeds added."""
    t0 = time.perf_counter()
    row = dict(row, replicates=dict(row.get("replicates", {}), **run_replicates(Setting(row["name"], values, runs), seeds)))
    row["timings"] = dict(row.get("timings", {}), replicates_s=time.perf_counter() - t0)
    return row


def reuse(cfg, folder: Path):
    """The metrics of a row this script finished earlier in ``folder`` with the same config
    (an interrupted benchmark continues where it stopped), else None. The auto row is
    always run afresh."""
    path = folder / "bench_row.json"
    if path.exists():
        saved = json.loads(path.read_text())
        current = json.loads(json.dumps(cfg.to_dict()))
        # a field added to the config after the row ran, at its default value, changes nothing
        defaults = json.loads(json.dumps(type(cfg)().to_dict()))
        added = {k for k in current if k not in saved["config"] and current[k] == defaults.get(k)}
        if saved["config"] == {k: v for k, v in current.items() if k not in added}:
            print(f"  {folder.name}: {saved['metrics']} (finished earlier, same config)", flush=True)
            return saved["metrics"]
    return None


def criterion_vs_miou(base, out: Path, cache: FeatureCache) -> dict:
    """The label-free criterion (reference: the uncentred calibration, as ``--select`` uses it) of
    every STEGO row's final checkpoint next to its validation cluster mIoU, and their Spearman
    rank correlation: does the criterion order runs as the labels do?"""
    knn = cache.neighbors(base.n_neighbors)
    n_clusters = load(out / "published" / "checkpoint.pt").n_clusters
    reference = calibrate_for_config(replace(base, pointwise=False), cache, knn, n_clusters)
    points = []
    for folder in [out / "published", *sorted((out / "grid").iterdir()), out / "auto"]:
        model = load(folder / "checkpoint.pt")
        score = score_for_config(base, model.head, cache, knn, reference, n_clusters).score
        miou = json.loads((folder / "eval" / "metrics.json").read_text())["cluster"]["strict"]["miou"]
        points.append({"run": folder.name, "label_free_score": score, "val_cluster_miou": miou})
    rho = spearmanr([p["label_free_score"] for p in points], [p["val_cluster_miou"] for p in points]).statistic
    print(f"  criterion vs val cluster mIoU over {len(points)} runs: Spearman {rho:.3f}", flush=True)
    return {"spearman": float(rho), "points": points}


def gap_closed(row: dict):
    """(auto - published) / (oracle - published) in cluster mIoU; None where the published
    settings are themselves the best grid point (no gap to close)."""
    gap = row["oracle"]["cluster_miou"] - row["published"]["cluster_miou"]
    return (row["auto"]["cluster_miou"] - row["published"]["cluster_miou"]) / gap if gap > 0 else None


def table(rows: list) -> str:
    lines = ["| setting | row | cluster acc | cluster mIoU | linear acc | linear mIoU |", "|---|---|---|---|---|---|"]
    for r in rows:
        for key, label in (("raw", "raw features (k-means)"), ("published", "STEGO, published CocoStuff settings"),
                           ("oracle", f"STEGO, oracle grid point ({r['oracle']['grid_point']}), WITH labels"),
                           ("auto", "STEGO, `--shifts auto --select label-free` (no labels)")):
            m = r[key]
            lines.append(f"| {r['name']} | {label} | {m['cluster_acc']:.1f} | {m['cluster_miou']:.1f} | "
                         f"{m['linear_acc']:.1f} | {m['linear_miou']:.1f} |")
    return "\n".join(lines)


def write_summary(rows: list, order: list, out: Path, seconds: float) -> None:
    """The JSON result (settings, gap closed, bars) and the markdown table."""
    rows.sort(key=lambda r: order.index(r["name"]))
    closed = {r["name"]: gap_closed(r) for r in rows}
    defined = [c for c in closed.values() if c is not None]
    bars = {
        "auto_beats_published_cluster_miou_everywhere": all(r["auto"]["cluster_miou"] > r["published"]["cluster_miou"] for r in rows),
        "mean_gap_closed_over_settings_with_a_gap": sum(defined) / len(defined) if defined else None,
        "settings_where_published_is_the_best_grid_point": [n for n, c in closed.items() if c is None],
        "demo_auto_cluster_acc": next((r["auto"]["cluster_acc"] for r in rows if r["name"] == "demo"), None),
    }
    seed_check = replicate_summary(rows)
    result = {"benchmark": "label_free", "machine": machine(), "seconds_this_invocation": seconds,
              "settings": rows, "gap_closed": closed, "bars": bars, "seed_check": seed_check}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2, default=float))

    def closed_text(name):
        c = closed[name]
        return (f"closes {100 * c:.0f}% of the published -> oracle cluster-mIoU gap" if c is not None
                else "(the published settings are the best grid point: no gap to close)")

    md = table(rows) + "\n\n" + "\n".join(
        f"- {r['name']}: auto {closed_text(r['name'])}; chosen shifts "
        f"b_self {r['auto_chosen']['b_self']:.3f}, b_knn {r['auto_chosen']['b_knn']:.3f}, "
        f"b_rand {r['auto_chosen']['b_rand']:.3f}, spatial centring {'on' if r['auto_chosen']['pointwise'] else 'off'}; "
        f"selected checkpoint {r['auto_chosen']['selected']}; label-free criterion vs val cluster mIoU over the "
        f"setting's {len(r['criterion_vs_miou']['points'])} STEGO runs: Spearman {r['criterion_vs_miou']['spearman']:.2f}"
        for r in rows) + "\n"
    if seed_check:
        md += "\n" + replicate_table(seed_check) + "\n"
    out.with_suffix(".md").write_text(md)
    print(md)
    print(json.dumps(bars, indent=2))


def replicate_summary(rows: list) -> dict:
    """Per setting with replicate seeds: cluster mIoU of published and auto for every seed (the
    main rows are seed 0), their means, and on how many seeds auto is ahead."""
    summary = {}
    for r in rows:
        if not r.get("replicates"):
            continue
        per_seed = {str(r["config"]["seed"]): {"published": r["published"], "auto": r["auto"]}, **r["replicates"]}
        pub = [v["published"]["cluster_miou"] for v in per_seed.values()]
        auto = [v["auto"]["cluster_miou"] for v in per_seed.values()]
        summary[r["name"]] = {
            "seeds": list(per_seed), "published_cluster_miou": pub, "auto_cluster_miou": auto,
            "published_mean": sum(pub) / len(pub), "auto_mean": sum(auto) / len(auto),
            "auto_ahead_on_seeds": sum(a > p for a, p in zip(auto, pub)),
        }
    return summary


def replicate_table(summary: dict) -> str:
    lines = [("Seed check (the published and auto rows again with other seeds; same backbone, schedule and evaluation; "
              "cluster mIoU; the first seed is the main rows'):"),
             "", "| setting | seeds | published | auto | mean published | mean auto | auto ahead |", "|---|---|---|---|---|---|---|"]

    def fmt(values):
        return " / ".join(f"{x:.1f}" for x in values)

    for name, s in summary.items():
        lines.append(f"| {name} | {', '.join(s['seeds'])} | {fmt(s['published_cluster_miou'])} | "
                     f"{fmt(s['auto_cluster_miou'])} | {s['published_mean']:.1f} | {s['auto_mean']:.1f} | "
                     f"{s['auto_ahead_on_seeds']} of {len(s['seeds'])} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", default=str(REPO / "runs" / "bench-label-free"), help="work folder (caches, runs)")
    parser.add_argument("--settings", default=None, help="comma-separated subset of the settings")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "label_free.json"))
    parser.add_argument("--summarise", action="store_true",
                        help="only rewrite the summary (bars, markdown table) from the rows already in --out")
    parser.add_argument("--only-auto", action="store_true",
                        help="run only the auto row again, keeping the other rows of --out (after a change to --shifts auto)")
    parser.add_argument("--replicate-seeds", default="",
                        help="comma-separated extra seeds: the published and auto rows again with each (a seed-noise check)")
    parser.add_argument("--replicates-only", action="store_true",
                        help="only add --replicate-seeds to the rows already in --out (nothing else is run again)")
    args = parser.parse_args()
    seeds = [int(x) for x in args.replicate_seeds.split(",") if x.strip()]
    if args.replicates_only and not seeds:
        parser.error("--replicates-only needs --replicate-seeds")
    runs = Path(args.runs)
    if args.summarise:
        saved = json.loads(Path(args.out).read_text())
        write_summary(saved["settings"], list(settings(runs)), Path(args.out), saved["seconds_this_invocation"])
        return 0
    runs.mkdir(parents=True, exist_ok=True)
    make_data(runs)
    all_settings = settings(runs)
    names = args.settings.split(",") if args.settings else list(all_settings)
    require_weights(names, all_settings)
    out = Path(args.out)
    keep_previous = args.settings or args.replicates_only
    previous = json.loads(out.read_text())["settings"] if out.exists() and keep_previous else []
    rows = [r for r in previous if r["name"] not in names]
    t0 = time.perf_counter()
    kept = {r["name"]: r for r in previous}
    for name in names:
        print(f"[{name}]", flush=True)
        if (args.only_auto or args.replicates_only) and name not in kept:
            parser.error(f"{out} has no rows for {name}; run it without --only-auto / --replicates-only first")
        if args.replicates_only:
            rows.append(add_replicates(kept[name], all_settings[name], runs, seeds))
        else:
            rows.append(run_setting(name, all_settings[name], runs, previous=kept[name] if args.only_auto else None,
                                    replicate_seeds=seeds))
    write_summary(rows, list(all_settings), out, time.perf_counter() - t0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
