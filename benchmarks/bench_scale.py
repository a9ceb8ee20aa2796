"""How the data-parallel stages and the neighbour search scale, on this machine.

1. Extraction into the cache and ``segment`` on Ray: 1 worker x 1 thread against 2 workers x 1
   thread, the same work, the same engine, measured in one invocation (bar: >= 1.7x).
2. Nearest neighbours of N = 1k, 10k, 100k, 1M generated 384-d descriptors (clustered, as
   global descriptors of real images are: 2000 centres + noise): exact FAISS search up to
   100k (1M exact: projected from the N^2 growth, far too slow here) and the HNSW index at
   every N with its recall@7 against exact search on 1000 queries; time and peak memory
   (each measurement in a fresh process, peak RSS).
3. Cache reads at the same N: a sharded cache of N one-cell 384-d items (the shape of the
   descriptors; a full ViT-S/8 cache at 1M crops would be 600 GB): a random batch of 64 items and
   one full pass, time and peak memory.
4. Cache bytes per crop at 224 px for every backbone preset (features + thumbnail + label).

Run time on the project's 2-core CPU: about 25 minutes (the 1M HNSW build and the 100k exact
search are most of it). Writes ``benchmarks/results/scale.json``.

    PYTHONPATH=src python3 benchmarks/bench_scale.py
    PYTHONPATH=src python3 benchmarks/bench_scale.py --parts knn --sizes 1000,10000
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, write_result  # noqa: E402

SIZES = (1_000, 10_000, 100_000, 1_000_000)


def descriptors(n: int, d: int = 384, seed: int = 0):
    import numpy as np

    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(2000, d)).astype(np.float32)
    return centres[rng.integers(0, 2000, n)] + 0.5 * rng.normal(size=(n, d)).astype(np.float32)


def _child(code: str) -> dict:
    """Run ``code`` (which prints one JSON line) in a fresh interpreter; add its peak RSS."""
    wrapper = ("import json, resource, sys; sys.path.insert(0, %r)\n" % str(Path(__file__).resolve().parent)
               + code + "\nresult['peak_rss_mb'] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024\n"
               "print(json.dumps(result))")
    out = subprocess.run([sys.executable, "-c", wrapper], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def knn_part(sizes) -> list:
    rows = []
    for n in sizes:
        row = {"n": n}
        if n <= 100_000:
            row["exact"] = _child(f"""
import time
from bench_scale import descriptors
from stegoseg.features.knn import nearest_neighbors
x = descriptors({n}); t = time.perf_counter(); nearest_neighbors(x, k=7, backend='faiss')
result = {{'seconds': time.perf_counter() - t}}""")
        row["hnsw"] = _child(f"""
import time
from bench_scale import descriptors
from stegoseg.features.knn import approximate_neighbors
x = descriptors({n}); t = time.perf_counter(); _, report = approximate_neighbors(x, k=7)
result = dict(report, seconds=time.perf_counter() - t)""")
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def project_exact(rows: list) -> list:
    """Rows without an exact search get its time projected from the largest measured one (N^2)."""
    exact = [(r["n"], r["exact"]["seconds"]) for r in rows if "exact" in r]
    if exact:
        n0, t0 = max(exact)
        for r in rows:
            if "exact" not in r:
                r["exact_projected_seconds"] = t0 * (r["n"] / n0) ** 2
    return rows


def read_part(sizes, root: Path) -> list:
    rows = []
    for n in sizes:
        rows.append(dict(n=n, **_child(f"""
import time, numpy as np
from pathlib import Path
from bench_scale import descriptors
from stegoseg.features import shards
root = Path({str(root)!r}) / 'n{n}'
meta = {{'n_items': {n}, 'feature_shape': [384, 1, 1], 'thumb_size': 1, 'label_shape': None,
         'shard_items': shards.default_shard_items(384 * 2, {n})}}
