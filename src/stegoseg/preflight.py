"""Checks that run before any long work: the output folder, free disk space, the
accelerator, and the label values of every split a command will read.

Each check raises :class:`~stegoseg.errors.StegosegError` with one line naming the
file or option and what to do; none of them writes anything the user did not ask for.
The catalogue of the cases they cover is docs/reliability.md.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Optional

import numpy as np
from stegoseg.progress import progress_bar as tqdm

from stegoseg.data.base import IGNORE_INDEX
from stegoseg.errors import StegosegError

log = logging.getLogger("stegoseg")


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000.0
    return f"{n:.1f} TB"  # pragma: no cover


def check_writable(folder, option: str = "--out") -> Path:
    """Prove, before any work, that ``folder`` can be written: a file is created and removed
    there when it exists, else the nearest existing parent must let us create it. Nothing is
    left behind (a run that cannot start writes nothing)."""
    folder = Path(folder)
    parent = folder
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise StegosegError(f"{option} {folder}: {parent} is a file, not a folder; choose another path")
    if parent != folder:
        if not os.access(parent, os.W_OK | os.X_OK):
            raise StegosegError(f"{option} {folder}: cannot create it in {parent} (permission denied); "
                                "choose a writable folder")
        return folder
    try:
        fd, probe = tempfile.mkstemp(prefix=".stegoseg-write-test-", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise StegosegError(f"{option} {folder}: cannot write there ({exc.strerror}); choose a writable folder") from None
    return folder


def default_file_mode() -> int:
    """0666 minus the process's umask: the mode ``open()`` would give a new file."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def atomic_write(path, save, suffix: str = ".tmp") -> None:
    """Write ``path`` by calling ``save(temporary path)`` on a uniquely named file beside it,
    then renaming: concurrent writers never share a temporary file, readers never see a
    partial file, and an existing file (even one hard-linked elsewhere) is replaced as a
    directory entry, never rewritten in place. The file gets the usual mode (mkstemp's is
    0600); a failed write leaves no temporary file."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix="." + path.stem + ".", suffix=suffix, dir=path.parent)
    os.close(fd)
    try:
        save(tmp)
        os.chmod(tmp, default_file_mode())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise



def atomic_save_npy(path, array) -> None:
    """``np.save`` through :func:`atomic_write` (readers never see a partial file)."""
    import numpy as np

    def save(tmp):
        with open(tmp, "wb") as f:  # a file object: np.save would append .npy to the temporary name
            np.save(f, array)

    atomic_write(path, save, suffix=".tmp.npy")

def free_bytes(folder) -> int:
    """Free bytes on the file system holding ``folder`` (or its nearest existing parent)."""
    p = Path(folder).absolute()
    while not p.exists():
        p = p.parent
    return shutil.disk_usage(p).free


def check_free_space(folder, needed: int, what: str, option: str = "--out", margin: float = 1.05,
                     advice: Optional[str] = None) -> None:
    """Raise when the file system of ``folder`` has less than ``needed`` bytes (plus 5%) free;
    ``advice``: what to do (default: free some space or point ``option`` at another disk)."""
    have = free_bytes(folder)
    if needed * margin > have:
        raise StegosegError(
            f"not enough disk space for {what} in {folder}: it needs {human_bytes(needed * margin)}, "
            f"{human_bytes(have)} are free; {advice or f'free some space or point {option} at another disk'}"
        )


def check_accelerator(accelerator: str = "auto", device: str = "auto") -> None:
    """``--accelerator gpu`` / ``--device cuda`` on a machine without a usable GPU: say so now."""
    import torch

    from stegoseg.config.stego import valid_device

    if not valid_device(device):
        raise StegosegError(f"--device must be auto, cpu, cuda, cuda:N or mps, got {device!r}")
    if accelerator in ("gpu", "cuda") and not torch.cuda.is_available():
        raise StegosegError(f"--accelerator {accelerator}: no CUDA GPU is available here; use --accelerator cpu (or auto)")
    if accelerator == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise StegosegError("--accelerator mps: Apple's MPS is not available here; use --accelerator cpu (or auto)")
    if str(device).startswith("cuda"):
        if not torch.cuda.is_available():
            raise StegosegError(f"--device {device}: no CUDA GPU is available here; use --device cpu (or auto)")
        if ":" in device and int(device.split(":")[1]) >= torch.cuda.device_count():
            raise StegosegError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s)")


# --------------------------------------------------------------------------- label values
def files_fingerprint(paths) -> str:
    """SHA-1 of (path, size, modification time) of every file: changes when a file is added,
    removed, renamed or rewritten."""
    h = hashlib.sha1()
    for p in paths:
        st = os.stat(p)
        h.update(f"{Path(p).resolve()}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def file_head(path, n: int = 512) -> bytes:
    """The first ``n`` bytes of a file (without reading the rest: checkpoints can be gigabytes)."""
    with open(path, "rb") as f:
        return f.read(n)


def refuse_web_page(path, head: bytes, what: str) -> None:
    """A download that saved the host's HTML page instead of the file: one line saying so."""
    if head.lstrip().lower().startswith((b"<!doctype", b"<html")):
        raise StegosegError(f"{path} is a web page, not {what} (a download that saved the host's page instead of "
                            "the file?): download the file itself")


