"""Reading and writing checkpoint dicts: one self-contained ``.pt`` file, or a folder in the
hub-mixin layout of segmentation_models_pytorch and timm (``config.json`` + ``model.safetensors``).

These functions handle files and plain dicts only; :mod:`stegoseg.model` turns a dict into a
:class:`~stegoseg.model.SegmentationModel` and back. A file is read with
``torch.load(weights_only=True)``: nothing in it is executed.
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import torch

from stegoseg.errors import StegosegError
from stegoseg.preflight import default_file_mode, file_head

log = logging.getLogger("stegoseg")

CHECKPOINT_FORMAT = "stegoseg"
CHECKPOINT_VERSION = 2  # 2: a `projection` entry (--pca-dim); written only by checkpoints that have one
# The save_pretrained folder: the checkpoint dict without its tensors, and the tensors.
PRETRAINED_CONFIG = "config.json"
PRETRAINED_WEIGHTS = "model.safetensors"
# Where the checkpoint dict holds state dicts; in a save_pretrained folder each one is
# replaced by the key prefix of its tensors in model.safetensors ("backbone." etc.).
_STATE_DICT_SLOTS = (("backbone", "state_dict"), ("head", "state_dict"), ("cluster_probe",), ("linear_probe",),
                     ("projection",))


def write_checkpoint_file(ckpt: dict, path) -> Path:
    """``torch.save`` of a checkpoint dict, atomically (a temporary file renamed into place)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    try:
        torch.save(ckpt, tmp)
        tmp.replace(path)
    except (OSError, RuntimeError) as exc:  # torch reports a full disk as RuntimeError
        tmp.unlink(missing_ok=True)
        raise StegosegError(f"cannot write the checkpoint {path}: {str(exc).splitlines()[0]} (free disk space "
                            "or choose another --out); nothing was written") from None
    return path


def write_pretrained_folder(ckpt: dict, directory) -> Path:
    """A checkpoint dict as a save_pretrained folder (see :meth:`~stegoseg.model.SegmentationModel.save_pretrained`)."""
    directory = Path(directory)
    config, tensors = split_checkpoint(ckpt)
    weights_path, config_path = directory / PRETRAINED_WEIGHTS, directory / PRETRAINED_CONFIG
    tmp_weights = weights_path.with_name(weights_path.name + ".tmp")
    tmp_config = config_path.with_name(config_path.name + ".tmp")
    try:
        text = json.dumps(config, indent=2) + "\n"
    except (TypeError, ValueError) as exc:
        raise StegosegError(f"cannot save the model to {directory}: its config is not JSON ({exc}); "
                            "nothing was written") from None
    from safetensors.torch import save_file

    if config_path.exists():
        log.warning("replacing the model saved in %s", directory)
    try:
        directory.mkdir(parents=True, exist_ok=True)
        # Without config.json the folder reads as incomplete: drop the old one before
        # replacing the tensors, write the new one last.
        config_path.unlink(missing_ok=True)
        save_file(tensors, str(tmp_weights), metadata={"format": "pt"})
        os.chmod(tmp_weights, default_file_mode())  # safetensors writes 0600; config.json gets the usual mode
        tmp_config.write_text(text)
        tmp_weights.replace(weights_path)
        tmp_config.replace(config_path)
    except (OSError, RuntimeError, ValueError) as exc:
        tmp_weights.unlink(missing_ok=True)
        tmp_config.unlink(missing_ok=True)
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise StegosegError(f"cannot write the model folder {directory}: {first} (free disk space or choose "
                            "another folder); no complete model was written there") from None
    return directory


