"""Every trainable method on the four settings of ``bench_label_free.py``, three seeds each.

Rows, with one feature cache, one schedule and one evaluation per setting (strict counting,
no CRF, percent):

* ``raw``: the raw-feature baseline (k-means cluster probe + linear probe on the backbone features);
* ``stego``: STEGO as a user runs it on a new folder (``--shifts auto --select label-free``);
* ``primaps``: PriMaPs-EM on the backbone features (pseudo masks, the reference's PCA start, EM
  with the EMA teacher for the setting's ``steps``);
* ``stego+primaps`` / ``cause-tr+primaps``: PriMaPs-EM boosting that seed's finished ``stego`` /
  ``cause-tr`` model (``--init-from`` its checkpoint), ``steps`` EM steps;
* ``cause-mlp`` / ``cause-tr``: CAUSE with its defaults (2048-concept clusterbook, thresholds
  0.3 / 0.1, temperature 0.07, EMA 0.99, grid sampling 4), stage 2 for the setting's ``steps``
  and stage 3 (the modularity cluster probe) for as many steps; the row's cluster probe is the
  default k-means refit on the trained code (``--cluster-fit kmeans``, as every other row's),
  and ``modularity_probe`` holds the same run evaluated with the reference's own stage-3 probe
  (``--cluster-fit online``).

No row sees a label in training apart from its linear probe. Seeds 0, 1, 2 change the head
initialisation, batch order, dropout and k-means seeds; the backbone stays the same (a random
one is written once to a weights file, as in the label-free benchmark's seed check), so the
features are the same for every seed. Random and tiny CPU-pretrained backbones do NOT rank
methods on real data: the point is that every method runs end to end through the same
pipeline, and which one wins on these settings.

Training cost: each row's wall time of training (all stages) and its optimiser steps, so a
cost per step and per run, measured in the same invocation on the same machine.

Run time on the project's 2-core CPU (2026-12-01/02): about 6 minutes per seed on each generated
setting (CAUSE-TR is most of it), about 65 minutes per seed on CamVid with the tiny DINO
backbone (CAUSE-TR's 600 steps take 29 of them; the whole setting, three seeds and its
training-cost measurement, took 130 minutes of one invocation after seed 0 was stored), and more for CamVid with the random ViT-S/8 (its
cache alone takes about 15 minutes), plus a few minutes of training-cost measurement per setting.

Writes ``benchmarks/results/methods.json`` ({"settings": [{"name", "rows": {method: M}}]}, M
with the metrics' mean and per seed) and ``benchmarks/results/methods.md``. Rows finished by
an earlier invocation with the same config are reused (an interrupted run continues); each
finished row is also written, small, to ``benchmarks/results/methods-rows/SETTING/seedK/`` with
its config, the fingerprint of the backbone weights' tensors and their per-tensor sums and norms, and reused
from there on another machine when the config matches and the backbone is the same (the same fingerprint, or
the same sums and norms to float32 rounding: a seed-0 random backbone drawn on another CPU can differ in a few
last bits); ``runs/`` does not travel between machines, a committed row does.

    PYTHONPATH=src python3 benchmarks/bench_methods.py                       # all four settings
    PYTHONPATH=src python3 benchmarks/bench_methods.py --settings demo --seeds 0
    PYTHONPATH=src python3 benchmarks/bench_methods.py --cost-only          # the per-step cost again, alone
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

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, save_backbone_file  # noqa: E402
from bench_label_free import REPO, Setting, make_data, metrics, require_weights, reuse, settings  # noqa: E402

from stegoseg.config.stego import make_config
from stegoseg.features.cache import state_fingerprint
from stegoseg.methods.baseline import fit_feature_baseline
from stegoseg.methods.cause import MODULARITY_PROBE, train_method
from stegoseg.methods.common import build_backbone_from_config, evaluate_checkpoint_model
from stegoseg.studies.dimred import load_with_backbone

METHODS = ("raw", "stego", "cause-mlp", "cause-tr", "primaps", "stego+primaps", "cause-tr+primaps")
METRICS = ("cluster_acc", "cluster_miou", "linear_acc", "linear_miou")


def row_config(setting: Setting, method: str, seed: int, keep: dict, folder: Path):
    """The config of one (method, seed) row of a setting. ``METHOD+primaps`` boosts the finished
    METHOD row of the same seed (``--method primaps --init-from``: the same as training METHOD
    again inside ``--method METHOD+primaps``, without paying for it twice)."""
    values = dict(setting.values, seed=seed, cache_dir=str(setting.cache_dir), **keep)  # noqa: C408
    if method == "stego":
        return make_config(dict(values, shifts="auto", select="label-free"))
    if method == "raw":
        return replace(setting.base, seed=seed, **keep)
    if method == "primaps":
        return make_config(dict(values, method="primaps", primaps_steps=values["steps"]))
    if method.endswith("+primaps"):
        start = folder.parent / method[: -len("+primaps")] / "checkpoint.pt"
        # (set after validation: the row is also configured, to look for a stored copy, before `start` is trained)
        return replace(make_config(dict(values, method="primaps", primaps_steps=values["steps"])), init_from=str(start))
    return make_config(dict(values, method=method, cause_probe_steps=values["steps"]))


ROWS = REPO / "benchmarks" / "results" / "methods-rows"


def backbone_identity(cfg) -> dict:
    """What a stored row records of the backbone weights file it read (both None: no file), from
    one read of the file: ``weights_fingerprint``, the SHA-1 of its tensors (of the tensors, not of
    the file: ``torch.save`` of the same seed-0 weights on another machine gives other bytes), and
    ``weights_signature``, each floating tensor's (sum, L2 norm) in float64. The seed-0 random
    backbone drawn on another CPU can differ in the last bits of some values (the vectorised
    initialisers round differently), which changes the fingerprint; the signature tells such a
    copy (equal to ~1e-7 relative) from another backbone (different at the first digit)."""
    if not cfg.weights:
        return {"weights_fingerprint": None, "weights_signature": None}
    saved = torch.load(cfg.weights, map_location="cpu", weights_only=True)
    state = saved.get("state_dict", saved)
    return {"weights_fingerprint": state_fingerprint(state),
            "weights_signature": {name: [float(t.double().sum()), float(t.double().norm())]
                                  for name, t in sorted(state.items()) if t.is_floating_point()}}


def same_backbone(saved: dict, cfg) -> bool:
    """A stored row's backbone is this one: the same tensor fingerprint, or the same signature to
    float32 rounding (rtol 1e-5 on every tensor's sum and norm, the same tensor names)."""
    mine = backbone_identity(cfg)
    if saved.get("weights_fingerprint") == mine["weights_fingerprint"]:
        return True
    theirs, ours = saved.get("weights_signature"), mine["weights_signature"]
    if not theirs or not ours or set(theirs) != set(ours):
        return False
    return all(abs(a - b) <= 1e-5 * max(abs(a), abs(b), 1e-3) for k in ours for a, b in zip(theirs[k], ours[k]))


def stored_row(setting: Setting, method: str, seed: int, cfg) -> Path:
    return ROWS / setting.name / f"seed{seed}" / f"{method.replace('+', '-plus-')}.json"


def reuse_stored(path: Path, cfg):
    """The metrics of a row committed under ``benchmarks/results/methods-rows`` by an earlier
    invocation (possibly on another machine: ``runs/`` does not travel) with the same config and
    the same backbone weights (by digest), else None."""
    if not path.exists():
        return None
    saved = json.loads(path.read_text())
    current = json.loads(json.dumps(cfg.to_dict()))
    same = {k: v for k, v in saved["config"].items() if k not in ("weights", "cache_dir", "data_root", "init_from")}
    mine = {k: current.get(k) for k in same}
    if same != mine or not same_backbone(saved, cfg):
        return None
    print(f"  {path.stem}: {saved['metrics']} (stored in {path.relative_to(REPO)}, same config and backbone)", flush=True)
    return saved["metrics"]


def train_row(setting: Setting, method: str, cfg, folder: Path, seed: int = 0, needed_later: bool = False) -> dict:
    """Train (or reuse) and evaluate one row; its metrics with training seconds and steps.
    ``needed_later``: a later row of this seed starts from this row's checkpoint, so a stored
    row without its checkpoint here is trained again."""
    finished = reuse(cfg, folder)
    if finished is not None:
        return finished
    store = stored_row(setting, method, seed, cfg)
    if not needed_later:
        finished = reuse_stored(store, cfg)
        if finished is not None:
            return finished
    if folder.exists():  # an interrupted row (no bench_row.json): start it again
        shutil.rmtree(folder)
    t = time.perf_counter()
    if method == "raw":
        model = fit_feature_baseline(cfg, folder, backbone=setting.shared)
        seconds, steps = time.perf_counter() - t, 0
    else:
        ckpt = train_method(cfg, folder)
        seconds = time.perf_counter() - t
        model = load_with_backbone(ckpt, setting.shared, "cpu")
        runs = 2 if method == "stego" and cfg.auto_centring == "both" else 1
        if method == "stego":
            steps = cfg.steps * runs
        elif "primaps" in method:
            steps = cfg.primaps_steps or cfg.steps  # the EM steps (the boosted model's own are in its row)
        else:
            steps = cfg.steps + cfg.cause_probe_steps
    result = metrics(evaluate_checkpoint_model(setting.base, model, folder / "eval"))
    result.update(train_seconds=seconds, train_steps=steps, seconds_per_step=seconds / steps if steps else None)
    if method in ("cause-mlp", "cause-tr"):  # the same run with the reference's own (modularity-fitted) cluster probe
        model.cluster_probe.centroids.data.copy_(torch.load(folder / MODULARITY_PROBE, weights_only=True))
        result["modularity_probe"] = metrics(evaluate_checkpoint_model(setting.base, model, folder / "eval-modularity"))
    print(f"  {method} {folder.name}: {json.dumps(result)}", flush=True)
    (folder / "bench_row.json").write_text(json.dumps({"config": cfg.to_dict(), "metrics": result}))
    store.parent.mkdir(parents=True, exist_ok=True)
    store.write_text(json.dumps({"config": cfg.to_dict(), **backbone_identity(cfg), "metrics": result},
                                indent=1, default=float))
    return result


def with_fixed_backbone(name: str, values: dict, runs: Path) -> dict:
    """A random backbone is drawn from ``--seed``: write the seed-0 one to a weights file once and
    pass it as ``--weights``, so that every seed's rows read the same features (one cache)."""
    if values.get("weights") or values.get("pretrained", True):
        return values
    path = runs / name / "backbone-seed0.pt"
    if not path.exists():
        backbone, _ = build_backbone_from_config(make_config(dict(values, seed=0)))
        save_backbone_file(backbone, values.get("tiny", False), path)
    return dict(values, weights=str(path))


def run_setting(name: str, values: dict, runs: Path, seeds: list, previous: dict = None,
                cost_only: bool = False) -> dict:
    """Every row of a setting (rows finished earlier are reused); the training cost is measured
    when ``previous`` (this setting's entry of an earlier invocation) has none or has other rows
    than this invocation's, or with ``cost_only``."""
    setting = Setting(name, with_fixed_backbone(name, values, runs), runs)
    if cost_only:
        return dict(previous, seconds_per_step=training_cost(setting))
    rows = {m: {"per_seed": {}} for m in METHODS}
    for seed in seeds:
        keep = {}
        for method in METHODS:
            folder = setting.out / "methods" / f"seed{seed}" / method
            cfg = row_config(setting, method, seed, keep, folder)
            later = f"{method}+primaps" in METHODS and reuse_stored(
                stored_row(setting, f"{method}+primaps", seed, cfg),
                row_config(setting, f"{method}+primaps", seed, keep, folder.parent / f"{method}+primaps")) is None
            rows[method]["per_seed"][str(seed)] = train_row(setting, method, cfg, folder, seed, needed_later=later)
    for method, row in rows.items():
        per = list(row["per_seed"].values())
        row["mean"] = {k: statistics.fmean(m[k] for m in per) for k in METRICS if all(m.get(k) is not None for m in per)}
        if all("modularity_probe" in m for m in per):
            row["mean"]["modularity_probe"] = {k: statistics.fmean(m["modularity_probe"][k] for m in per)
                                               for k in ("cluster_acc", "cluster_miou")}
        times = [m["train_seconds"] for m in per if m.get("train_seconds") is not None]
        steps = [m["seconds_per_step"] for m in per if m.get("seconds_per_step")]
        row["mean"]["train_seconds"] = statistics.fmean(times) if times else None
        row["mean"]["seconds_per_step"] = statistics.fmean(steps) if steps else None
    cost = (previous or {}).get("seconds_per_step")
    if cost is None or not same_rows(previous, rows):  # e.g. the rows of another backbone file: measure again
        cost = training_cost(setting)
    return {"name": name, "config": {k: v for k, v in values.items() if k != "progress"}, "seeds": seeds,
            "rows": rows, "seconds_per_step": cost}


def same_rows(previous: dict, rows: dict) -> bool:
    """The earlier invocation's entry has exactly these per-seed rows (its training cost was
    measured with them, so it still belongs next to them)."""
    before = previous.get("rows", {})
    return set(before) == set(rows) and all(
        json.loads(json.dumps(before[m]["per_seed"], default=float)) == json.loads(json.dumps(rows[m]["per_seed"], default=float))
        for m in rows)


def training_cost(setting: Setting, short: int = 10, long: int = 50) -> dict:
    """Seconds per training step of each method on the setting's cache, in this invocation: the
    time of ``long`` steps minus that of ``short`` steps, divided by ``long - short`` (start-up,
    calibration and probe fitting cancel). STEGO: one run with fixed shifts (its loss and probes);
    CAUSE: stage-2 steps (head + teacher + bank), with its clusterbook fitted beforehand."""
    from stegoseg.training.cause import fit_cause, fit_clusterbook
    from stegoseg.training.stego import fit_stego

    from stegoseg.methods.common import build_split, n_classes_for

    base = make_config(dict(setting.values, cache_dir=str(setting.cache_dir), shifts="fixed", select="last",
                            ckpt_every=10**6, progress=False))
    n_classes = n_classes_for(base, build_split(base, base.train_split, setting.out))
    out, root = {}, setting.out / "cost"
    for method in ("stego", "cause-mlp", "cause-tr"):
        times = {}
        for steps in (short, long):
            folder = root / f"{method}-{steps}"
            if folder.exists():
                shutil.rmtree(folder)
            cfg = make_config(dict(base.to_dict(), method=method, steps=steps, cause_probe_steps=1,
                                   cause_book_steps=5)) if method != "stego" else replace(base, steps=steps)
            if method == "stego":
                t = time.perf_counter()
                fit_stego(cfg, folder, setting.cache, n_classes, setting.cache.has_labels)
            else:
                book = fit_clusterbook(cfg, setting.cache, folder)
                t = time.perf_counter()
                fit_cause(cfg, folder, setting.cache, n_classes, setting.cache.has_labels, book)
            times[steps] = time.perf_counter() - t
        out[method] = (times[long] - times[short]) / (long - short)
    out["ratio_to_stego"] = {m: out[m] / out["stego"] for m in ("cause-mlp", "cause-tr")}
    print(f"  seconds per training step: {json.dumps(out)}", flush=True)
    return out


def table(result: dict) -> str:
    lines = ["| setting | method | cluster acc | cluster mIoU (seeds) | linear acc | linear mIoU | train s / run | "
             "s / step |", "|---|---|---|---|---|---|---|---|"]
    for s in result["settings"]:
        present = [m for m in METHODS if m in s["rows"]]  # a setting measured before a row was added lacks it
        best = max(present, key=lambda m: s["rows"][m]["mean"]["cluster_miou"])
        for method in present:
            row = s["rows"][method]
            m = row["mean"]
            per = "/".join(f"{v['cluster_miou']:.1f}" for v in row["per_seed"].values())
            mark = "**" if method == best else ""
            t = f"{m['train_seconds']:.0f}" if m.get("train_seconds") else "-"
            step = f"{m['seconds_per_step']:.3f}" if m.get("seconds_per_step") else "-"
            lines.append(f"| {s['name']} | {method} | {m['cluster_acc']:.1f} | {mark}{m['cluster_miou']:.1f}{mark} "
                         f"({per}) | {m['linear_acc']:.1f} | {m['linear_miou']:.1f} | {t} | {step} |")
            if "modularity_probe" in m:
                mp = m["modularity_probe"]
                per = "/".join(f"{v['modularity_probe']['cluster_miou']:.1f}" for v in row["per_seed"].values())
                lines.append(f"| {s['name']} | {method}, the reference's modularity probe | {mp['cluster_acc']:.1f} | "
                             f"{mp['cluster_miou']:.1f} ({per}) | | | | |")
    lines += ["", "Seconds per training step (same invocation, same cache; see `training_cost`):", "",
              "| setting | STEGO | CAUSE-MLP | CAUSE-TR | CAUSE-MLP / STEGO | CAUSE-TR / STEGO |", "|---|---|---|---|---|---|"]
    for s in result["settings"]:
        c = s.get("seconds_per_step")
        if c:
            lines.append(f"| {s['name']} | {c['stego']:.3f} | {c['cause-mlp']:.3f} | {c['cause-tr']:.3f} | "
                         f"{c['ratio_to_stego']['cause-mlp']:.2f} | {c['ratio_to_stego']['cause-tr']:.2f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", default=str(REPO / "runs" / "bench-methods"))
    parser.add_argument("--settings", default="demo,synthetic-small-objects,camvid-vits8-random,camvid-tiny-dino")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "methods.json"))
    parser.add_argument("--cost-only", action="store_true",
                        help="only measure the seconds per training step again, for settings already in --out")
    args = parser.parse_args()
    runs = Path(args.runs)
    table_of = settings(runs)
    require_weights(args.settings.split(","), table_of)
    make_data(runs)
    seeds = [int(s) for s in args.seeds.split(",")]
    out = Path(args.out)
    previous = json.loads(out.read_text()) if out.exists() else {"settings": []}
    done = {s["name"]: s for s in previous.get("settings", [])}
    t0 = time.perf_counter()
    for name in args.settings.split(","):
        print(f"[{name}]", flush=True)
        done[name] = run_setting(name, table_of[name], runs, seeds, previous=done.get(name), cost_only=args.cost_only)
        order = [n for n in table_of if n in done]
        result = {"benchmark": "methods", "machine": machine(), "seconds_this_invocation": time.perf_counter() - t0,
                  "settings": [done[n] for n in order]}
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2, default=float))
        md = table(result)
        missing = [n for n in table_of if n not in done]
        partial = [f"{s['name']} (seeds {', '.join(map(str, s['seeds']))})" for s in result["settings"] if len(s["seeds"]) < 3]
        if missing or partial:
            md += "\n\nNot measured yet: " + "; ".join(
                ([f"settings {', '.join(missing)}"] if missing else []) + ([f"only {', '.join(partial)}"] if partial else [])
            ) + " (run the script again: finished rows are reused)."
        out.with_suffix(".md").write_text(
            "Strict counting, no CRF, percent; mean over the seeds (per-seed cluster mIoU in brackets); the best "
            "cluster mIoU of a setting in bold. Random and tiny backbones: these numbers show that every method "
            "runs, not how they rank on real data.\n\n" + md + "\n")
        print(md, flush=True)


if __name__ == "__main__":
    main()
