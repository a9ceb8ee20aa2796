"""The segmentation model a user loads: backbone -> (head) -> code -> probes (-> CRF).

One class serves every method: the raw-feature baseline has no head (the code is the
backbone's features), STEGO has its :class:`~stegoseg.nn.heads.SegmentationHead`. A
checkpoint is one self-contained file (see :meth:`SegmentationModel.save`), or a folder
in the hub-mixin layout of segmentation_models_pytorch and timm, ``config.json`` plus
``model.safetensors`` (see :meth:`SegmentationModel.save_pretrained`); both hold the same
checkpoint dict (:meth:`SegmentationModel.state_for_checkpoint`).

Python use::

    model = stegoseg.load("run/checkpoint.pt")   # or a save_pretrained folder
    labels = model.segment(pil_image)            # (H, W) int array, cluster classes
    code = model.code(batch01)                   # (B, K, h, w)
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

from stegoseg.backbones.backbone import create_backbone
from stegoseg.data.base import pil_to_tensor
from stegoseg.data.io import image_from_array_or_pil
from stegoseg.data.transforms import minor_side_size
from stegoseg.errors import StegosegError
from stegoseg.evaluation.crf import CRFParams, image_to_uint8, run_crf_jobs
from stegoseg.labels import classes_from_assignment
from stegoseg.labels import cluster_lookup as lookup_of_clusters
from stegoseg.labels import label_names as names_of_labels
from stegoseg.nn.probes import CRF_ALPHA, ClusterProbe, LinearProbe, probe_kind  # noqa: F401 - CRF_ALPHA: API

log = logging.getLogger("stegoseg")
from stegoseg.checkpoint_io import (  # noqa: F401 - CHECKPOINT_* and the folder names are part of this module's API
    CHECKPOINT_FORMAT,
    CHECKPOINT_VERSION,
    PRETRAINED_CONFIG,
    PRETRAINED_WEIGHTS,
    _checked_model,
    check_weights_for_checkpoint,
    load_model,
    model_from_checkpoint,
    read_checkpoint_file,
    read_pretrained_folder,
    write_checkpoint_file,
    write_pretrained_folder,
)

def build_backbone(spec: dict, weights: Optional[str] = None):
    """Build a backbone from a spec {name, pretrained, weights, tiny, overrides}."""
    return create_backbone(
        spec["name"],
        pretrained=spec.get("pretrained", True),
        weights=weights if weights is not None else spec.get("weights"),
        tiny=spec.get("tiny", False),
        pos_embed=spec.get("pos_embed", "timm"),
        **spec.get("overrides", {}),
    )


class SegmentationModel(nn.Module):
    """Frozen backbone + optional trained head + cluster probe + optional linear probe."""

    def __init__(
        self,
        backbone: nn.Module,
        backbone_spec: dict,
        head: Optional[nn.Module],
        n_clusters: int,
        n_classes: Optional[int] = None,
        class_names: Optional[Sequence[str]] = None,
        method: str = "stego",
        config: Optional[dict] = None,
    ):
        super().__init__()
        # ``backbone`` may be None while the head is trained on cached features
        # (:class:`~stegoseg.training.stego.StegoModule`); :meth:`attach_backbone` adds it.
        self.backbone = backbone
        self.backbone_spec = dict(backbone_spec)
        self.head = head
        self.code_dim = head.dim if head is not None else backbone.embed_dim
        alpha, metric = probe_kind(method)
        self.cluster_probe = ClusterProbe(self.code_dim, n_clusters, alpha=alpha, metric=metric)
        self.linear_probe = LinearProbe(self.code_dim, n_classes) if n_classes else None
        self.n_classes = n_classes
        self.class_names = list(class_names) if class_names else None
        self.method = method
        self.config = dict(config or {})
        # cluster -> class id found by an evaluation against labels (None: an unmatched cluster);
        # with it, the cluster probe's maps come out as class ids (see :meth:`named_clusters`)
        self.cluster_classes: Optional[list] = None
        # names a user gave to clusters of a label-free model (the page; a file beside the checkpoint)
        self.cluster_names: dict = {}
        # Inference precision: None (float32) or torch.bfloat16 (autocast on CUDA only).
        self.autocast_dtype: Optional[torch.dtype] = None

    def attach_backbone(self, backbone: nn.Module, backbone_spec: dict) -> "SegmentationModel":
        """Give a model trained on cached features the backbone those features came from."""
        if self.head is not None and getattr(self.head, "in_dim", backbone.embed_dim) != backbone.embed_dim:
            raise StegosegError(f"the head expects {self.head.in_dim}-channel features, the backbone gives "
                                f"{backbone.embed_dim}")
        self.backbone = backbone
        self.backbone_spec = dict(backbone_spec)
        return self

    @property
    def n_clusters(self) -> int:
        return self.cluster_probe.n_clusters

    @property
    def device(self) -> torch.device:
        return self.cluster_probe.centroids.device

    # ----------------------------------------------------------------- embeddings
    def features(self, images01: torch.Tensor) -> torch.Tensor:
        """Backbone features (B, C, ceil(H/p), ceil(W/p)) of [0, 1] images (padded to the patch size)."""
        with torch.no_grad():
            return self.backbone.features(images01.to(self.device), mode="pad")

    def code_from_features(self, features: torch.Tensor) -> torch.Tensor:
        return self.head(features) if self.head is not None else features

    def code(self, images01: torch.Tensor, flip: bool = False) -> torch.Tensor:
        """Code (B, K, h, w); with ``flip`` averaged with the code of the mirrored image."""
        use_amp = self.autocast_dtype is not None and self.device.type == "cuda"
        with torch.no_grad(), torch.autocast("cuda", dtype=self.autocast_dtype or torch.bfloat16, enabled=use_amp):
            code = self.code_from_features(self.features(images01)).float()
            if flip:
                mirrored = self.code_from_features(self.features(images01.flip(-1))).float().flip(-1)
                code = (code + mirrored) / 2
        return code

    # ----------------------------------------------------------------- prediction
    # ``predict`` and ``segment_batch`` differ only in how the network input is made and at
    # which size the labels come out; from the ready network input on they share
    # :meth:`_label_maps` (code -> crop to the image -> bilinear upsample -> probe ->
    # argmax or dense CRF) and :meth:`_run_crf`.
    def predict(
        self,
        images01: torch.Tensor,
        out_size: Optional[tuple] = None,
        flip: bool = True,
        crf: bool = False,
        crf_params: CRFParams = CRFParams(),
        crf_pool=None,
        crf_workers: int = 1,
    ) -> dict:
        """Hard predictions for a batch of [0, 1] images that is already the network input.

        Returns {"cluster": (B, H, W) cluster ids, "linear": (B, H, W) class ids or None}
        at ``out_size`` (default: the images' size). The code is upsampled bilinearly to
        that size before the probes, as in the published protocol; with ``crf`` the
        probes' outputs are refined by the dense CRF (which needs ``out_size`` equal to
        the image size) on the 8-bit batch (truncated with ``crf_params.reference_input``).

        This is the evaluation entry point: the batch comes from the dataset's transform
        (:class:`~stegoseg.data.transforms.EvalTransform`) and is not resized here.
        :meth:`segment_batch` is the same computation for raw images of any size: it
        resizes each to the network size itself (:func:`resize_minor`, the geometry of
        ``EvalTransform(resolution, crop="none", image_resample="bilinear")``) and returns
        labels at each image's original size, with the CRF on the original image.
        """
        images01 = images01.to(self.device)
        image_size = tuple(images01.shape[-2:])
        size = tuple(out_size) if out_size is not None else image_size
        if crf and size != image_size:
            raise StegosegError("the CRF needs predictions at image size: pass out_size=None")
        probes = ("cluster", "linear") if self.linear_probe is not None else ("cluster",)
        crf_images = (
            [image_to_uint8(image, truncate=crf_params.reference_input) for image in images01.cpu()] if crf else None
        )
        outputs = self._label_maps(images01, [size] * len(images01), flip, probes, crf_images, crf_params)
        self._run_crf(outputs, crf_pool, crf_workers)
        return {
            probe: torch.from_numpy(np.stack([out[probe] for out in outputs])) if probe in probes else None
            for probe in ("cluster", "linear")
        }

    def _label_maps(
        self,
        x: torch.Tensor,
        sizes: Sequence[tuple],
        flip: bool,
        probes: Sequence[str],
        crf_images: Optional[Sequence[np.ndarray]] = None,
        crf_params: Optional[CRFParams] = None,
    ) -> list:
        """The shared path from a ready network input ``x`` (B, 3, h, w) in [0, 1] on the model's device.

        Code (flip-averaged with ``flip``) -> crop the padded grid to the image -> bilinear
        upsample to ``sizes[i]`` = (H, W) of image i -> each probe of ``probes``. Returns
        one dict per image, probe -> (H, W) int64 labels, or with ``crf_images`` (one
        (H, W, 3) uint8 RGB image at ``sizes[i]`` per image) probe -> a pending CRF job
        that :meth:`_run_crf` turns into labels.
        """
        with torch.no_grad():
            code = crop_to_image(self.code(x, flip=flip), x.shape[-2:], self.backbone.patch_size)
        outputs: list = [{} for _ in sizes]
        groups: dict = {}
        for i, size in enumerate(sizes):
            groups.setdefault(tuple(int(v) for v in size), []).append(i)
        for size, idx in groups.items():  # one upsampling per output size
            with torch.no_grad():
                c = code if len(idx) == len(sizes) else code[idx]
                c = F.interpolate(c, size=size, mode="bilinear", align_corners=False)
                for probe in probes:
                    logits = self.cluster_probe.log_probs(c) if probe == "cluster" else self.linear_probe(c)
                    if crf_images is None:
                        labels = logits.argmax(1).cpu().numpy().astype(np.int64)
                        for j, i in enumerate(idx):
                            outputs[i][probe] = labels[j]
                    else:
                        for j, i in enumerate(idx):
                            # RGB uint8 (read-only views are fine: dense_crf copies); BGR flip there
                            outputs[i][probe] = (crf_images[i], logits[j].float().cpu().numpy(), crf_params)
        return outputs

    @staticmethod
    def _run_crf(outputs: list, pool=None, workers: int = 1) -> None:
        """Replace the pending CRF jobs in ``outputs`` (from :meth:`_label_maps`) by their labels,
        in ``pool`` if given, else in ``workers`` processes (1 = inline)."""
        slots = [(out, probe) for out in outputs for probe, value in out.items() if isinstance(value, tuple)]
        if not slots:
            return
        refined = run_crf_jobs([out[probe] for out, probe in slots], pool, workers)
        for (out, probe), labels in zip(slots, refined):
            out[probe] = labels

    def segment(
        self,
        image: Union[Image.Image, np.ndarray, str, Path],
        crf: Optional[bool] = None,
        flip: bool = True,
        resolution: Optional[int] = 320,
        probe: str = "cluster",
        crf_params: Optional[CRFParams] = None,
    ) -> np.ndarray:
        """Label map (H, W) int64 for one image at its original size.

        ``image``: a PIL image, a numpy array, a torch tensor or a file path, converted to
        8-bit RGB by :func:`stegoseg.data.io.image_from_array_or_pil`:

        * PIL images of any mode; 16-bit, 32-bit and float greyscale are scaled by range.
        * numpy arrays (H, W), (H, W, 1), (H, W, 3) or (H, W, 4) (alpha dropped), channels
          last. uint8 is used as is, bool as 0/255, uint16 as 16-bit (/257), other
          integers in 0..255 as 8-bit; floats in [0, 1] are scaled by 255, floats in
          [0, 255] rounded. Anything outside these ranges is min-max normalised with a
          warning; NaN/inf, empty arrays and other shapes raise StegosegError.
        * torch tensors channels first: (H, W) or (C, H, W) with C = 1, 3 or 4, e.g. a
          (3, H, W) float tensor in [0, 1]; values follow the numpy rules.

        ``resolution``: the network sees the image with its minor side resized to this
        (None: the original size; large images cost memory). ``probe``: "cluster"
        (unsupervised) or "linear" (needs a linear probe). ``crf_params``: dense CRF
        settings when ``crf`` (default :class:`~stegoseg.evaluation.crf.CRFParams`); the CRF gets the
        8-bit RGB image, so ``reference_input`` only changes the channel order here.
        """
        return self.segment_batch(
            [image], crf=crf, flip=flip, resolution=resolution, probe=probe, crf_params=crf_params
        )[0]

    def segment_batch(
        self,
        images: Sequence,
        crf: Optional[bool] = None,
        flip: bool = True,
        resolution: Optional[int] = 320,
        probe: str = "cluster",
        crf_pool=None,
        crf_params: Optional[CRFParams] = None,
    ) -> list:
        """Label maps for several images of any sizes; images whose network size agrees run as one batch.

        Each image may be anything :meth:`segment` accepts; ``crf_params`` as there. The one
        intended difference from :meth:`predict`: here each image is resized to the network
        size by :func:`resize_minor` (bilinear, minor side ``resolution``, long side
        truncated as in the evaluation transform) and labels come back at its original
        size, the CRF running on the original image; :meth:`predict` takes a batch that is
        already the network input. So ``segment_batch([im], resolution=r)`` equals
        ``predict(EvalTransform(r, crop="none", image_resample="bilinear")(im)[0][None],
        out_size=(H, W))`` for an image of size (H, W), flip and CRF settings alike.
        """

        maps = self.segment_probes(images, crf=crf, flip=flip, resolution=resolution, probes=(probe,),
                                   crf_pool=crf_pool, crf_params=crf_params)
        return [out[probe] for out in maps]

    def segment_probes(
        self,
        images: Sequence,
        crf: Optional[bool] = None,
        flip: bool = True,
        resolution: Optional[int] = 320,
        probes: Sequence[str] = ("cluster",),
        crf_pool=None,
        crf_params: Optional[CRFParams] = None,
        raw_clusters: bool = False,
    ) -> list:
        """:meth:`segment_batch` for several probes from one pass of the network: one dict per
        image, probe name -> (H, W) labels. With a stored cluster -> class matching
        (:meth:`set_cluster_classes`) the cluster probe's labels are class ids (unmatched
        clusters after them, see :meth:`cluster_lookup`) unless ``raw_clusters``."""
        for probe in probes:
            if probe == "linear" and self.linear_probe is None:
                raise StegosegError("this checkpoint has no linear probe (trained without labels): use probe='cluster'")
            if probe not in ("cluster", "linear"):
                raise StegosegError(f"unknown probe '{probe}': use cluster or linear")
        params = crf_params if crf_params is not None else CRFParams()
        crf = self.default_crf() if crf is None else bool(crf)
        images = list(images)
        pil = [
            image_from_array_or_pil(image, name="image" if len(images) == 1 else f"image {k}")
            for k, image in enumerate(images)
        ]
        nets = [resize_minor(im, resolution) for im in pil]
        groups: dict = {}
        for i, net in enumerate(nets):
            groups.setdefault(net.size, []).append(i)
        outputs: list = [None] * len(pil)
        for idx in groups.values():
            x = torch.stack([pil_to_tensor(nets[i]) for i in idx]).to(self.device)
            sizes = [(pil[i].height, pil[i].width) for i in idx]
            # the CRF gets the original 8-bit RGB image (read-only view: dense_crf copies it)
            crf_images = [np.asarray(pil[i], dtype=np.uint8) for i in idx] if crf else None
            for i, out in zip(idx, self._label_maps(x, sizes, flip, tuple(probes), crf_images, params)):
                outputs[i] = out
        self._run_crf(outputs, crf_pool)  # all groups' CRF jobs in one round
        if self.cluster_classes is not None and not raw_clusters:
            lookup = self.cluster_lookup()
            for out in outputs:
                if "cluster" in out:
                    out["cluster"] = lookup[out["cluster"]]
        return outputs

    def default_crf(self) -> bool:
        """The dense CRF setting ``segment`` uses when not told: the checkpoint's (its run's
        ``crf``), as the command line's ``segment`` does; off for a model whose config records none."""
        return bool((self.config or {}).get("crf", False))

    def set_cluster_classes(self, assignment: Sequence[int]) -> None:
        """Store an evaluation's cluster -> class matching (see :mod:`stegoseg.labels`)."""
        self.cluster_classes = classes_from_assignment(assignment, self.n_clusters, self.n_known_classes)

    @property
    def n_known_classes(self) -> int:
        return self.n_classes or (len(self.class_names) if self.class_names else 0)

    def cluster_lookup(self) -> np.ndarray:
        """(n_clusters,) the label each cluster id becomes (:func:`stegoseg.labels.cluster_lookup`)."""
        return lookup_of_clusters(self.cluster_classes, self.n_clusters, self.n_known_classes)

    def label_names(self, probe: str = "cluster") -> list:
        """The name of every label id the probe's maps hold (:func:`stegoseg.labels.label_names`)."""
        return names_of_labels(self, probe)

    # ----------------------------------------------------------------- persistence
    def state_for_checkpoint(self, include_backbone: Optional[bool] = None) -> dict:
        """The checkpoint dict. The backbone's weights are stored when they cannot be
        rebuilt from their source (random init or a local file), unless told otherwise."""
        spec = dict(self.backbone_spec)
        source = getattr(self.backbone, "weights_source", "random")
        if include_backbone is None:
            include_backbone = not str(source).startswith("timm:")
        options = getattr(self.head, "options", dict)() if self.head is not None else {}
        # --pca-dim: the fixed projection of the backbone's features (None: none)
        projection = getattr(self.backbone, "projection_state", lambda: None)()
        ckpt = {
            "format": CHECKPOINT_FORMAT,
            # version 1 unless the features are projected (older readers then refuse the file clearly)
            "version": CHECKPOINT_VERSION if projection is not None else 1,
            "method": self.method,
            "backbone": {
                **spec,
                "weights_source": source,
                "weights_sha256": getattr(self.backbone, "weights_sha256", None),
                "state_dict": self.backbone.state_dict() if include_backbone else None,
            },
            "head": None
            if self.head is None
            else {
                "kind": getattr(self.head, "checkpoint_kind", "stego"),
                "in_dim": self.head.in_dim,
                "dim": self.head.dim,
                **({"options": options} if options else {}),
                "state_dict": self.head.state_dict(),
            },
            "cluster_probe": self.cluster_probe.state_dict(),
            "n_clusters": self.n_clusters,
            "linear_probe": self.linear_probe.state_dict() if self.linear_probe is not None else None,
            "n_classes": self.n_classes,
            "class_names": self.class_names,
            "cluster_classes": self.cluster_classes,
            "config": self.config,
            "projection": projection,
        }
        return ckpt

    def save(self, path, include_backbone: Optional[bool] = None) -> Path:
        """Write the checkpoint dict (:meth:`state_for_checkpoint`) to one file, atomically."""
        return write_checkpoint_file(self.state_for_checkpoint(include_backbone), path)

    def save_pretrained(self, directory, include_backbone: Optional[bool] = None) -> Path:
        """Save the model as a folder in the hub-mixin layout (segmentation_models_pytorch, timm).

        ``config.json``: the checkpoint dict of :meth:`state_for_checkpoint` without its
        tensors (format tag and version, method, backbone spec with weights source and
        SHA-256 and ``weights_stored``, head kind and sizes, n_clusters, n_classes,
        class_names, the run config); each state dict is replaced by the key prefix of its
        tensors in ``model.safetensors`` ("backbone.", "head.", "cluster_probe.",
        "linear_probe."), or null where there is none. ``include_backbone`` as in
        :meth:`save`: by default the backbone's weights are stored unless they can be
        rebuilt from the hub. Load with :meth:`from_pretrained` or :func:`load`.

        JSON has no tuples: tuples of the run config come back as lists.
        """
        return write_pretrained_folder(self.state_for_checkpoint(include_backbone), directory)

    @classmethod
    def from_pretrained(cls, directory, weights: Optional[str] = None, device: str = "cpu",
                        replace_backbone: bool = False) -> "SegmentationModel":
        """Load a folder written by :meth:`save_pretrained`, with the checks of :func:`load`.

        ``weights``: a local backbone weights file, for folders saved without the backbone
        whose spec names hub weights (or to replace the stored backbone).
        """
        return _checked_model(
            lambda: cls.from_checkpoint(read_pretrained_folder(directory), weights=weights, device=device,
                                        replace_backbone=replace_backbone),
            what=f"model folder {directory}",
            remedy="use the folder save_pretrained wrote",
        )

    @classmethod
    def from_checkpoint(cls, ckpt: dict, weights: Optional[str] = None, device: str = "cpu",
                        replace_backbone: bool = False) -> "SegmentationModel":
        """A model from a checkpoint dict (:func:`stegoseg.checkpoint_io.model_from_checkpoint`)."""
        return model_from_checkpoint(cls, ckpt, weights=weights, device=device, replace_backbone=replace_backbone)


