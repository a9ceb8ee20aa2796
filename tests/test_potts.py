import json

import numpy as np
import torch
from conftest import tiny_config

from stegoseg.cli import main
from stegoseg.evaluation.crf import CRFParams
from stegoseg.losses.potts import potts_kernel, potts_term
from stegoseg.methods.common import build_backbone_from_config, build_split, prepare
from stegoseg.studies.potts import optimise_potts
from stegoseg.training.steps import StepBatches
from stegoseg.training.stego import StegoModule


def test_kernel_values():
    pos = torch.tensor([[[[0.0, 0.0], [50.0, 0.0]]]])  # (1, 1, 2, 2): two points
    col = torch.tensor([[[[10.0, 10.0]], [[10.0, 200.0]], [[10.0, 10.0]]]])  # (1, 3, 1, 2)
    k = potts_kernel(pos, col, pos, col, CRFParams())
    assert k.shape == (1, 1, 2, 1, 2)
    assert torch.isclose(k[0, 0, 0, 0, 0], torch.tensor(1.0))  # a point with itself
    assert k[0, 0, 0, 0, 1] < 1e-6  # far apart and different colour


def test_potts_alone_segments_a_two_colour_image():
    img = np.zeros((40, 40, 3), np.uint8)
    img[:, 20:] = (200, 40, 40)
    img[:, :20] = (30, 60, 200)
    r = optimise_potts(img, n_codes=4, size=24, steps=150, shift=0.15,
                       params=CRFParams(bi_xy_std=30.0, bi_rgb_std=13.0))
    labels = r["labels"]
    left, right = labels[:, :10], labels[:, 14:]
    # each half is (nearly) one label, and the halves differ
    lmode, rmode = np.bincount(left.ravel()).argmax(), np.bincount(right.ravel()).argmax()
    assert lmode != rmode
    assert (left == lmode).mean() > 0.9 and (right == rmode).mean() > 0.9
    assert r["losses"][-1] < r["losses"][0]


def test_potts_training_term(synthetic_root, tmp_path):
    cfg = tiny_config(synthetic_root, cache_dir=str(tmp_path / "c"), w_potts=0.5)
    backbone, _ = build_backbone_from_config(cfg)
    cache = prepare(cfg, tmp_path, backbone)
    assert cache.thumb_batch([0, 1]).shape == (2, 3, 8, 8)
    ds = StepBatches(cache, cache.neighbors(cfg.n_neighbors), cfg.batch_size, cfg.seed, cfg.knn_topk, steps=2,
                     with_thumbs=True)
    n = build_split(cfg, "train").n_classes
    module = StegoModule(cfg, backbone.embed_dim, n, n)
    out = module.compute_losses(ds[0], step=0)
    assert "potts" in out and torch.isfinite(out["potts"])
    code = torch.randn(2, 4, 5, 5, requires_grad=True)
    potts_term(code, torch.rand(2, 3, 8, 8) * 255, 0.3, 4).backward()
    assert code.grad is not None


def test_study_potts_command(tmp_path):
    from PIL import Image

    img = np.zeros((30, 30, 3), np.uint8)
    img[15:] = 255
    Image.fromarray(img).save(tmp_path / "x.png")
    assert main(["study-potts", str(tmp_path / "x.png"), "--out", str(tmp_path / "o"), "--steps", "30",
                 "--size", "16"]) == 0
    summary = json.loads((tmp_path / "o" / "potts.json").read_text())
    assert summary["final_loss"] <= summary["first_loss"]
    assert (tmp_path / "o" / "potts.png").exists()
