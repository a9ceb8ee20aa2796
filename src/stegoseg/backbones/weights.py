"""Backbone weights: reading local files of every common format, and downloading with one
clear offline error.
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import os
import socket
import threading
from pathlib import Path
from typing import Any, Mapping
from urllib.parse import urlparse

import torch
from torch import nn

from stegoseg.backbones.presets import BackbonePreset, resolve_backbone_name
from stegoseg.errors import StegosegError

# Seconds allowed for the quick "can we reach the download host at all" check made before
# any download, so that an offline machine fails fast with one clear message instead of
# waiting through the hub client's retries. Override with this environment variable.
NETWORK_PROBE_TIMEOUT_ENV = "STEGOSEG_NETWORK_TIMEOUT_S"


_DEFAULT_NETWORK_PROBE_TIMEOUT_S = 5.0


_HF_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


def file_sha256(path: str | os.PathLike[str], chunk_bytes: int = 1 << 20) -> str:
    """Hex SHA-256 of a file."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while True:
            block = handle.read(chunk_bytes)
            if not block:
                break
            digest.update(block)
    return digest.hexdigest()


def read_weights_file(path: Path) -> Any:
    if not path.exists():
        raise StegosegError(f"weights file not found: {path}")
    if not path.is_file():
        raise StegosegError(f"weights path is not a file: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device="cpu")
        except Exception as exc:  # safetensors raises its own error types
            raise StegosegError(f"cannot read safetensors weights file {path}: {exc}") from exc
    try:
        # weights_only=True: tensors and plain containers only, no arbitrary code. DINO
        # training checkpoints also store their argparse.Namespace of arguments, which
        # is allowed explicitly. MoCo's .pth.tar holds epoch/arch/state_dict/optimizer
        # (plain types), so no unsafe fallback is needed for it.
        with _allow_namespace_unpickling():
            return torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:
        from stegoseg.checkpoint_io import load_failure

        raise StegosegError(
            f"cannot read weights file {path}: {load_failure(exc)}; save a plain state dict "
            "(torch.save(model.state_dict(), ...)) or a .safetensors file"
        ) from None


def _allow_namespace_unpickling() -> Any:
    """Context allowing ``argparse.Namespace`` in weights-only loading (torch >= 2.5)."""
    safe_globals = getattr(torch.serialization, "safe_globals", None)
    return safe_globals([argparse.Namespace]) if safe_globals else contextlib.nullcontext()


def _strip_prefix(state: dict[str, Any], prefix: str) -> dict[str, Any]:
    """Keep only keys starting with ``prefix`` if any do, with the prefix removed."""
    if any(k.startswith(prefix) for k in state):
        return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    return state


def extract_state_dict(obj: Any, preset: BackbonePreset, path: Path) -> dict[str, torch.Tensor]:
    """Unwrap any supported checkpoint container into a flat backbone state dict."""
    if not isinstance(obj, Mapping):
        raise StegosegError(f"weights file {path} does not hold a state dict (got {type(obj).__name__})")
    fmt = obj.get("format")
    if fmt in ("stegoseg", "stegoseg-backbone"):
        entry = obj.get("backbone") if fmt == "stegoseg" else obj
        if not isinstance(entry, Mapping) or not isinstance(entry.get("state_dict"), Mapping):
            raise StegosegError(
                f"stegoseg checkpoint {path} holds no backbone weights; pass the backbone's "
                "original weights file with weights=PATH"
            )
        stored = entry.get("name")
        if stored is not None:
            try:
                stored_preset = resolve_backbone_name(str(stored))
            except StegosegError:
                stored_preset = str(stored)
            if stored_preset != preset.name:
                raise StegosegError(
                    f"weights file {path} holds backbone '{stored}', not '{preset.name}'; "
                    f"use create_backbone('{stored}', weights=...)"
                )
        state = dict(entry["state_dict"])
        state = _strip_prefix(state, "model.")  # Backbone.state_dict() keys
    else:
        state = obj
        for container in ("teacher", "student", "state_dict", "model"):
            inner = state.get(container) if isinstance(state, Mapping) else None
            if isinstance(inner, Mapping):
                state = inner
                break
        state = dict(state)
        # DDP wrappers, MoCo's query encoder, DINO's MultiCropWrapper (backbone + head).
        state = _strip_prefix(state, "module.")
        state = _strip_prefix(state, "encoder_q.")
        state = _strip_prefix(state, "backbone.")
        state = _strip_prefix(state, "model.")

    # The classifier / projection head is not part of the backbone.
    head = "head." if preset.family == "vit" else "fc."
    state = {k: v for k, v in state.items() if not k.startswith(head)}
    bad = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise StegosegError(f"weights file {path} is not a state dict of tensors (e.g. key {bad[0]!r})")
    return state


def load_weights_into(
    model: nn.Module, preset: BackbonePreset, state: dict[str, torch.Tensor], path: Path
) -> None:
    """Load an extracted state dict into the model with strict key and shape matching."""
    if preset.family == "vit" and state:
        # timm's ViT filter converts official DINOv2 checkpoints (mask token, registers,
        # SwiGLU names), reshapes linear patch embeddings and resamples pos_embed when
        # the checkpoint's grid differs from the model's; its Eva filter converts Meta's
        # original DINOv3 files (storage tokens, rotary periods, split q/k/v biases).
        from timm.models.eva import Eva
        from timm.models.eva import checkpoint_filter_fn as eva_filter
        from timm.models.vision_transformer import checkpoint_filter_fn

        if isinstance(model, Eva):
            checkpoint_filter_fn = eva_filter  # noqa: N806 - the same role for timm's other ViT class

        try:
            state = checkpoint_filter_fn(state, model)
        except Exception as exc:
            raise StegosegError(
                f"weights file {path} does not fit backbone '{preset.name}': {exc}"
            ) from exc

    expected = model.state_dict()
    for key, value in expected.items():
        # Old BatchNorm checkpoints have no step counter; it is unused in eval mode.
        if key.endswith("num_batches_tracked") and key not in state:
            state[key] = value.clone()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    mismatched = [
        f"{k} {tuple(state[k].shape)} vs {tuple(expected[k].shape)}"
        for k in expected
        if k in state and tuple(state[k].shape) != tuple(expected[k].shape)
    ]
    if missing or unexpected or mismatched:
        parts = []
        if mismatched:
            parts.append(f"shape mismatch (file vs model): {', '.join(mismatched[:3])}")
        if missing:
            parts.append(f"missing keys: {', '.join(missing[:5])}")
        if unexpected:
            parts.append(f"unexpected keys: {', '.join(unexpected[:5])}")
        raise StegosegError(
            f"weights file {path} does not fit backbone '{preset.name}' "
            f"({'; '.join(parts)}); check the backbone name (and tiny=) matches the file"
        )
    model.load_state_dict(state, strict=True)


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _hub_offline() -> bool:
    """The hub's offline flag; its environment variables are read again here because
    ``huggingface_hub.constants.HF_HUB_OFFLINE`` is fixed when huggingface_hub is imported."""
    from huggingface_hub import constants

    return _env_flag("HF_HUB_OFFLINE") or _env_flag("TRANSFORMERS_OFFLINE") or bool(constants.HF_HUB_OFFLINE)


def _probe_timeout_s() -> float:
    try:
        return float(os.environ.get(NETWORK_PROBE_TIMEOUT_ENV, _DEFAULT_NETWORK_PROBE_TIMEOUT_S))
    except ValueError:
        return _DEFAULT_NETWORK_PROBE_TIMEOUT_S


def _network_available(url: str) -> tuple[bool, str]:
    """Quick check that the host of ``url`` accepts TCP connections.

    Runs in a daemon thread bounded by the probe timeout, so a hanging DNS lookup cannot
    block. Skipped (assumed reachable) when an HTTP(S) proxy is configured, because the
    download then goes through the proxy and the host may not be reachable directly.
    Returns ``(ok, reason)``.
    """
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True, ""
    parsed = urlparse(url)
    host = parsed.hostname or ""
    port = parsed.port or (80 if parsed.scheme == "http" else 443)
    timeout_s = _probe_timeout_s()
    outcome: dict[str, str] = {}

    def probe() -> None:
        try:
            with socket.create_connection((host, port), timeout=timeout_s):
                outcome["ok"] = ""
        except OSError as exc:
            outcome["error"] = str(exc) or type(exc).__name__

    thread = threading.Thread(target=probe, name="stegoseg-network-probe", daemon=True)
    thread.start()
    thread.join(timeout_s + 0.5)
    if "ok" in outcome:
        return True, ""
    return False, f"cannot reach {host} ({outcome.get('error', f'no answer within {timeout_s:g} s')})"


def _cached_hub_file(repo_id: str) -> str | None:
    """Path of the preset's weights in the local Hugging Face cache, or None (no network)."""
    from huggingface_hub import try_to_load_from_cache

    for filename in _HF_WEIGHT_FILES:
        path = try_to_load_from_cache(repo_id, filename)
        if isinstance(path, str):  # not None / _CACHED_NO_EXIST
            return path
    return None


def _download_hub_file(repo_id: str) -> str:
    """Download the preset's weights from the Hugging Face hub (safetensors preferred)."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.utils import EntryNotFoundError

    for filename in _HF_WEIGHT_FILES[:-1]:
        try:
            return hf_hub_download(repo_id, filename)
        except EntryNotFoundError:
            continue
    return hf_hub_download(repo_id, _HF_WEIGHT_FILES[-1])


def _url_cache_path(url: str) -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints" / Path(urlparse(url).path).name


def _cached_url_file(url: str) -> str | None:
    """Path of a URL download in torch.hub's checkpoint cache, or None."""
    path = _url_cache_path(url)
    return str(path) if path.is_file() else None


def _download_url_file(url: str) -> str:
    path = _url_cache_path(url)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.hub.download_url_to_file(url, str(path), progress=True)
    return str(path)


def _offline_error(preset: BackbonePreset, reason: str) -> StegosegError:
    if preset.download_source == "hf":
        official = (f"Meta's original file, handed out after a licence request at {preset.url}"
                    if str(preset.url).endswith("/") else f"the official checkpoint {preset.url}")
        what = f"model.safetensors from https://huggingface.co/{preset.hf_hub_id} (or {official})"
    else:
        what = str(preset.url)
    return StegosegError(
        f"cannot download pretrained weights for backbone '{preset.name}' ({reason}); "
        f"download {what} on a machine with internet access and pass the file with "
        f"create_backbone('{preset.name}', weights=PATH) or the CLI option --weights PATH "
        f"(or use --no-pretrained / pretrained=False for a random backbone: numbers then are not meaningful)"
    )


def download_weights(preset: BackbonePreset) -> tuple[Path, str]:
    """Local path of the preset's pretrained weights (cached or downloaded) and the
    ``weights_source`` string. Never waits long when offline."""
    if preset.download_source == "hf":
        assert preset.hf_hub_id is not None
        source = f"timm:{preset.arch}@hub"
        cached = _cached_hub_file(preset.hf_hub_id)
        if cached:
            return Path(cached), source
        if _hub_offline():
            raise _offline_error(preset, "HF_HUB_OFFLINE is set and the file is not in the local cache")
        endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
        ok, reason = _network_available(endpoint)
        if not ok:
            raise _offline_error(preset, reason)
        try:
            return Path(_download_hub_file(preset.hf_hub_id)), source
        except Exception as exc:  # connection, HTTP and cache errors of the hub client
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            raise _offline_error(preset, f"{type(exc).__name__}: {first}") from exc

    assert preset.url is not None
    source = f"url:{preset.url}"
    cached = _cached_url_file(preset.url)
    if cached:
        return Path(cached), source
    ok, reason = _network_available(preset.url)
    if not ok:
        raise _offline_error(preset, reason)
    try:
        return Path(_download_url_file(preset.url)), source
    except Exception as exc:  # urllib / HTTP / disk errors
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise _offline_error(preset, f"{type(exc).__name__}: {first}") from exc