def read_pretrained_folder(directory) -> dict:
    """The checkpoint dict of a save_pretrained folder; every way the folder can be wrong is one StegosegError line."""
    directory = Path(directory)
    if not directory.is_dir():
        raise StegosegError(f"model folder {directory} does not exist: pass a folder written by save_pretrained")
    config_path, weights_path = directory / PRETRAINED_CONFIG, directory / PRETRAINED_WEIGHTS
    if not config_path.is_file():
        raise StegosegError(f"model folder {directory} has no {PRETRAINED_CONFIG} (an incomplete copy, or not a "
                            "folder written by save_pretrained)")
    try:
        config = json.loads(config_path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        reason = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
        raise StegosegError(f"cannot read {PRETRAINED_CONFIG} of model folder {directory} ({reason}): use a "
                            "folder written by save_pretrained") from None
    if not isinstance(config, dict) or config.get("format") != CHECKPOINT_FORMAT:
        raise StegosegError(f"model folder {directory} is not a stegoseg model ({PRETRAINED_CONFIG} has no "
                            f"'format': '{CHECKPOINT_FORMAT}' tag): pass a folder written by save_pretrained")
    version = config.get("version")
    if not isinstance(version, int) or version > CHECKPOINT_VERSION:
        raise StegosegError(f"model folder {directory} has format version {version!r}; this stegoseg reads "
                            f"version {CHECKPOINT_VERSION} and older (written by a newer stegoseg?)")
    if not weights_path.is_file():
        raise StegosegError(f"model folder {directory} has no {PRETRAINED_WEIGHTS} (an incomplete copy?): use "
                            "the whole folder save_pretrained wrote")
    from safetensors.torch import load_file

    try:
        tensors = load_file(str(weights_path), device="cpu")
    except Exception as exc:  # noqa: BLE001 - safetensors raises its own error types
        reason = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
        raise StegosegError(f"cannot read {PRETRAINED_WEIGHTS} of model folder {directory} ({reason}): the file "
                            "is truncated or corrupt (an interrupted copy or a full disk?)") from None
    return join_checkpoint(config, tensors)


def read_checkpoint_file(path) -> dict:
    """The checkpoint dict of a ``.pt`` file written by stegoseg (``weights_only``: nothing is executed)."""
    path = Path(path)
    if not path.is_file():
        raise StegosegError(f"checkpoint {path} does not exist: pass the .pt file a `stegoseg train` run wrote "
                            "(or a folder written by save_pretrained)")
    head = file_head(path, 64)
    if head and not head.startswith((b"PK\x03\x04", b"\x80")):
        looks = "a YAML or text file (a config.yaml?)" if head.strip()[:1].isalpha() or head[:1] in b"#{-" else \
            "not a PyTorch file"
        raise StegosegError(f"{path} is {looks}, not a checkpoint: pass the checkpoint.pt a `stegoseg train` run "
                            "wrote, or a folder written by save_pretrained")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unpickling problem is a bad file
        raise StegosegError(f"cannot read checkpoint {path}: {load_failure(exc)}") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise StegosegError(f"{path} is not a stegoseg checkpoint (no format tag): pass a file written by stegoseg")
    return ckpt


def split_checkpoint(ckpt: dict) -> tuple:
    """A checkpoint dict -> (its JSON part, its tensors): each state dict (see
    ``_STATE_DICT_SLOTS``) becomes the key prefix of its tensors, or stays None; the
    backbone entry also records ``weights_stored``. Inverse: :func:`join_checkpoint`."""
    config = dict(ckpt)
    tensors: dict = {}
    for slot in _STATE_DICT_SLOTS:
        parent = config
        for key in slot[:-1]:
            if parent.get(key) is None:
                break
            parent[key] = dict(parent[key])  # copy: the caller's dict stays as it was
            parent = parent[key]
        else:
            state = parent.get(slot[-1])
            prefix = f"{slot[0]}."
            if state is not None:
                for name, tensor in state.items():
                    tensors[prefix + name] = tensor.detach().cpu().contiguous()
            parent[slot[-1]] = prefix if state is not None else None
    config["backbone"]["weights_stored"] = config["backbone"]["state_dict"] is not None
    return config, tensors


def join_checkpoint(config: dict, tensors: dict) -> dict:
    """The checkpoint dict of a save_pretrained folder's ``config.json`` and tensors."""
    ckpt = dict(config)
    used = set()
    for slot in _STATE_DICT_SLOTS:
        parent = ckpt
        for key in slot[:-1]:
            if parent.get(key) is None:
                break
            parent[key] = dict(parent[key])
            parent = parent[key]
        else:
            prefix = parent.get(slot[-1])
            if prefix is None:
                continue
            if prefix != f"{slot[0]}.":
                raise ValueError(f"{'.'.join(slot)} names tensors {prefix!r}, expected '{slot[0]}.'")
            state = {name[len(prefix):]: t for name, t in tensors.items() if name.startswith(prefix)}
            used.update(prefix + name for name in state)
            parent[slot[-1]] = state
    backbone = ckpt["backbone"]
    if backbone.pop("weights_stored", None) not in (None, backbone.get("state_dict") is not None):
        raise ValueError("backbone.weights_stored disagrees with backbone.state_dict")
    unknown = sorted(set(tensors) - used)
    if unknown:
        raise ValueError(f"{PRETRAINED_WEIGHTS} holds tensors no part of the model takes ({unknown[0]})")
    return ckpt


def load_failure(exc: Exception) -> str:
    """Why ``torch.load`` failed, in our words: torch's own message suggests loading with
    ``weights_only=False``, which would run arbitrary code from the file; never pass that on."""
    import pickle

    text = str(exc)
    if isinstance(exc, pickle.UnpicklingError) and ("weights_only" in text or "Unsupported global" in text):
        return ("it contains Python objects other than plain tensors and values, which stegoseg does not load "
                "and nothing in it was run (a checkpoint from another program, or a tampered file?)")
    return "the file is truncated or corrupt, or not a checkpoint (an interrupted copy or a full disk?)"


def check_weights_for_checkpoint(bb: dict, weights, replace_backbone: bool = False) -> bool:
    """``--weights FILE`` for a checkpoint, checked before the model is built: the file must be
    the checkpoint's own backbone (the same SHA-256 as recorded), or, with ``replace_backbone``,
    at least of the same architecture (tensor names and shapes as the stored backbone, or as
    the checkpoint's preset builds it). Anything else is one StegosegError line. Returns whether
    the file holds the model's own weights."""
    from stegoseg.backbones.presets import get_backbone_preset
    from stegoseg.backbones.weights import extract_state_dict, file_sha256, read_weights_file
    from stegoseg.model import build_backbone

    path = Path(weights).expanduser()
    if not path.is_file():
        raise StegosegError(f"--weights {path}: no such file")
    recorded = bb.get("weights_sha256")
    if recorded is not None and file_sha256(path) == recorded:
        return True  # the checkpoint's own weights file (e.g. offline, for a model saved without its backbone)
    preset = get_backbone_preset(bb["name"])
    given = extract_state_dict(read_weights_file(path), preset, path)
    if bb.get("state_dict") is not None:
        expected = {k[len("model."):]: tuple(v.shape) for k, v in bb["state_dict"].items() if k.startswith("model.")}
    else:
        with torch.device("meta"):
            expected = {k: tuple(v.shape) for k, v in build_backbone({**bb, "pretrained": False, "weights": None})
                        .model.state_dict().items()}
    shapes = {k: tuple(v.shape) for k, v in given.items()}
    differ = [k for k in expected if k in shapes and shapes[k] != expected[k] and "pos_embed" not in k]
    missing = [k for k in expected if k not in shapes and not k.endswith("num_batches_tracked")]
    if differ or len(missing) > len(expected) // 2:
        what = (f"{differ[0]} {shapes[differ[0]]} vs {expected[differ[0]]}" if differ
                else f"{len(missing)} of its {len(expected)} tensors missing")
        raise StegosegError(f"--weights {path} is not a {bb['name']} backbone like the checkpoint's ({what}): pass the "
                            "weights of the backbone the model was trained with")
    if bb.get("state_dict") is not None:
        own = {k[len("model."):]: v for k, v in bb["state_dict"].items() if k.startswith("model.")}
        if all(k in given and torch.equal(given[k].to(v.dtype), v) for k, v in own.items()):
            return True  # the stored backbone's own tensors, saved to a file
    if bb.get("state_dict") is None and recorded is None:
        return True  # nothing recorded to compare with (a model saved without its random backbone)
    if not replace_backbone:
        stored = "stores its backbone" if bb.get("state_dict") is not None else f"was trained with weights {recorded[:12]}"
        raise StegosegError(f"--weights {path} holds other weights than the model's own backbone (the checkpoint "
                            f"{stored}): drop --weights, or pass --replace-backbone-weights to run the model on this "
                            "backbone knowingly")
    return False


def model_from_checkpoint(cls, ckpt: dict, weights=None, device: str = "cpu", replace_backbone: bool = False):
    """A ``cls`` (:class:`~stegoseg.model.SegmentationModel`) from a checkpoint dict: the stored
    backbone (or ``weights``, checked by :func:`check_weights_for_checkpoint`), head, probes,
    class names and the cluster -> class matching."""
    from stegoseg.model import build_backbone

    bb = ckpt["backbone"]
    own_weights = check_weights_for_checkpoint(bb, weights, replace_backbone) if weights is not None else True
    if bb.get("state_dict") is not None and weights is None:
        spec = {**bb, "pretrained": False, "weights": None}
        backbone = build_backbone(spec)
        backbone.load_state_dict(bb["state_dict"])
        backbone.weights_source = bb.get("weights_source", "checkpoint")
        backbone.weights_sha256 = bb.get("weights_sha256")
    else:
        backbone = build_backbone(bb, weights=weights)
        if not own_weights:
            backbone.weights_replaced = True  # evaluate's metrics.json says so
            log.warning("--replace-backbone-weights: the backbone of this model is %s, not the one it was trained "
                        "with; its maps and metrics are those of another backbone", weights)
    if ckpt.get("projection") is not None:  # --pca-dim: the features the head was trained on
        backbone.project_onto(ckpt["projection"]["mean"], ckpt["projection"]["weight"])
    names, n_classes = ckpt.get("class_names"), ckpt.get("n_classes")
    if names is not None and n_classes and ckpt.get("linear_probe") is not None and len(names) != n_classes:
        # ValueError: _checked_model names the file or folder
        raise ValueError(f"class_names lists {len(names)} classes for a model of {n_classes}")
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
    if ckpt.get("cluster_classes") is not None:
        if len(ckpt["cluster_classes"]) != model.n_clusters:
            raise ValueError(f"cluster_classes lists {len(ckpt['cluster_classes'])} clusters for {model.n_clusters}")
        model.cluster_classes = list(ckpt["cluster_classes"])
    return model.to(device).eval()


def _build_head(entry: dict):
    """A checkpoint's head, by its recorded kind (checkpoints without a kind hold STEGO's)."""
    from stegoseg.nn.heads import build_head

    head = build_head(entry.get("kind", "stego"), entry["in_dim"], entry["dim"], entry.get("options"))
    head.load_state_dict(entry["state_dict"])
    return head


def load_model(path, weights=None, device: str = "auto", replace_backbone: bool = False):
    """Load a stegoseg checkpoint file, or a folder written by
    :meth:`SegmentationModel.save_pretrained` (needs no config files).

    ``weights``: a local backbone weights file, for checkpoints that name hub weights
    when there is no network (it must be the model's own backbone: see
    :func:`check_weights_for_checkpoint`; ``replace_backbone`` allows other weights of the
    same architecture, knowingly).
    """
    from stegoseg import labels
    from stegoseg.model import SegmentationModel

    if device == "auto":  # a GPU when there is one, as the command line does
        device = "cuda" if torch.cuda.is_available() else "cpu"
    path = Path(path)
    if path.is_dir() and not (path / "config.json").exists():
        for inside in ("checkpoint.pt", "train/checkpoint.pt"):  # `train --out` and `run --out` folders
            if (path / inside).is_file():
                path = path / inside
                break
    if path.is_dir():
        model = SegmentationModel.from_pretrained(path, weights=weights, device=device,
                                                  replace_backbone=replace_backbone)
    else:
        ckpt = read_checkpoint_file(path)
        model = _checked_model(
            lambda: SegmentationModel.from_checkpoint(ckpt, weights=weights, device=device,
                                                      replace_backbone=replace_backbone),
            what=f"checkpoint {path}",
            remedy="use the file a stegoseg run wrote",
        )
    model.cluster_names = labels.read_cluster_names(path, model.n_clusters)
    return model


def _checked_model(build, what: str, remedy: str):
    """``build()`` (a model from a checkpoint dict) with the checks both saved formats share:
    a dict that does not fit the model, or NaN/inf weights, is one StegosegError line
    naming ``what`` (the file or folder)."""
    try:
        model = build()
    except StegosegError:
        raise
    except (KeyError, RuntimeError, TypeError, ValueError, AttributeError) as exc:
        reason = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
        raise StegosegError(f"{what} is damaged or was edited ({reason}): {remedy}") from None
    bad = [name for name, t in model.state_dict().items() if t.is_floating_point() and not torch.isfinite(t).all()]
    if bad:
        raise StegosegError(f"{what} holds NaN or infinite weights ({bad[0]}"
                            f"{f' and {len(bad) - 1} more' if len(bad) > 1 else ''}): the run that wrote it diverged "
                            "or the file is damaged")
    return model
