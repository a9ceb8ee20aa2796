"""Import released checkpoints of other implementations into a stegoseg model, one reader per
foreign layout. Files are read with ``torch.load(weights_only=True)`` / ``np.load(allow_pickle=
False)``: nothing in them is executed, and no package of the other implementation is needed.

CAUSE (Kim et al. 2023; github ByungKwanLee/Causal-Unsupervised-Segmentation) publishes per
dataset and backbone:

* ``segment_tr.pth`` / ``segment_mlp.pth``: the state dict of its ``Segment_TR`` /
  ``Segment_MLP``: student ``head.*`` and ``projection_head.*``, EMA teacher ``head_ema.*`` and
  ``projection_head_ema.*``, the linear probe ``linear.f.*``. Inference uses the teacher.
* ``cluster_tr.pth`` / ``cluster_mlp.pth``: the state dict of its ``Cluster``: ``codebook``
  (concepts x C) and ``cluster_probe`` (classes x code width).
* ``modular.npy``: the concept clusterbook (concepts x C, float32).

The teacher head, the cluster probe, the linear probe and (for CAUSE-TR) the clusterbook become
a :class:`~stegoseg.model.SegmentationModel` with the backbone named by ``backbone``.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

from stegoseg.errors import StegosegError

# Our CAUSE-TR head's parameter names for the reference's (``head_ema.`` prefix removed).
TR_NAMES = {
    "query_pos": "query_pos",
    "tr.self_attn.": "self_attn.",
    "tr.multihead_attn.": "cross_attn.",
    "tr.linear1.": "ffn_in.",
    "tr.linear2.": "ffn_out.",
    "tr.norm1.": "norm_self.",
    "tr.norm2.": "norm_cross.",
    "tr.norm3.": "norm_ffn.",
    "tr.f1.": "out.linear.",
    "tr.f2.0.": "out.nonlinear.0.",
    "tr.f2.2.": "out.nonlinear.2.",
}
MLP_NAMES = {"f1.": "linear.", "f2.0.": "nonlinear.0.", "f2.2.": "nonlinear.2."}


def _read_state(path: Path) -> dict:
    """A plain dict of tensors from a ``torch.save`` file, or one StegosegError line."""
    from stegoseg.preflight import file_head, refuse_web_page

    head = file_head(path)
    refuse_web_page(path, head, "a PyTorch file")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any failure to unpickle is a bad file
        text = str(exc)
        if head[:4] in (b"PK\x03\x04", b"\x80\x02") and ("weights_only" in text or "Unsupported global" in text):
            raise StegosegError(f"{path} holds Python objects other than tensors, which stegoseg does not load "
                                "(nothing in it was run): pass the released .pth file itself") from None
        raise StegosegError(f"cannot read {path}: the file is truncated or not a PyTorch file (an interrupted "
                            "download?)") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                              for k, v in state.items()):
        raise StegosegError(f"{path} is not a state dict of tensors: pass CAUSE's segment_*.pth / cluster_*.pth")
    return state


def _read_npy(path: Path) -> torch.Tensor:
    try:
        array = np.load(path, allow_pickle=False)
    except Exception as exc:  # noqa: BLE001 - any failure to read is a bad file
        reason = str(exc).splitlines()[0][:120] if str(exc) else type(exc).__name__
        raise StegosegError(f"cannot read {path} as a numpy array ({reason}): pass CAUSE's modular.npy "
                            "clusterbook") from None
    if not isinstance(array, np.ndarray):
        raise StegosegError(f"{path} is a numpy archive of several arrays, not a clusterbook: pass CAUSE's modular.npy")
    if array.ndim != 2 or not np.issubdtype(array.dtype, np.floating):
        raise StegosegError(f"{path} holds a {array.dtype} array of shape {array.shape}, not a clusterbook "
                            "(concepts x feature channels, float)")
    return torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))


def read_cause_files(paths: Sequence) -> dict:
    """Sort CAUSE's released files by content: {"segment": state, "cluster": state or None,
    "clusterbook": tensor or None, "method": "cause-tr" | "cause-mlp", "names": {part: path}}."""
    found: dict = {"segment": None, "cluster": None, "clusterbook": None}
    names: dict = {}
    for raw in paths:
        path = Path(raw)
        if not path.is_file():
            raise StegosegError(f"{path} does not exist: pass the files of the released CAUSE model "
                                "(segment_*.pth, cluster_*.pth, modular.npy)")
        if path.suffix == ".npy":
            part, value = "clusterbook", _read_npy(path)
        else:
            value = _read_state(path)
            if any(k.startswith("head_ema.") for k in value):
                part = "segment"
            elif "cluster_probe" in value:
                part = "cluster"
            else:
                raise StegosegError(f"{path} is neither CAUSE's segment_*.pth (head_ema.* keys) nor its cluster_*.pth "
                                    f"(a cluster_probe tensor); its keys start {sorted(value)[:3]}")
        if found[part] is not None:
            raise StegosegError(f"{path} and {names[part]} are both a {part} file: pass one of each")
        found[part], names[part] = value, path
    if found["segment"] is None:
        raise StegosegError("no segment_*.pth among the files: CAUSE's head is in segment_tr.pth / segment_mlp.pth")
    found["method"] = "cause-tr" if any(k.startswith("head_ema.tr.") for k in found["segment"]) else "cause-mlp"
    if found["cluster"] is None:
        raise StegosegError(f"{names['segment']} needs its cluster_{found['method'][6:]}.pth (the cluster probe, "
                            "released beside it): pass it too")
    if found["clusterbook"] is None and found["method"] == "cause-tr":
        book = found["cluster"].get("codebook")
        if book is None or not float(book.abs().sum()):
            raise StegosegError(f"{names['segment']} is a CAUSE-TR head, which needs its clusterbook: pass the "
                                "released modular.npy")
        found["clusterbook"] = book.float()
    found["names"] = names
    return found


def _renamed(state: dict, prefix: str, table: dict, where: Path) -> dict:
    out = {}
    for key, value in state.items():
        if not key.startswith(prefix):
            continue
        rest = key[len(prefix):]
        match = next((theirs for theirs in table if rest == theirs or rest.startswith(theirs)), None)
        if match is None:
            raise StegosegError(f"{where}: unexpected tensor {key} (a newer CAUSE layout?)")
        out[table[match] + rest[len(match):]] = value.float()
    return out


def dino_pos_embed(backbone: str) -> str:
    """CAUSE's DINO ViTs interpolate the position embedding as DINO does (offset 0.1, plain
    bicubic): ``"dino"`` for DINO (v1) presets, timm's own for the others."""
    from stegoseg.backbones.presets import get_backbone_preset

    return "dino" if get_backbone_preset(backbone).name.startswith("dino_vit") else "timm"