def image_size(path, remedy: str) -> tuple:
    """(width, height) from an image file's header, or one StegosegError line naming the file
    (not an image, damaged, or a decompression bomb) with ``remedy``."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            return im.size
    except Image.DecompressionBombError:
        raise StegosegError(f"image {path} is too large to decode safely (more than {2 * Image.MAX_IMAGE_PIXELS:,} "
                            f"pixels): downscale or tile it, or {remedy}") from None
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        reason = str(exc).splitlines()[0][:100] if str(exc) else type(exc).__name__
        raise StegosegError(f"image {path} is not an image stegoseg can read ({reason}): {remedy}, or convert it"
                            ) from None


def check_images(dataset, min_side: int = 1, what: str = "") -> None:
    """Before any work: every image file of ``dataset`` opens as an image (only its header is
    read: thousands of files a second) and has a minor side of at least ``min_side`` pixels;
    the first bad one is one line naming it."""
    paths = list(getattr(dataset, "image_paths", None) or [])
    if not paths:
        return
    for p in paths:
        w, h = image_size(p, "remove it from the folder")
        if min(w, h) < min_side:
            raise StegosegError(f"image {p} is {w}x{h}: {what or f'at least {min_side} pixels per side are needed'}; "
                                "remove it from the folder or enlarge it")


def label_values(dataset, scan_dir: Optional[Path] = None, progress: bool = True) -> dict:
    """{value: first label file holding it} over every label file of a labelled dataset,
    after the dataset's own mapping (unlabelled pixels excluded). With ``scan_dir`` the
    result is kept there, keyed by the label files' fingerprint, so a later run on
    unchanged files reads it instead of decoding every label again."""
    paths = list(getattr(dataset, "label_paths", None) or [])
    cache_file = None
    if scan_dir is not None and paths:
        mapping = f"{type(dataset).__name__}:{getattr(dataset, 'label_ignore_index', '')}"  # what map_label depends on
        key = hashlib.sha1((files_fingerprint(paths) + mapping).encode()).hexdigest()[:16]
        cache_file = Path(scan_dir) / f"labels-{key}.json"
        if cache_file.exists():
            return {int(k): v for k, v in json.loads(cache_file.read_text()).items()}
    if hasattr(dataset, "label_values"):  # file datasets: their own reading, mapping and memo
        first = dataset.label_values(progress=progress)
    else:
        first = {}
        for i in tqdm(range(len(dataset)), desc=f"check labels {dataset.split}", disable=not progress, unit="img"):
            sample = dataset.load(i)
            label = sample.label if sample.label is not None else np.array([], dtype=np.int64)
            for v in np.unique(label[label != IGNORE_INDEX]).tolist():
                first.setdefault(int(v), sample.id)
    if cache_file is not None:
        try:
            cache_file.parent.mkdir(parents=True, exist_ok=True)
            cache_file.write_text(json.dumps({str(k): v for k, v in sorted(first.items())}))
        except OSError:
            pass  # a read-only cache folder: the scan is simply not remembered
    return first


def check_label_range(values: dict, n_classes: int, split: str, source: str) -> None:
    """Every label value must be a class id below ``n_classes`` (or the ignore value)."""
    bad = sorted(v for v in values if v < 0 or v >= n_classes)
    if bad:
        v = bad[-1]
        raise StegosegError(
            f"label file {values[v]} ({split} split) holds the value {v}, but there are {n_classes} classes "
            f"({source}), so class ids must be 0..{n_classes - 1}: fix the label, mark the pixels unlabelled "
            f"(--ignore-index), or give the right class count"
        )


# --------------------------------------------------------------------------- --overwrite
#: What each command writes into its --out folder (and ``--overwrite`` removes first, so that
#: no output of the earlier run is left beside the new ones). The feature cache
#: (``cache/``) and generated data are kept: they are validated, not stale.
EVAL_OUTPUTS = ("metrics.json", "confusion_cluster.png", "confusion_linear.png", "predictions.png", "selection-eval",
                ".eval-parts")
TRAIN_OUTPUTS = (
    "checkpoint.pt", "config.yaml", "run_config.json", "lightning", "logs", "candidates", "calibration.json", "selection.json",
    "selection.png", "selected_similarity_histogram.png", "similarity_histogram.png", "training_curves.png",
    "selection-eval", "clusterbook.npy", "clusterbook.json", "clusterbook.partial.pt",
    "modularity_probe.pt", "run_inputs.json", "pseudo_masks.json", "base",
)
OUTPUTS = {
    "train": TRAIN_OUTPUTS,
    "run": ("report.md", "summary.json", "config.yaml", "timings.json"),
    "baseline": EVAL_OUTPUTS + ("checkpoint.pt", "config.yaml"),
    "evaluate": EVAL_OUTPUTS,
    "datus": EVAL_OUTPUTS + ("config.yaml",),
    "pretrain": ("backbone.pt", "config.yaml", "lightning", "logs", "readout.json", "readout_history.json", "readout.png",
                 "training_curves.png"),
}


def prepare_out(out, command: str, marker: str, overwrite: bool, resume: bool = False) -> Path:
    """The output folder of ``command``, checked before any work: writable, and an earlier
    run's output (``marker``) refused unless ``--overwrite`` or ``--resume``; the command
    takes :func:`lock_out` when its checks have passed. Nothing is removed here:
    :func:`clear_outputs` runs after the other checks passed, so a command that stops on bad
    input never destroys the previous run."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise StegosegError(f"--out {out}: a file of that name exists; choose a folder path")
    if not resume and (out / marker).exists() and not overwrite:
        raise StegosegError(f"{out / marker} exists: choose another --out or pass --overwrite")
    return check_writable(out)


