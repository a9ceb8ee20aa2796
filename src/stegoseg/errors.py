"""User-facing errors.

Every problem caused by user input (a bad path, an unreadable file, an invalid option)
is raised as :class:`StegosegError` with a one-line message that names the file or
option and says what to do. The command-line interface prints such errors as a single
line and exits with status 2 instead of showing a traceback.
"""


class StegosegError(Exception):
    """An error caused by user input or environment, with an actionable one-line message."""


def refuse_overwrite(out, marker: str, overwrite: bool) -> None:
    """Raise unless ``--overwrite`` was given when ``out/marker`` (a finished run's output) exists."""
    from pathlib import Path

    path = Path(out) / marker
    if path.exists() and not overwrite:
        raise StegosegError(f"{path} exists: choose another --out or pass --overwrite")
