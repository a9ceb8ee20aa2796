"""Small tools: list backbones, import released checkpoints, write a generated dataset, the Potts-loss study."""
from __future__ import annotations

from pathlib import Path

from stegoseg.cli.common import out_arg
from stegoseg.errors import StegosegError, refuse_overwrite


def cmd_backbones(args) -> int:
    from stegoseg.backbones.presets import BACKBONE_PRESETS

    width = max(len(name) for name in BACKBONE_PRESETS)
    for name, preset in BACKBONE_PRESETS.items():
        print(f"{name:<{width}}  patch {preset.patch_size:>2}  {preset.embed_dim:>4} ch  {preset.description}; "
              f"weights licence: {preset.licence}")
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


def cmd_import_checkpoint(args) -> int:
    from stegoseg.backbones.presets import get_backbone_preset
    from stegoseg.config.stego import make_config
    from stegoseg.data.registry import parse_class_names
    from stegoseg.preflight import check_writable

    lightning = [f for f in args.files if str(f).endswith(".ckpt")]
    if lightning and len(lightning) != len(args.files):
        raise StegosegError("mixed files: STEGO / PriMaPs .ckpt files are imported alone (a PriMaPs .ckpt with its "
                            "STEGO .ckpt), CAUSE's .pth / .npy files together")
    if not lightning:
        if args.backbone is None:
            raise StegosegError("CAUSE's files do not name their backbone: pass --backbone, e.g. dino_vitb8")
        get_backbone_preset(args.backbone)  # an unknown name is one line before any file is read
    out = Path(args.out)
    if (out / "config.json").exists() and not args.overwrite:
        raise StegosegError(f"{out} already holds a model: pass --overwrite to replace it, or choose another --out")
    check_writable(out)
    names = parse_class_names(args.class_names) if args.class_names else None
    if lightning:
        model, values = _import_lightning(args, names)
    else:
        from stegoseg.backbones.imports import import_cause

        model = import_cause(args.files, backbone=args.backbone, method=args.method, weights=args.weights,
                             pretrained=not args.no_pretrained, tiny=args.tiny, class_names=names)
        values = {"backbone": args.backbone, "weights": args.weights, "pretrained": not args.no_pretrained,
                  "tiny": args.tiny, "dim": model.head.dim, "resolution": args.resolution, "n_classes": model.n_clusters}
    values.update(method=model.method, pos_embed=model.backbone_spec.get("pos_embed", "timm"))
    if args.dataset:
        values["dataset"] = args.dataset
    if args.data_root:
        values["data_root"] = str(Path(args.data_root).resolve())
    model.config = make_config(values).to_dict()
    model.save_pretrained(out)
    print(f"imported a {model.method} model ({model.n_clusters} clusters, backbone {model.backbone.name}) into {out}")
    return 0


def _import_lightning(args, names) -> tuple:
    from stegoseg.backbones.import_lightning import import_lightning

    for option, given in (("--backbone", args.backbone), ("--weights", args.weights), ("--method", args.method)):
        if given:
            raise StegosegError(f"{option}: a STEGO / PriMaPs .ckpt carries its own backbone and method; drop {option}")
    model, found = import_lightning(args.files, class_names=names)
    spec = model.backbone_spec
    values = {"backbone": spec["name"], "pretrained": False, "tiny": spec.get("tiny", False),
              "dim": found["dim"], "resolution": found["resolution"], "n_classes": found["n_classes"],
              "extra_clusters": found.get("extra_clusters", 0)}
    return model, values


def add_commands(sub) -> None:
    p = sub.add_parser("backbones", help="list backbone presets")
    p.set_defaults(func=cmd_backbones)
    p = sub.add_parser("make-synthetic", help="write a generated labelled dataset (directory layout)")
    p.add_argument("root", help="empty folder to write into")
    p.add_argument("--n-train", type=int, default=40)
    p.add_argument("--n-val", type=int, default=12)
    p.add_argument("--n-classes", type=int, default=4)
    p.add_argument("--height", type=int, default=96)
    p.add_argument("--width", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_make_synthetic)

    p = sub.add_parser(
        "import-checkpoint",
        help="turn the authors' released STEGO, PriMaPs or CAUSE files into a stegoseg model folder",
        description="Reads the released files without running any code from them (and without Lightning or the "
        "authors' packages): STEGO's .ckpt (e.g. cocostuff27_vit_base_5.ckpt; backbone, head, probes inside), "
        "PriMaPs' .ckpt (with the STEGO .ckpt it was trained on, if it was), or CAUSE's segment_tr.pth / "
        "segment_mlp.pth (head), cluster_tr.pth / cluster_mlp.pth (cluster probe) and modular.npy (clusterbook; "
        "pass --backbone), and writes a model folder (config.json + model.safetensors) that evaluate, segment, serve "
        "and stegoseg.load use as they are. The files are recognised by their content, in any order.",
    )
    p.add_argument("files", nargs="+", help="the released files (*.ckpt; or segment_*.pth, cluster_*.pth, modular.npy)")
    p.add_argument("--method", choices=("cause-mlp", "cause-tr"), default=None,
                   help="the method the files are of (default: read from the files; given, it must agree)")
    p.add_argument("--backbone", default=None,
                   help="CAUSE: the backbone preset the model was trained on, e.g. dino_vitb8 (.ckpt files carry theirs)")
    p.add_argument("--weights", default=None, help="a local backbone weights file (offline use)")
    p.add_argument("--no-pretrained", action="store_true", help="random backbone (tests only)")
    p.add_argument("--tiny", action="store_true", help="tiny backbone architecture (tests only)")
    p.add_argument("--class-names", default=None, help="'a,b,...' or a file with one name per line")
    p.add_argument("--dataset", default=None, help="the dataset format evaluate reads by default, e.g. cocostuff27")
    p.add_argument("--data-root", default=None, help="the dataset folder evaluate reads by default")
    p.add_argument("--resolution", type=int, default=320,
                   help="the training resolution of the model (CAUSE: 320; 322 for DINOv2) (default: 320)")
    out_arg(p, "models/imported")
    p.add_argument("--overwrite", action="store_true", help="replace a model already in --out")
    p.set_defaults(func=cmd_import_checkpoint)

    p = sub.add_parser(
        "study-potts",
        help="STEGO A.9: optimise the CRF-kernel Potts loss alone on one image; continuous + discrete solutions",
        description="Minimises mean(-max(S,0) * (k - shift)) over a free K-channel code map of the image resized "
        "to --size (every pixel pair), where k is the CRF kernel (normalised to [0,1]) and S the cosine similarity of "
        "per-pixel label distributions softmax(logits). Writes "
        "potts.png (image | code PCA | argmax | loss) and potts.json.",
    )
    p.add_argument("image", help="an image file")
    out_arg(p, "runs/potts")
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
