"""Command-line interface: a thin layer over the library (:mod:`stegoseg.methods`, :mod:`stegoseg.segment`, :mod:`stegoseg.training.dino`, :mod:`stegoseg.studies`).

Every subcommand maps onto a library function; errors caused by input are printed as
one line (``stegoseg: error: ...``) with exit status 2.
"""
from __future__ import annotations

import argparse
import errno
import logging
import sys
from pathlib import Path

from stegoseg.errors import StegosegError, refuse_overwrite
from stegoseg.preflight import check_writable, prepare_out

log = logging.getLogger("stegoseg")


def _out_arg(p: argparse.ArgumentParser, default: str) -> None:
    p.add_argument("--out", default=default, help=f"output folder (default: {default})")


def cmd_backbones(args) -> int:
    from stegoseg.backbones.presets import list_backbones

    for name in list_backbones():
        print(name)
    return 0


def cmd_baseline(args) -> int:
    from stegoseg.config.stego import resolve_config
    from stegoseg.methods.baseline import run_feature_baseline
    from stegoseg.methods.common import check_before_work

    cfg = resolve_config(args)
    out = prepare_out(args.out, "baseline", "metrics.json", args.overwrite)
    check_before_work(cfg, out, evaluate=True)
    result = run_feature_baseline(cfg, out)
    _print_summary(result, out)
    return 0


def cmd_make_synthetic(args) -> int:
    from stegoseg.data.synthetic import make_synthetic_dataset

    try:
        root = make_synthetic_dataset(
            args.root, n_train=args.n_train, n_val=args.n_val, n_classes=args.n_classes, seed=args.seed,
            size=(args.height, args.width),
        )
    except FileExistsError as exc:
        raise StegosegError(str(exc)) from exc
    print(root)
    return 0


def cmd_prepare(args) -> int:
    from stegoseg.config.stego import resolve_config
    from stegoseg.methods.common import check_before_work, prepare

    cfg = resolve_config(args)
    out = check_writable(args.out)
    check_before_work(cfg, out)
    cache = prepare(cfg, out)
    print(f"feature cache: {cache.path} ({cache.n} items, complete={cache.complete})")
    return 0


def cmd_train(args) -> int:
    from stegoseg.config.stego import resolve_config
    from stegoseg.methods.common import check_before_work
    from stegoseg.methods.stego import train_stego

    cfg = resolve_config(args)
    out = prepare_out(args.out, "train", "checkpoint.pt", args.overwrite, resume=args.resume)
    check_before_work(cfg, out)
    path = train_stego(cfg, out, resume=args.resume)
    if path is not None:
        print(f"checkpoint: {path}")
    return 0


def cmd_evaluate(args) -> int:
    from stegoseg.config.stego import explicit_values
    from stegoseg.evaluation.protocol import summary_rows
    from stegoseg.methods.common import (
        check_eval_labels,
        config_for_checkpoint,
        evaluate_checkpoint_model,
        resolve_device,
    )
    from stegoseg.model import load
    from stegoseg.preflight import check_accelerator

    model = load(args.checkpoint, weights=explicit_values(args).get("weights"), device="cpu")
    cfg = config_for_checkpoint(model, args)
    check_accelerator(cfg.accelerator, cfg.device)
    model.to(resolve_device(cfg.device))
    out = prepare_out(args.out, "evaluate", "metrics.json", args.overwrite)
    check_eval_labels(cfg, model, out, split=args.split)
    result = evaluate_checkpoint_model(cfg, model, out, split=args.split)
    result["summary"] = summary_rows(result)
    _print_summary(result, out)
    return 0


def cmd_segment(args) -> int:
    from stegoseg.config.base import raise_first_failure
    from stegoseg.evaluation.crf import CRFParams
    from stegoseg.methods.common import resolve_device
    from stegoseg.model import load
    from stegoseg.preflight import check_accelerator
    from stegoseg.segment import segment_images

    raise_first_failure([
        (args.resolution >= 0, f"--resolution must be >= 0 (0: original size), got {args.resolution}"),
        (args.batch_size >= 1, "--batch-size must be >= 1"),
        (args.num_workers >= 0, "--num-workers must be >= 0"),
        (args.crf_workers >= 1, "--crf-workers must be >= 1"),
    ])
    check_accelerator(device=args.device)
    model = load(args.checkpoint, weights=args.weights, device=resolve_device(args.device))
    if args.bf16:
        import torch

        model.autocast_dtype = torch.bfloat16
    written = segment_images(
        model, args.inputs, args.out, crf=args.crf, flip=args.flip,
        resolution=None if args.resolution == 0 else args.resolution, probe=args.probe,
        overwrite=args.overwrite, progress=not args.quiet, num_workers=args.num_workers,
        batch_size=args.batch_size, crf_workers=args.crf_workers,
        crf_params=CRFParams(reference_input=bool(model.config.get("crf_reference_input", False))),
    )
    print(f"wrote {len(written)} label maps (+ overlays) to {args.out}")
    return 0


