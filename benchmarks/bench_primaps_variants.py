"""The measured effect of PriMaPs-EM's deliberate training differences from its reference
(docs/primaps.md), on the ``primaps`` row of ``bench_methods.py`` (same settings, seeds, schedule
and evaluation: strict, no CRF):

* ``cache``: the default, EM on the feature cache's crops (five-crop at ``--resolution``), no
  augmentation: bench_methods' own ``primaps`` row (reused from
  ``benchmarks/results/methods-rows/`` when the config and backbone match);
* ``student-augs``: ``--primaps-student-augs``, the reference's ``--student-augs`` recipe: the
  backbone runs on every batch, each crop flipped at random with its masks, the teacher reads the
  clean crop and the student a blurred, jittered or grey copy;
* ``centre-crops``: the reference's training data, one centre crop per image at the evaluation
  resolution (``--no-five-crop --resolution EVAL``: 320 px on CamVid, as the reference's 320 px
  crops), its own cache and pseudo masks;
* ``pca-all-vectors``: the prototypes' PCA start on every feature vector of the cache instead of
  at most 262,144 vectors of at most 2,976 crops;
* ``best-val-step``: the reference's model choice, the EM checkpoint (every ``ckpt_every`` steps and
  the last) of the best validation cluster mIoU, chosen WITH labels, against our last step: the
  ``cache`` run's saved teachers, each evaluated (its prototypes and linear probe at that step).

``best-val-step`` is what ``--select val-miou`` does for PriMaPs-EM, done here on the ``cache`` run
so that it costs no training of its own.

Run time on the project's 2-core CPU (2026-12-03), three seeds: demo about 40 minutes (a minute
per row, ``student-augs`` 11 minutes: the random ViT-S/8 runs twice per step); CamVid with the
tiny DINO about 90 minutes (a row that builds its seed's pseudo masks 11 minutes, 8.5 of them the
masks; one that reuses them about 4; ``best-val-step`` 3 minutes of evaluations, plus the
``cache`` run when bench_methods' folder lacks it). Rows are written as they finish to
``benchmarks/results/primaps_variants.json`` / ``.md`` (machine named) and reused when the
script runs again (``--runs`` folder, same config).

    PYTHONPATH=src python3 benchmarks/bench_primaps_variants.py
    PYTHONPATH=src python3 benchmarks/bench_primaps_variants.py --settings demo --variants student-augs --seeds 0
"""
from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine  # noqa: E402
from bench_label_free import REPO, Setting, make_data, metrics, require_weights, reuse, settings  # noqa: E402
from bench_methods import reuse_stored, row_config, stored_row, with_fixed_backbone  # noqa: E402

import stegoseg.training.primaps as primaps_training
from stegoseg.config.stego import make_config
from stegoseg.methods.cause import train_method
from stegoseg.methods.common import evaluate_checkpoint_model
from stegoseg.studies.dimred import load_with_backbone

VARIANTS = ("cache", "student-augs", "centre-crops", "pca-all-vectors", "best-val-step")
METRICS = ("cluster_acc", "cluster_miou", "linear_acc", "linear_miou")


def variant_values(variant: str, values: dict) -> dict:
    """The setting's config values for ``variant`` (what its cache is built from)."""
    if variant == "centre-crops":
        return dict(values, five_crop=False, resolution=values["eval_resolution"])
    return values


