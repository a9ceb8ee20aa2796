"""``stegoseg serve``: the local web page over a checkpoint."""
from __future__ import annotations

from stegoseg.errors import StegosegError


def cmd_serve(args) -> int:
    from stegoseg.methods.common import resolve_device
    from stegoseg.preflight import check_accelerator
    from stegoseg.serve import serve

    if not 1 <= args.port <= 65535:
        raise StegosegError(f"--port must be 1..65535, got {args.port}")
    if args.images and not __import__("pathlib").Path(args.images).is_dir():
        raise StegosegError(f"--images {args.images}: not a folder")
    check_accelerator(device=args.device)
    serve(args.checkpoint, host=args.host, port=args.port, images=args.images, weights=args.weights,
          device=resolve_device(args.device), block=True, replace_backbone=args.replace_backbone_weights)
    return 0


def add_commands(sub) -> None:
    p = sub.add_parser(
        "serve", help="a local web page: segment images, click a point to see its correspondences",
        description="Loads the checkpoint once and serves a page (Gradio) at http://HOST:PORT: drop images (or pick "
        "from --images), see the cluster map with its legend, the overlay and the linear-probe map (CRF, flip and "
        "resolution adjustable), click a point to see its feature and code correspondences over the image and its "
        "nearest neighbours (the training cache when the checkpoint's cache is on this machine, else --images), "
        "and download the label map and overlay.",
    )
    p.add_argument("checkpoint", help="checkpoint.pt or a save_pretrained folder")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--host", default="127.0.0.1",
                   help="interface to bind (default 127.0.0.1: this machine only; 0.0.0.0 exposes the page)")
    p.add_argument("--images", default=None, help="a folder whose images the page offers (and searches for neighbours)")
    p.add_argument("--weights", default=None, help="local backbone weights if the checkpoint names hub weights")
    p.add_argument("--replace-backbone-weights", action="store_true",
                   help="with --weights: run the model on other weights of the same architecture (knowingly)")
    p.add_argument("--device", default="auto")
    p.set_defaults(func=cmd_serve)
