"""The authors' released STEGO and PriMaPs .ckpt layouts (tiny fixtures built with the
reference classes: tests/fixtures/lightning_release/README.md): imported without running any
pickled code, the imported model's forward equals the reference's, bad files are one line."""
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import one_line_error

from stegoseg.cli import main
from stegoseg.model import load

RELEASE = Path(__file__).parent / "fixtures" / "lightning_release"
STEGO_REF = torch.load(RELEASE / "stego_forward.pt", weights_only=True)
PRIMAPS_REF = torch.load(RELEASE / "primaps_forward.pt", weights_only=True)



@pytest.mark.parametrize("tag", ["cocostuff27", "potsdam_linear"])
def test_stego_ckpt_imports_and_equals_the_reference_forward(tag, tmp_path):
    out = tmp_path / "model"
    assert main(["import-checkpoint", str(RELEASE / f"stego_{tag}.ckpt"), "--out", str(out)]) == 0
    model = load(out)
    ref = STEGO_REF[tag]
    assert model.method == "stego" and model.backbone.name == "dino_vits8" and model.backbone.pos_embed_mode == "dino"
    assert model.n_clusters == {"cocostuff27": 6, "potsdam_linear": 3}[tag]  # extra_clusters 1 / 0
    features = model.features(ref["images01"])  # 48 x 64: DINO's position-embedding interpolation
    code = model.code(ref["images01"])
    assert torch.allclose(features, ref["features"], atol=1e-5)
    assert torch.allclose(code, ref["code"], atol=1e-4)
    assert torch.equal(model.cluster_probe(code), ref["cluster"])
    assert torch.allclose(model.linear_probe(code), ref["linear"], atol=1e-4)
    assert model.config["resolution"] == 224 and model.config["n_classes"] == (5 if tag == "cocostuff27" else 3)


def test_primaps_ckpt_imports_and_equals_the_reference_forward(tmp_path):
    out = tmp_path / "model"
    assert main(["import-checkpoint", str(RELEASE / "primaps_cityscapes.ckpt"), "--out", str(out)]) == 0
    model, ref = load(out), PRIMAPS_REF["primaps"]
    assert model.method == "primaps" and model.head is None and model.cluster_probe.metric == "dot"
    code = model.code(ref["images01"])
    assert torch.allclose(code, ref["features"], atol=1e-5)
    assert torch.allclose(model.cluster_probe.similarity(code), ref["teacher"], atol=1e-4)  # the EMA teacher, g v/|v|
    assert torch.equal(model.cluster_probe(code), ref["cluster"])
    assert torch.allclose(model.linear_probe(code), ref["linear"], atol=1e-4)


def test_primaps_on_stego_needs_its_stego_file_and_then_equals_the_reference(tmp_path, capsys):
    primaps, stego = str(RELEASE / "primaps_stego_cocostuff27.ckpt"), str(RELEASE / "stego_cocostuff27.ckpt")
    one_line_error(capsys, ["import-checkpoint", primaps, "--out", str(tmp_path / "a")], "cocostuff27_vit_base_5.ckpt",
                   "pass that STEGO .ckpt too")
    assert main(["import-checkpoint", stego, primaps, "--out", str(tmp_path / "m")]) == 0  # any order
    model, ref = load(tmp_path / "m"), PRIMAPS_REF["stego+primaps"]
    assert model.method == "stego+primaps" and model.cluster_probe.metric == "dot"
    code = model.code(ref["images01"])
    assert torch.allclose(model.cluster_probe.similarity(code), ref["teacher"], atol=1e-4)
    assert torch.equal(model.cluster_probe(code), ref["cluster"])


def test_imported_model_segments_from_the_command_line(synthetic_root, tmp_path):
    out = tmp_path / "model"
    assert main(["import-checkpoint", str(RELEASE / "stego_cocostuff27.ckpt"), "--class-names", "a,b,c,d,e",
                 "--out", str(out)]) == 0
    assert load(out).class_names == ["a", "b", "c", "d", "e"]
    image = sorted((synthetic_root / "imgs" / "val").iterdir())[0]
    assert main(["segment", str(out), str(image), "--out", str(tmp_path / "seg"), "--device", "cpu", "--crf"]) == 0
    assert (tmp_path / "seg" / f"{image.stem}.png").exists()


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_bad_release_files_are_one_line_and_payloads_never_run(tmp_path, capsys):
    out = ["--out", str(tmp_path / "m")]
    truncated = tmp_path / "truncated.ckpt"
    truncated.write_bytes((RELEASE / "stego_cocostuff27.ckpt").read_bytes()[:5000])
    one_line_error(capsys, ["import-checkpoint", str(truncated), *out], "truncated")
    marker = tmp_path / "ran"
    evil = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(1)}, "hyper_parameters": _Payload(marker)}, evil)
    one_line_error(capsys, ["import-checkpoint", str(evil), *out], "posix.system", "nothing in it was run")
    assert not marker.exists()
    legacy = tmp_path / "legacy.ckpt"  # the pre-1.6 torch format goes through the same allow-list
    torch.save({"state_dict": {}, "x": _Payload(marker)}, legacy, _use_new_zipfile_serialization=False)
    one_line_error(capsys, ["import-checkpoint", str(legacy), *out], "nothing in it was run")
    assert not marker.exists()
    other = tmp_path / "other.ckpt"
    torch.save({"state_dict": {"encoder.weight": torch.zeros(2)}, "hyper_parameters": {}}, other)
    one_line_error(capsys, ["import-checkpoint", str(other), *out], "neither STEGO's", "PriMaPs'")
    page = tmp_path / "page.ckpt"
    page.write_text("<!DOCTYPE html><html>Google Drive - virus scan warning</html>")
    one_line_error(capsys, ["import-checkpoint", str(page), *out], "web page")
    one_line_error(capsys, ["import-checkpoint", str(RELEASE / "stego_cocostuff27.ckpt"), "--backbone", "dino_vitb8",
                            *out], "--backbone", "carries its own")
    one_line_error(capsys, ["import-checkpoint", str(RELEASE / "stego_cocostuff27.ckpt"),
                            str(RELEASE / "stego_potsdam_linear.ckpt"), *out], "both stego files")
    one_line_error(capsys, ["import-checkpoint", str(tmp_path / "missing.ckpt"), *out], "does not exist")
    one_line_error(capsys, ["import-checkpoint", str(RELEASE / "stego_cocostuff27.ckpt"), "--class-names", "a,b",
                            *out], "2 class names")
    assert not (tmp_path / "m" / "config.json").exists()
    pickle.dumps(0)  # the standard pickle module is untouched by the restricted reader
