"""The pipeline's commands: run (the main job), prepare, train, baseline, evaluate."""
from __future__ import annotations

import argparse

from stegoseg.cli.common import out_arg, print_summary
from stegoseg.config.stego import add_config_arguments
from stegoseg.preflight import check_writable, clear_outputs, lock_out, prepare_out


def cmd_run(args) -> int:
    from stegoseg.config.stego import explicit_values, resolve_config
    from stegoseg.methods.common import check_before_work, with_default_val_split
    from stegoseg.methods.run import run_all

    cfg = with_default_val_split(resolve_config(args), explicit_values(args))
    out = prepare_out(args.out, "run", "report.md", args.overwrite, resume=args.resume)
    if args.resume:
        check_something_to_resume(out / "train", f"--out {out}")
    check_before_work(cfg, out, evaluate=True)
    lock_out(out, "run")
    if args.overwrite and not args.resume:
        clear_outputs(out, "run")
    summary = run_all(cfg, out, resume=args.resume, baseline=args.baseline)
    if summary is not None:
        for name, rows in summary.items():
            print(name + ": " + (", ".join(f"{k} {v:.1f}" for k, v in rows.items()) or "no metrics (no labels)"))
        print(f"report: {out / 'report.md'}")
    return 0


def check_something_to_resume(train: "Path", where: str) -> None:
    """``--resume`` into a folder with no run is an error, not a silent fresh start."""
    from stegoseg.errors import StegosegError

    # any trace of a started run (a run killed while preparing has written its config.yaml)
    marks = [train / "config.yaml", train / "lightning", train / "candidates", train / "checkpoint.pt",
             train / "run_inputs.json"]
    if train.name == "train":  # `run`'s layout: the run folder's own config.yaml counts too
        marks.append(train.parent / "config.yaml")
    if not any(m.exists() for m in marks):
        raise StegosegError(f"--resume: {where} holds no run to resume (no config.yaml, no lightning/ checkpoints): "
                            "drop --resume to start a new run there, or point --out at the interrupted run's folder")


def cmd_prepare(args) -> int:
    from stegoseg.config.stego import resolve_config
    from stegoseg.methods.common import check_before_work, prepare

    cfg = resolve_config(args)
    out = check_writable(args.out)
    check_before_work(cfg, out, train=False)
    lock_out(out, "prepare")
    cache = prepare(cfg, out)
    print(f"feature cache: {cache.path} ({cache.n} items, complete={cache.complete})")
    return 0


def cmd_train(args) -> int:
    from stegoseg.config.stego import resolve_config
    from stegoseg.methods.common import check_before_work
    from stegoseg.methods.cause import train_method

    cfg = resolve_config(args)
    out = prepare_out(args.out, "train", "checkpoint.pt", args.overwrite, resume=args.resume)
    if args.resume:
        check_something_to_resume(out, f"--out {out}")
    check_before_work(cfg, out)
    lock_out(out, "train")
    if args.overwrite and not args.resume:
        clear_outputs(out, "train")
    path = train_method(cfg, out, resume=args.resume)
    if path is not None:
        print(f"checkpoint: {path}")
    return 0


def cmd_baseline(args) -> int:
    from stegoseg.config.stego import resolve_config
    from stegoseg.methods.baseline import run_feature_baseline
    from stegoseg.methods.common import check_before_work

    cfg = resolve_config(args)
    out = prepare_out(args.out, "baseline", "metrics.json", args.overwrite)
    check_before_work(cfg, out, evaluate=True)
    lock_out(out, "baseline")
    if args.overwrite:
        clear_outputs(out, "baseline")
    result = run_feature_baseline(cfg, out)
    print_summary(result, out)
    return 0


#: The Ray options of a command, in RayOptions' order.
RAY_FIELDS = ("ray_address", "ray_workers", "ray_gpus_per_worker", "ray_cpus_per_worker")


