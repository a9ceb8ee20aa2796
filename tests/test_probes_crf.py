"""Probes on unlabelled batches, the dense CRF on a two-colour image, and loader order with
worker processes."""
import numpy as np
import torch

from stegoseg.data.base import IGNORE_INDEX
from stegoseg.evaluation.crf import CRFParams, dense_crf
from stegoseg.nn.probes import ClusterProbe, LinearProbe


def test_linear_probe_loss_on_an_all_unlabelled_batch_is_zero_with_no_gradient_into_nan():
    probe = LinearProbe(6, 3)
    code = torch.randn(2, 6, 4, 4)
    labels = torch.full((2, 8, 8), IGNORE_INDEX)
    loss = probe.loss(code, labels)
    assert loss.item() == 0.0
    loss.backward()
    assert all(torch.isfinite(p.grad).all() and not p.grad.any() for p in probe.parameters())
    labels[0, 0, 0] = 1  # one labelled pixel: the loss is the cross-entropy of that pixel alone
    logits = torch.nn.functional.interpolate(probe(code), size=(8, 8), mode="bilinear", align_corners=False)
    expect = -torch.log_softmax(logits[0, :, 0, 0], 0)[1]
    torch.testing.assert_close(probe.loss(code, labels), expect)


def test_cluster_probe_loss_ignores_labels_and_equals_minus_mean_best_cosine():
    torch.manual_seed(0)
    probe = ClusterProbe(5, 3)
    code = torch.randn(2, 5, 3, 3)
    sim = torch.einsum("bchw,kc->bkhw", torch.nn.functional.normalize(code, dim=1),
                       torch.nn.functional.normalize(probe.centroids, dim=1))
    torch.testing.assert_close(probe.loss(code), -sim.max(1).values.mean())


def test_crf_on_a_two_colour_image_snaps_a_blurry_boundary_to_the_colour_edge():
    h, w = 24, 32
    image = np.zeros((h, w, 3), np.uint8)
    image[:, 16:] = (220, 30, 30)  # left black, right red: the edge at column 16
    x = np.arange(w)[None, :].repeat(h, 0)
    p_right = 1 / (1 + np.exp(-(x - 12) / 3.0))  # unary: a soft boundary 4 pixels too far left
    probs = np.stack([1 - p_right, p_right]).astype(np.float32)
    assert (probs.argmax(0)[:, 13:16] == 1).all()  # before: columns 13-15 on the wrong side of the edge
    labels = dense_crf(image, probs, CRFParams()).argmax(0)
    assert (labels[:, :16] == 0).all() and (labels[:, 16:] == 1).all()


def test_feature_extraction_with_loader_workers_keeps_the_item_order(tmp_path):
    from conftest import tiny_config

    from stegoseg.data.synthetic import make_synthetic_dataset
    from stegoseg.features.cache import extract_features
    from stegoseg.methods.common import build_backbone_from_config, build_split

    root = make_synthetic_dataset(tmp_path / "d", n_train=9, n_val=2, size=(40, 48))
    cfg = tiny_config(root)
    backbone, _ = build_backbone_from_config(cfg)
    train = build_split(cfg, "train")
    one = extract_features(backbone, train, tmp_path / "c0", resolution=32, batch_size=4, num_workers=0, progress=False)
    two = extract_features(backbone, train, tmp_path / "c2", resolution=32, batch_size=4, num_workers=2, progress=False)
    assert one.ids == two.ids
    assert np.array_equal(np.asarray(one.features), np.asarray(two.features))
    assert np.array_equal(np.asarray(one.labels), np.asarray(two.labels))


def test_crf_in_worker_processes_equals_the_crf_inline():
    from stegoseg.evaluation.crf import crf_batch, crf_pool

    gen = torch.Generator().manual_seed(0)
    images = torch.rand(3, 3, 20, 24, generator=gen)
    logits = torch.randn(3, 4, 10, 12, generator=gen)
    inline = crf_batch(images, logits, CRFParams(), workers=1)
    assert torch.equal(crf_batch(images, logits, CRFParams(), workers=2), inline)
    with crf_pool(2) as pool:
        assert torch.equal(crf_batch(images, logits, CRFParams(), pool=pool), inline)


def test_evaluation_with_crf_workers_equals_one_process(tmp_path):
    from conftest import tiny_config

    from stegoseg.data.synthetic import make_synthetic_dataset
    from stegoseg.methods.baseline import fit_feature_baseline
    from stegoseg.methods.common import evaluate_checkpoint_model, replace

    root = make_synthetic_dataset(tmp_path / "d", n_train=8, n_val=4, size=(40, 48))
    cfg = tiny_config(root, crf=True, crf_workers=1)
    model = fit_feature_baseline(cfg, tmp_path / "b")
    one = evaluate_checkpoint_model(cfg, model, tmp_path / "e1")
    two = evaluate_checkpoint_model(replace(cfg, crf_workers=2), model, tmp_path / "e2")
    assert one["cluster"]["strict"]["confusion"] == two["cluster"]["strict"]["confusion"]
