"""Tests for stegoseg.backbones: presets, shapes, freezing, weight files, offline errors."""

from __future__ import annotations

import argparse
import math
import time

import pytest
import torch

from stegoseg.backbones import weights as bb
from stegoseg.backbones.backbone import Backbone, create_backbone, global_descriptor
from stegoseg.backbones.presets import (
    BACKBONE_PRESETS,
    get_backbone_preset,
    list_backbones,
    resolve_backbone_name,
)
from stegoseg.backbones.weights import file_sha256
from stegoseg.errors import StegosegError

ALL = list_backbones()
VITS = [n for n in ALL if BACKBONE_PRESETS[n].family == "vit"]
RESNETS = [n for n in ALL if BACKBONE_PRESETS[n].family == "resnet"]


def tiny(name: str, seed: int = 0, **kwargs) -> Backbone:
    torch.manual_seed(seed)
    return create_backbone(name, pretrained=False, tiny=True, **kwargs)


def images(backbone: Backbone, h_patches: int = 3, w_patches: int = 5, batch: int = 2) -> torch.Tensor:
    gen = torch.Generator().manual_seed(1)
    p = backbone.patch_size
    return torch.rand(batch, 3, h_patches * p, w_patches * p, generator=gen)


def assert_same_features(a: Backbone, b: Backbone) -> None:
    x = a.normalize(images(a))
    fa, fb = a(x), b(x)
    assert torch.allclose(fa, fb, atol=1e-6), (fa - fb).abs().max()


def assert_different_features(a: Backbone, b: Backbone) -> None:
    x = a.normalize(images(a))
    assert not torch.allclose(a(x), b(x), atol=1e-4)


# ---------------------------------------------------------------------------- presets


def test_expected_presets_are_listed():
    expected = {
        "dino_vits8", "dino_vits16", "dino_vitb8", "dino_vitb16",
        "dinov2_vits14", "dinov2_vitb14", "dinov2_vitl14",
        "dinov2_vits14_reg", "dinov2_vitb14_reg", "dinov2_vitl14_reg",
        "dinov3_vits16", "dinov3_vits16plus", "dinov3_vitb16", "dinov3_vitl16",
        "resnet50_supervised", "mocov2_resnet50",
    }
    assert expected <= set(ALL)
    assert BACKBONE_PRESETS["dinov3_vits16plus"].arch == "vit_small_plus_patch16_dinov3.lvd1689m"
    assert BACKBONE_PRESETS["dinov3_vitl16"].embed_dim == 1024
    assert "DINOv3 License" in BACKBONE_PRESETS["dinov3_vitb16"].licence
    assert BACKBONE_PRESETS["dino_vits8"].arch == "vit_small_patch8_224.dino"
    assert BACKBONE_PRESETS["dinov2_vitb14_reg"].arch == "vit_base_patch14_reg4_dinov2.lvd142m"
    assert BACKBONE_PRESETS["mocov2_resnet50"].url.endswith("moco_v2_800ep_pretrain.pth.tar")


def test_aliases_and_unknown_name():
    assert resolve_backbone_name("vit_small_patch8_224.dino") == "dino_vits8"
    assert resolve_backbone_name("DINO-ViTS8") == "dino_vits8"
    assert resolve_backbone_name("vit_large_patch14_reg4_dinov2") == "dinov2_vitl14_reg"
    assert resolve_backbone_name("resnet50") == "resnet50_supervised"
    with pytest.raises(StegosegError) as err:
        create_backbone("no_such_net", pretrained=False)
    message = str(err.value)
    assert "no_such_net" in message and "dino_vits8" in message and "mocov2_resnet50" in message
    assert "\n" not in message


@pytest.mark.parametrize("name", ALL)
def test_full_size_architecture_matches_table(name):
    # Built on the meta device: checks timm/torchvision widths and strides, no memory.
    with torch.device("meta"):
        backbone = create_backbone(name, pretrained=False)
    preset = get_backbone_preset(name)
    assert backbone.patch_size == preset.patch_size
    assert backbone.embed_dim == preset.embed_dim
    if preset.family == "vit":
        registers = name.endswith("_reg") or name.startswith("dinov3")
        assert backbone.model.num_prefix_tokens == (5 if registers else 1)
        assert backbone.model.dynamic_img_size


