"""User-facing errors.

Every problem caused by user input (a bad path, an unreadable file, an invalid option)
is raised as :class:`StegosegError` with a one-line message that names the file or
option and says what to do. The command-line interface prints such errors as a single
line and exits with status 2 instead of showing a traceback.
"""


class StegosegError(Exception):
    """An error caused by user input or environment, with an actionable one-line message."""

    exit_code = 2


class RunInterrupted(StegosegError):
    """Training stopped by Ctrl-C or SIGTERM at a step boundary, its state saved for ``--resume``
    (exit status 128 + the signal's number, as a shell reports a signal)."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.exit_code = 128 + int(signum)


def refuse_overwrite(out, marker: str, overwrite: bool) -> None:
    """Raise unless ``--overwrite`` was given when ``out/marker`` (a finished run's output) exists."""
    from pathlib import Path

    path = Path(out) / marker
    if path.exists() and not overwrite:
        raise StegosegError(f"{path} exists: choose another --out or pass --overwrite")
