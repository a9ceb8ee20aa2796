"""Does label-free checkpoint selection help CAUSE? (issue #20, item 4)

For CAUSE-MLP and CAUSE-TR on the generated settings of ``bench_methods.py`` (the same config
as its ``cause-mlp`` / ``cause-tr`` rows: defaults, ``steps`` stage-2 steps, a checkpoint every
``ckpt_every``), seeds 0, 1, 2, one training run each with ``--select val-miou``: every stage-2
head (each saved step and the last; the random backbone fixed to its seed-0 weights, as there) gets both the label-free criterion and its validation
cluster mIoU (the cluster probe refitted by k-means on that head's code, strict, no CRF), in the
run's ``selection.json``. From the same candidates:

* ``last``: the last head (what CAUSE keeps by default, as its reference does). This is another
  training run than bench_methods' row of that seed, and does not reproduce it exactly: demo
  within 0.2 points, small objects up to 10 (CAUSE's seeds vary that much there); the three
  choices of one row are always among the same run's heads;
* ``label-free``: the head with the best label-free score (``--select label-free``: no label);
* ``oracle``: the head with the best validation cluster mIoU (chosen WITH labels: the ceiling).

and the Spearman correlation of the criterion with validation cluster mIoU over a run's
candidates. Random backbones: this says whether the criterion picks better heads than the
last one on these settings, not on real data.

Run time on the project's 2-core CPU (2026-12-02): about 3 minutes per CAUSE-MLP run and 10-17 per
CAUSE-TR run (training plus the candidates' evaluations), so 40-60 minutes per setting.

Writes ``benchmarks/results/cause_selection.json`` and ``benchmarks/results/cause_selection.md``;
finished runs (``bench_selection.json`` in the run folder, same config) are reused.

    PYTHONPATH=src python3 benchmarks/bench_cause_selection.py
    PYTHONPATH=src python3 benchmarks/bench_cause_selection.py --settings demo --seeds 0
"""
from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

from scipy.stats import spearmanr

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine  # noqa: E402
from bench_label_free import REPO, Setting, make_data, require_weights, settings  # noqa: E402
from bench_methods import row_config, with_fixed_backbone  # noqa: E402

from stegoseg.methods.cause import train_method

METHODS = ("cause-mlp", "cause-tr")
CHOICES = ("last", "label-free", "oracle")


def run_one(setting: Setting, method: str, seed: int, folder: Path, reuse_only: bool = False):
    """One training run with ``--select val-miou``; the three choices among its stage-2 heads
    (``reuse_only``: only a finished run's, else None)."""
    cfg = replace(row_config(setting, method, seed, {}, folder), select="val-miou")
    record = folder / "bench_selection.json"
    if record.exists():
        saved = json.loads(record.read_text())
        if saved["config"] == json.loads(json.dumps(cfg.to_dict())):
            print(f"  {method} seed {seed}: reused {record}", flush=True)
            return saved["result"]
    if reuse_only:
        return None
    if folder.exists():  # an interrupted run (no bench_selection.json): this script's own folder, start it again
        shutil.rmtree(folder)
    t = time.perf_counter()
    train_method(cfg, folder)
    selection = json.loads((folder / "selection.json").read_text())
    candidates = {int(k): {"label_free_score": v["label_free_score"], "val_cluster_miou": v["val_cluster_miou"]}
                  for k, v in selection["candidates"].items()}
    steps = sorted(candidates)
    free = max(steps, key=lambda s: candidates[s]["label_free_score"])  # ties: the earliest, as --select does
    oracle = max(steps, key=lambda s: candidates[s]["val_cluster_miou"])
    rho = spearmanr([candidates[s]["label_free_score"] for s in steps],
                    [candidates[s]["val_cluster_miou"] for s in steps]).statistic
    result = {"last": candidates[steps[-1]]["val_cluster_miou"], "last_step": steps[-1],
              "label-free": candidates[free]["val_cluster_miou"], "label-free_step": free,
              "oracle": candidates[oracle]["val_cluster_miou"], "oracle_step": oracle,
              "spearman": None if rho != rho else float(rho), "seconds": time.perf_counter() - t,
              "candidates": {str(s): candidates[s] for s in steps}}
    print(f"  {method} seed {seed}: {json.dumps({k: v for k, v in result.items() if k != 'candidates'})}", flush=True)
    record.write_text(json.dumps({"config": cfg.to_dict(), "result": result}, indent=1, default=float))
    return result