x = descriptors({n}).astype(np.float16).reshape({n}, 384, 1, 1)
for s in range(shards.n_shards({n}, meta['shard_items'])):
    r = shards.shard_range(meta, s)
    shards.write_shard(root, meta, s, {{'features': x[r.start:r.stop], 'thumbs': np.zeros((len(r), 3, 1, 1), np.uint8)}})
del x
a = shards.ShardedArray(root, meta, 'features')
rng = np.random.default_rng(0)
t = time.perf_counter()
for _ in range(20):
    a[np.sort(rng.choice({n}, 64, replace=False))]
batch = (time.perf_counter() - t) / 20
t = time.perf_counter(); total = 0.0
for s in range(0, {n}, 65536):
    total += float(a[s:s + 65536].astype(np.float32).sum())
result = {{'random_batch64_seconds': batch, 'full_pass_seconds': time.perf_counter() - t,
           'shards': shards.n_shards({n}, meta['shard_items']), 'bytes': a.nbytes}}""")))
        print(json.dumps(rows[-1]), flush=True)
    return rows


def _local_cluster(work: Path):
    import ray

    from stegoseg.data.synthetic import make_synthetic_dataset

    data = make_synthetic_dataset(work / "data", n_train=40, n_val=4, size=(112, 144))
    common = ["--data-root", str(data), "--no-pretrained", "--resolution", "112", "--no-progress",
              "--num-workers", "0", "--device", "cpu", "--extract-batch-size", "4", "--cache-shard-items", "10"]
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    return data, common


def extraction_part(work: Path) -> dict:
    """Extraction into the cache on a local Ray cluster: 1 worker x 1 thread vs 2 workers x 1 thread."""
    import ray

    from stegoseg.cli import main

    data, common = _local_cluster(work)
    try:
        times = {}
        for workers in (1, 2):
            t = time.perf_counter()
            assert main(["prepare", "--out", str(work / f"prep{workers}"), *common, "--ray-address", "local",
                         "--ray-workers", str(workers)]) == 0
            times[workers] = time.perf_counter() - t
    finally:
        ray.shutdown()
    items = 40 * 5
    result = {"items": items, "seconds_1x1": times[1], "seconds_2x1": times[2], "items_per_s_1x1": items / times[1],
              "items_per_s_2x1": items / times[2], "speedup": times[1] / times[2],
              "note": "a random full-size ViT-S/8 at 112 px, 40 generated images x 5 crops, shards of 10 crops, on a "
                      "local Ray cluster of 2 CPUs; each run includes starting its actors (building the backbone) "
                      "and the KNN on the driver"}
    print(json.dumps(result), flush=True)
    return result


def segment_part(work: Path, n_images: int = 160) -> dict:
    """``segment`` of ``n_images`` generated images on a local Ray cluster: 1 worker x 1 thread vs
    2 workers x 1 thread (each run starts its actors: about 10 s of loading here, so a short job
    shows less than the steady-state ratio; 40 images gave 1.37x on 2026-12-01)."""
    import ray
    import torch

    from stegoseg.cli import main

    data, common = _local_cluster(work)
    try:
        torch.set_num_threads(1)
        assert main(["train", "--out", str(work / "train"), *common, "--no-five-crop", "--steps", "2",
                     "--ckpt-every", "2", "--shifts", "fixed", "--select", "last", "--batch-size", "8"]) == 0
        ckpt = work / "train" / "checkpoint.pt"
        from stegoseg.data.synthetic import make_synthetic_dataset

        images = make_synthetic_dataset(work / "many", n_train=n_images, n_val=1, size=(112, 144)) / "imgs" / "train"
        seg = ["--no-crf", "--resolution", "112", "--batch-size", "2", "--num-workers", "0", "--no-progress",
               "--device", "cpu"]
        times = {}
        for workers in (1, 2):
            t = time.perf_counter()
            assert main(["segment", str(ckpt), str(images), "--out", str(work / f"seg{workers}"),
                         *seg, "--ray-address", "local", "--ray-workers", str(workers)]) == 0
            times[workers] = time.perf_counter() - t
    finally:
        ray.shutdown()
    # The same work without any engine: one one-thread `segment` process on every image, then two
    # at once on half the images each (what this 2-core machine gives two processes by itself).
    files = sorted(str(f) for f in images.iterdir())
    plain = {}
    for n in (1, 2):
        env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
        t = time.perf_counter()
        procs = [subprocess.Popen([sys.executable, "-m", "stegoseg", "segment", str(ckpt), *files[i::n], "--out",
                                   str(work / f"plain{n}-{i}"), *seg], env=env, stdout=subprocess.DEVNULL)
                 for i in range(n)]
        assert all(proc.wait() == 0 for proc in procs)
        plain[n] = time.perf_counter() - t
    result = {"images": n_images, "seconds_1x1": times[1], "seconds_2x1": times[2],
              "images_per_s_1x1": n_images / times[1], "images_per_s_2x1": n_images / times[2],
              "speedup": times[1] / times[2],
              "no_engine_seconds_1": plain[1], "no_engine_seconds_2": plain[2], "no_engine_speedup": plain[1] / plain[2],
              "speedup_relative_to_no_engine": (times[1] / times[2]) / (plain[1] / plain[2]),
              "note": "a random full-size ViT-S/8 with a head trained 2 steps, 112 px, flip, no CRF, batches of 2, "
                      "on a local Ray cluster of 2 CPUs; each run includes starting its actors (loading the model); "
                      "no_engine: the same images through one, then two concurrent one-thread `segment` processes "
                      "(each loading the model) without Ray"}
    print(json.dumps(result), flush=True)
    return result


def bytes_per_crop(resolution: int = 224) -> dict:
    from stegoseg.backbones.presets import BACKBONE_PRESETS

    out = {}
    for name, p in BACKBONE_PRESETS.items():
        g = resolution // p.patch_size
        thumbs = 3 * (resolution // 4) ** 2
        out[name] = {"features": p.embed_dim * g * g * 2, "with_thumb_and_label": p.embed_dim * g * g * 2 + thumbs
                     + resolution * resolution}
    return out


def merged(old, new: list) -> list:
    rows = {r["n"]: r for r in (old or [])}
    rows.update({r["n"]: r for r in new})
    return [rows[n] for n in sorted(rows)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--parts", default="extraction,segment,knn,reads,bytes")
    parser.add_argument("--sizes", default=",".join(map(str, SIZES)))
    parser.add_argument("--segment-images", type=int, default=160,
                        help="images of the segment part (each run includes starting its actors: more images "
                             "weigh the start-up less)")
    args = parser.parse_args()
    parts, sizes = args.parts.split(","), [int(s) for s in args.sizes.split(",")]
    out = Path(__file__).resolve().parent / "results" / "scale.json"
    result = json.loads(out.read_text()) if out.exists() else {}
    result.pop("benchmark", None), result.pop("machine", None)
    with tempfile.TemporaryDirectory(prefix="bench-scale-") as tmp:
        if "extraction" in parts:
            result["extraction"] = extraction_part(Path(tmp) / "extraction")
        if "segment" in parts:
            # every job size measured so far (the start-up is a fixed cost: the ratio grows with the job)
            earlier = result.get("segment_by_images") or (
                {str(result["segment"]["images"]): result["segment"]} if "segment" in result else {})
            result["segment"] = segment_part(Path(tmp) / "segment", args.segment_images)
            result["segment_by_images"] = dict(earlier, **{str(args.segment_images): result["segment"]})
        if "knn" in parts:  # rows of other sizes measured by an earlier invocation are kept
            result["knn"] = project_exact(merged(result.get("knn"), knn_part(sizes)))
            write_result("scale", dict(result, measured_on=machine()))
        if "reads" in parts:
            result["cache_reads"] = merged(result.get("cache_reads"), read_part(sizes, Path(tmp) / "reads"))
    if "bytes" in parts:
        result["cache_bytes_per_crop_224"] = bytes_per_crop()
    result["measured_on"] = machine()
    write_result("scale", result)


if __name__ == "__main__":
    main()
