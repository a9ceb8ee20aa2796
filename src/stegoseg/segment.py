"""Segmenting image files into palette PNGs and overlays (``stegoseg segment``).
"""
from __future__ import annotations

import logging
import errno
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from stegoseg.data.io import list_images, load_image
from stegoseg.errors import StegosegError
from stegoseg.evaluation.crf import crf_pool
from stegoseg.model import SegmentationModel
from stegoseg.preflight import atomic_write, check_writable, lock_out
from stegoseg.reporting.figures import make_palette, overlay, save_label_png

log = logging.getLogger("stegoseg")


# --------------------------------------------------------------------------- segment
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")


def expand_inputs(inputs) -> list:
    """Files, folders (their images, sorted; hidden files such as ``._x.jpg`` skipped) and
    glob patterns -> a list of image paths, each file once."""
    import glob


    paths = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            found = list_images(p)
            if not found:
                raise StegosegError(f"{p} holds no images ({', '.join(IMAGE_SUFFIXES)})")
            paths.extend(found)
        elif p.is_file():
            paths.append(p)
        elif p.is_symlink():
            raise StegosegError(f"{p} is a link to a missing file: restore its target or leave it out")
        else:
            matches = sorted(Path(m) for m in glob.glob(str(item))
                             if Path(m).suffix.lower() in IMAGE_SUFFIXES and not Path(m).name.startswith(".")
                             and Path(m).is_file())
            if not matches:
                raise StegosegError(f"{item}: no such file, folder, or glob match")
            paths.extend(matches)
    unique, seen = [], set()
    for p in paths:
        key = p.resolve()
        if key in seen:
            log.warning("%s was given more than once: segmenting it once", p)
            continue
        seen.add(key)
        unique.append(p)
    return unique


def output_stems(paths: list) -> list:
    """A distinct output name per input: the file's stem; where stems clash (``a.jpg`` and
    ``a.png``, or ``x/a.jpg`` and ``y/a.jpg``) the suffix and then parent folder names are
    added until they differ (compared case-insensitively, as some file systems do). A stem
    that equals another's overlay name (``a_overlay.jpg`` beside ``a.jpg``) counts as a clash."""
    def name(p: Path, level: int) -> str:
        if level == 0:
            return p.stem
        base = f"{p.stem}_{p.suffix.lstrip('.')}" if p.suffix else p.stem
        parents = [q.name for q in p.resolve().parents if q.name][: level - 1]
        return "_".join([*reversed(parents), base])

    levels = [0] * len(paths)
    for _ in range(64):
        names = [name(p, lv) for p, lv in zip(paths, levels)]
        groups: dict = {}
        for i, n in enumerate(names):
            groups.setdefault(n.lower(), []).append(i)
        clashes = [idx for idx in groups.values() if len(idx) > 1]
        overlays = {f"{n.lower()}_overlay": i for i, n in enumerate(names)}
        clashes += [[i] for i, n in enumerate(names) if n.lower() in overlays and overlays[n.lower()] != i]
        if not clashes:
            return names
        for idx in clashes:
            for i in idx:
                levels[i] += 1
    raise StegosegError(f"cannot give distinct output names to {paths[0]} and the inputs named like it")


# inputs larger than this many ViT tokens get a warning when segmented at their original size
LARGE_TOKEN_COUNT = 16384