def summarise(per_seed: dict) -> dict:
    per_seed = {seed: row for seed, row in per_seed.items() if row is not None}
    rows = list(per_seed.values())
    if not rows:
        return None
    mean = {c: statistics.fmean(r[c] for r in rows) for c in CHOICES}
    rhos = [r["spearman"] for r in rows if r["spearman"] is not None]
    mean["spearman"] = statistics.fmean(rhos) if rhos else None
    mean["label_free_beats_last"] = sum(r["label-free"] > r["last"] for r in rows)
    mean["label_free_below_last"] = sum(r["label-free"] < r["last"] for r in rows)
    return {"per_seed": per_seed, "mean": mean}


def table(result: dict) -> str:
    lines = ["| setting | method | last head | label-free choice | oracle (WITH labels) | label-free vs last "
             "(seeds up / down) | Spearman (criterion, val mIoU) |", "|---|---|---|---|---|---|---|"]
    for name, methods in result["settings"].items():
        for method, row in methods.items():
            if row is None:
                lines.append(f"| {name} | {method} | not run | | | | |")
                continue
            m, per = row["mean"], row["per_seed"]

            def cell(choice):
                seeds = "/".join(f"{per[s][choice]:.1f}" for s in sorted(per))
                return f"{m[choice]:.1f} ({seeds})"

            rho = "-" if m["spearman"] is None else f"{m['spearman']:+.2f}"
            lines.append(f"| {name} | {method} | {cell('last')} | {cell('label-free')} | {cell('oracle')} | "
                         f"{m['label_free_beats_last']} / {m['label_free_below_last']} of {len(per)} | {rho} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", default=str(REPO / "runs" / "bench-cause-selection"))
    parser.add_argument("--settings", default="demo,synthetic-small-objects")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "cause_selection.json"))
    parser.add_argument("--reuse-only", action="store_true",
                        help="train nothing: tabulate the runs an earlier invocation finished (the rest: not run)")
    args = parser.parse_args()
    runs = Path(args.runs)
    table_of = settings(runs)
    names = args.settings.split(",")
    require_weights(names, table_of)
    make_data(runs)
    seeds = [int(s) for s in args.seeds.split(",")]
    t0 = time.perf_counter()
    result = {"benchmark": "cause_selection", "machine": machine(), "settings": {}}
    for name in names:
        print(f"[{name}]", flush=True)
        setting = Setting(name, with_fixed_backbone(name, table_of[name], runs), runs)
        result["settings"][name] = {
            method: summarise({str(seed): run_one(setting, method, seed, setting.out / f"seed{seed}" / method,
                                                  reuse_only=args.reuse_only)
                               for seed in seeds})
            for method in METHODS}
    result["seconds_this_invocation"] = time.perf_counter() - t0
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2, default=float))
    missing = [f"{name} {method} seed {seed}" for name, methods in result["settings"].items()
               for method, row in methods.items() for seed in map(str, seeds)
               if row is None or seed not in row["per_seed"]]
    md = ("Strict validation cluster mIoU (percent, no CRF, the cluster probe refitted by k-means on each head's "
          "code), mean over the seeds (per seed in brackets), of three choices among one CAUSE run's stage-2 "
          "heads. Random backbones: not a ranking on real data.\n\n" + table(result) + "\n"
          + (f"\nNot run yet: {', '.join(missing)} (run the script again: finished runs are reused).\n" if missing else ""))
    out.with_suffix(".md").write_text(md)
    print(md, flush=True)


if __name__ == "__main__":
    main()
