"""The feature cache's sharded files: items ``[s * S, (s + 1) * S)`` of every array live in
``shards/<kind>-<s>.<ext>`` (raw little-endian arrays, C order; ``S`` = ``meta["shard_items"]``).

A shard is written whole by one writer into a temporary file and renamed into place (the
features file last), so a shard file that exists is complete, writers of different shards
never touch the same file (Ray workers on several machines write one shared cache in
parallel), a writer killed midway leaves only a temporary file, and a reader opens only the
shards its items fall in (lazily, as read-only memory maps).
"""
from __future__ import annotations

import errno
import os
import uuid
from pathlib import Path
from typing import Optional

import numpy as np

from stegoseg.errors import StegosegError
from stegoseg.preflight import human_bytes

#: kind -> (file extension, dtype)
KINDS = {"features": ("f16", np.float16), "thumbs": ("u8", np.uint8), "labels": ("u8", np.uint8)}

#: A shard holds about this many bytes of features by default (one unit of work for a worker).
SHARD_BYTES = 256 * 2**20


def default_shard_items(item_bytes: int, n: int) -> int:
    """Items per shard: about :data:`SHARD_BYTES` of features, at least 1, at most ``n``."""
    return int(max(1, min(n, SHARD_BYTES // max(1, item_bytes))))


def n_shards(n: int, shard_items: int) -> int:
    return -(-n // shard_items)


def shard_file(path: Path, kind: str, shard: int) -> Path:
    return Path(path) / "shards" / f"{kind}-{shard:05d}.{KINDS[kind][0]}"


def item_shapes(meta: dict) -> dict:
    """kind -> the shape of one item, for the kinds this cache stores."""
    t = int(meta["thumb_size"])
    shapes = {"features": tuple(int(v) for v in meta["feature_shape"]), "thumbs": (3, t, t)}
    if meta.get("label_shape"):
        shapes["labels"] = tuple(int(v) for v in meta["label_shape"])
    return shapes


def shard_range(meta: dict, shard: int) -> range:
    s = int(meta["shard_items"])
    return range(shard * s, min((shard + 1) * s, int(meta["n_items"])))


def shard_sizes(meta: dict, shard: int) -> dict:
    """kind -> the bytes that kind's file of ``shard`` has when complete."""
    m = len(shard_range(meta, shard))
    return {k: m * int(np.prod(shape)) * np.dtype(KINDS[k][1]).itemsize for k, shape in item_shapes(meta).items()}


def shard_state(path: Path, meta: dict, shard: int) -> tuple:
    """(complete, problem): complete when every file of the shard exists with its size;
    ``problem`` names a file that exists with the wrong size (damage: writes are by rename)."""
    complete = True
    for kind, size in shard_sizes(meta, shard).items():
        f = shard_file(path, kind, shard)
        if not f.exists():
            complete = False
        elif f.stat().st_size != size:
            return False, f"shards/{f.name} has {f.stat().st_size:,} bytes, meta.json says {size:,}"
    return complete, None


def write_shard(path: Path, meta: dict, shard: int, arrays: dict) -> None:
    """Write one shard's arrays (kind -> (m, ...) array) by rename, the features file last."""
    sizes = shard_sizes(meta, shard)
    if set(arrays) != set(sizes):
        raise ValueError(f"shard {shard}: got arrays {sorted(arrays)}, the cache stores {sorted(sizes)}")
    folder = Path(path) / "shards"
    folder.mkdir(parents=True, exist_ok=True)
    for kind in sorted(arrays, key=lambda k: k == "features"):
        data = np.ascontiguousarray(arrays[kind], dtype=KINDS[kind][1])
        if data.nbytes != sizes[kind]:
            raise ValueError(f"shard {shard} {kind}: {data.nbytes} bytes, expected {sizes[kind]}")
        target = shard_file(path, kind, shard)
        tmp = folder / f".{target.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        try:
            _write_file(data, tmp)
            os.replace(tmp, target)
        except BaseException as exc:
            tmp.unlink(missing_ok=True)
            if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise StegosegError(f"disk full while writing {target} ({human_bytes(data.nbytes)}): free some space "
                                    "and run the same command again, which resumes at this shard") from None
            raise


def _write_file(data: np.ndarray, path: Path) -> None:
    data.tofile(path)


def remove_temporaries(path: Path) -> int:
    """Delete the temporary files of writers that died midway (they never became shards)."""
    folder = Path(path) / "shards"
    gone = 0
    for tmp in folder.glob(".*.tmp-*") if folder.exists() else []:
        tmp.unlink(missing_ok=True)
        gone += 1
    return gone


class ShardedArray:
    """One kind of a sharded cache seen as an (N, ...) array: ``a[i]``, ``a[slice]``,
    ``a[index_array]``, ``np.array(a)``. Only the shards the asked items fall in are opened."""

    def __init__(self, path: Path, meta: dict, kind: str):
        self.path, self.meta, self.kind = Path(path), meta, kind
        self.n, self.shard_items = int(meta["n_items"]), int(meta["shard_items"])
        self.item_shape = item_shapes(meta)[kind]
        self.dtype = np.dtype(KINDS[kind][1])
        self.shape = (self.n, *self.item_shape)
        self._open: dict = {}

    def __len__(self) -> int:
        return self.n

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape)) * self.dtype.itemsize

    def shard(self, s: int) -> np.memmap:
        if s not in self._open:
            f = shard_file(self.path, self.kind, s)
            if not f.exists():
                first = s * self.shard_items
                raise StegosegError(f"items {first}..{min(first + self.shard_items, self.n) - 1} of the feature cache "
                                    f"{self.path} are not extracted yet ({f.name} is missing): run `stegoseg prepare` "
                                    "again, which finishes it")
            m = len(range(s * self.shard_items, min((s + 1) * self.shard_items, self.n)))
            self._open[s] = np.memmap(f, dtype=self.dtype, mode="r", shape=(m, *self.item_shape))
        return self._open[s]

    def __getitem__(self, key):
        if isinstance(key, (int, np.integer)):
            i = int(key) + (self.n if key < 0 else 0)
            if not 0 <= i < self.n:
                raise IndexError(f"item {key} of {self.n}")
            s, o = divmod(i, self.shard_items)
            return np.array(self.shard(s)[o])
        idx = np.arange(self.n)[key] if not isinstance(key, np.ndarray) or key.dtype == bool else key
        idx = np.asarray(idx, dtype=np.int64).reshape(-1)
        idx = np.where(idx < 0, idx + self.n, idx)
        out = np.empty((len(idx), *self.item_shape), dtype=self.dtype)
        which = idx // self.shard_items
        for s in np.unique(which):
            rows = which == s
            out[rows] = self.shard(int(s))[idx[rows] - s * self.shard_items]
        return out

    def __array__(self, dtype=None, copy=None):
        data = self[:]
        return data.astype(dtype) if dtype is not None else data


def open_kinds(path: Path, meta: dict) -> dict:
    """kind -> :class:`ShardedArray` for every kind the cache stores."""
    return {kind: ShardedArray(path, meta, kind) for kind in item_shapes(meta)}


def done_items(path: Path, meta: dict) -> tuple:
    """(per-item done flags from the complete shards, the first damaged file or None)."""
    n = int(meta["n_items"])
    done = np.zeros(n, dtype=bool)
    for s in range(n_shards(n, int(meta["shard_items"]))):
        complete, problem = shard_state(path, meta, s)
        if problem:
            return None, problem
        if complete:
            r = shard_range(meta, s)
            done[r.start:r.stop] = True
    return done, None


def missing_shards(path: Path, meta: dict) -> list:
    n = int(meta["n_items"])
    return [s for s in range(n_shards(n, int(meta["shard_items"]))) if not shard_state(path, meta, s)[0]]


def first_damage(path: Path, meta: dict) -> Optional[str]:
    return done_items(path, meta)[1]
