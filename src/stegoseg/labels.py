"""What a model's label ids mean: the cluster -> class matching an evaluation found (stored in
the checkpoint by ``run``), the names a user gave to the clusters of a label-free model (a file
beside the checkpoint, written by the page), and the name of every id a probe's maps hold.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from stegoseg.errors import StegosegError


def classes_from_assignment(assignment: Sequence[int], n_clusters: int, n_classes: int) -> list:
    """An evaluation's ``assignment`` (a class id per cluster; ids >= n_classes: matched to no
    class) as the model's ``cluster_classes``: the class id, or None."""
    if len(assignment) != n_clusters:
        raise ValueError(f"{len(assignment)} assignments for {n_clusters} clusters")
    return [int(a) if 0 <= int(a) < n_classes else None for a in assignment]


def cluster_lookup(cluster_classes: Optional[list], n_clusters: int, n_classes: int) -> np.ndarray:
    """(n_clusters,) int: the label a cluster id becomes: its class id when matched, else
    n_classes + its rank among the unmatched clusters (identity without a matching)."""
    if cluster_classes is None:
        return np.arange(n_clusters)
    spare = iter(range(n_classes, n_classes + n_clusters))
    return np.asarray([c if c is not None else next(spare) for c in cluster_classes], dtype=np.int64)


def cluster_label_names(class_names: Sequence[str], cluster_classes: Optional[list], n_clusters: int,
                        given: Optional[dict] = None) -> list:
    """The name of every label id a cluster map holds after :func:`cluster_lookup`: the class
    names of matched clusters ("class i" where a name is missing), "cluster i" for unmatched
    ones; without a matching, the names a user gave (``given``), else "cluster i"."""
    if cluster_classes is None:
        return [(given or {}).get(i) or f"cluster {i}" for i in range(n_clusters)]
    names = list(class_names)
    lookup = cluster_lookup(cluster_classes, n_clusters, len(names))
    out = names + [""] * max(0, int(lookup.max()) + 1 - len(names))
    for cluster, label in enumerate(lookup.tolist()):
        if cluster_classes[cluster] is None:
            out[label] = f"cluster {cluster}"
        elif not out[label]:
            out[label] = f"class {label}"
    return out


def label_names(model, probe: str = "cluster") -> list:
    """The name of every label id the probe's maps hold: class names for the linear probe, else
    :func:`cluster_label_names` of the model's matching or the names a user gave its clusters."""
    names = list(model.class_names or [])
    if probe == "linear":
        return names or [f"class {i}" for i in range(model.n_classes or 0)]
    if model.cluster_classes is not None and len(names) < model.n_known_classes:
        names += [f"class {i}" for i in range(len(names), model.n_known_classes)]
    return cluster_label_names(names, model.cluster_classes, model.n_clusters, getattr(model, "cluster_names", {}))


def names_file(path) -> Path:
    """Where the cluster names a user gave (the page) live: beside a checkpoint file
    (``checkpoint.names.json``), or inside a model folder (``cluster_names.json``)."""
    path = Path(path)
    return path / "cluster_names.json" if path.is_dir() else path.with_name(path.stem + ".names.json")


def read_cluster_names(path, n_clusters: int) -> dict:
    """{cluster id: name} from :func:`names_file`, or {} (a damaged file is one StegosegError line)."""
    file = names_file(path)
    if not file.exists():
        return {}
    try:
        raw = json.loads(file.read_text())["cluster_names"]
        names = {int(k): str(v).strip() for k, v in raw.items() if str(v).strip()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise StegosegError(f"cannot read the cluster names {file} ({exc}): fix or delete that file") from None
    bad = [k for k in names if not 0 <= k < n_clusters]
    if bad:
        raise StegosegError(f"{file} names cluster {bad[0]}, but the model has clusters 0..{n_clusters - 1}: fix or "
                            "delete that file")
    return names


def parse_cluster_names(text: str, n_clusters: int) -> dict:
    """``"0=sky, 3=road"`` (or one ``id=name`` per line) -> {0: "sky", 3: "road"}; an empty name
    removes one. One StegosegError line for anything else."""
    names = {}
    for part in [p.strip() for chunk in str(text).splitlines() for p in chunk.split(",")]:
        if not part:
            continue
        key, sep, value = part.partition("=")
        if not sep or not key.strip().isdigit():
            raise StegosegError(f"'{part}': write cluster names as id=name, e.g. 0=sky, 3=road")
        cluster = int(key)
        if not 0 <= cluster < n_clusters:
            raise StegosegError(f"'{part}': the model has clusters 0..{n_clusters - 1}")
        names[cluster] = value.strip()
    return names


def save_cluster_names(model, path, names: dict) -> Path:
    """Merge ``names`` into the model's cluster names and write them beside its checkpoint
    (:func:`names_file`, by rename); ``segment`` and :func:`stegoseg.load` read them."""
    from stegoseg.preflight import atomic_write

    merged = {**(model.cluster_names or {}), **names}
    merged = {k: v for k, v in sorted(merged.items()) if v}
    file = names_file(path)
    atomic_write(file, lambda tmp: Path(tmp).write_text(json.dumps({"cluster_names": merged}, indent=1)))
    model.cluster_names = merged
    return file