# ------------------------------------------------------------------ tiny build + shapes


@pytest.mark.parametrize("name", ALL)
def test_tiny_backbone_shapes_frozen_eval(name):
    backbone = tiny(name)
    preset = get_backbone_preset(name)
    p = backbone.patch_size
    assert backbone.name == name
    assert p == preset.patch_size
    assert backbone.weights_source == "random" and backbone.weights_sha256 is None
    assert len(backbone.mean) == 3 and len(backbone.std) == 3
    assert isinstance(backbone.mean, tuple) and isinstance(backbone.std, tuple)

    for shape in [(2, 3, p * 4, p * 6), (1, 3, p * 5, p * 5)]:
        x = torch.randn(*shape)
        feats = backbone(x)
        assert feats.shape == (shape[0], backbone.embed_dim, shape[2] // p, shape[3] // p)
        assert torch.isfinite(feats).all()

    assert all(not q.requires_grad for q in backbone.parameters())
    backbone.train()
    assert not backbone.training
    assert all(not m.training for m in backbone.modules())
    x = torch.randn(1, 3, p * 2, p * 2)
    assert torch.equal(backbone(x), backbone(x))  # deterministic: no dropout, fixed BN
    assert not backbone(x).requires_grad


def test_vit_drops_prefix_tokens():
    backbone = tiny("dinov2_vits14_reg")
    x = torch.randn(1, 3, 14 * 2, 14 * 3)
    tokens = backbone.model.forward_features(x)
    assert tokens.shape[1] == 5 + 6
    feats = backbone(x)
    # feature cell (row 1, col 2) is patch token 5 + 1 * 3 + 2
    assert torch.allclose(feats[0, :, 1, 2], tokens[0, 5 + 3 + 2])


def test_dinov3_drops_cls_and_registers_at_any_grid():
    # Rotary positions: no embedding to resample, any multiple of 16 gives its own grid.
    backbone = tiny("dinov3_vits16")
    assert backbone.model.pos_embed is None and backbone.model.rope is not None
    for rows, cols in [(2, 3), (5, 1), (7, 4)]:
        x = torch.randn(1, 3, 16 * rows, 16 * cols)
        tokens = backbone.model.forward_features(x)
        assert tokens.shape[1] == 5 + rows * cols
        feats = backbone(x)
        assert feats.shape == (1, 32, rows, cols)
        expected = tokens[0, 5:].reshape(rows, cols, 32).permute(2, 0, 1)
        assert torch.allclose(feats[0], expected, atol=1e-6)


def test_dinov3_timm_state_dict_round_trip_and_wrong_size(tmp_path):
    from safetensors.torch import save_file

    source = tiny("dinov3_vits16", seed=3)
    path = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in source.model.state_dict().items()}, str(path))
    loaded = create_backbone("dinov3_vits16", weights=path, tiny=True)
    assert_same_features(source, loaded)
    with pytest.raises(StegosegError) as err:
        create_backbone("dinov2_vits14_reg", weights=path, tiny=True)
    assert "does not fit backbone 'dinov2_vits14_reg'" in str(err.value)