def cmd_pretrain(args) -> int:
    from stegoseg.config.stego import resolve_config
    from stegoseg.training.dino import PretrainConfig, pretrain

    cfg = resolve_config(args, cls=PretrainConfig)
    out = prepare_out(args.out, "pretrain", "backbone.pt", args.overwrite, resume=args.resume)
    summary = pretrain(cfg, out, resume=args.resume)
    if summary is not None:
        last = summary["readout"][-1] if summary["readout"] else None
        print(f"backbone weights: {summary['backbone_file']} (sha256 {summary['sha256'][:16]}...)"
              + (f"; k-NN readout acc {last['acc']:.1f}, mIoU {last['miou']:.1f}" if last else ""))
        print(f"use it with: --backbone {summary['arch']} --weights {summary['backbone_file']}")
    return 0


def cmd_datus(args) -> int:
    from stegoseg.config.stego import resolve_config
    from stegoseg.methods.datus import DatusParams, run_datus

    cfg = resolve_config(args)
    out = prepare_out(args.out, "datus", "metrics.json", args.overwrite)
    params = DatusParams(knn=args.graph_knn, min_similarity=args.min_similarity, resolution=args.louvain_resolution,
                         min_patches=args.min_patches, crop_size=args.crop_size, n_clusters=args.clusters, seed=cfg.seed)
    result = run_datus(cfg, out, params, split=args.split, denoise=args.denoise, denoise_epochs=args.denoise_epochs)
    from stegoseg.evaluation.protocol import summary_rows

    result["summary"] = summary_rows(result)
    print(f"{result['n_segments']} segments in {result['n_images']} images -> {result['n_clusters']} clusters")
    _print_summary(result, out)
    return 0


def cmd_study_potts(args) -> int:
    import json
    from dataclasses import asdict

    import numpy as np

    from stegoseg.data.io import load_image
    from stegoseg.evaluation.crf import CRFParams
    from stegoseg.studies.potts import optimise_potts, save_potts_figure

    image = np.asarray(load_image(args.image))
    params = CRFParams(pos_w=args.pos_w, pos_xy_std=args.pos_sxy, bi_w=args.bi_w, bi_xy_std=args.bi_sxy,
                       bi_rgb_std=args.srgb)
    out = Path(args.out)
    refuse_overwrite(out, "potts.png", args.overwrite)
    result = optimise_potts(image, n_codes=args.n_codes, size=args.size, steps=args.steps, lr=args.lr,
                            shift=args.shift, params=params, seed=args.seed)
    save_potts_figure(result, out / "potts.png")
    summary = {"image": str(args.image), "final_loss": result["losses"][-1], "first_loss": result["losses"][0],
               "n_segments": int(len(np.unique(result["labels"]))), "params": asdict(params),
               "size": args.size, "steps": args.steps, "shift": args.shift}
    (out / "potts.json").write_text(json.dumps(summary, indent=2, default=str))
    print(f"Potts loss {summary['first_loss']:.4f} -> {summary['final_loss']:.4f}; "
          f"{summary['n_segments']} segments; figure {out / 'potts.png'}")
    return 0


def cmd_compare(args) -> int:
    from stegoseg.methods.datus import compare_runs

    print(compare_runs(args.runs, args.out_md), end="")
    return 0


def cmd_run(args) -> int:
    from stegoseg.config.stego import resolve_config
    from stegoseg.methods.common import check_before_work
    from stegoseg.methods.run import run_all

    cfg = resolve_config(args)
    out = prepare_out(args.out, "run", "report.md", args.overwrite, resume=args.resume)
    check_before_work(cfg, out, evaluate=True)
    summary = run_all(cfg, out, resume=args.resume, baseline=args.baseline)
    if summary is not None:
        for name, rows in summary.items():
            print(name + ": " + ", ".join(f"{k} {v:.1f}" for k, v in rows.items()))
        print(f"report: {out / 'report.md'}")
    return 0


_FILE_ERRNOS = {
    errno.ENOSPC: "the disk is full: free some space or write to another disk",
    errno.EDQUOT: "disk quota exceeded: free some space or write to another disk",
    errno.EACCES: "permission denied: choose a folder you can write to, or fix the permissions",
    errno.EPERM: "operation not permitted: choose a folder you can write to",
    errno.EROFS: "read-only file system: choose a writable folder",
    errno.EEXIST: "a file of that name already exists: choose another path",
    errno.ENOTDIR: "a path component is a file, not a folder: choose another path",
    errno.EISDIR: "a folder was found where a file was expected: choose another path",
}