#: The lock file of an output folder, and the open handles this process holds (until it exits).
OUT_LOCK = ".stegoseg.lock"
_HELD_LOCKS: dict = {}


def lock_out(out: Path, command: str) -> None:
    """An exclusive lock on ``<out>/.stegoseg.lock`` (creating ``out``) for the rest of this
    process, taken when a command's checks have passed and its work begins: a second stegoseg
    command writing into the same folder stops with one line naming the first one's process id
    and command, instead of mixing their outputs. Released by the OS when the
    process ends (also on a kill). The worker processes Lightning starts for multi-device
    training (``LOCAL_RANK`` > 0) share their launcher's lock."""
    import fcntl

    if int(os.environ.get("LOCAL_RANK", "0") or 0) > 0 or int(os.environ.get("NODE_RANK", "0") or 0) > 0:
        return
    Path(out).mkdir(parents=True, exist_ok=True)
    path = Path(out).resolve() / OUT_LOCK
    if str(path) in _HELD_LOCKS:
        return
    handle = open(path, "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "another process"
        handle.close()
        raise StegosegError(f"--out {out} is in use by another stegoseg command ({holder}): wait for it to finish, "
                            "or choose another --out") from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"pid {os.getpid()}, stegoseg {command}")
    handle.flush()
    _HELD_LOCKS[str(path)] = handle


def release_out_locks() -> None:
    """Drop this process's output-folder locks and their files (a command has finished; a
    killed process's lock goes with it, its file stays and is simply locked anew)."""
    import fcntl

    for path, handle in list(_HELD_LOCKS.items()):
        try:
            Path(path).unlink(missing_ok=True)
            fcntl.flock(handle, fcntl.LOCK_UN)
        finally:
            handle.close()
            _HELD_LOCKS.pop(path, None)


#: The sub-folders ``run`` writes, with the command whose outputs each holds.
RUN_FOLDERS = {"train": "train", "eval": "evaluate", "baseline": "baseline"}


def clear_outputs(out, command: str) -> None:
    """``--overwrite``: remove what ``command`` writes in ``out`` (and only that: a user's own
    files stay, also inside ``run``'s sub-folders), so that no output of the earlier run stays
    beside the new ones."""
    out = Path(out)
    for name in OUTPUTS[command]:
        target = out / name
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target)
        elif target.exists() or target.is_symlink():
            target.unlink()
    if command == "run":
        for folder, sub in RUN_FOLDERS.items():
            if (out / folder).is_dir():
                clear_outputs(out / folder, sub)
        segments = out / "segment"
        if segments.is_dir():  # the label maps and overlays of the example segmentations
            (segments / "labels.json").unlink(missing_ok=True)
            for overlay in segments.glob("*_overlay.png"):
                overlay.unlink()
                (segments / (overlay.name[: -len("_overlay.png")] + ".png")).unlink(missing_ok=True)
