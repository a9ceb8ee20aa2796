"""CAUSE through the pipeline: formulas written out, a few steps through `run`, resume, save/load,
the released-file importer, and bad input."""
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import one_line_error, tiny_cli, tiny_config

from stegoseg.cli import main
from stegoseg.losses.cause import ConceptBank, concept_contrastive_loss, modularity_loss

RELEASE = Path(__file__).parent / "fixtures" / "cause_release"
CAUSE_CLI = ["--cause-concepts", "16", "--cause-projection-dim", "16", "--cause-probe-steps", "4",
             "--cause-book-steps", "6", "--ckpt-every", "3", "--cause-grid", "2"]


# ------------------------------------------------------------------ formulas written out
def test_modularity_equals_the_formula_written_out():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, 4, generator=g)
    m = torch.randn(3, 4, generator=g)
    expected = []
    for b in range(2):
        xn = x[b] / x[b].norm(dim=1, keepdim=True)
        mn = m / m.norm(dim=1, keepdim=True)
        a = (xn @ xn.T).clamp(min=0)
        a.fill_diagonal_(0)
        d, e = a.sum(1), a.sum()
        c = (xn @ mn.T).clamp(min=0)
        q = 0.0
        for i in range(5):
            for j in range(5):
                same = max(float(torch.tanh(c[i, n] * c[j, n] / 0.1)) for n in range(3))
                q += (float(a[i, j]) - float(d[i] * d[j] / e)) * same / float(e)
        expected.append(q)
    assert modularity_loss(m, x, 0.1).item() == pytest.approx(-sum(expected) / 2, rel=1e-5)


def test_contrastive_loss_equals_the_formula_written_out():
    # two images of two tokens; concepts: e0 and e1; image 0 = (e0, e1), image 1 = (e0, e0)
    book = torch.eye(2)
    tokens = torch.tensor([[[1.0, 0.0], [0.0, 1.0]], [[1.0, 0.1], [0.9, 0.0]]])
    g = torch.Generator().manual_seed(1)
    z, zt = torch.randn(2, 2, 3, generator=g), torch.randn(2, 2, 3, generator=g)
    concept = [[0, 1], [0, 0]]
    zn = z / z.norm(dim=-1, keepdim=True)
    ztn = zt / zt.norm(dim=-1, keepdim=True)
    terms = []
    for b in range(2):
        per_pair = []
        for i in range(2):
            logits = {(c, k): float(zn[b, i] @ ztn[c, k]) / 0.07 for c in range(2) for k in range(2)}
            same = {key: concept[key[0]][key[1]] == concept[b][i] for key in logits}
            positives = [key for key in logits if same[key] and key != (b, i)]
            # concept vectors are orthogonal: every other pair is a negative (cos 0 < 0.1)
            log_denominator = np.log(sum(np.exp(logits[key]) for key in logits if key != (b, i) or False)
                                     + (np.exp(logits[(b, i)]) if not same[(b, i)] else 0.0))
            per_pair += [-logits[key] + log_denominator for key in positives]
        terms.append(np.mean(per_pair))
    loss = concept_contrastive_loss(tokens, z, zt, book)
    assert loss.item() == pytest.approx(float(np.mean(terms)), rel=1e-5)


def test_bank_keeps_a_random_half_of_each_concepts_keys_newest_last_and_at_most_size():
    bank = ConceptBank(2, 1, size=3)
    book = torch.eye(2)
    tokens = torch.tensor([[1.0, 0.0]] * 4 + [[0.0, 1.0]] * 2)
    keys = torch.arange(6.0)[:, None]
    torch.manual_seed(0)
    bank.update(tokens, keys, book)
    assert len(bank.keys[0]) == 2 and len(bank.keys[1]) == 1
    assert set(bank.keys[0].flatten().tolist()) <= {0, 1, 2, 3} and set(bank.keys[1].flatten().tolist()) <= {4, 5}
    bank.update(tokens, keys + 10, book)
    assert len(bank.keys[0]) == 3  # 2 + 2 new, the oldest dropped
    assert bank.keys[0][-1].item() >= 10 and bank.keys[0][0].item() < 10
    ids, flat = bank.entries()
    assert ids.tolist() == [0, 0, 0, 1, 1]
    again = ConceptBank(2, 1, size=3)
    again.load_state(bank.state())
    assert torch.equal(again.entries()[1], flat)