def run_row(setting: Setting, eval_setting: Setting, variant: str, seed: int, folder: Path) -> dict:
    """One (variant, seed) row: trained (or reused) and evaluated on the setting's evaluation."""
    cfg = row_config(setting, "primaps", seed, {}, folder)
    if variant == "student-augs":
        cfg = make_config(dict(cfg.to_dict(), primaps_student_augs=True))
    if variant == "cache":
        stored = reuse_stored(stored_row(setting, "primaps", seed, cfg), cfg)
        if stored is not None:
            return stored
    finished = reuse(cfg, folder) if variant != "pca-all-vectors" else _reuse_marked(cfg, folder)
    if finished is not None:
        return finished
    if folder.exists():  # an interrupted row of this script: start it again
        shutil.rmtree(folder)
    limits = primaps_training.PCA_INIT_VECTORS, primaps_training.PCA_INIT_CROPS
    if variant == "pca-all-vectors":
        primaps_training.PCA_INIT_VECTORS = primaps_training.PCA_INIT_CROPS = 1 << 62
    try:
        t = time.perf_counter()
        ckpt = train_method(cfg, folder)
        seconds = time.perf_counter() - t
    finally:
        primaps_training.PCA_INIT_VECTORS, primaps_training.PCA_INIT_CROPS = limits
    model = load_with_backbone(ckpt, eval_setting.shared, "cpu")
    result = metrics(evaluate_checkpoint_model(eval_setting.base, model, folder / "eval"))
    steps = cfg.primaps_steps or cfg.steps
    result.update(train_seconds=seconds, train_steps=steps, seconds_per_step=seconds / steps)
    print(f"  {variant} seed {seed}: {json.dumps(result)}", flush=True)
    record = {"config": cfg.to_dict(), "metrics": result}
    if variant == "pca-all-vectors":
        record["pca_all_vectors"] = True
    (folder / "bench_row.json").write_text(json.dumps(record))
    return result


def best_val_step(setting: Setting, seed: int, folder: Path) -> dict:
    """The ``cache`` row's run (bench_methods' folder; trained there again when only its stored
    metrics are here) with each saved EM step's teacher evaluated; the metrics of the step with
    the best validation cluster mIoU, with that step and every step's cluster mIoU."""
    import torch

    from bench_methods import train_row
    from stegoseg.nn.primaps import PrototypeHead

    record = folder / "bench_row.json"
    if record.exists():
        saved = json.loads(record.read_text())
        print(f"  best-val-step seed {seed}: {saved['metrics']} (finished earlier)", flush=True)
        return saved["metrics"]
    run = setting.out / "methods" / f"seed{seed}" / "primaps"
    cfg = row_config(setting, "primaps", seed, {}, run)
    if not (run / "checkpoint.pt").exists():
        train_row(setting, "primaps", cfg, run, seed, needed_later=True)
    model = load_with_backbone(run / "checkpoint.pt", setting.shared, "cpu")
    scores, results = {}, {}
    for ckpt in sorted((run / "lightning").glob("step*.ckpt")):
        step = int(ckpt.stem[len("step"):])
        state = torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]
        teacher = PrototypeHead(model.code_dim, model.n_clusters)
        teacher.load_state_dict({k[len("teacher."):]: v for k, v in state.items() if k.startswith("teacher.")})
        with torch.no_grad():
            model.cluster_probe.centroids.copy_(teacher.weight())
            if model.linear_probe is not None:
                model.linear_probe.load_state_dict({k[len("linear_probe."):]: v for k, v in state.items()
                                                    if k.startswith("linear_probe.")})
        results[step] = metrics(evaluate_checkpoint_model(setting.base, model, folder / f"eval-step{step}"))
        scores[step] = results[step]["cluster_miou"]
    best = max(sorted(scores), key=lambda s: scores[s])  # ties: the earliest step
    result = dict(results[best], chosen_step=best, last_step=max(scores),
                  cluster_miou_per_step={str(s): v for s, v in scores.items()})
    print(f"  best-val-step seed {seed}: {json.dumps(result)}", flush=True)
    folder.mkdir(parents=True, exist_ok=True)
    record.write_text(json.dumps({"config": cfg.to_dict(), "metrics": result}))
    return result


def _reuse_marked(cfg, folder: Path):
    """``reuse`` for the one variant that its config does not tell apart (a module constant)."""
    record = folder / "bench_row.json"
    if record.exists() and json.loads(record.read_text()).get("pca_all_vectors"):
        return reuse(cfg, folder)
    return None