def cmd_evaluate(args) -> int:
    from stegoseg.config.stego import explicit_values, replace
    from stegoseg.evaluation.protocol import summary_rows
    from stegoseg.methods.common import (
        check_eval_labels,
        config_for_checkpoint,
        evaluate_checkpoint_model,
        resolve_device,
    )
    from stegoseg.model import load
    from stegoseg.errors import StegosegError
    from stegoseg.preflight import check_accelerator

    given = explicit_values(args)
    from stegoseg.config.stego import Config

    # Ray only when asked on this command line (never from the Ray options the checkpoint's run had)
    ray_values = {k: given.get(k, Config.__dataclass_fields__[k].default) for k in RAY_FIELDS}
    if ray_values["ray_address"]:  # bad Ray options are one line before the model is read
        from stegoseg.distributed.engine import RayOptions, connect, option_problems
        from stegoseg.config.base import raise_first_failure

        options = RayOptions(*(ray_values[k] for k in RAY_FIELDS))
        raise_first_failure(option_problems(options.workers, options.gpus_per_worker, options.cpus_per_worker))
        connect(options)
    model = load(args.checkpoint, weights=explicit_values(args).get("weights"), device="cpu",
                 replace_backbone=args.replace_backbone_weights)
    cfg = replace(config_for_checkpoint(model, args), **ray_values)
    check_accelerator(device=cfg.device)  # evaluation runs on --device; the training accelerator does not matter
    if not cfg.ray_address:  # (on Ray the workers put it on their devices)
        model.to(resolve_device(cfg.device))
    out = prepare_out(args.out, "evaluate", "metrics.json", args.overwrite)
    check_eval_labels(cfg, model, out, split=args.split)
    lock_out(out, "evaluate")
    if args.overwrite:
        clear_outputs(out, "evaluate")
    result = evaluate_checkpoint_model(cfg, model, out, split=args.split)
    result["summary"] = summary_rows(result)
    print_summary(result, out)
    return 0


def add_commands(sub) -> None:
    p = sub.add_parser(
        "run",
        help="the main job: prepare -> train -> evaluate -> segment (+ raw-feature baseline) -> report.md",
        description="Run everything for one dataset into one folder: feature cache, STEGO training, evaluation "
        "(parity and strict), the raw-feature baseline on the same backbone, example segmentations and "
        "report.md. With --dataset synthetic and no --data-root, images are generated (no downloads).",
    )
    out_arg(p, "runs/main")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run in --out")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier run's outputs in --out")
    p.add_argument("--baseline", action=argparse.BooleanOptionalAction, default=True,
                   help="also fit and evaluate the raw-feature baseline (default: on)")
    add_config_arguments(p)
    p.set_defaults(func=cmd_run)
    p = sub.add_parser("prepare", help="five-crop, extract and cache backbone features, compute nearest neighbours",
                       description="Resumable: an interrupted run continues where it stopped; finished items are never recomputed.")
    out_arg(p, "runs/prepare")
    add_config_arguments(p, groups=("data", "backbone", "features", "run"), extra=("seed", "feature_dropout"))
    p.set_defaults(func=cmd_prepare)
    p = sub.add_parser("train", help="train the STEGO head and probes on cached features (Lightning)",
                       description="Writes checkpoint.pt (one self-contained file), lightning/ checkpoints every "
                       "--ckpt-every steps, logs/metrics.csv, similarity_histogram.png, training_curves.png.")
    out_arg(p, "runs/train")
    p.add_argument("--resume", action="store_true", help="continue from --out/lightning/last.ckpt")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier run's outputs in --out")
    add_config_arguments(p, groups=("method", "data", "backbone", "features", "loss", "cause", "primaps", "training",
                                    "probes", "evaluation", "run"))
    p.set_defaults(func=cmd_train)
    p = sub.add_parser(
        "baseline",
        help="raw backbone features: k-means cluster probe + linear probe, evaluated (the 'DINO baseline')",
        description="Cache the training split's backbone features, fit a spherical k-means cluster probe "
        "(and a linear probe when labels exist) straight on them, and evaluate on the validation split. "
        "Writes config.yaml, checkpoint.pt, metrics.json, confusion_*.png and predictions.png under --out.",
    )
    out_arg(p, "runs/baseline")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier run's outputs in --out")
    add_config_arguments(p, groups=("data", "backbone", "features", "probes", "evaluation", "run"),
                         extra=("seed", "extra_clusters", "batch_size", "probe_lr", "accelerator"))
    p.set_defaults(func=cmd_baseline)
    p = sub.add_parser("evaluate", help="evaluate a checkpoint with the published protocol (parity + strict)",
                       description="Uses the checkpoint's own config; any option given here overrides it "
                       "(e.g. --no-crf, --eval-resolution, --data-root).")
    p.add_argument("checkpoint", help="checkpoint.pt written by train / baseline / run")
    p.add_argument("--split", default=None, help="split to evaluate (default: the config's val split)")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier evaluation in --out")
    p.add_argument("--replace-backbone-weights", action="store_true",
                   help="with --weights: evaluate the model on other weights of the same architecture (knowingly)")
    out_arg(p, "runs/eval")
    add_config_arguments(p, groups=("data", "evaluation", "run"), extra=("weights",))
    p.set_defaults(func=cmd_evaluate)
