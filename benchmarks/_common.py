"""Shared helpers for the benchmark scripts (not part of the library)."""
from __future__ import annotations

import json
import platform
import time
from pathlib import Path

import torch

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def machine() -> str:
    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}"
    return f"CPU {platform.processor() or platform.machine()} x{torch.get_num_threads()} threads, torch {torch.__version__}"


def timed(fn, repeat: int = 1, sync: bool = True) -> float:
    """Median wall time of ``fn()`` over ``repeat`` runs, in seconds."""
    times = []
    for _ in range(repeat):
        if sync and torch.cuda.is_available():
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if sync and torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    times.sort()
    return times[len(times) // 2]


def write_result(name: str, result: dict, out_dir=None) -> Path:
    out_dir = Path(out_dir or Path(__file__).resolve().parent / "results")
    out_dir.mkdir(parents=True, exist_ok=True)
    result = {"benchmark": name, "machine": machine(), **result}
    path = out_dir / f"{name}.json"
    path.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    return path


def save_backbone_file(backbone, tiny: bool, path: Path) -> Path:
    """A backbone's weights as a ``stegoseg-backbone`` file (for ``--weights``): a random backbone,
    drawn from ``--seed``, kept fixed across seeds."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"format": "stegoseg-backbone", "name": backbone.name, "tiny": tiny,
                "state_dict": {k: v.detach().cpu().clone() for k, v in backbone.state_dict().items()}}, path)
    return path