def _print_summary(result: dict, out: Path) -> None:
    summary = result.get("summary") or {}
    if summary:
        print("| metric | value |\n|---|---|")
        for k, v in summary.items():
            print(f"| {k} | {v:.2f} |")
    print(f"outputs: {out}")


def build_parser() -> argparse.ArgumentParser:
    from stegoseg.config.stego import add_config_arguments

    parser = argparse.ArgumentParser(
        prog="stegoseg",
        description="Unsupervised semantic segmentation with frozen self-supervised ViTs (STEGO and baselines).",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("backbones", help="list backbone presets")
    p.set_defaults(func=cmd_backbones)

    p = sub.add_parser(
        "baseline",
        help="raw backbone features: k-means cluster probe + linear probe, evaluated (the 'DINO baseline')",
        description="Cache the training split's backbone features, fit a spherical k-means cluster probe "
        "(and a linear probe when labels exist) straight on them, and evaluate on the validation split. "
        "Writes config.yaml, checkpoint.pt, metrics.json, confusion_*.png and predictions.png under --out.",
    )
    _out_arg(p, "runs/baseline")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier run's outputs in --out")
    add_config_arguments(p)
    p.set_defaults(func=cmd_baseline)

    p = sub.add_parser(
        "run",
        help="the main job: prepare -> train -> evaluate -> segment (+ raw-feature baseline) -> report.md",
        description="Run everything for one dataset into one folder: feature cache, STEGO training, evaluation "
        "(parity and strict), the raw-feature baseline on the same backbone, example segmentations and "
        "report.md. With --dataset synthetic and no --data-root, images are generated (no downloads).",
    )
    _out_arg(p, "runs/main")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run in --out")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier run's outputs in --out")
    p.add_argument("--baseline", action=argparse.BooleanOptionalAction, default=True,
                   help="also fit and evaluate the raw-feature baseline (default: on)")
    add_config_arguments(p)
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("prepare", help="five-crop, extract and cache backbone features, compute nearest neighbours",
                       description="Resumable: an interrupted run continues where it stopped; finished items are never recomputed.")
    _out_arg(p, "runs/prepare")
    add_config_arguments(p)
    p.set_defaults(func=cmd_prepare)

    p = sub.add_parser("train", help="train the STEGO head and probes on cached features (Lightning)",
                       description="Writes checkpoint.pt (one self-contained file), lightning/ checkpoints every "
                       "--ckpt-every steps, logs/metrics.csv, similarity_histogram.png, training_curves.png.")
    _out_arg(p, "runs/train")
    p.add_argument("--resume", action="store_true", help="continue from --out/lightning/last.ckpt")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier run's outputs in --out")
    add_config_arguments(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("evaluate", help="evaluate a checkpoint with the published protocol (parity + strict)",
                       description="Uses the checkpoint's own config; any option given here overrides it "
                       "(e.g. --no-crf, --eval-resolution, --data-root).")
    p.add_argument("checkpoint", help="checkpoint.pt written by train / baseline / run")
    p.add_argument("--split", default=None, help="split to evaluate (default: the config's val split)")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier evaluation in --out")
    _out_arg(p, "runs/eval")
    add_config_arguments(p)
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("segment", help="segment images, folders or globs into palette PNGs + overlays")
    p.add_argument("checkpoint", help="checkpoint.pt")
    p.add_argument("inputs", nargs="+", help="image files, folders, or glob patterns (quoted)")
    _out_arg(p, "segmented")
    p.add_argument("--crf", action=argparse.BooleanOptionalAction, default=True, help="dense CRF refinement")
    p.add_argument("--flip", action=argparse.BooleanOptionalAction, default=True, help="flip averaging")
    p.add_argument("--resolution", type=int, default=320, help="network input minor side (0: original size)")
    p.add_argument("--probe", choices=("cluster", "linear"), default="cluster")
    p.add_argument("--device", default="auto")
    p.add_argument("--weights", default=None, help="local backbone weights if the checkpoint names hub weights")
    p.add_argument("--num-workers", type=int, default=2, help="image-decoding workers")
    p.add_argument("--batch-size", type=int, default=8, help="images per network batch (same-size images batch together)")
    p.add_argument("--crf-workers", type=int, default=2, help="processes for the CRF")
    p.add_argument("--bf16", action="store_true", help="bfloat16 autocast on CUDA (faster; no effect on CPU)")
    p.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_segment)

    p = sub.add_parser(
        "pretrain",
        help="DINO self-distillation of a ViT on your own images -> a backbone weights file",
        description="Train a ViT (timm) with DINO (lightly's loss, head and multi-crop transform) on the "
        "training split of --data-root. Writes backbone.pt (load with --weights), readout.json/png "
        "(periodic patch k-NN readout when the val split has labels), config.yaml, lightning/ checkpoints.",
    )
    _out_arg(p, "runs/pretrain")
    p.add_argument("--resume", action="store_true", help="continue from --out/lightning/last.ckpt")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier run's outputs in --out")
    from stegoseg.training.dino import PretrainConfig

    add_config_arguments(p, cls=PretrainConfig)
    p.set_defaults(func=cmd_pretrain)

    p = sub.add_parser(
        "datus",
        help="DatUS^2: Louvain segments of patch graphs + dataset-level k-means pseudo-labels, evaluated",
        description="Per image: kNN affinity graph over the backbone's patch embeddings, Louvain communities, "
        "small segments merged into their most similar neighbour. Over the split: each segment's masked "
        "bounding-box crop embedded with the backbone's global feature, spherical k-means, segments painted "
        "with their cluster. Optional de-noising network. Writes metrics.json (parity + strict), "
        "confusion_cluster.png, predictions.png (image | label | segments | clusters).",
    )
    _out_arg(p, "runs/datus")
    p.add_argument("--split", default=None, help="split to segment and score (default: the val split)")
    p.add_argument("--graph-knn", type=int, default=10, help="edges per patch in the affinity graph (default 10)")
    p.add_argument("--min-similarity", type=float, default=0.0, help="drop edges below this cosine (default 0)")
    p.add_argument("--louvain-resolution", type=float, default=1.0, help="Louvain resolution (default 1.0)")
    p.add_argument("--min-patches", type=int, default=4, help="merge segments smaller than this (default 4)")
    p.add_argument("--crop-size", type=int, default=224, help="segment crops are resized to this (default 224)")
    p.add_argument("--clusters", type=int, default=None, help="k-means K (default: number of classes)")
    p.add_argument("--denoise", choices=("light", "deeplabv3"), default=None,
                   help="train a network on the pseudo masks: light (1x1 conv on the frozen backbone) or deeplabv3")
    p.add_argument("--denoise-epochs", type=int, default=20)
    p.add_argument("--overwrite", action="store_true", help="replace an earlier run's outputs in --out")
    add_config_arguments(p)
    p.set_defaults(func=cmd_datus)

    p = sub.add_parser(
        "study-potts",
        help="STEGO A.9: optimise the CRF-kernel Potts loss alone on one image; continuous + discrete solutions",
        description="Minimises mean(-max(S,0) * (k - shift)) over a free K-channel code map of the image resized "
        "to --size (every pixel pair), where k is the CRF kernel (normalised to [0,1]) and S the cosine similarity of "
        "per-pixel label distributions softmax(logits). Writes "
        "potts.png (image | code PCA | argmax | loss) and potts.json.",
    )
    p.add_argument("image", help="an image file")
    _out_arg(p, "runs/potts")
    p.add_argument("--n-codes", type=int, default=8, help="code channels K (default 8)")
    p.add_argument("--size", type=int, default=48, help="working resolution in pixels (default 48)")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--shift", type=float, default=0.08, help="constant b subtracted from the kernel (default 0.08)")
    p.add_argument("--pos-w", type=float, default=3.0)
    p.add_argument("--pos-sxy", type=float, default=1.0)
    p.add_argument("--bi-w", type=float, default=4.0)
    p.add_argument("--bi-sxy", type=float, default=24.0, help="bilateral position std in working pixels (default 24)")
    p.add_argument("--srgb", type=float, default=20.0, help="bilateral colour std, 0..255 (default 20)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=cmd_study_potts)

    p = sub.add_parser("compare", help="markdown table of several runs' metrics (STEGO vs DatUS^2 vs raw features)")
    p.add_argument("runs", nargs="+", help="folders holding metrics.json (e.g. RUN/eval RUN/baseline DATUS)")
    p.add_argument("--out-md", default=None, help="also write the table to this file")
    p.set_defaults(func=cmd_compare)

    from stegoseg.studies import ablation, correspondence, dimred

    for study in (correspondence, dimred, ablation):
        study.add_cli(sub)

    p = sub.add_parser("make-synthetic", help="write a generated labelled dataset (directory layout)")
    p.add_argument("root", help="empty folder to write into")
    p.add_argument("--n-train", type=int, default=40)
    p.add_argument("--n-val", type=int, default=12)
    p.add_argument("--n-classes", type=int, default=4)
    p.add_argument("--height", type=int, default=96)
    p.add_argument("--width", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_make_synthetic)

    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s"
    )
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return args.func(args)
    except StegosegError as exc:
        print(f"stegoseg: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        # the environment refused a file operation: one line naming the file, not a traceback
        if exc.errno not in _FILE_ERRNOS:
            raise
        where = f"{exc.filename}: " if exc.filename else ""
        advice = _FILE_ERRNOS[exc.errno]
        print(f"stegoseg: error: {where}{exc.strerror or exc} ({advice})", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("stegoseg: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
