"""Other methods: DINO pretraining on your images, DatUS^2, and comparing runs."""
from __future__ import annotations

from stegoseg.cli.common import out_arg, print_summary
from stegoseg.config.stego import add_config_arguments
from stegoseg.preflight import clear_outputs, lock_out, prepare_out


def cmd_pretrain(args) -> int:
    from stegoseg.config.pretrain import PretrainConfig
    from stegoseg.config.stego import resolve_config
    from stegoseg.training.dino import pretrain

    cfg = resolve_config(args, cls=PretrainConfig)
    out = prepare_out(args.out, "pretrain", "backbone.pt", args.overwrite, resume=args.resume)
    if args.overwrite and not args.resume:
        clear_outputs(out, "pretrain")
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
    lock_out(out, "datus")
    if args.overwrite:
        clear_outputs(out, "datus")
    params = DatusParams(knn=args.graph_knn, min_similarity=args.min_similarity, resolution=args.louvain_resolution,
                         min_patches=args.min_patches, crop_size=args.crop_size, n_clusters=args.clusters, seed=cfg.seed)
    result = run_datus(cfg, out, params, split=args.split, denoise=args.denoise, denoise_epochs=args.denoise_epochs)
    from stegoseg.evaluation.protocol import summary_rows

    result["summary"] = summary_rows(result)
    print(f"{result['n_segments']} segments in {result['n_images']} images -> {result['n_clusters']} clusters")
    print_summary(result, out)
    return 0


def cmd_compare(args) -> int:
    from stegoseg.methods.datus import compare_runs

    print(compare_runs(args.runs, args.out_md), end="")
    return 0


def add_commands(sub) -> None:
    p = sub.add_parser(
        "pretrain",
        help="DINO self-distillation of a ViT on your own images -> a backbone weights file",
        description="Train a ViT (timm) with DINO (lightly's loss, head and multi-crop transform) on the "
        "training split of --data-root. Writes backbone.pt (load with --weights), readout.json/png "
        "(periodic patch k-NN readout when the val split has labels), config.yaml, lightning/ checkpoints.",
    )
    out_arg(p, "runs/pretrain")
    p.add_argument("--resume", action="store_true", help="continue from --out/lightning/last.ckpt")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier run's outputs in --out")
    from stegoseg.config.pretrain import PretrainConfig

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
    out_arg(p, "runs/datus")
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
    add_config_arguments(p, groups=("data", "backbone", "evaluation", "run"), extra=("seed",))
    p.set_defaults(func=cmd_datus)
    p = sub.add_parser("compare", help="markdown table of several runs' metrics (STEGO vs DatUS^2 vs raw features)")
    p.add_argument("runs", nargs="+", help="folders holding metrics.json (e.g. RUN/eval RUN/baseline DATUS)")
    p.add_argument("--out-md", default=None, help="also write the table to this file")
    p.set_defaults(func=cmd_compare)
