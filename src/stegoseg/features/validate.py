"""Checks of a feature cache on disk, run whenever one is opened: a damaged cache (an edited
or invalid ``meta.json``, a truncated shard file, NaN features, a
truncated neighbour list) is found before it is used, never in the middle of training.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import numpy as np

from stegoseg.features import shards

#: Items whose features are checked for NaN / inf on every open (a seeded sample).
FINITE_SAMPLE = 32


def meta_problem(path: Path) -> tuple:
    """(meta dict or None, the problem or None) of ``<path>/meta.json``."""
    try:
        meta = json.loads((path / "meta.json").read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        return None, f"meta.json cannot be read ({str(exc).splitlines()[0][:80]})"
    if not isinstance(meta, dict):
        return None, "meta.json is not a JSON object"
    try:
        n = int(meta["n_items"])
        c, h, w = (int(v) for v in meta["feature_shape"])
        int(meta["thumb_size"])
        ids = meta["ids"]
        shard_items = int(meta["shard_items"])
    except (KeyError, TypeError, ValueError) as exc:
        return None, f"meta.json lacks or garbles {exc}"
    if n < 1 or min(c, h, w) < 1:
        return None, f"meta.json gives {n} items of shape {(c, h, w)}"
    if shard_items < 1:
        return None, f"meta.json gives {shard_items} items per shard"
    if not isinstance(ids, list) or len(ids) != n:
        return None, f"meta.json lists {len(ids) if isinstance(ids, list) else 'no'} ids for n_items {n}"
    spec = meta.get("spec") or {}
    if spec.get("resolution") and spec.get("patch_size"):
        grid = int(spec["resolution"]) // int(spec["patch_size"])
        if (h, w) != (grid, grid):
            return None, (f"meta.json's feature_shape {[c, h, w]} does not fit its resolution {spec['resolution']} and "
                          f"patch {spec['patch_size']} ({grid} x {grid} cells)")
        if meta.get("label_shape") and [int(v) for v in meta["label_shape"]] != [int(spec["resolution"])] * 2:
            return None, f"meta.json's label_shape {meta['label_shape']} does not fit its resolution {spec['resolution']}"
    return meta, None


def file_problems(path: Path, meta: dict) -> Optional[str]:
    """The first shard file whose size disagrees with ``meta`` (a truncated or edited cache)."""
    return shards.first_damage(path, meta)


def done_flags(path: Path, meta: dict) -> tuple:
    """(per-item flags: the item's shard is complete, or None; the problem or None)."""
    return shards.done_items(path, meta)


def cache_problem(path: Path, check_values: bool = True) -> Optional[str]:
    """Why the cache at ``path`` cannot be used as it is, or None. ``check_values``: also read a
    sample of finished items' features for NaN / inf."""
    meta, problem = meta_problem(path)
    if problem:
        return problem
    done, problem = done_flags(path, meta)
    if problem:
        return problem
    if check_values:
        finished = np.flatnonzero(done)
        if len(finished):
            feats = shards.ShardedArray(path, meta, "features")
            pick = np.sort(np.random.default_rng(0).choice(finished, size=min(FINITE_SAMPLE, len(finished)),
                                                           replace=False))
            values = feats[pick]
            bad = [int(i) for i, v in zip(pick, values) if not np.isfinite(v).all()]
            if bad:
                return f"features of item {bad[0]} ({meta['ids'][bad[0]]}) are NaN or infinite"
    return None


def array_problem(path: Path, rows: int, columns: Optional[int] = None, below: Optional[int] = None) -> Optional[str]:
    """Why a stored ``.npy`` array (global descriptors, neighbour lists) cannot be used, or None."""
    try:
        array = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError, EOFError) as exc:
        return f"{path.name} cannot be read ({str(exc).splitlines()[0][:80]})"
    if array.ndim != 2 or array.shape[0] != rows or (columns is not None and array.shape[1] != columns):
        return f"{path.name} has shape {array.shape}, expected ({rows}, {columns if columns is not None else 'k'})"
    if below is not None and (np.asarray(array).min() < 0 or np.asarray(array).max() >= below):
        return f"{path.name} holds indices outside 0..{below - 1}"
    return None
