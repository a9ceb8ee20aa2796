from pathlib import Path

import pytest

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory):
    """A small generated labelled dataset (directory layout), shared by the tests of a session."""
    from stegoseg.data.synthetic import make_synthetic_dataset

    return make_synthetic_dataset(tmp_path_factory.mktemp("synthetic") / "data", n_train=24, n_val=8, size=(64, 80))


def tiny_config(data_root, **overrides):
    """A Config for fast tests: tiny random ViT-S/8, small crops, few steps."""
    from stegoseg.config.stego import make_config

    values = dict(
        dataset="directory",
        data_root=str(data_root),
        backbone="dino_vits8",
        pretrained=False,
        tiny=True,
        resolution=32,
        five_crop=True,
        n_neighbors=8,
        knn_topk=3,
        extract_batch_size=16,
        num_workers=0,
        dim=16,
        steps=12,
        batch_size=8,
        n_samples=5,
        ckpt_every=4,
        log_every=2,
        eval_resolution=48,
        eval_batch_size=4,
        crf=False,
        crf_workers=1,
        kmeans_iters=10,
        linear_epochs=2,
        progress=False,
        accelerator="cpu",
        device="cpu",
        # the reference's behaviour: the given b values and the online cluster probe (the label-free
        # tests pass shifts="auto"; cluster_fit="kmeans" where they test the refit)
        shifts="fixed",
        cluster_fit="online",
    )
    values.update(overrides)
    return make_config(values)


@pytest.fixture
def one_thread():
    """Tiny tensors: one thread avoids oversubscribing a shared CPU (much faster here)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


#: Fast settings for command-line tests (tiny random ViT-S/8, small crops, few steps); a
#: command takes the subset it offers: see :func:`tiny_cli`.
TINY_CLI = [
    "--no-pretrained", "--tiny", "--resolution", "32", "--n-neighbors", "8", "--knn-topk", "3",
    "--dim", "16", "--batch-size", "8", "--n-samples", "5", "--num-workers", "0", "--no-progress",
    "--eval-resolution", "48", "--eval-batch-size", "4", "--kmeans-iters", "5", "--linear-epochs", "1",
    "--accelerator", "cpu", "--device", "cpu", "--crf-workers", "1",
]


def tiny_cli(command: str, *extra: str) -> list:
    """TINY_CLI followed by ``extra``, keeping only the options ``stegoseg COMMAND`` offers
    (each command lists only the options it reads)."""
    from stegoseg.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command").choices[command]
    accepted = set(sub._option_string_actions)
    tokens, out, i = list(TINY_CLI) + list(extra), [], 0
    while i < len(tokens):
        has_value = i + 1 < len(tokens) and not tokens[i + 1].startswith("--")
        item = tokens[i : i + (2 if has_value else 1)]
        if tokens[i] in accepted:
            out += item
        i += len(item)
    return out


def one_line_error(capsys, args, *fragments):
    """``stegoseg ARGS`` exits 2 with one ``stegoseg: error:`` line holding every fragment."""
    from stegoseg.cli import main

    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("stegoseg: error:") and len(err.splitlines()) == 1, err
    for fragment in fragments:
        assert fragment in err, err