def resize_minor(image: Image.Image, resolution: Optional[int]) -> Image.Image:
    """The network input of :meth:`SegmentationModel.segment_batch`: ``image`` resized
    bilinearly so that its minor side is ``resolution`` (None or 0: unchanged).

    The size is :func:`~stegoseg.data.transforms.minor_side_size`'s, the evaluation
    transform's (the minor side exactly ``resolution``, the long side truncated like
    torchvision's ``Resize``), so an image segmented here and the same image through
    ``EvalTransform(resolution, crop="none")`` reach the network at the same size.
    (Rounding the long side instead, as before, gave a network input one pixel longer
    for e.g. a 31 x 20 image at resolution 16: 25 x 16 against the transform's 24 x 16.)
    """
    if not resolution:
        return image
    size = minor_side_size(image.width, image.height, int(resolution))
    size = (max(1, size[0]), max(1, size[1]))
    return image if size == image.size else image.resize(size, Image.BILINEAR)


def crop_to_image(code: torch.Tensor, image_size, patch: int) -> torch.Tensor:
    """Map a padded feature grid onto the image area: keep the H/p x W/p part covering it.

    The grid from a padded image covers ceil(H/p) * p pixels; resample it so that the
    fraction H / (ceil(H/p) p) of it is what gets upsampled to the image.
    """
    h, w = image_size
    gh, gw = code.shape[-2:]
    if gh * patch == h and gw * patch == w:
        return code
    # Upsample the full grid to the padded pixel size, then crop to the image.
    full = F.interpolate(code, size=(gh * patch, gw * patch), mode="bilinear", align_corners=False)
    return full[..., :h, :w]


def load(path, weights: Optional[str] = None, device: str = "auto", replace_backbone: bool = False) -> SegmentationModel:
    """Load a stegoseg checkpoint file, a folder written by :meth:`SegmentationModel.save_pretrained`
    (needs no config files), or a run's folder holding ``checkpoint.pt``; ``device="auto"``: a GPU
    when there is one. ``weights``: a local backbone weights file, for checkpoints that name hub
    weights when there is no network (it must be the model's own backbone:
    :func:`~stegoseg.checkpoint_io.check_weights_for_checkpoint`; ``replace_backbone`` allows
    other weights of the same architecture, knowingly). The names a user gave the clusters
    (:mod:`stegoseg.labels`) come with it."""
    return load_model(path, weights=weights, device=device, replace_backbone=replace_backbone)
