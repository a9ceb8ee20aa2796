"""A local web page to look at segmentations and correspondences (``stegoseg serve``).

The functions behind the page are plain Python (tested without a server): :class:`Viewer`
loads the model once and answers the page's requests — segment an image (cluster map with
its legend, overlay, optional linear-probe map; CRF, flip and resolution as options),
the correspondence maps of a clicked point over the same image and over its nearest
neighbours (the paper's Fig. 2) for the backbone's features and for the trained code, and
the files to download. :func:`build_page` wires them into a Gradio page; every request
carries its own state, and model calls are serialised by a lock, so concurrent users never
see each other's images.
"""


import atexit
import json
import logging
import shutil
import tempfile
import threading
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from stegoseg.data.base import pil_to_tensor
from stegoseg.data.io import list_images, load_image
from stegoseg.errors import StegosegError
from stegoseg.evaluation.crf import crf_params_from
from stegoseg.features.cache import FeatureCache, backbone_weights_id
from stegoseg.features.projection import projection_digest
from stegoseg.model import SegmentationModel, crop_to_image, resize_minor
from stegoseg.reporting.figures import make_palette, overlay

log = logging.getLogger("stegoseg")

MAX_UPLOAD_BYTES = 30 * 1024 * 1024  # a larger upload is refused with a message
MAX_PIXELS = 40_000_000
#: The page's own style: thumbnail captions wrap instead of ending in an ellipsis ("0....jpg").
PAGE_CSS = ".caption-label { white-space: normal !important; max-width: 100% !important; word-break: break-all; }"
SLOW_RESOLUTION = 512  # above this network resolution the page says that segmenting will be slow
NEIGHBOUR_RESOLUTION = 224  # folder images are embedded at this minor side for the neighbour search


def check_upload(path) -> Image.Image:
    """An uploaded file as an RGB image, or StegosegError with what is wrong with it."""
    p = Path(path)
    name = p.name
    if not p.is_file():
        raise StegosegError(f"{name}: the upload did not arrive; try again")
    size = p.stat().st_size
    if size == 0:
        raise StegosegError(f"{name} is an empty file (0 bytes)")
    if size > MAX_UPLOAD_BYTES:
        raise StegosegError(f"{name} is {size / 1e6:.0f} MB; the page accepts images up to {MAX_UPLOAD_BYTES / 1e6:.0f} MB")
    try:
        with Image.open(p) as probe:
            w, h = probe.size
    except Image.DecompressionBombError:
        raise StegosegError(f"{name} has more than {2 * Image.MAX_IMAGE_PIXELS / 1e6:.0f} megapixels; the page accepts "
                            f"up to {MAX_PIXELS / 1e6:.0f} megapixels") from None
    except Exception:  # noqa: BLE001 - any failure to parse the header means "not an image"
        raise StegosegError(f"{name} is not an image (or a format PIL cannot read)") from None
    if w * h > MAX_PIXELS:
        raise StegosegError(f"{name} is {w}x{h} pixels; the page accepts up to {MAX_PIXELS / 1e6:.0f} megapixels")
    try:
        return load_image(p)
    except StegosegError as exc:
        raise StegosegError(f"{name}: {str(exc).split(': ', 1)[-1]}") from None


@dataclass
class Segmentation:
    """What the page shows for one image."""

    name: str
    image: np.ndarray  # (H, W, 3) uint8
    labels: np.ndarray  # (H, W) cluster (or class) ids
    cluster_rgb: np.ndarray
    overlay: np.ndarray
    linear_rgb: Optional[np.ndarray]
    legend: list  # [(id, name, (r, g, b), pixel share)]
    seconds: float
    files: list = field(default_factory=list)  # downloadable label PNG and overlay
    linear_legend: list = field(default_factory=list)  # the linear-probe map's, when it is shown