# ------------------------------------------------------------------ the pipeline
@pytest.mark.slow
@pytest.mark.parametrize("method", ["cause-mlp", "cause-tr"])
def test_run_with_cause_trains_evaluates_segments_and_reloads(method, synthetic_root, tmp_path, capsys):
    from stegoseg.model import load

    out = tmp_path / method
    args = ["run", "--method", method, "--out", str(out), "--data-root", str(synthetic_root), "--steps", "6",
            "--no-baseline", *CAUSE_CLI, *tiny_cli("run")]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert f"{method.upper()}: cluster_parity_acc" in printed
    ckpt = out / "train" / "checkpoint.pt"
    for stage in ("clusterbook.npy", "clusterbook.json", "lightning/last.ckpt", "checkpoint.pt"):
        assert (out / "train" / stage).exists(), stage
    model = load(ckpt)
    assert model.method == method and model.cluster_probe.alpha == 3.0
    assert type(model.head).__name__ == ("CauseTRHead" if method == "cause-tr" else "CauseMLPHead")
    # --cluster-fit kmeans (the default): the probe refitted on the code; stage 3's probe kept beside it
    modularity = torch.load(out / "train" / "modularity_probe.pt", weights_only=True)
    assert modularity.shape == model.cluster_probe.centroids.shape
    assert not torch.allclose(modularity, model.cluster_probe.centroids)
    if method == "cause-tr":  # the head carries the clusterbook it was trained with
        assert torch.equal(model.head.clusterbook, torch.from_numpy(np.load(out / "train" / "clusterbook.npy")))
    folder = model.save_pretrained(tmp_path / "pretrained")
    again = load(folder)
    images = sorted((synthetic_root / "imgs" / "val").iterdir())[:2]
    for a, b in zip(model.segment_batch(images, resolution=40), again.segment_batch(images, resolution=40)):
        np.testing.assert_array_equal(a, b)  # 40 px: a 5x5 grid, not the training grid (query positions resampled)
    assert main(["segment", str(folder), str(images[0]), "--out", str(tmp_path / "seg"), "--resolution", "40",
                 "--device", "cpu"]) == 0
    assert (tmp_path / "seg" / f"{images[0].stem}.png").exists()
    # resuming this run as the other method is refused: the checkpoint belongs to another method
    other = "cause-mlp" if method == "cause-tr" else "cause-tr"
    capsys.readouterr()
    one_line_error(capsys, ["train", "--method", other, "--out", str(out / "train"), "--data-root",
                            str(synthetic_root), "--steps", "6", "--resume", *CAUSE_CLI, *tiny_cli("train")], "method")