def import_cause(paths: Sequence, backbone: str, method: Optional[str] = None, weights: Optional[str] = None,
                 pretrained: bool = True, tiny: bool = False, class_names: Optional[list] = None,
                 config: Optional[dict] = None):
    """A :class:`~stegoseg.model.SegmentationModel` from CAUSE's released files (module docstring).
    DINO (v1) backbones use DINO's own position-embedding interpolation, as CAUSE's code does."""
    files = read_cause_files(paths)
    try:
        return _cause_model(files, backbone, method, weights, pretrained, tiny, class_names, config)
    except StegosegError:
        raise
    except (KeyError, IndexError, RuntimeError, ValueError, AttributeError, TypeError) as exc:
        reason = str(exc).splitlines()[0][:160] if str(exc) else type(exc).__name__
        names = ", ".join(str(p) for p in files["names"].values())
        raise StegosegError(f"the files {names} do not form one CAUSE model ({reason}): pass the segment, cluster "
                            "and clusterbook files released together") from None


def _cause_model(files: dict, backbone: str, method, weights, pretrained: bool, tiny: bool, class_names, config):
    from stegoseg.model import SegmentationModel, build_backbone
    from stegoseg.nn.cause import CauseMLPHead, CauseTRHead

    if method is not None and method != files["method"]:
        raise StegosegError(f"--method {method}, but {files['names']['segment']} holds a {files['method']} head: pass "
                            f"--method {files['method']} (or leave it out)")
    method = files["method"]
    segment, where = files["segment"], files["names"]["segment"]
    spec = {"name": backbone, "pretrained": pretrained and not weights, "weights": weights, "tiny": tiny,
            "pos_embed": dino_pos_embed(backbone)}
    net = build_backbone(spec)
    probe = files["cluster"]["cluster_probe"].float()
    if method == "cause-tr":
        state = _renamed(segment, "head_ema.", TR_NAMES, where)
        in_dim = state["out.linear.weight"].shape[1]
        dim = state["out.linear.weight"].shape[0]
        queries = state["query_pos"].shape[0]
        side = math.isqrt(queries)
        if side * side != queries:
            raise StegosegError(f"{where}: {queries} query positions are not a square token grid")
        book = files["clusterbook"]
        if book.shape[1] != in_dim:
            raise StegosegError(f"the clusterbook {files['names'].get('clusterbook', files['names']['cluster'])} has "
                                f"{book.shape[1]}-channel concepts, the head {in_dim}-channel features: files of two "
                                "different models?")
        head = CauseTRHead(in_dim, dim, n_concepts=book.shape[0], grid=(side, side),
                           hidden_dim=state["ffn_in.weight"].shape[0])
        state["clusterbook"] = book
    else:
        state = _renamed(segment, "head_ema.", MLP_NAMES, where)
        in_dim, dim = state["linear.weight"].shape[1], state["linear.weight"].shape[0]
        head = CauseMLPHead(in_dim, dim)
    if net.embed_dim != in_dim:
        raise StegosegError(f"the CAUSE head in {where} takes {in_dim}-channel features, --backbone {backbone} gives "
                            f"{net.embed_dim}: name the backbone the model was trained on (e.g. dino_vitb8 for 768, "
                            "dino_vits8 for 384)")
    if probe.shape[1] != dim:
        raise StegosegError(f"the cluster probe in {files['names']['cluster']} has {probe.shape[1]} channels, the head's "
                            f"code {dim}: files of two different models?")
    head.load_state_dict(state)
    linear_w, linear_b = segment.get("linear.f.weight"), segment.get("linear.f.bias")
    if (linear_w is None) != (linear_b is None):
        raise StegosegError(f"{where} has half a linear probe (linear.f.weight without linear.f.bias, or the reverse)")
    n_classes = int(linear_w.shape[0]) if linear_w is not None else None
    if class_names is not None and len(class_names) != probe.shape[0]:
        raise StegosegError(f"{len(class_names)} class names for a {probe.shape[0]}-class CAUSE model")
    model = SegmentationModel(net, spec, head, n_clusters=int(probe.shape[0]), n_classes=n_classes,
                              class_names=class_names, method=method, config=config)
    with torch.no_grad():
        model.cluster_probe.centroids.copy_(probe)
        if n_classes is not None:
            model.linear_probe.conv.weight.copy_(linear_w.float().reshape(model.linear_probe.conv.weight.shape))
            model.linear_probe.conv.bias.copy_(linear_b.float())
    return model.eval()