def test_dinov3_offline_error_names_the_licence_page(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(bb, "_cached_hub_file", lambda repo_id: None)
    with pytest.raises(StegosegError) as err:
        create_backbone("dinov3_vitb16")
    message = str(err.value)
    assert "timm/vit_base_patch16_dinov3.lvd1689m" in message and "licence request" in message
    assert "--weights PATH" in message and "\n" not in message


def _forward_features_path(backbone: Backbone, x: torch.Tensor) -> torch.Tensor:
    """The ViT path forward() used before timm's forward_intermediates: forward_features,
    drop the prefix (CLS + register) tokens, reshape the patch tokens to (B, C, h, w)."""
    batch, _, height, width = x.shape
    p = backbone.patch_size
    tokens = backbone.model.forward_features(x)[:, backbone.model.num_prefix_tokens:]
    return tokens.reshape(batch, height // p, width // p, tokens.shape[-1]).permute(0, 3, 1, 2).contiguous()


@pytest.mark.parametrize("name,pos_embed", [
    ("dino_vits8", "timm"), ("dino_vits8", "dino"), ("dino_vits16", "dino"), ("dinov2_vits14_reg", "timm"),
])
def test_vit_features_are_bit_identical_to_the_forward_features_path(name, pos_embed):
    backbone = tiny(name, pos_embed=pos_embed)
    assert backbone.model.num_prefix_tokens == (5 if "reg" in name else 1)
    for h_patches, w_patches in [(3, 5), (4, 4), (7, 2)]:
        x = backbone.normalize(images(backbone, h_patches, w_patches))
        feats = backbone(x)
        assert feats.shape == (2, backbone.embed_dim, h_patches, w_patches) and feats.is_contiguous()
        assert torch.equal(feats, _forward_features_path(backbone, x))
    if pos_embed == "dino":
        # forward() goes through the instance's DINO _pos_embed: off the stored 28x28 /
        # 14x14 grid it differs from the same weights in timm mode
        assert_different_features(backbone, tiny(name))


def test_forward_rejects_non_multiple_size():
    backbone = tiny("dino_vits8")
    with pytest.raises(StegosegError, match="multiple of the patch size 8"):
        backbone(torch.randn(1, 3, 30, 32))


def test_normalize_and_global_features():
    backbone = tiny("dino_vits16")
    mean_image = torch.tensor(backbone.mean).view(1, 3, 1, 1).expand(2, 3, 32, 32)
    assert torch.allclose(backbone.normalize(mean_image), torch.zeros(2, 3, 32, 32), atol=1e-6)
    ones = torch.ones(3, 4, 4)
    expected = (1 - torch.tensor(backbone.mean)) / torch.tensor(backbone.std)
    assert torch.allclose(backbone.normalize(ones)[:, 0, 0], expected)

    x = backbone.normalize(images(backbone))
    g = backbone.global_features(x)
    assert g.shape == (2, backbone.embed_dim)
    assert torch.allclose(g.norm(dim=1), torch.ones(2), atol=1e-5)
    assert torch.allclose(g, global_descriptor(backbone(x)))


@pytest.mark.parametrize("name", ["dino_vits8", "dinov2_vits14", "resnet50_supervised"])
def test_prepare_and_features_any_size(name):
    backbone = tiny(name)
    p = backbone.patch_size
    h, w = 3 * p + 1, 5 * p - 3  # neither is a multiple
    x01 = torch.rand(2, 3, h, w)

    padded, size = backbone.prepare(x01, mode="pad")
    assert size == (h, w)
    assert padded.shape == (2, 3, 4 * p, 5 * p)
    assert torch.allclose(padded[:, :, :h, :w], backbone.normalize(x01))
    assert torch.count_nonzero(padded[:, :, h:, :]) == 0

    resized, size = backbone.prepare(x01, mode="resize")
    assert size == (h, w)
    assert resized.shape == (2, 3, round(h / p) * p, round(w / p) * p)

    feats = backbone.features(x01, mode="pad")
    assert feats.shape == (2, backbone.embed_dim, math.ceil(h / p), math.ceil(w / p))
    feats = backbone.features(x01, mode="resize")
    assert feats.shape == (2, backbone.embed_dim, round(h / p), round(w / p))

    small = torch.rand(1, 3, p // 3 + 1, p // 3 + 1)
    assert backbone.features(small, mode="resize").shape[-2:] == (1, 1)
    with pytest.raises(StegosegError):
        backbone.prepare(x01, mode="crop")


def test_tiny_pretrained_download_is_refused():
    with pytest.raises(StegosegError, match="pretrained=False"):
        create_backbone("dino_vits8", tiny=True)


# ------------------------------------------------------------------------ weight files


@pytest.mark.parametrize("name", ["dino_vits8", "dinov2_vits14_reg", "mocov2_resnet50"])
def test_roundtrip_pth_and_safetensors(tmp_path, name):
    from safetensors.torch import save_file

    source = tiny(name, seed=1)
    state = source.model.state_dict()
    pth = tmp_path / "weights.pth"
    torch.save(state, pth)
    st = tmp_path / "weights.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(st))

    assert_different_features(source, tiny(name, seed=2))  # the test can fail
    for path in (pth, st):
        loaded = create_backbone(name, weights=path, tiny=True)
        assert_same_features(source, loaded)
        assert loaded.weights_source == str(path.resolve())
        assert loaded.weights_sha256 == file_sha256(path)
        assert all(not q.requires_grad for q in loaded.parameters())
        assert not loaded.training


def test_official_dino_training_checkpoint(tmp_path):
    source = tiny("dino_vits16", seed=3)
    backbone_state = source.model.state_dict()
    head = {"head.mlp.0.weight": torch.randn(8, 32), "head.last_layer.weight_g": torch.randn(1, 8)}
    teacher = {f"backbone.{k}": v for k, v in backbone_state.items()}
    teacher.update(head)
    student = {f"module.{k}": torch.zeros_like(v) for k, v in teacher.items()}
    ckpt = {
        "teacher": teacher,
        "student": student,
        "epoch": 100,
        "args": argparse.Namespace(arch="vit_small", patch_size=16),
    }
    path = tmp_path / "checkpoint.pth"
    torch.save(ckpt, path)
    loaded = create_backbone("dino_vits16", weights=path, tiny=True)
    assert_same_features(source, loaded)

    # teacher wrapped in DDP ("module.backbone.") is accepted too
    ckpt["teacher"] = {f"module.{k}": v for k, v in teacher.items()}
    torch.save(ckpt, path)
    assert_same_features(source, create_backbone("dino_vits16", weights=path, tiny=True))


def test_official_dino_plain_checkpoint_with_other_grid(tmp_path):
    # Official DINO backbone files are plain state dicts; pos_embed from a different
    # image size is resampled by timm's checkpoint filter.
    source = create_backbone("dino_vits16", pretrained=False, tiny=True, img_size=64)
    state = source.model.state_dict()
    assert state["pos_embed"].shape[1] == 1 + 16
    path = tmp_path / "dino_deitsmall16_pretrain.pth"
    torch.save(state, path)
    loaded = create_backbone("dino_vits16", weights=path, tiny=True)  # default img 224
    assert loaded.model.pos_embed.shape[1] == 1 + 14 * 14
    x = loaded.normalize(images(loaded, 4, 4))
    # resampled 4x4 -> 14x14 on load and back to 4x4 in forward: close, not identical
    cos = torch.nn.functional.cosine_similarity(source(x), loaded(x), dim=1)
    assert cos.min() > 0.95


def test_official_dinov2_checkpoint_with_registers(tmp_path):
    # Build an official-DINOv2-format state dict (mask_token, register_tokens, cls/pos
    # layout of the original repo) from a tiny timm model; timm's filter converts it.
    source = tiny("dinov2_vits14_reg", seed=4)
    state = dict(source.model.state_dict())
    reg, cls, pos = state.pop("reg_token"), state.pop("cls_token"), state.pop("pos_embed")
    cls_pos = torch.randn(1, 1, pos.shape[-1])
    official = dict(state)
    official["register_tokens"] = reg
    official["cls_token"] = cls - cls_pos
    official["pos_embed"] = torch.cat([cls_pos, pos], dim=1)
    official["mask_token"] = torch.zeros(1, pos.shape[-1])
    path = tmp_path / "dinov2_vits14_reg4_pretrain.pth"
    torch.save(official, path)
    loaded = create_backbone("dinov2_vits14_reg", weights=path, tiny=True)
    assert_same_features(source, loaded)


def test_moco_checkpoint(tmp_path):
    source = tiny("mocov2_resnet50", seed=5)
    query = {f"module.encoder_q.{k}": v for k, v in source.model.state_dict().items()}
    query["module.encoder_q.fc.0.weight"] = torch.randn(16, 2048)
    query["module.encoder_q.fc.2.weight"] = torch.randn(8, 16)
    key = {k.replace("encoder_q", "encoder_k"): torch.zeros_like(v) for k, v in query.items()}
    state = {**query, **key, "module.queue": torch.randn(8, 4), "module.queue_ptr": torch.zeros(1)}
    ckpt = {
        "epoch": 800,
        "arch": "resnet50",
        "state_dict": state,
        "optimizer": {"state": {}, "param_groups": [{"lr": 0.03, "momentum": 0.9, "params": [0, 1]}]},
    }
    path = tmp_path / "moco_v2_800ep_pretrain.pth.tar"
    torch.save(ckpt, path)
    loaded = create_backbone("mocov2_resnet50", weights=path, tiny=True)
    assert_same_features(source, loaded)


def test_torchvision_resnet_state_dict_with_classifier(tmp_path):
    source = tiny("resnet50_supervised", seed=6)
    state = dict(source.model.state_dict())
    state["fc.weight"] = torch.randn(1000, 2048)
    state["fc.bias"] = torch.randn(1000)
    for k in [k for k in state if k.endswith("num_batches_tracked")]:
        del state[k]  # very old torchvision files have no BN step counter
    path = tmp_path / "resnet50-0676ba61.pth"
    torch.save(state, path)
    assert_same_features(source, create_backbone("resnet50_supervised", weights=path, tiny=True))


def test_stegoseg_checkpoints(tmp_path):
    source = tiny("dino_vits8", seed=7)
    full = {
        "format": "stegoseg",
        "backbone": {"name": "dino_vits8", "state_dict": source.state_dict()},
        "head": {"w": torch.zeros(1)},
    }
    path = tmp_path / "run.ckpt"
    torch.save(full, path)
    assert_same_features(source, create_backbone("dino_vits8", weights=path, tiny=True))

    export = {"format": "stegoseg-backbone", "name": "dino_vits8", "state_dict": source.model.state_dict()}
    path2 = tmp_path / "export.pt"
    torch.save(export, path2)
    assert_same_features(source, create_backbone("vit_small_patch8_224.dino", weights=path2, tiny=True))

    with pytest.raises(StegosegError, match="holds backbone 'dino_vits8'"):
        create_backbone("dino_vits16", weights=path2, tiny=True)

    torch.save({"format": "stegoseg", "backbone": {"name": "dino_vits8"}}, path)
    with pytest.raises(StegosegError, match="holds no backbone weights"):
        create_backbone("dino_vits8", weights=path, tiny=True)


def test_wrong_shape_file_names_the_file(tmp_path):
    path = tmp_path / "vits8_tiny.pth"
    torch.save(tiny("dino_vits8").model.state_dict(), path)
    with pytest.raises(StegosegError) as err:
        create_backbone("dino_vits8", weights=path)  # full-size model, tiny file
    message = str(err.value)
    assert str(path) in message and "dino_vits8" in message
    assert "shape mismatch" in message

    torch.save({"foo.weight": torch.zeros(3)}, path)
    with pytest.raises(StegosegError) as err:
        create_backbone("mocov2_resnet50", weights=path, tiny=True)
    assert str(path) in str(err.value) and "missing keys" in str(err.value)
    assert "unexpected keys: foo.weight" in str(err.value)


def test_missing_and_unsafe_files(tmp_path):
    missing = tmp_path / "nope.pth"
    with pytest.raises(StegosegError, match="not found") as err:
        create_backbone("dino_vits8", weights=missing, tiny=True)
    assert str(missing) in str(err.value)

    unsafe = tmp_path / "pickled.pth"
    torch.save({"obj": _Arbitrary()}, unsafe)
    with pytest.raises(StegosegError, match="Python objects other than plain tensors") as err:
        create_backbone("dino_vits8", weights=unsafe, tiny=True)
    assert str(unsafe) in str(err.value) and "nothing in it was run" in str(err.value)
    assert "weights_only" not in str(err.value)

    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"not a safetensors file")
    with pytest.raises(StegosegError, match="garbage.safetensors"):
        create_backbone("dino_vits8", weights=garbage, tiny=True)


class _Arbitrary:
    pass


def test_file_sha256(tmp_path):
    path = tmp_path / "f.bin"
    path.write_bytes(b"abc")
    assert file_sha256(path) == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"


# ----------------------------------------------------------------------------- offline


def _no_network(url):
    return False, "simulated offline"


def test_offline_hub_download_fails_fast_with_instructions(monkeypatch):
    monkeypatch.setattr(bb, "_cached_hub_file", lambda repo_id: None)
    monkeypatch.setattr(bb, "_network_available", _no_network)
    monkeypatch.setattr(bb, "_download_hub_file", _must_not_be_called)
    start = time.monotonic()
    with pytest.raises(StegosegError) as err:
        create_backbone("dino_vits16")
    assert time.monotonic() - start < 10
    message = str(err.value)
    assert "timm/vit_small_patch16_224.dino" in message
    assert "dino_vitbase16" not in message and "dino_deitsmall16_pretrain.pth" in message
    assert "weights=" in message and "--weights" in message and "\n" not in message


def test_offline_env_skips_any_network(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(bb, "_cached_hub_file", lambda repo_id: None)
    monkeypatch.setattr(bb, "_network_available", _must_not_be_called)
    with pytest.raises(StegosegError, match="HF_HUB_OFFLINE") as err:
        create_backbone("dinov2_vits14_reg")
    assert "timm/vit_small_patch14_reg4_dinov2.lvd142m" in str(err.value)
    assert "weights=PATH" in str(err.value)


def test_hub_client_error_becomes_one_clear_error(monkeypatch):
    def failing_download(repo_id):
        raise OSError("connection reset\nsecond line")

    monkeypatch.setattr(bb, "_cached_hub_file", lambda repo_id: None)
    monkeypatch.setattr(bb, "_network_available", lambda url: (True, ""))
    monkeypatch.setattr(bb, "_download_hub_file", failing_download)
    with pytest.raises(StegosegError) as err:
        create_backbone("dino_vits8")
    message = str(err.value)
    assert "connection reset" in message and "weights=" in message and "\n" not in message


@pytest.mark.parametrize("name", RESNETS)
def test_offline_url_download(monkeypatch, name):
    monkeypatch.setattr(bb, "_cached_url_file", lambda url: None)
    monkeypatch.setattr(bb, "_network_available", _no_network)
    monkeypatch.setattr(bb, "_download_url_file", _must_not_be_called)
    with pytest.raises(StegosegError) as err:
        create_backbone(name)
    message = str(err.value)
    assert BACKBONE_PRESETS[name].url in message and "weights=" in message


def test_cached_download_is_used_without_network(monkeypatch, tmp_path):
    fake = tmp_path / "model.safetensors"
    monkeypatch.setattr(bb, "_cached_hub_file", lambda repo_id: str(fake))
    monkeypatch.setattr(bb, "_network_available", _must_not_be_called)
    path, source = bb.download_weights(get_backbone_preset("dino_vits8"))
    assert path == fake and source == "timm:vit_small_patch8_224.dino@hub"

    monkeypatch.setattr(bb, "_cached_url_file", lambda url: str(fake))
    path, source = bb.download_weights(get_backbone_preset("mocov2_resnet50"))
    assert path == fake and source.startswith("url:https://dl.fbaipublicfiles.com/moco/")


def test_hub_cache_lookup_reads_the_hub_cache(monkeypatch, tmp_path):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    repo = tmp_path / "models--timm--vit_small_patch8_224.dino"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("abc123")
    (repo / "snapshots" / "abc123").mkdir(parents=True)
    (repo / "snapshots" / "abc123" / "pytorch_model.bin").write_bytes(b"x")
    assert bb._cached_hub_file("timm/vit_small_patch16_224.dino") is None
    assert bb._cached_hub_file("timm/vit_small_patch8_224.dino").endswith("abc123/pytorch_model.bin")
    (repo / "snapshots" / "abc123" / "model.safetensors").write_bytes(b"y")  # preferred
    assert bb._cached_hub_file("timm/vit_small_patch8_224.dino").endswith("abc123/model.safetensors")


def test_network_probe_is_bounded(monkeypatch):
    for var in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv(bb.NETWORK_PROBE_TIMEOUT_ENV, "1")
    start = time.monotonic()
    ok, reason = bb._network_available("https://stegoseg-test.invalid/weights.pth")
    assert time.monotonic() - start < 3
    assert not ok and "stegoseg-test.invalid" in reason


def _must_not_be_called(*args, **kwargs):
    raise AssertionError("network access attempted")