def summarise(per_seed: dict) -> dict:
    rows = list(per_seed.values())
    return {"per_seed": per_seed, "mean": {k: statistics.fmean(r[k] for r in rows) for k in METRICS}}


def table(result: dict) -> str:
    lines = ["| setting | variant | cluster acc | cluster mIoU (seeds) | cluster mIoU vs cache (seeds up / down) | "
             "linear mIoU | train s / run |", "|---|---|---|---|---|---|---|"]
    for name, variants in result["settings"].items():
        base = variants.get("cache")
        for variant, row in variants.items():
            m, per = row["mean"], row["per_seed"]
            seeds = "/".join(f"{per[s]['cluster_miou']:.1f}" for s in sorted(per))
            delta = ""
            if base is not None and variant != "cache":
                common = [s for s in per if s in base["per_seed"]]
                diffs = [per[s]["cluster_miou"] - base["per_seed"][s]["cluster_miou"] for s in common]
                if diffs:
                    delta = (f"{statistics.fmean(diffs):+.1f} ({sum(d > 0 for d in diffs)} / "
                             f"{sum(d < 0 for d in diffs)} of {len(diffs)})")
            secs = [r["train_seconds"] for r in per.values() if r.get("train_seconds") is not None]
            seconds = f"{statistics.fmean(secs):.0f}" if secs else "-"
            lines.append(f"| {name} | {variant} | {m['cluster_acc']:.1f} | {m['cluster_miou']:.1f} ({seeds}) | {delta} | "
                         f"{m['linear_miou']:.1f} | {seconds} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", default=str(REPO / "runs" / "bench-methods"))
    parser.add_argument("--settings", default="demo,camvid-tiny-dino")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "primaps_variants.json"))
    args = parser.parse_args()
    runs, out = Path(args.runs), Path(args.out)
    table_of = settings(runs)
    names = args.settings.split(",")
    require_weights(names, table_of)
    variants = args.variants.split(",")
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise SystemExit(f"--variants: unknown {', '.join(unknown)} (choose from {', '.join(VARIANTS)})")
    make_data(runs)
    seeds = [int(s) for s in args.seeds.split(",")]
    previous = json.loads(out.read_text()) if out.exists() else {"settings": {}}
    result = {"benchmark": "primaps_variants", "machine": machine(), "settings": previous.get("settings", {})}
    t0 = time.perf_counter()
    for name in names:
        print(f"[{name}]", flush=True)
        values = with_fixed_backbone(name, table_of[name], runs)
        evaluation = Setting(name, values, runs)  # bench_methods' setting: its cache, backbone and evaluation
        for variant in variants:
            # another cache (centre crops): its own folder, so that its prepare stage does not meet bench_methods'
            setting = evaluation if variant_values(variant, values) is values else \
                Setting(name, variant_values(variant, values), runs / variant)
            row = result["settings"].setdefault(name, {}).get(variant, {"per_seed": {}})
            for seed in seeds:
                folder = setting.out / "primaps-variants" / variant / f"seed{seed}"
                row["per_seed"][str(seed)] = (best_val_step(setting, seed, folder) if variant == "best-val-step"
                                              else run_row(setting, evaluation, variant, seed, folder))
                result["settings"][name][variant] = summarise(row["per_seed"])
                result["seconds_this_invocation"] = time.perf_counter() - t0
                out.write_text(json.dumps(result, indent=1, default=float))
                out.with_suffix(".md").write_text(
                    "PriMaPs-EM's training differences from its reference, measured (strict, no CRF, percent; mean "
                    "over the seeds, per seed in brackets; `cache` is bench_methods' `primaps` row). Random and tiny "
                    "backbones: not a ranking on real data. `train s / run` is the whole training call: a row that "
                    "reuses the pseudo masks an earlier row built for its seed (`student-augs`, `pca-all-vectors` "
                    "after `cache`) does not count them; `best-val-step` trains nothing of its own.\n\n"
                    + table(result) + "\n")
    print(table(result), flush=True)


if __name__ == "__main__":
    main()
