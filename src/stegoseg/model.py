"""The segmentation model a user loads: backbone -> (head) -> code -> probes (-> CRF).

One class serves every method: the raw-feature baseline has no head (the code is the
backbone's features), STEGO has its :class:`~stegoseg.nn.heads.SegmentationHead`. A
checkpoint is one self-contained file (see :meth:`SegmentationModel.save`).

Python use::

    model = stegoseg.load("run/checkpoint.pt")
    labels = model.segment(pil_image)            # (H, W) int array, cluster classes
    code = model.code(batch01)                   # (B, K, h, w)
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

from stegoseg.backbones.backbone import create_backbone
from stegoseg.data.base import pil_to_tensor
from stegoseg.errors import StegosegError
from stegoseg.evaluation.crf import CRFParams, crf_batch, crf_job
from stegoseg.nn.heads import build_head
from stegoseg.nn.probes import ClusterProbe, LinearProbe

CHECKPOINT_FORMAT = "stegoseg"
CHECKPOINT_VERSION = 1


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
        self.cluster_probe = ClusterProbe(self.code_dim, n_clusters)
        self.linear_probe = LinearProbe(self.code_dim, n_classes) if n_classes else None
        self.n_classes = n_classes
        self.class_names = list(class_names) if class_names else None
        self.method = method
        self.config = dict(config or {})
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
        """Hard predictions for a batch of [0, 1] images.

        Returns {"cluster": (B, H, W) cluster ids, "linear": (B, H, W) class ids or None}
        at ``out_size`` (default: the images' size). The code is upsampled bilinearly to
        that size before the probes, as in the published protocol; with ``crf`` the
        probes' outputs are refined by the dense CRF (which needs ``out_size`` equal to
        the image size).
        """
        images01 = images01.to(self.device)
        size = tuple(out_size) if out_size is not None else tuple(images01.shape[-2:])
        with torch.no_grad():
            code = self.code(images01, flip=flip)
            # Crop padding: the features cover ceil(H/p) patches; map exactly onto the image.
            code = _crop_to_image(code, images01.shape[-2:], self.backbone.patch_size)
            code = F.interpolate(code, size=size, mode="bilinear", align_corners=False)
            cluster_logits = self.cluster_probe.log_probs(code)
            linear_logits = self.linear_probe(code) if self.linear_probe is not None else None
        if crf:
            if size != tuple(images01.shape[-2:]):
                raise StegosegError("the CRF needs predictions at image size: pass out_size=None")
            images_cpu = images01.cpu()
            out = {"cluster": crf_batch(images_cpu, cluster_logits.cpu(), crf_params, crf_workers, crf_pool)}
            out["linear"] = (
                crf_batch(images_cpu, linear_logits.cpu(), crf_params, crf_workers, crf_pool)
                if linear_logits is not None
                else None
            )
            return out
        return {
            "cluster": cluster_logits.argmax(1).cpu(),
            "linear": linear_logits.argmax(1).cpu() if linear_logits is not None else None,
        }

    def segment(
        self,
        image: Union[Image.Image, np.ndarray, str, Path],
        crf: bool = False,
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
        crf: bool = False,
        flip: bool = True,
        resolution: Optional[int] = 320,
        probe: str = "cluster",
        crf_pool=None,
        crf_params: Optional[CRFParams] = None,
    ) -> list:
        """Label maps for several images of any sizes; images whose network size agrees run as one batch.

        Each image may be anything :meth:`segment` accepts; ``crf_params`` as there.
        """
        from stegoseg.data.io import image_from_array_or_pil

        if probe == "linear" and self.linear_probe is None:
            raise StegosegError("this checkpoint has no linear probe (trained without labels): use probe='cluster'")
        if probe not in ("cluster", "linear"):
            raise StegosegError(f"unknown probe '{probe}': use cluster or linear")
        params = crf_params if crf_params is not None else CRFParams()
        images = list(images)
        pil = [
            image_from_array_or_pil(image, name="image" if len(images) == 1 else f"image {k}")
            for k, image in enumerate(images)
        ]
        nets = [_resize_minor(im, resolution) for im in pil]
        groups: dict = {}
        for i, net in enumerate(nets):
            groups.setdefault(net.size, []).append(i)
        results: list = [None] * len(pil)
        crf_jobs: list = []
        for idx in groups.values():
            x = torch.stack([pil_to_tensor(nets[i]) for i in idx]).to(self.device)
            with torch.no_grad():
                code = _crop_to_image(self.code(x, flip=flip), x.shape[-2:], self.backbone.patch_size)
            for j, i in enumerate(idx):
                w, h = pil[i].size
                with torch.no_grad():
                    c = F.interpolate(code[j : j + 1], size=(h, w), mode="bilinear", align_corners=False)
                    logits = self.cluster_probe.log_probs(c) if probe == "cluster" else self.linear_probe(c)
                if crf:
                    # RGB uint8 (read-only view: dense_crf copies it); BGR flip there with reference_input
                    crf_jobs.append((i, (np.asarray(pil[i], dtype=np.uint8), logits[0].float().cpu().numpy(), params)))
                else:
                    results[i] = logits.argmax(1)[0].cpu().numpy().astype(np.int64)
        if crf_jobs:
            order, jobs = zip(*crf_jobs)
            refined = crf_pool.map(crf_job, jobs) if crf_pool is not None else map(crf_job, jobs)
            for i, labels in zip(order, refined):
                results[i] = labels
        return results

    # ----------------------------------------------------------------- persistence
    def state_for_checkpoint(self, include_backbone: Optional[bool] = None) -> dict:
        """The checkpoint dict. The backbone's weights are stored when they cannot be
        rebuilt from their source (random init or a local file), unless told otherwise."""
        spec = dict(self.backbone_spec)
        source = getattr(self.backbone, "weights_source", "random")
        if include_backbone is None:
            include_backbone = not str(source).startswith("timm:")
        ckpt = {
            "format": CHECKPOINT_FORMAT,
            "version": CHECKPOINT_VERSION,
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
                "state_dict": self.head.state_dict(),
            },
            "cluster_probe": self.cluster_probe.state_dict(),
            "n_clusters": self.n_clusters,
            "linear_probe": self.linear_probe.state_dict() if self.linear_probe is not None else None,
            "n_classes": self.n_classes,
            "class_names": self.class_names,
            "config": self.config,
        }
        return ckpt

    def save(self, path, include_backbone: Optional[bool] = None) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(path.suffix + ".tmp")
        try:
            torch.save(self.state_for_checkpoint(include_backbone), tmp)
            tmp.replace(path)
        except (OSError, RuntimeError) as exc:  # torch reports a full disk as RuntimeError
            tmp.unlink(missing_ok=True)
            raise StegosegError(f"cannot write the checkpoint {path}: {str(exc).splitlines()[0]} (free disk space "
                                "or choose another --out); nothing was written") from None
        return path

    @classmethod
    def from_checkpoint(cls, ckpt: dict, weights: Optional[str] = None, device: str = "cpu") -> "SegmentationModel":
        bb = ckpt["backbone"]
        if bb.get("state_dict") is not None and weights is None:
            spec = {**bb, "pretrained": False, "weights": None}
            backbone = build_backbone(spec)
            backbone.load_state_dict(bb["state_dict"])
            backbone.weights_source = bb.get("weights_source", "checkpoint")
            backbone.weights_sha256 = bb.get("weights_sha256")
        else:
            backbone = build_backbone(bb, weights=weights)
        head = _build_head(ckpt["head"]) if ckpt.get("head") is not None else None
        spec = {k: bb[k] for k in ("name", "pretrained", "weights", "tiny", "overrides", "pos_embed") if k in bb}
        model = cls(
            backbone,
            spec,
            head,
            n_clusters=ckpt["n_clusters"],
            n_classes=ckpt.get("n_classes") if ckpt.get("linear_probe") is not None else None,
            class_names=ckpt.get("class_names"),
            method=ckpt.get("method", "stego"),
            config=ckpt.get("config"),
        )
        model.cluster_probe.load_state_dict(ckpt["cluster_probe"])
        if ckpt.get("linear_probe") is not None:
            model.linear_probe.load_state_dict(ckpt["linear_probe"])
        return model.to(device).eval()


def _build_head(entry: dict) -> nn.Module:
    """A checkpoint's head, by its recorded kind (checkpoints without a kind hold STEGO's)."""
    head = build_head(entry.get("kind", "stego"), entry["in_dim"], entry["dim"])
    head.load_state_dict(entry["state_dict"])
    return head


def _resize_minor(image: Image.Image, resolution: Optional[int]) -> Image.Image:
    if not resolution:
        return image
    w, h = image.size
    scale = resolution / min(w, h)
    return image.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.BILINEAR)


def _crop_to_image(code: torch.Tensor, image_size, patch: int) -> torch.Tensor:
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


def load(path, weights: Optional[str] = None, device: str = "cpu") -> SegmentationModel:
    """Load a stegoseg checkpoint file (needs no config files).

    ``weights``: a local backbone weights file, for checkpoints that name hub weights
    when there is no network.
    """
    path = Path(path)
    if not path.is_file():
        raise StegosegError(f"checkpoint {path} does not exist: pass the .pt file a `stegoseg train` run wrote")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unpickling problem is a bad file
        raise StegosegError(f"cannot read checkpoint {path}: {_load_failure(exc)}") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise StegosegError(f"{path} is not a stegoseg checkpoint (no format tag): pass a file written by stegoseg")
    try:
        model = SegmentationModel.from_checkpoint(ckpt, weights=weights, device=device)
    except StegosegError:
        raise
    except (KeyError, RuntimeError, TypeError, ValueError) as exc:
        reason = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
        raise StegosegError(f"checkpoint {path} is damaged or was edited ({reason}): use the file a stegoseg run "
                            "wrote") from None
    bad = [name for name, t in model.state_dict().items() if t.is_floating_point() and not torch.isfinite(t).all()]
    if bad:
        raise StegosegError(f"checkpoint {path} holds NaN or infinite weights ({bad[0]}"
                            f"{f' and {len(bad) - 1} more' if len(bad) > 1 else ''}): the run that wrote it diverged "
                            "or the file is damaged")
    return model


def _load_failure(exc: Exception) -> str:
    """Why ``torch.load`` failed, in our words: torch's own message suggests loading with
    ``weights_only=False``, which would run arbitrary code from the file; never pass that on."""
    import pickle

    text = str(exc)
    if isinstance(exc, pickle.UnpicklingError) and ("weights_only" in text or "Unsupported global" in text):
        return ("it contains Python objects other than plain tensors and values, which stegoseg does not load "
                "(a checkpoint from another program?)")
    return "the file is truncated or corrupt, or not a checkpoint (an interrupted copy or a full disk?)"
