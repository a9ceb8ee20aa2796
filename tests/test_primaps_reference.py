"""PriMaPs and PriMaPs-EM against the reference implementation (github visinf/primaps, commit
7ca7757): values in tests/fixtures/primaps_reference.pt were computed by the reference's own
functions in a scratch environment (how: tests/fixtures/primaps_reference.md)."""
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from stegoseg.evaluation.crf import CRFParams, crf_available, crf_job
from stegoseg.losses.primaps import ema_decay, ema_step, focal_loss
from stegoseg.nn.primaps import PrototypeHead, mask_pseudo_label, mask_unaries, median_filter3x3, principal_masks
from stegoseg.training.primaps_em import em_loss, em_pseudo_label

REF = torch.load(Path(__file__).parent / "fixtures" / "primaps_reference.pt", weights_only=True)


@pytest.mark.parametrize("case", ["A", "B"])
def test_mask_proposals_equal_reference(case):
    """The soft masks (the stopping rule: A stops at 95% coverage after 4 masks, B after one
    mask) and the CRF's input (median filter, gain, background map, log-softmax)."""
    rec = REF[f"{case}_plain"]
    masks = principal_masks(REF[f"{case}_features"], generator_seed=int(REF[f"{case}_seed"]))
    assert masks.shape == rec["soft_masks"].shape == ({"A": 4, "B": 1}[case], 12, 12)
    # float32 rounding: the fixture's machine and this one may take other BLAS paths (1.8e-7
    # seen on 2026-12-01); which pixels are in which mask is exact
    assert torch.equal(masks > 0, rec["soft_masks"] > 0)
    torch.testing.assert_close(masks, rec["soft_masks"], rtol=0, atol=1e-6)
    assert torch.allclose(mask_unaries(masks), rec["crf_in"], atol=1e-6)


@pytest.mark.skipif(not crf_available(), reason="pydensecrf2 is not installed")
@pytest.mark.parametrize("case", ["A", "B"])
def test_crf_output_and_pseudo_labels_equal_reference(case):
    rec = REF[f"{case}_plain"]
    unaries = mask_unaries(principal_masks(REF[f"{case}_features"], generator_seed=int(REF[f"{case}_seed"])))
    size = rec["crf_labels"].shape
    logits = F.interpolate(unaries[None], size=size, mode="bilinear", align_corners=False)[0]
    # the reference hands pydensecrf its image in BGR order: CRFParams(reference_input=True)
    labels = torch.from_numpy(crf_job((rec["crf_image"].numpy(), logits.numpy(), CRFParams(reference_input=True))))
    assert torch.equal(labels, rec["crf_labels"].long())
    assert torch.equal(mask_pseudo_label(labels), rec["pseudo"].long())  # no class prior: mask ids, 0 -> 255
    if case == "A":  # with a class prior: each mask takes its most frequent prior class
        assert torch.equal(mask_pseudo_label(labels, REF["A_prior_map"]), REF["A_prior"]["pseudo"].long())


def test_sign_flip_where_the_reference_makes_nan_masks():
    """Case C: after the first mask (a 6x6 hole), every free feature has a negative cosine with
    the principal direction. The reference divides by a zero maximum: NaN masks, and the whole
    image ends as 'ignore'. Flipping the direction's sign gives the second (large) mask."""
    rec = REF["C_plain"]
    assert torch.isnan(rec["crf_in"]).all() and (rec["pseudo"] == 255).all()
    masks = principal_masks(REF["C_features"], generator_seed=int(REF["C_seed"]))
    assert torch.equal(masks[0] > 0, rec["soft_masks"][0] > 0)  # the first mask is the reference's
    torch.testing.assert_close(masks[0], rec["soft_masks"][0], rtol=0, atol=1e-6)  # (float32 rounding)
    assert [int((m > 0).sum()) for m in masks] == [36, 28 * 28 - 36]
    assert torch.isfinite(mask_unaries(masks)).all()


def test_median_filter_is_the_lower_median_with_reflect_padding():
    x = torch.arange(12.0).reshape(1, 3, 4) ** 2 % 7
    out = median_filter3x3(x)
    padded = F.pad(x[None], (1, 1, 1, 1), mode="reflect")[0, 0]
    for i in range(3):
        for j in range(4):
            window = padded[i:i + 3, j:j + 3].flatten().sort().values
            assert out[0, i, j] == window[4]


def test_pseudo_label_ties_go_to_the_smallest_class():
    ids = torch.tensor([[1, 1, 2, 2], [0, 1, 2, 255]])
    classes = torch.tensor([[4, 2, 0, 3], [1, 4, 3, 0]])
    # mask 1: classes 4, 2, 4 -> 4; mask 2: 0, 3, 3 -> 3; background 0 and 255 stay ignored
    assert mask_pseudo_label(ids, classes).tolist() == [[4, 4, 3, 3], [255, 4, 3, 255]]
    assert mask_pseudo_label(torch.tensor([[1, 1]]), torch.tensor([[5, 2]])).tolist() == [[2, 2]]


def test_focal_loss_equals_reference_and_formula():
    ref = REF["focal"]
    assert torch.allclose(focal_loss(ref["logits"], ref["target"]), ref["loss"], atol=1e-7)
    z, y = ref["logits"], ref["target"]
    p = z.softmax(1)
    w = (1 - p.mean(dim=(0, 2, 3))) ** 2
    nll = -p.log().gather(1, y.clamp(max=3)[:, None])[:, 0]
    manual = torch.where(y == 255, torch.zeros_like(nll), w[y.clamp(max=3)] * nll).mean()
    assert torch.allclose(focal_loss(z, y), manual, atol=1e-6)


def test_ema_schedule():
    assert [ema_decay(c, 0.98) for c in (1, 2)] == [0.0, 0.0]
    assert ema_decay(3, 0.98) == pytest.approx(2 / 3) and ema_decay(10, 0.98) == pytest.approx(0.9)
    assert ema_decay(50, 0.98) == pytest.approx(0.98) and ema_decay(500, 0.98) == 0.98


def test_35_em_steps_equal_reference():
    """Student and EMA teacher over 35 steps of the reference's loop (teacher class map ->
    per-mask mode -> focal loss -> Adam 5e-3; teacher update at steps 10, 20, 30)."""
    em = REF["em"]
    k, c = em["init"].shape
    student, teacher = PrototypeHead(c, k), PrototypeHead(c, k)
    student.reset(em["init"])
    teacher.load_state_dict(student.state_dict())
    opt = torch.optim.Adam(student.parameters(), lr=float(em["lr"]))
    updates = 0
    for step in range(35):
        features, masks = em["batches"][step % 3]
        pseudo = em_pseudo_label(teacher, features, masks[:, 0])
        assert torch.equal(pseudo, em["pseudo"][step].long()), step
        loss = em_loss(student, features, pseudo, float(em["gamma"]))
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step > 0 and step % int(em["every"]) == 0:
            updates += 1
            ema_step(student, teacher, updates, float(em["decay"]))
        assert abs(float(loss.detach()) - float(em["loss"][step])) < 1e-6, step
        for ours, key in ((student.gain, "student_g"), (student.direction, "student_v"),
                          (teacher.gain, "teacher_g"), (teacher.direction, "teacher_v")):
            assert torch.allclose(ours.detach(), em[key][step], atol=1e-6), (step, key)
    assert not torch.allclose(teacher.direction, student.direction)  # the teacher lags after the third update
