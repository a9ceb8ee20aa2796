"""Resuming interrupted runs: which checkpoint, refusing changed settings, keeping the log.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import NamedTuple, Optional

import torch

from stegoseg.config.stego import Config
from stegoseg.errors import StegosegError
from stegoseg.preflight import atomic_write

log = logging.getLogger("stegoseg")


# --------------------------------------------------------------------------- resume and logs
RUN_CONFIG = "run_config.json"  # next to lightning/: the config its checkpoints were trained with


# Fields a resumed run may change: they do not enter the steps already taken (output,
# speed, evaluation and selection settings; a larger --steps continues the same run).
RESUME_MAY_CHANGE = {
    "steps", "progress", "num_workers", "cache_in_memory", "device", "accelerator", "extract_batch_size", "cache_dir", "data_root",
    "log_every", "ckpt_every", "select", "selection_batches", "eval_resolution", "eval_crop", "eval_resample", "flip",
    "crf", "crf_workers", "eval_batch_size", "max_eval_images", "n_grid", "bf16_inference", "crf_reference_input",
    "kmeans_iters", "linear_epochs", "weights", "cache_shard_items", "ray_address", "ray_workers", "ray_gpus_per_worker",
    "ray_cpus_per_worker",
}


class ResumePoint(NamedTuple):
    path: str  # the Lightning checkpoint
    step: int  # its global step


def resume_checkpoint(ckpt_dir: Path, cfg: Config) -> Optional[ResumePoint]:
    """The Lightning checkpoint ``--resume`` continues from and its step (read once, while
    checking that the file is readable), or None when this run has not started yet (it then
    starts from step 0). Refuses a resume whose settings differ from
    the interrupted run's (the result would mix two configurations). An unreadable
    ``last.ckpt`` (cut short by a kill or a full disk) falls back, with a warning, to the
    newest readable periodic checkpoint: training is a pure function of the step, so
    continuing from an earlier step gives the same result."""
    saved = ckpt_dir.parent / RUN_CONFIG
    if not saved.exists():
        if (ckpt_dir / "last.ckpt").exists():
            raise StegosegError(f"--resume: {ckpt_dir} holds checkpoints of a run without {RUN_CONFIG} (written by an "
                                "older stegoseg?): pass --overwrite to start again")
        return None
    # a setting added since the interrupted run was written reads as its default there
    old = {**json.loads(json.dumps(type(cfg)().to_dict())), **json.loads(saved.read_text())}
    new = json.loads(json.dumps(cfg.to_dict()))
    changed = sorted(k for k in set(old) | set(new) if k not in RESUME_MAY_CHANGE and old.get(k) != new.get(k))
    if changed:
        shown = ", ".join(f"--{k.replace('_', '-')} {old.get(k)} -> {new.get(k)}" for k in changed[:4])
        raise StegosegError(f"--resume: the settings differ from the interrupted run in {ckpt_dir.parent} ({shown}): "
                            "resume with the same settings, or pass --overwrite to start a new run")
    if cfg.steps < old.get("steps", cfg.steps):
        raise StegosegError(f"--resume: --steps {cfg.steps} is fewer than the interrupted run's {old['steps']}")
    candidates = [p for p in [ckpt_dir / "last.ckpt"] + sorted(ckpt_dir.glob("step*.ckpt"), reverse=True) if p.exists()]
    if not candidates:
        return None
    for i, path in enumerate(candidates):
        try:
            step = int(torch.load(path, map_location="cpu", weights_only=True).get("global_step", 0))
        except Exception as exc:  # noqa: BLE001 - any failure means the file cannot be used
            from stegoseg.checkpoint_io import load_failure

            log.warning("--resume: cannot read %s (%s): trying an earlier checkpoint", path, load_failure(exc))
            continue
        if i:
            log.warning("--resume: continuing from %s", path)
        return ResumePoint(str(path), step)
    raise StegosegError(f"--resume: no checkpoint in {ckpt_dir} can be read (truncated or corrupt): pass --overwrite "
                        "to start again")


def refuse_unfinished_run(ckpt_dir: Path) -> None:
    """A fresh start must not train on top of another run's Lightning checkpoints."""
    if (ckpt_dir / "last.ckpt").exists():
        raise StegosegError(f"{ckpt_dir} holds an earlier run's checkpoints: pass --resume to continue it, or "
                            "--overwrite to start again")


def resumed_step(ckpt_path: str) -> int:
    return int(torch.load(ckpt_path, map_location="cpu", weights_only=True).get("global_step", 0))


LOG_BEFORE_RESUME = "metrics_before_resume.csv"


def _read_rows(path: Path) -> list:
    import csv

    if not path.exists():
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _write_rows(path: Path, rows: list) -> None:
    import csv

    columns = list(dict.fromkeys(k for r in rows for k in r))

    def save(tmp):
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=columns)
            writer.writeheader()
            writer.writerows(rows)

    atomic_write(path, save, suffix=".csv")


def keep_log_before_resume(log_dir: Path, step: int) -> None:
    """Before a resumed fit (Lightning starts ``metrics.csv`` afresh): keep the rows of the
    steps before ``step`` (those after it are trained again) in ``metrics_before_resume.csv``."""
    rows = _read_rows(log_dir / LOG_BEFORE_RESUME) + _read_rows(log_dir / "metrics.csv")
    rows = [r for r in rows if r.get("step") not in (None, "") and int(r["step"]) < step]
    if rows:
        _write_rows(log_dir / LOG_BEFORE_RESUME, rows)
    if (log_dir / "metrics.csv").exists():
        (log_dir / "metrics.csv").unlink()


def merge_resumed_log(log_dir: Path) -> None:
    """After a resumed fit: ``metrics.csv`` = the kept rows + the new ones (one log of the whole run)."""
    before = log_dir / LOG_BEFORE_RESUME
    if not before.exists():
        return
    _write_rows(log_dir / "metrics.csv", _read_rows(before) + _read_rows(log_dir / "metrics.csv"))
    before.unlink()