@pytest.mark.slow
def test_cause_label_free_selection_keeps_the_best_scored_stage2_head(synthetic_root, tmp_path):
    """--select label-free on CAUSE: every stage-2 checkpoint (and the last head) is a candidate,
    the best label-free score wins, and checkpoint.pt holds that checkpoint's teacher head with its
    own k-means probe; the modularity probe (fitted for the last head) is kept only for it."""
    import json

    from stegoseg.model import load

    out = tmp_path / "sel"
    assert main(["train", "--method", "cause-mlp", "--select", "label-free", "--out", str(out), "--data-root",
                 str(synthetic_root), "--steps", "6", *CAUSE_CLI, "--ckpt-every", "2", *tiny_cli("train")]) == 0
    selection = json.loads((out / "selection.json").read_text())
    assert selection["mode"] == "label-free"
    assert sorted(int(k) for k in selection["candidates"]) == [2, 4, 6]  # stage 2 only: stage 3 moves no head
    scores = {int(k): v["label_free_score"] for k, v in selection["candidates"].items()}
    assert selection["chosen_step"] == max(scores, key=lambda k: (scores[k], -k))
    model = load(out / "checkpoint.pt")
    chosen = selection["chosen_step"]
    saved = out / "lightning" / ("last.ckpt" if chosen == 6 else f"step{chosen:06d}.ckpt")
    state = torch.load(saved, map_location="cpu", weights_only=True)["state_dict"]
    teacher = {k[len("parts.model.head."):]: v for k, v in state.items() if k.startswith("parts.model.head.")}
    assert teacher and all(torch.equal(model.head.state_dict()[k], v) for k, v in teacher.items())
    assert (out / "modularity_probe.pt").exists() == (chosen == 6)
    # the scores differ between heads (else the test could not tell a choice from the default)
    assert len(set(round(v, 9) for v in scores.values())) > 1


