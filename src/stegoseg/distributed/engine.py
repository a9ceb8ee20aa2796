"""Ray Data as the engine of the data-parallel stages: connecting (a local cluster or an
existing one), the checks before any work, and one call that runs a list of work items
through a pool of actors (each loads its model once) with one progress bar for the job.

Ray is optional (``pip install "stegoseg[distributed]"``); nothing here is imported unless a
command is given ``--ray-address``.
"""
from __future__ import annotations

import logging
import os
import socket
from dataclasses import dataclass
from typing import Callable, Optional

from stegoseg.errors import StegosegError
from stegoseg.progress import progress_bar

log = logging.getLogger("stegoseg")

#: Test hook: a path P; while ``P.armed`` exists, the first worker to create P dies
#: (``os._exit``) in the middle of its item, so that tests see Ray restart it and redo the item.
KILL_ONCE = "STEGOSEG_TEST_KILL_WORKER_ONCE"


@dataclass(frozen=True)
class RayOptions:
    """``--ray-address`` (``local``: start a cluster in this process; ``auto``: the cluster
    running on this machine; ``HOST:PORT`` or ``ray://HOST:PORT``: that cluster's head),
    ``--ray-workers`` actors, each with ``--ray-gpus-per-worker`` GPUs and
    ``--ray-cpus-per-worker`` CPUs (its torch threads)."""

    address: str
    workers: int = 2
    gpus_per_worker: float = 0.0
    cpus_per_worker: float = 1.0

    @classmethod
    def from_config(cls, cfg) -> Optional["RayOptions"]:
        if not getattr(cfg, "ray_address", None):
            return None
        return cls(cfg.ray_address, cfg.ray_workers, cfg.ray_gpus_per_worker, cfg.ray_cpus_per_worker)


def option_problems(workers: int, gpus: float, cpus: float) -> list:
    """(condition, message) checks of the Ray options' values (for ``raise_first_failure``)."""
    return [
        (workers >= 1, f"--ray-workers must be >= 1, got {workers}"),
        (gpus >= 0, f"--ray-gpus-per-worker must be >= 0, got {gpus}"),
        (cpus > 0, f"--ray-cpus-per-worker must be > 0, got {cpus}"),
    ]


def _reachable(address: str, timeout: float = 5.0) -> Optional[str]:
    """Why ``HOST:PORT`` cannot be reached (None when a TCP connection opens)."""
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host or "127.0.0.1", int(port)), timeout=timeout):
            return None
    except ValueError:
        return f"{address!r} is not HOST:PORT"
    except OSError as exc:
        return exc.strerror or str(exc)


def connect(options: RayOptions) -> None:
    """Join or start the Ray cluster and check that it has what the options ask, before any
    work: no Ray, an unreachable address, more GPUs or CPUs than the cluster has are one line."""
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError:
        raise StegosegError("--ray-address: Ray is not installed here: pip install \"stegoseg[distributed]\" "
                            "(or leave out --ray-address to run in this process)") from None
    address = options.address
    if not ray.is_initialized():
        if address == "local":
            ray.init(num_cpus=max(1, int(options.workers * options.cpus_per_worker + 0.999)),
                     include_dashboard=False, log_to_driver=False, configure_logging=False)
        else:
            plain = address.removeprefix("ray://")
            if address != "auto":
                why = _reachable(plain)
                if why:
                    raise StegosegError(f"--ray-address {address}: no Ray cluster answers there ({why}): start one "
                                        "with `ray start --head` on that machine, or use --ray-address local")
            try:
                ray.init(address=address, log_to_driver=False, configure_logging=False)
            except (ConnectionError, RuntimeError, ValueError) as exc:
                first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]
                raise StegosegError(f"--ray-address {address}: cannot join the Ray cluster ({first}): start one with "
                                    "`ray start --head`, or use --ray-address local") from None
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False  # one bar for the whole job, the driver's
    ctx.print_on_execution_start = False
    have = ray.cluster_resources()
    gpus, cpus = float(have.get("GPU", 0)), float(have.get("CPU", 0))
    if options.gpus_per_worker > 0 and options.gpus_per_worker > gpus:
        raise StegosegError(f"--ray-gpus-per-worker {options.gpus_per_worker:g}: the Ray cluster has {gpus:g} GPUs; "
                            "use --ray-gpus-per-worker 0 (CPU workers) or join a cluster with GPUs")
    if options.workers * options.gpus_per_worker > gpus:
        raise StegosegError(f"--ray-workers {options.workers} x --ray-gpus-per-worker {options.gpus_per_worker:g} "
                            f"needs {options.workers * options.gpus_per_worker:g} GPUs, the Ray cluster has {gpus:g}: "
                            "use fewer workers")
    if options.workers * options.cpus_per_worker > cpus:
        raise StegosegError(f"--ray-workers {options.workers} x --ray-cpus-per-worker {options.cpus_per_worker:g} "
                            f"needs {options.workers * options.cpus_per_worker:g} CPUs, the Ray cluster has {cpus:g}: "
                            "use fewer workers or fewer CPUs per worker")
    log.info("Ray: %d workers (%g GPU, %g CPU each) on a cluster of %g CPUs and %g GPUs (%s)", options.workers,
             options.gpus_per_worker, options.cpus_per_worker, cpus, gpus, address)


def run_items(rows: list, actor_class, constructor_kwargs: dict, options: RayOptions, total: int, desc: str,
              progress: bool = True, unit: str = "img", count: Callable = None, on_row: Callable = None) -> list:
    """Every row (a dict of plain values: one unit of work, written by the actor by rename)
    through ``actor_class(**constructor_kwargs)`` instances, ``options.workers`` of them, one row
    per call; returns the rows the actors return. ``count(row)``: how many ``unit`` a returned
    row finished (the bar's step). A worker that dies is restarted and its row redone by Ray."""
    import ray

    if not rows:
        return []
    connect(options)
    ds = ray.data.from_items(rows, override_num_blocks=len(rows))
    mapped = ds.map_batches(
        actor_class, fn_constructor_kwargs=dict(constructor_kwargs, threads=max(1, int(options.cpus_per_worker))),
        batch_size=1, batch_format="pandas", compute=ray.data.ActorPoolStrategy(size=options.workers),
        num_cpus=options.cpus_per_worker, num_gpus=options.gpus_per_worker or None,
    )  # (Ray Data's actor pool restarts a dead actor and retries its item: max_restarts / max_task_retries -1)
    bar = progress_bar(total=total, desc=desc, disable=not progress, unit=unit)
    out = []
    try:
        for row in mapped.iter_rows():
            row = dict(row)
            if on_row is not None:  # (kept by on_row: not held here as well, a job's blobs can be large)
                on_row(row)
            else:
                out.append(row)
            bar.update(count(row) if count else 1)
    except Exception as exc:  # a worker's own StegosegError is the user's one line
        cause = exc
        while cause is not None and not isinstance(cause, StegosegError):
            cause = getattr(cause, "cause", None) or cause.__cause__
        if cause is not None:
            raise StegosegError(str(cause)) from None
        raise
    finally:
        bar.close()
    return out


def worker_setup(threads: int) -> None:
    """What every actor does first: its torch threads (its CPUs)."""
    import torch

    torch.set_num_threads(max(1, threads))


def maybe_die_for_test() -> None:
    """The :data:`KILL_ONCE` hook (tests only): the first caller to create the file dies."""
    marker = os.environ.get(KILL_ONCE)
    if not marker or not os.path.exists(marker + ".armed"):
        return
    try:
        fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return
    os.write(fd, str(os.getpid()).encode())
    os.close(fd)
    os._exit(17)
