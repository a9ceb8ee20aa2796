"""``stegoseg segment``: label maps and overlays for image files."""
from __future__ import annotations

import argparse

from stegoseg.cli.common import out_arg


def cmd_segment(args) -> int:
    from stegoseg.config.base import raise_first_failure
    from stegoseg.distributed.engine import RayOptions, connect, option_problems
    from stegoseg.evaluation.crf import crf_params_from
    from stegoseg.methods.common import resolve_device
    from stegoseg.model import load
    from stegoseg.preflight import check_accelerator
    from stegoseg.segment import segment_images

    raise_first_failure([
        (args.resolution >= 0, f"--resolution must be >= 0 (0: original size), got {args.resolution}"),
        (args.batch_size >= 1, "--batch-size must be >= 1"),
        (args.num_workers >= 0, "--num-workers must be >= 0"),
        (args.crf_workers >= 1, "--crf-workers must be >= 1"),
        *option_problems(args.ray_workers, args.ray_gpus_per_worker, args.ray_cpus_per_worker),
    ])
    check_accelerator(device=args.device)
    ray = None
    if args.ray_address:
        from stegoseg.segment import RaySegment

        options = RayOptions(args.ray_address, args.ray_workers, args.ray_gpus_per_worker, args.ray_cpus_per_worker)
        connect(options)
        ray = RaySegment(options, str(args.checkpoint), args.weights, args.replace_backbone_weights, args.device,
                         args.bf16)
    model = load(args.checkpoint, weights=args.weights, device=resolve_device(args.device),
                 replace_backbone=args.replace_backbone_weights)
    if args.bf16:
        import torch

        model.autocast_dtype = torch.bfloat16
    written = segment_images(
        model, args.inputs, args.out, crf=args.crf, flip=args.flip,
        resolution=None if args.resolution == 0 else args.resolution, probe=args.probe,
        overwrite=args.overwrite, progress=not args.quiet, num_workers=args.num_workers,
        batch_size=args.batch_size, crf_workers=args.crf_workers,
        crf_params=crf_params_from(model.config), ray=ray,
    )
    print(f"wrote {len(written)} label map{'' if len(written) == 1 else 's'} (+ overlays) to {args.out}")
    return 0


def add_commands(sub) -> None:
    p = sub.add_parser("segment", help="segment images, folders or globs into palette PNGs + overlays")
    p.add_argument("checkpoint", help="checkpoint.pt")
    p.add_argument("inputs", nargs="+", help="image files, folders, or glob patterns (quoted)")
    out_arg(p, "segmented")
    p.add_argument("--crf", action=argparse.BooleanOptionalAction, default=None,
                   help="dense CRF refinement (default: the checkpoint's setting, as model.segment)")
    p.add_argument("--flip", action=argparse.BooleanOptionalAction, default=True, help="flip averaging")
    p.add_argument("--eval-resolution", "--resolution", dest="resolution", type=int, default=320,
                   help="network input minor side (0: original size); the name evaluate and run use for it "
                   "(--resolution: the old name)")
    p.add_argument("--probe", choices=("cluster", "linear"), default="cluster")
    p.add_argument("--device", default="auto")
    p.add_argument("--weights", default=None, help="local backbone weights if the checkpoint names hub weights")
    p.add_argument("--replace-backbone-weights", action="store_true",
                   help="with --weights: run the model on other weights of the same architecture (knowingly)")
    p.add_argument("--num-workers", type=int, default=2, help="image-decoding workers")
    p.add_argument("--batch-size", type=int, default=8, help="images per network batch (same-size images batch together)")
    p.add_argument("--crf-workers", type=int, default=2, help="processes for the CRF")
    p.add_argument("--bf16-inference", "--bf16", dest="bf16", action="store_true",
                   help="bfloat16 autocast on CUDA (faster; no effect on CPU); --bf16: the old name")
    p.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    ray = p.add_argument_group("Ray options (pip install \"stegoseg[distributed]\")")
    ray.add_argument("--ray-address", default=None, help="segment on Ray: local starts a cluster here, auto joins the "
                     "one on this machine, HOST:PORT or ray://HOST:PORT another (default: this process)")
    ray.add_argument("--ray-workers", type=int, default=2, help="Ray actors, each loading the model once")
    ray.add_argument("--ray-gpus-per-worker", type=float, default=0.0, help="GPUs per actor (0: CPU)")
    ray.add_argument("--ray-cpus-per-worker", type=float, default=1.0, help="CPUs per actor (its torch threads)")
    p.add_argument("--no-progress", "--quiet", dest="quiet", action="store_true",
                   help="no progress bar (log lines instead), as the other commands; --quiet: the old name")
    p.set_defaults(func=cmd_segment)