class Neighbours:
    """Images to search for a query image's nearest neighbours, with their backbone features:
    the checkpoint's training cache (its thumbnails and cached features) or the images of a
    folder (embedded once at start)."""

    def __init__(self, thumbs: list, features: torch.Tensor, source: str, names: Optional[list] = None):
        self.thumbs, self.features, self.source = thumbs, features, source
        self.names = list(names) if names is not None else [f"item {i}" for i in range(len(thumbs))]
        self.descriptors = F.normalize(features.float().mean(dim=(2, 3)), dim=1)

    def __len__(self) -> int:
        return len(self.thumbs)

    @classmethod
    def from_cache(cls, model: SegmentationModel, cache_dir, limit: int = 500) -> Optional["Neighbours"]:
        """The training cache of this checkpoint's backbone under ``cache_dir``, if one exists."""
        root = Path(cache_dir)
        if not root.is_dir():
            return None
        wanted = backbone_weights_id(model.backbone)
        projection = projection_digest(model.backbone)
        for meta in sorted(root.glob("*/meta.json")):
            spec = json.loads(meta.read_text()).get("spec", {})
            if (spec.get("weights") != wanted or spec.get("backbone") != model.backbone.name
                    or spec.get("projection") != projection):
                continue
            cache = FeatureCache(meta.parent)
            if not cache.complete:
                continue
            idx = np.linspace(0, cache.n - 1, min(limit, cache.n)).round().astype(int)
            thumbs = [np.ascontiguousarray(cache.thumbs[i].transpose(1, 2, 0)) for i in idx]
            feats = torch.from_numpy(np.array(cache.features[idx]))  # float16, as stored
            names = [str(cache.ids[i]).replace("#crop", " crop ") for i in idx]  # the image's name and its crop
            return cls(thumbs, feats, f"training cache {meta.parent.name} ({len(idx)} crops)", names)
        return None

    @classmethod
    def from_folder(cls, model: SegmentationModel, folder, limit: int = 64) -> "Neighbours":
        paths = list_images(folder)[:limit]
        if not paths:
            raise StegosegError(f"--images {folder}: no images there")
        thumbs, feats = [], []
        for p in paths:
            image = resize_minor(load_image(p), NEIGHBOUR_RESOLUTION)
            x = pil_to_tensor(image)[None]
            f = model.features(x)
            f = F.interpolate(f, size=(NEIGHBOUR_RESOLUTION // 8, NEIGHBOUR_RESOLUTION // 8), mode="bilinear",
                              align_corners=False)
            thumbs.append(np.asarray(image))
            feats.append(f[0].cpu().half())
        return cls(thumbs, torch.stack(feats), f"folder {folder} ({len(paths)} images)", [p.name for p in paths])

    def nearest(self, descriptor: torch.Tensor, k: int) -> list:
        sims = self.descriptors @ F.normalize(descriptor.float().cpu(), dim=0)
        return sims.topk(min(k, len(self))).indices.tolist()


class Viewer:
    """The model, loaded once, and what the page asks of it."""

    def __init__(self, model: SegmentationModel, neighbours: Optional[Neighbours] = None):
        self.model = model.eval()
        self.neighbours = neighbours
        self.lock = threading.Lock()
        n = max(model.n_clusters, model.n_classes or 0)
        self.palette = make_palette(n)
        self.crf_params = crf_params_from(model.config)

    # ----------------------------------------------------------------- segment
    def segment(self, image: Image.Image, name: str = "image", crf: bool = False, flip: bool = True,
                resolution: Optional[int] = 320, linear: bool = False) -> Segmentation:
        import time

        if linear and self.model.linear_probe is None:
            raise StegosegError("this checkpoint has no linear probe (it was trained without labels)")
        t0 = time.perf_counter()
        probes = ("cluster", "linear") if linear else ("cluster",)
        with self.lock, torch.no_grad():  # both probes from one pass of the network
            maps = self.model.segment_probes([image], crf=crf, flip=flip, resolution=resolution or None,
                                             probes=probes, crf_params=self.crf_params)[0]
        labels, lin = maps["cluster"], maps.get("linear")
        rgb = np.asarray(image.convert("RGB"))
        legend = self.legend(labels, linear=False)
        return Segmentation(
            name=name, image=rgb, labels=labels, cluster_rgb=self.palette[labels], overlay=overlay(rgb, labels, self.palette),
            linear_rgb=None if lin is None else self.palette[lin], legend=legend, seconds=time.perf_counter() - t0,
            linear_legend=[] if lin is None else self.legend(lin, linear=True),
        )

    def legend(self, labels: np.ndarray, linear: bool = False) -> list:
        """(id, name, colour, share of pixels) of every id present: class names for the linear
        probe and for a cluster probe whose clusters were matched to classes (the model's
        ``cluster_classes``), "cluster i" for unmatched clusters."""
        ids, counts = np.unique(labels, return_counts=True)
        names = self.model.label_names("linear" if linear else "cluster")
        rows = []
        for i, c in zip(ids.tolist(), counts.tolist()):
            name = names[i] if i < len(names) else f"cluster {i}"
            rows.append((i, name, tuple(int(v) for v in self.palette[i]), c / labels.size))
        return rows

    @staticmethod
    def legend_html(rows: list) -> str:
        cells = "".join(
            f'<span class="legend-item" style="display:inline-block;margin:2px 8px 2px 0">'
            f'<span style="display:inline-block;width:14px;height:14px;background:rgb{colour};'
            f'vertical-align:middle;border:1px solid #888"></span> {name} ({100 * share:.1f}%)</span>'
            for _, name, colour, share in rows
        )
        return f'<div id="legend-items">{cells}</div>'

    def save_files(self, result: Segmentation, folder) -> list:
        """The label map (palette PNG whose pixel values are the ids) and the overlay, for download."""
        from stegoseg.reporting.figures import save_label_png

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        stem = Path(result.name).stem or "image"
        label_path, overlay_path = folder / f"{stem}_labels.png", folder / f"{stem}_overlay.png"
        save_label_png(result.labels, label_path, self.palette)
        Image.fromarray(result.overlay).save(overlay_path)
        result.files = [str(label_path), str(overlay_path)]
        return result.files

    # ----------------------------------------------------------------- correspondences
    def network_input(self, image: Image.Image, resolution: Optional[int]) -> torch.Tensor:
        """(1, 3, h, w) in [0, 1]: the image as :meth:`SegmentationModel.segment` feeds it to the network."""
        return pil_to_tensor(resize_minor(image.convert("RGB"), resolution))[None]

    def correspondence(self, image: Image.Image, x: int, y: int, resolution: Optional[int] = 320,
                       n_neighbours: int = 3) -> list:
        """[(picture, caption)]: the clicked point's cosine similarity to every patch of the
        same image and of its nearest neighbours, for the backbone features and for the code."""
        w, h = image.size
        if not (0 <= x < w and 0 <= y < h):
            raise StegosegError(f"the point ({x}, {y}) is outside the {w}x{h} image")
        with self.lock, torch.no_grad():
            x01 = self.network_input(image, resolution)
            hn, wn = x01.shape[-2:]
            p = self.model.backbone.patch_size
            feats = self.model.features(x01)[0].cpu()  # the padded grid: ceil(hn/p) x ceil(wn/p) cells
            code = self.model.code_from_features(feats[None].to(self.model.device))[0].float().cpu()
            gh, gw = feats.shape[-2:]
            r, c = min(int(y * hn / h) // p, gh - 1), min(int(x * wn / w) // p, gw - 1)
            rgb = np.asarray(image.convert("RGB"))

            def on_image(sim):  # the part of the padded grid that covers the image, as the model crops it
                return crop_to_image(torch.from_numpy(sim)[None, None], (hn, wn), p)[0, 0].numpy()

            panels = [(mark(rgb, x, y), "clicked point")]
            panels.append((heat(rgb, on_image(similarity(feats, feats[:, r, c]))), "backbone features: same image"))
            panels.append((heat(rgb, on_image(similarity(code, code[:, r, c]))), "trained code: same image"))
            if self.neighbours is not None and len(self.neighbours):
                for j in self.neighbours.nearest(feats.mean(dim=(1, 2)), n_neighbours):
                    nf = self.neighbours.features[j].float()
                    ncode = self.model.code_from_features(nf[None].to(self.model.device))[0].float().cpu()
                    thumb = self.neighbours.thumbs[j]
                    name = self.neighbours.names[j]
                    panels.append((heat(thumb, similarity(nf, feats[:, r, c])), f"features: {name}"))
                    panels.append((heat(thumb, similarity(ncode, code[:, r, c])), f"code: {name}"))
        return panels


def similarity(feats: torch.Tensor, query: torch.Tensor) -> np.ndarray:
    """Cosine similarity (h, w) of every feature vector of ``feats`` (C, h, w) to ``query`` (C,)."""
    return torch.einsum("chw,c->hw", F.normalize(feats.float(), dim=0), F.normalize(query.float(), dim=0)).numpy()


def heat(image: np.ndarray, sim: np.ndarray, alpha: float = 0.6) -> np.ndarray:
    """A similarity map (upsampled to the image) in a colour map over the greyed image: 0 and
    below dark, 1 bright."""
    import matplotlib

    h, w = image.shape[:2]
    up = F.interpolate(torch.from_numpy(sim)[None, None], size=(h, w), mode="bilinear", align_corners=False)[0, 0]
    colours = matplotlib.colormaps["inferno"](up.clamp(0, 1).numpy())[..., :3] * 255
    grey = image.astype(np.float32).mean(axis=2, keepdims=True)
    return (alpha * colours + (1 - alpha) * grey).round().clip(0, 255).astype(np.uint8)


def mark(image: np.ndarray, x: int, y: int) -> np.ndarray:
    """The image with a cross at (x, y)."""
    out = image.copy()
    h, w = out.shape[:2]
    size = max(3, min(h, w) // 30)
    for dy in range(-size, size + 1):
        for px, py in ((x, y + dy), (x + dy, y)):
            if 0 <= px < w and 0 <= py < h:
                out[py, px] = (0, 255, 0)
    return out


# --------------------------------------------------------------------------- the page
def build_page(viewer: Viewer, folder: Optional[Path] = None, title: str = "stegoseg", names_path=None):
    """The Gradio page over ``viewer``; ``folder``: images offered in a list besides uploads;
    ``names_path``: the checkpoint beside which cluster names given on the page are saved (a
    model whose clusters are not matched to classes)."""
    import gradio as gr

    folder_images = [str(p) for p in list_images(folder)] if folder else []
    offered = set(folder_images)
    work = Path(tempfile.mkdtemp(prefix="stegoseg-serve-"))
    # the users' label maps and overlays live here while the page runs; they go with the process
    atexit.register(shutil.rmtree, work, True)
    model = viewer.model
    about = (f"**{title}** · method `{model.method}` · backbone `{model.backbone_spec.get('name')}` · "
             f"{model.n_clusters} clusters" + (f" · linear probe over {model.n_classes} classes" if model.linear_probe
                                                 is not None else "")
             + f" · device `{model.device}` · neighbours: "
             + (viewer.neighbours.source if viewer.neighbours is not None else "none (no training cache or --images)"))
    if random_backbone(model):
        about += ("\n\n⚠️ **This model's backbone is randomly initialised** (trained with --no-pretrained): its "
                  "segmentations show that the pipeline runs, not what the method does on real features.")

    def segment_all(files, picked, crf, flip, resolution, linear, session):
        if picked and picked not in offered:  # the list takes typed values: only the folder's images are read
            log.warning("page: refused a request for %r: not an image the page offers", picked)
            raise gr.Error("that image is not one the page offers", print_exception=False)
        paths = [(Path(f).name, f) for f in (files or [])] + [(Path(p).name, p) for p in ([picked] if picked else [])]
        if not paths:
            return (*([gr.update()] * 8), "Add an image (upload or pick one) first.", session)
        results, problems = [], []
        for name, path in paths:
            try:
                image = check_upload(path)
                result = viewer.segment(image, name=name, crf=crf, flip=flip, resolution=int(resolution),
                                        linear=linear)
                viewer.save_files(result, work / uuid.uuid4().hex)  # a folder per request: sessions never share files
                results.append((result, image))
            except StegosegError as exc:
                problems.append(str(exc))
        session = {"results": results, "current": 0, "resolution": int(resolution)}
        message = "\n".join(f"⚠️ {p}" for p in problems)
        if not results:
            return (*([None] * 4), "", None, [], [], message or "No image could be read.", session)
        uploads = len(files or [])
        origin = " and ".join(part for part in (f"{uploads} upload(s)" if uploads else "",
                                                "the image picked from the folder" if picked else "") if part)
        done = f"Segmented {len(results)} image(s) ({origin}) in {sum(r.seconds for r, _ in results):.1f} s."
        if int(resolution) > SLOW_RESOLUTION:
            done += (f" Resolution {int(resolution)}: the network sees about {(int(resolution) // 8) ** 2:,}+ tokens "
                     "per image; on a CPU that takes much longer than at 320.")
        shown_outputs = list(show(results[0][0]))
        shown_outputs[5] = [f for r, _ in results for f in r.files]  # every image's label map and overlay
        return (*shown_outputs, [(r.overlay, r.name) for r, _ in results], [],
                (message + "\n" if message else "") + done, session)

    def name_clusters(text, session):
        from stegoseg.labels import parse_cluster_names, save_cluster_names

        try:
            file = save_cluster_names(model, names_path, parse_cluster_names(text, model.n_clusters))
        except StegosegError as exc:
            return gr.update(), f"⚠️ {exc}"
        except OSError as exc:
            return gr.update(), f"⚠️ cannot save the names beside {names_path}: {exc.strerror or exc}"
        current = None
        if session and session.get("results"):
            result = session["results"][session["current"]][0]
            result.legend = viewer.legend(result.labels)
            current = viewer.legend_html(result.legend)
        return (current if current is not None else gr.update()), f"Saved {len(model.cluster_names)} name(s) in {file}."

    def resolution_note(value):
        if int(value) <= SLOW_RESOLUTION:
            return gr.update()
        return (f"⏱️ Resolution {int(value)}: about {(int(value) // model.backbone.patch_size) ** 2:,} or more tokens "
                "per image; attention grows with their square, so on a CPU one image can take minutes.")

    def show(result: Segmentation):
        legends = viewer.legend_html(result.legend)
        if result.linear_legend:  # the linear-probe map's colours, named by class
            legends = f"<b>cluster map</b> {legends}<b>linear probe</b> {viewer.legend_html(result.linear_legend)}"
        return (result.image, result.cluster_rgb, result.overlay, result.linear_rgb, legends, result.files)

    # (no `from __future__ import annotations` in this module: Gradio finds SelectData by the annotation's type)
    def pick(session, evt: gr.SelectData):
        if not session or not session.get("results"):
            return (*([gr.update()] * 6), session)
        session = {**session, "current": int(evt.index)}
        return (*show(session["results"][session["current"]][0]), session)

    def click(session, evt: gr.SelectData):
        if not session or not session.get("results"):
            return [], "Segment an image first, then click a point of it."
        result, image = session["results"][session["current"]]
        x, y = int(evt.index[0]), int(evt.index[1])
        try:
            panels = viewer.correspondence(image, x, y, resolution=session.get("resolution", 320))
        except StegosegError as exc:
            return [], f"⚠️ {exc}"
        return panels, f"Correspondences of the point ({x}, {y}) of {result.name}."

    with gr.Blocks(title=title) as page:
        gr.Markdown(about)
        session = gr.State(None)
        with gr.Row():
            with gr.Column(scale=1, min_width=260):
                files = gr.File(label="images (drop one or more)", file_count="multiple", elem_id="upload")
                # custom values reach segment_all, which refuses them with one log line (Gradio's own
                # refusal prints a traceback per request)
                picked = gr.Dropdown(choices=folder_images, value=None, label="…or an image of the folder",
                                     visible=bool(folder_images), elem_id="folder-pick", allow_custom_value=True)
                crf = gr.Checkbox(value=False, label="dense CRF (slower)", elem_id="crf")
                flip = gr.Checkbox(value=True, label="flip averaging", elem_id="flip")
                resolution = gr.Slider(64, 1024, value=320, step=16, label="network resolution (minor side, px)",
                                       elem_id="resolution")
                linear = gr.Checkbox(value=False, label="linear-probe map", interactive=model.linear_probe is not None,
                                     elem_id="linear")
                run = gr.Button("Segment", variant="primary", elem_id="segment-button")
                message = gr.Markdown(elem_id="message")
                naming = names_path is not None and model.cluster_classes is None
                with gr.Group(visible=naming):
                    names_box = gr.Textbox(label="name clusters (e.g. 0=sky, 3=road; saved for segment and this page)",
                                           elem_id="cluster-names")
                    save_names = gr.Button("Save names", elem_id="save-names")
            with gr.Column(scale=4):
                with gr.Row():
                    shown = gr.Image(label="image: click a point for its correspondences", interactive=False,
                                     elem_id="shown-image")
                    cluster = gr.Image(label="cluster map", interactive=False, elem_id="cluster-map")
                    over = gr.Image(label="overlay", interactive=False, elem_id="overlay")
                    lin = gr.Image(label="linear probe", interactive=False, elem_id="linear-map")
                legend = gr.HTML(elem_id="legend")
                downloads = gr.File(label="downloads: label map (PNG) and overlay", interactive=False,
                                    file_count="multiple", elem_id="downloads")
                gallery = gr.Gallery(label="all images (select one)", columns=6, height=160, elem_id="all-images")
                corr = gr.Gallery(label="correspondences (features | code; same image, then nearest neighbours)",
                                  columns=3, elem_id="correspondences")
        outputs = [shown, cluster, over, lin, legend, downloads]
        inputs = [files, picked, crf, flip, resolution, linear, session]
        run.click(segment_all, inputs, [*outputs, gallery, corr, message, session])
        # dropping images (or picking one) segments at once: the uploads alone, or the pick alone
        files.upload(lambda f, *rest: segment_all(f, None, *rest), [files, *inputs[2:]],
                     [*outputs, gallery, corr, message, session])
        picked.input(lambda p, *rest: segment_all(None, p, *rest), [picked, *inputs[2:]],
                     [*outputs, gallery, corr, message, session])
        resolution.release(resolution_note, [resolution], [message])  # said before the slow run, not after
        save_names.click(name_clusters, [names_box, session], [legend, message])
        gallery.select(pick, [session], [*outputs, session])
        shown.select(click, [session], [corr, message])
    return page


def random_backbone(model) -> bool:
    """Whether the model's backbone weights are a random initialisation (no file, no download)."""
    return str(getattr(model.backbone, "weights_source", "")) == "random"


def check_port_free(host: str, port: int) -> None:
    """Before loading anything: the port must be free on ``host``."""
    import socket

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        try:
            probe.bind((host, port))
        except OSError as exc:
            raise StegosegError(f"--port {port} on {host} is not free ({exc.strerror or exc}): another program (or "
                                f"another stegoseg serve) uses it; pass --port with another number, e.g. {port + 1}"
                                ) from None


def serve(checkpoint, host: str = "127.0.0.1", port: int = 7860, images=None, weights=None, device: str = "cpu",
          block: bool = True, replace_backbone: bool = False):
    """Load the model once and start the page; returns the Gradio app (with ``block=False``)."""
    try:
        import gradio  # noqa: F401
    except ImportError:
        raise StegosegError("the web page needs Gradio: pip install 'stegoseg[serve]' (or pip install gradio)") from None
    from stegoseg.model import load

    check_port_free(host, port)
    model = load(checkpoint, weights=weights, device=device, replace_backbone=replace_backbone)
    if random_backbone(model):
        log.warning("the backbone of %s is randomly initialised (trained with --no-pretrained): the page works, but "
                    "its segmentations are not meaningful", checkpoint)
    neighbours = None
    here = Path(checkpoint).resolve().parent
    recorded = (model.config or {}).get("cache_dir")
    candidates = [Path(recorded), here / recorded] if recorded else []
    for cache_dir in [*candidates, here / "cache", here.parent / "cache"]:  # train/ and run/ layouts
        neighbours = Neighbours.from_cache(model, cache_dir) if cache_dir.is_dir() else None
        if neighbours is not None:
            break
    if neighbours is None and images:
        neighbours = Neighbours.from_folder(model, images)
    if host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("serving on %s: anyone who can reach this machine's port %d can use the page and upload files",
                    host, port)
    page = build_page(Viewer(model, neighbours), Path(images) if images else None,
                      title=f"stegoseg: {Path(checkpoint).name}", names_path=Path(checkpoint))
    page.queue(default_concurrency_limit=2)
    # the page's address is stegoseg's line; Gradio's banner (with its share=True hint) and httpx's
    # request lines are no news
    logging.getLogger("httpx").setLevel(logging.WARNING)
    if block:
        log.info("serving %s at http://%s:%d (Ctrl-C stops)", checkpoint, host, port)
    page.launch(server_name=host, server_port=port, prevent_thread_lock=not block, show_error=True, quiet=True,
                css=PAGE_CSS)
    return page