def warn_large_images(paths, patch: int) -> list:
    """Warn (before any work) about images that, at their original size, give the network
    more than LARGE_TOKEN_COUNT tokens; returns those paths."""
    from PIL import Image

    large = []
    for p in paths:
        with Image.open(p) as im:
            w, h = im.size
        tokens = -(-w // patch) * -(-h // patch)
        if tokens > LARGE_TOKEN_COUNT:
            large.append(p)
            log.warning("%s is %dx%d: at its original size (--resolution 0) the network sees %d tokens; attention "
                        "cost grows with their square, so this is slow and memory-hungry: pass --resolution 320 "
                        "(the default) unless you need it", p, w, h, tokens)
    return large


#: The most backbone tokens one image may give (a ViT's cost grows with their square): a 2560 x
#: 2560 network input at patch 8. Larger inputs are refused before any work.
MAX_TOKENS = 320 * 320


def check_input_images(paths, patch: int, resolution: Optional[int]) -> None:
    """Before any work: every input opens as an image (its header is read; a non-image or a
    decompression bomb is one line naming it) and its network input, at ``resolution`` (minor
    side; None: original size), stays within :data:`MAX_TOKENS` backbone tokens."""
    from stegoseg.data.transforms import minor_side_size
    from stegoseg.preflight import image_size

    for p in paths:
        w, h = image_size(p, "remove it from the inputs")
        nw, nh = minor_side_size(w, h, int(resolution)) if resolution else (w, h)
        tokens = -(-max(1, nw) // patch) * -(-max(1, nh) // patch)
        if tokens > MAX_TOKENS:
            at = f"at --resolution {resolution}" if resolution else "at its original size (--resolution 0)"
            raise StegosegError(f"{p} is {w}x{h}: {at} the network input is {nw}x{nh}, {tokens:,} tokens of patch "
                                f"{patch}, more than the {MAX_TOKENS:,} one image may use: pass a smaller --resolution, "
                                "or crop or tile the image")


def segment_images(
    model: SegmentationModel,
    inputs,
    out_dir,
    crf: Optional[bool] = None,
    flip: bool = True,
    resolution: Optional[int] = 320,
    probe: str = "cluster",
    overwrite: bool = False,
    progress: bool = True,
    num_workers: int = 2,
    batch_size: int = 8,
    crf_workers: int = 2,
    crf_params=None,
    ray=None,
) -> list:
    """Write ``<name>.png`` (palette PNG of labels) and ``<name>_overlay.png`` per input image.

    Every input gets its own output names (see :func:`output_stems`). Never writes over an
    input image (also not through a hard link). Inputs are checked before any work
    (:func:`check_input_images`). An input whose label map and overlay both exist (a finished
    earlier run: both are written by rename, the overlay last) is skipped unless ``overwrite``,
    so a rerun after an interruption does only what is left. Returns the label-map paths
    written by this call. ``ray``: a :class:`RaySegment` (``--ray-address``): the batches run on
    Ray actors that each load the same checkpoint, after the same checks.
    """
    from stegoseg.progress import progress_bar as tqdm

    if probe == "linear" and model.linear_probe is None:
        raise StegosegError("--probe linear: this checkpoint has no linear probe (trained without labels); use --probe cluster")
    paths = expand_inputs(inputs)
    out_dir = check_writable(out_dir)
    input_files = {(st.st_dev, st.st_ino) for st in (os.stat(p) for p in paths)}
    if out_dir.resolve() in {Path(p).resolve().parent for p in paths}:
        log.warning("--out %s is also a folder of input images: its label maps and overlays will sit beside them "
                    "(and a later run over the folder would take them for inputs)", out_dir)
    targets = []
    for p, stem in zip(paths, output_stems(paths)):
        label_path, overlay_path = out_dir / f"{stem}.png", out_dir / f"{stem}_overlay.png"
        for t in (label_path, overlay_path):
            if t.exists():
                st = os.stat(t)
                if (st.st_dev, st.st_ino) in input_files:
                    raise StegosegError(f"output {t} is an input image (or a link to one): choose another --out")
        targets.append((label_path, overlay_path))
    names = [t.name.lower() for pair in targets for t in pair]
    if len(set(names)) != len(names):
        clash = next(n for n in names if names.count(n) > 1)
        raise StegosegError(f"two inputs would both write {out_dir / clash}: rename one, or segment them into "
                            "different --out folders")
    check_input_images(paths, model.backbone.patch_size, resolution)
    if not resolution:
        warn_large_images(paths, model.backbone.patch_size)
    if not overwrite:
        todo = [i for i, (label, over) in enumerate(targets) if not (label.exists() and over.exists())]
        if len(todo) < len(paths):
            log.info("%d of %d images are already segmented in %s: skipped (--overwrite redoes them)",
                     len(paths) - len(todo), len(paths), out_dir)
        paths, targets = [paths[i] for i in todo], [targets[i] for i in todo]
        if not paths:
            return []
    lock_out(out_dir, "segment")
    out_dir.mkdir(parents=True, exist_ok=True)
    crf = model.default_crf() if crf is None else crf
    names = model.label_names(probe)  # what every label id means: written beside the maps
    palette = label_palette(model)
    atomic_write(out_dir / "labels.json", lambda tmp: Path(tmp).write_text(json.dumps(
        {"probe": probe, "labels": {str(i): name for i, name in enumerate(names)},
         "colours": {str(i): [int(c) for c in palette[i]] for i in range(min(len(names), len(palette)))}}, indent=1)))
    settings = dict(crf=crf, flip=flip, resolution=resolution, probe=probe, crf_params=crf_params)
    if ray is not None:
        from stegoseg.distributed.stages import segment_on_ray

        segment_on_ray(ray.options, ray.checkpoint, ray.weights, ray.replace_backbone, ray.device, ray.bf16, paths,
                       targets, dict(settings, crf_workers=crf_workers), batch_size, progress)
        return [label for label, _ in targets]
    loader = torch.utils.data.DataLoader(
        _ImageFiles(paths), batch_size=None, num_workers=min(num_workers, len(paths)), shuffle=False
    )
    written = []
    bar = tqdm(total=len(paths), desc="segment", disable=not progress, unit="img")
    pool = crf_pool(crf_workers) if crf and crf_workers > 1 else None
    try:
        buffer = []
        for image, target in zip(loader, targets):
            buffer.append((image, target))
            if len(buffer) == batch_size:
                written += segment_and_write(model, *zip(*buffer), crf_pool=pool, done=len(written), **settings)
                bar.update(len(buffer))
                buffer = []
        if buffer:
            written += segment_and_write(model, *zip(*buffer), crf_pool=pool, done=len(written), **settings)
            bar.update(len(buffer))
    finally:
        bar.close()
        if pool is not None:
            pool.shutdown()
    return written


def label_palette(model: SegmentationModel) -> np.ndarray:
    """The colours of a model's label maps (one per cluster or class, whichever is more)."""
    return make_palette(max(model.n_clusters, model.n_classes or 0))


def segment_and_write(model: SegmentationModel, images, targets, crf: bool, flip: bool, resolution, probe: str,
                      crf_params=None, crf_pool=None, done: int = 0) -> list:
    """Segment one batch of images and write each one's label map and overlay (``targets``:
    (label path, overlay path) pairs) by rename, the overlay last, so that an image is done
    with both files or not at all. Returns the label-map paths. ``done``: images finished
    before this batch (for the disk-full message)."""
    from PIL import Image

    palette = label_palette(model)
    written = []
    labels_of = model.segment_batch(list(images), crf=crf, flip=flip, resolution=resolution, probe=probe,
                                    crf_pool=crf_pool, crf_params=crf_params)
    for image, (label_path, overlay_path), labels in zip(images, targets, labels_of):
        target = label_path
        try:
            atomic_write(label_path, lambda tmp: save_label_png(labels, tmp, palette), suffix=".png")
            target = overlay_path
            atomic_write(overlay_path, lambda tmp: Image.fromarray(overlay(np.asarray(image), labels, palette))
                         .save(tmp, format="PNG"), suffix=".png")
        except OSError as exc:
            label_path.unlink(missing_ok=True)  # an image is done with both files or not at all
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise StegosegError(f"disk full while writing {target} ({done + len(written)} images done): free some "
                                    "space and run the same command again, which skips the images already "
                                    "segmented") from None
            raise
        written.append(label_path)
    return written


@dataclass(frozen=True)
class RaySegment:
    """What Ray workers need to load the model ``segment`` was given (``--ray-address``)."""

    options: object  # stegoseg.distributed.engine.RayOptions
    checkpoint: str
    weights: Optional[str] = None
    replace_backbone: bool = False
    device: str = "auto"
    bf16: bool = False


class _ImageFiles(torch.utils.data.Dataset):
    """Decodes images in loader workers (parallel to the network)."""

    def __init__(self, paths):
        self.paths = list(paths)

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):

        return load_image(self.paths[i])