@pytest.mark.slow
def test_cause_resume_matches_the_uninterrupted_run(synthetic_root, tmp_path):
    import lightning as L

    from stegoseg.methods.common import build_backbone_from_config, build_split, prepare
    from stegoseg.training.cause import fit_cause, fit_clusterbook

    class Kill(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if trainer.global_step == 5:
                raise RuntimeError("simulated crash")

    cfg = tiny_config(synthetic_root, method="cause-tr", dim=8, steps=6, cause_probe_steps=3, ckpt_every=2,
                      cause_concepts=16, cause_projection_dim=16, cause_book_steps=5, cause_grid=2, lr=1e-3, probe_lr=1e-3,
                      cache_dir=str(tmp_path / "cache"))
    backbone, _ = build_backbone_from_config(cfg)
    cache = prepare(cfg, tmp_path, backbone)
    n_classes = build_split(cfg, "train").n_classes
    book = fit_clusterbook(cfg, cache, tmp_path / "book")
    full = fit_cause(cfg, tmp_path / "full", cache, n_classes, True, book)
    with pytest.raises(RuntimeError, match="simulated crash"):
        fit_cause(cfg, tmp_path / "killed", cache, n_classes, True, book, callbacks=[Kill()])
    resumed = fit_cause(cfg, tmp_path / "killed", cache, n_classes, True, book, resume=True)
    assert len(full.parts.bank) and torch.equal(full.parts.bank.entries()[1], resumed.parts.bank.entries()[1])
    for (name, a), (_, b) in zip(full.state_dict().items(), resumed.state_dict().items()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)


def test_clusterbook_is_reused_and_refitted_when_its_settings_change(synthetic_root, tmp_path):
    from stegoseg.methods.common import build_backbone_from_config, prepare
    from stegoseg.training.cause import fit_clusterbook

    cfg = tiny_config(synthetic_root, method="cause-mlp", cause_concepts=8, cause_book_steps=3, cause_grid=2,
                      cache_dir=str(tmp_path / "cache"))
    cache = prepare(cfg, tmp_path, build_backbone_from_config(cfg)[0])
    first = fit_clusterbook(cfg, cache, tmp_path)
    stamp = (tmp_path / "clusterbook.npy").stat().st_mtime_ns
    assert torch.equal(fit_clusterbook(cfg, cache, tmp_path), first)
    assert (tmp_path / "clusterbook.npy").stat().st_mtime_ns == stamp
    from stegoseg.config.stego import replace

    other = fit_clusterbook(replace(cfg, cause_book_steps=4), cache, tmp_path)
    assert not torch.equal(other, first)


# ------------------------------------------------------------------ the released files
def test_import_checkpoint_writes_a_model_that_segments_and_evaluates(synthetic_root, tmp_path, capsys):
    from stegoseg.model import load

    out = tmp_path / "imported"
    files = [str(RELEASE / name) for name in ("modular.npy", "cluster_tr.pth", "segment_tr.pth")]  # any order
    assert main(["import-checkpoint", *files, "--backbone", "dino_vits8", "--no-pretrained", "--tiny",
                 "--class-names", "a,b,c,d", "--out", str(out)]) == 0
    model = load(out)
    assert model.method == "cause-tr" and model.class_names == ["a", "b", "c", "d"]
    assert model.head.grid == (4, 4) and model.head.hidden_dim == 24
    image = sorted((synthetic_root / "imgs" / "val").iterdir())[0]
    assert main(["segment", str(out), str(image), "--out", str(tmp_path / "seg"), "--device", "cpu"]) == 0
    assert main(["evaluate", str(out), "--data-root", str(synthetic_root), "--out", str(tmp_path / "eval"),
                 "--no-crf", "--eval-resolution", "32", "--device", "cpu", "--no-progress"]) == 0
    assert (tmp_path / "eval" / "metrics.json").exists()



def test_bad_cause_input_is_one_line(synthetic_root, tmp_path, capsys):
    base = ["import-checkpoint", "--backbone", "dino_vits8", "--no-pretrained", "--tiny", "--out", str(tmp_path / "m")]
    one_line_error(capsys, [*base, str(RELEASE / "segment_tr.pth")], "cluster_tr.pth", "cluster probe")
    one_line_error(capsys, [*base, str(RELEASE / "segment_tr.pth"), str(RELEASE / "cluster_tr.pth")[:-4] + "x.pth"],
                   "does not exist")
    # a TR head without any clusterbook: the cluster file's codebook zeroed, no modular.npy
    cluster = torch.load(RELEASE / "cluster_tr.pth", weights_only=True)
    cluster["codebook"] = torch.zeros_like(cluster["codebook"])
    torch.save(cluster, tmp_path / "cluster_tr.pth")
    one_line_error(capsys, [*base, str(RELEASE / "segment_tr.pth"), str(tmp_path / "cluster_tr.pth")],
                   "needs its clusterbook", "modular.npy")
    # a clusterbook of the wrong width for the head / backbone
    np.save(tmp_path / "modular.npy", np.zeros((12, 48), np.float32))
    one_line_error(capsys, [*base, str(RELEASE / "segment_tr.pth"), str(RELEASE / "cluster_tr.pth"),
                            str(tmp_path / "modular.npy")], "48-channel concepts", "32-channel")
    # the backbone does not fit the head
    one_line_error(capsys, [*base[:-2], "--out", str(tmp_path / "m"), str(RELEASE / "segment_tr.pth"),
                            str(RELEASE / "cluster_tr.pth"), str(RELEASE / "modular.npy"), "--backbone", "resnet50_supervised"],
                   "32-channel features", "resnet50_supervised gives 2048")
    # files of another method than --method says
    one_line_error(capsys, [*base, str(RELEASE / "segment_tr.pth"), str(RELEASE / "cluster_tr.pth"),
                            str(RELEASE / "modular.npy"), "--method", "cause-mlp"], "--method cause-mlp", "cause-tr")
    # a pickle with a payload is refused without being run
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (Path.touch, (marker,))

    torch.save({"head_ema.x": Payload()}, tmp_path / "evil.pth")
    one_line_error(capsys, [*base, str(tmp_path / "evil.pth")], "not load", "nothing in it was run")
    assert not marker.exists()
    # a web page saved under the file's name, a text file, a numpy archive as the clusterbook
    (tmp_path / "page.pth").write_text("<!DOCTYPE html><html><body>Google Drive can't scan this file</body></html>")
    one_line_error(capsys, [*base, str(tmp_path / "page.pth")], "web page")
    (tmp_path / "notes.pth").write_text("just some text\n")
    one_line_error(capsys, [*base, str(tmp_path / "notes.pth")], "not a PyTorch file")
    np.savez(tmp_path / "book.npz", a=np.zeros((2, 2)))
    (tmp_path / "book.npz").rename(tmp_path / "book.npy")
    one_line_error(capsys, [*base, str(RELEASE / "segment_tr.pth"), str(RELEASE / "cluster_tr.pth"),
                            str(tmp_path / "book.npy")], "numpy archive")
    # a cluster probe of another code width (files of two models)
    cluster = torch.load(RELEASE / "cluster_tr.pth", weights_only=True)
    cluster["cluster_probe"] = torch.randn(4, 7)
    torch.save(cluster, tmp_path / "cluster_other.pth")
    one_line_error(capsys, [*base, str(RELEASE / "segment_tr.pth"), str(tmp_path / "cluster_other.pth"),
                            str(RELEASE / "modular.npy")], "7 channels", "two different models")
    # a truncated file
    data = (RELEASE / "segment_mlp.pth").read_bytes()
    (tmp_path / "cut.pth").write_bytes(data[: len(data) // 2])
    one_line_error(capsys, [*base, str(tmp_path / "cut.pth")], "truncated")
    # an unknown method for training
    one_line_error(capsys, ["train", "--method", "cause-xl", "--out", str(tmp_path / "t"), "--data-root",
                            str(synthetic_root), *tiny_cli("train")], "--method must be one of", "cause-tr")
    one_line_error(capsys, ["train", "--method", "primaps", "--select", "label-free", "--out", str(tmp_path / "t"),
                            "--data-root", str(synthetic_root), *tiny_cli("train")], "does not change",
                   "--select val-miou")
    one_line_error(capsys, ["train", "--method", "cause-tr", "--select", "label-free", "--cluster-fit", "online",
                            "--out", str(tmp_path / "t"), "--data-root", str(synthetic_root), *tiny_cli("train")],
                   "--cluster-fit kmeans", "last head only")
    one_line_error(capsys, ["train", "--method", "cause-mlp", "--w-potts", "0.1", "--out", str(tmp_path / "t"),
                            "--data-root", str(synthetic_root), *tiny_cli("train")], "--w-potts", "drop")


def test_method_defaults_fill_what_the_user_did_not_set():
    from stegoseg.cli import build_parser
    from stegoseg.config.stego import make_config, resolve_config

    parse = build_parser().parse_args
    cfg = resolve_config(parse(["train", "--method", "cause-tr", "--preset", "cocostuff27"]))
    assert (cfg.dim, cfg.lr, cfg.probe_lr) == (90, 1e-3, 1e-3)  # CAUSE's, over the (STEGO) preset's 70 / 5e-4
    cfg = resolve_config(parse(["train", "--method", "cause-tr", "--dim", "16", "--lr", "0.01"]))
    assert (cfg.dim, cfg.lr) == (16, 0.01)
    assert resolve_config(parse(["train"])).dim == 70
    assert make_config({"method": "cause-mlp"}).dim == 90 and make_config({"method": "cause-mlp", "dim": 5}).dim == 5


def test_the_web_page_functions_serve_an_imported_cause_tr_model():
    from PIL import Image

    from stegoseg.backbones.imports import import_cause
    from stegoseg.serve import Viewer

    files = [RELEASE / "segment_tr.pth", RELEASE / "cluster_tr.pth", RELEASE / "modular.npy"]
    model = import_cause(files, backbone="dino_vits8", pretrained=False, tiny=True)
    viewer = Viewer(model, None)
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 255, (40, 56, 3)).astype(np.uint8))
    result = viewer.segment(image, name="x.png", flip=True, resolution=40)  # a 5x7 grid: positions resampled
    assert np.array_equal(result.labels, model.segment(image, flip=True, resolution=40))
    panels = viewer.correspondence(image, 10, 20, resolution=40, n_neighbours=0)
    assert [p[1] for p in panels] == ["clicked point", "backbone features: same image", "trained code: same image"]
