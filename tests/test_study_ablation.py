import argparse
import json

import pytest
import torch
import yaml

from stegoseg.errors import StegosegError
from stegoseg.studies.ablation import VARIANTS, add_cli, parse_variants, variant_config

pytestmark = pytest.mark.usefixtures("one_thread")


def test_variants_parse_and_change_one_thing(synthetic_root):
    from conftest import tiny_config

    assert parse_variants("no_crf, full") == ["full", "no-crf"]  # table order, underscores allowed
    assert parse_variants(None) == list(VARIANTS)
    with pytest.raises(StegosegError, match="unknown variant"):
        parse_variants("full,no-such-thing")
    cfg = tiny_config(synthetic_root, crf=True)
    base = cfg.to_dict()
    for name, (changes, _) in VARIANTS.items():
        diff = {k: v for k, v in variant_config(cfg, name).to_dict().items() if base[k] != v}
        assert diff == changes, name
    assert variant_config(cfg, "no-five-crop").five_crop is False and variant_config(cfg, "no-knn").w_knn == 0


def test_ablate_command_writes_the_table(synthetic_root, tmp_path, capsys):
    from conftest import TINY_CLI as TINY

    parser = argparse.ArgumentParser(prog="stegoseg")
    add_cli(parser.add_subparsers(dest="command"))
    out = tmp_path / "ablation"
    args = parser.parse_args(["ablate", "--out", str(out), "--data-root", str(synthetic_root), *TINY, "--crf",
                              "--variants", "no-zero-clamp,no-crf", "--steps", "3", "--ckpt-every", "3",
                              "--log-every", "1", "--n-grid", "2", "--max-eval-images", "4"])
    assert args.func(args) == 0
    table = json.loads((out / "ablation.json").read_text())
    rows = {r["variant"]: r for r in table["rows"]}
    assert list(rows) == ["full", "no-zero-clamp", "no-crf"]  # no-crf brings in the full model
    for r in rows.values():  # no extra clusters: parity and strict counting agree in every row
        assert r["cluster_parity_miou"] == pytest.approx(r["cluster_strict_miou"]), r["variant"]
    # the resolved configs reflect each variant, everything else equal
    assert rows["full"]["config"]["zero_clamp"] is True and rows["full"]["config"]["crf"] is True
    assert rows["no-zero-clamp"]["config"]["zero_clamp"] is False and rows["no-zero-clamp"]["config"]["crf"] is True
    assert rows["no-crf"]["config"]["crf"] is False and rows["no-crf"]["config"]["zero_clamp"] is True
    assert not rows["no-crf"]["trained"] and rows["no-crf"]["checkpoint"] == rows["full"]["checkpoint"]
    for name in ("full", "no-zero-clamp"):
        saved = yaml.safe_load((out / name / "train" / "config.yaml").read_text())
        assert saved["zero_clamp"] is (name == "full") and saved["cache_dir"] == str(out / "cache")
    assert len([p for p in (out / "cache").iterdir() if (p / "meta.json").exists()]) == 1  # one shared feature cache
    # the two trained models differ; the CRF changes the evaluation of the same model
    full = torch.load(out / "full" / "train" / "checkpoint.pt", weights_only=True)["head"]["state_dict"]
    ablated = torch.load(out / "no-zero-clamp" / "train" / "checkpoint.pt", weights_only=True)["head"]["state_dict"]
    assert any(not torch.equal(full[k], ablated[k]) for k in full)
    assert table["meta"]["feature_memo"]["hits"] > 0
    assert (out / "ablation.png").stat().st_size > 0
    md = (out / "ablation.md").read_text()
    assert "| no-zero-clamp | zero_clamp=False |" in md and "RANDOMLY INITIALISED" in md
    assert "| no-crf |" in capsys.readouterr().out


def test_study_commands_have_help(capsys):
    from stegoseg.cli import main

    for sub in ("study-dimred", "ablate"):
        with pytest.raises(SystemExit) as e:
            main([sub, "--help"])
        assert e.value.code == 0
        assert "usage" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        main(["ablate", "--variants", "full,nope"])
    assert e.value.code == 2 and "unknown variant 'nope'" in capsys.readouterr().err
