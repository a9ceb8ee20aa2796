"""Command-line interface: a thin layer over the library (:mod:`stegoseg.methods`, :mod:`stegoseg.segment`, :mod:`stegoseg.training.dino`, :mod:`stegoseg.studies`).

Every subcommand maps onto a library function; errors caused by input are printed as
one line (``stegoseg: error: ...``) with exit status 2.
"""
from __future__ import annotations

import argparse
import errno
import logging
import signal
import sys
import threading
from typing import Optional

from stegoseg.cli import methods, pipeline, segment, serve, tools
from stegoseg.errors import StegosegError

log = logging.getLogger("stegoseg")


_FILE_ERRNOS = {
    errno.ENOSPC: "the disk is full: free some space or write to another disk",
    errno.EDQUOT: "disk quota exceeded: free some space or write to another disk",
    errno.EACCES: "permission denied: choose a folder you can write to, or fix the permissions",
    errno.EPERM: "operation not permitted: choose a folder you can write to",
    errno.EROFS: "read-only file system: choose a writable folder",
    errno.EEXIST: "a file of that name already exists: choose another path",
    errno.ENOTDIR: "a path component is a file, not a folder: choose another path",
    errno.EISDIR: "a folder was found where a file was expected: choose another path",
}


#: The studies' commands: their modules (which import the whole training stack) are imported
#: only when the command runs, so `stegoseg --help` and the other commands start fast.
STUDIES = {
    "study-correspondence": ("stegoseg.studies.correspondence", "do feature correspondences predict label "
                             "co-occurrence? PR/AP, correspondence maps, class coupling"),
    "study-dimred": ("stegoseg.studies.dimred", "STEGO as dimensionality reduction: PCA / random projection / STEGO "
                     "at equal dimension (Koenig et al. 2023)"),
    "ablate": ("stegoseg.studies.ablation", "ablate STEGO's components (zero clamp, five-crop, spatial centering, "
               "CRF, each loss term)"),
}


class DefaultsFormatter(argparse.HelpFormatter):
    """Every option's help ends with its default, unless the help already says it (or there is
    none worth saying: a switch that is off, no value)."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "default" in text or action.default in (None, False, argparse.SUPPRESS) or not action.option_strings:
            return text
        return f"{text} (default: %(default)s)"


#: Old option names kept for one release: each still works and says its new name.
DEPRECATED_OPTIONS = {"--resolution": "--eval-resolution", "--quiet": "--no-progress", "--bf16": "--bf16-inference"}


def warn_deprecated_options(command: str, words) -> None:
    """One line per old option name used (``segment``'s old spellings; see DEPRECATED_OPTIONS)."""
    if command not in ("segment",):
        return
    for word in words:
        name = str(word).split("=")[0]
        if name in DEPRECATED_OPTIONS:
            log.warning("%s %s is the old name of %s, which this release also accepts; the old one goes in the next "
                        "release", command, name, DEPRECATED_OPTIONS[name])


class StrictParser(argparse.ArgumentParser):
    """Options are spelled out (no abbreviations: ``--res`` is not ``--resolution``), every
    ``--help`` shows the defaults, and an unknown option gets this command's usage with the
    closest known names."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)
        kwargs.setdefault("formatter_class", DefaultsFormatter)
        super().__init__(*args, **kwargs)

    def parse_known_args(self, args=None, namespace=None):
        parsed, extra = super().parse_known_args(args, namespace)
        unknown = [a for a in extra if a.startswith("-")]
        if unknown:
            self.error_unknown(unknown)
        return parsed, extra

    def error_unknown(self, unknown) -> None:
        import difflib

        known = [o for action in self._actions for o in action.option_strings if o.startswith("--")]
        hints = []
        for option in unknown:
            word = option.split("=")[0]
            close = [o for o in known if o.startswith(word)][:3] or difflib.get_close_matches(word, known, n=3,
                                                                                               cutoff=0.6)
            hints.append(f"{option}" + (f" (did you mean {' or '.join(close)}?)" if close else ""))
        self.error(f"unrecognized option(s): {', '.join(hints)}; `{self.prog} --help` lists the options")


def build_parser(study: Optional[str] = None) -> argparse.ArgumentParser:
    """The parser of every command; the study named by ``study`` (or every study with
    ``study="all"``) gets its full parser, the others a listing entry."""
    import importlib

    parser = StrictParser(
        prog="stegoseg",
        description="Unsupervised semantic segmentation with frozen self-supervised ViTs (STEGO and baselines).",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=StrictParser)
    for module in (pipeline, segment, serve, methods, tools):
        module.add_commands(sub)
    for name, (module, help_text) in STUDIES.items():
        if study in (name, "all"):
            importlib.import_module(module).add_cli(sub)
        else:
            sub.add_parser(name, help=help_text, add_help=False)
    return parser


def main(argv=None) -> int:
    words = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(next((w for w in words if w in STUDIES), None))
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s"
    )
    # Lightning prints through its own handler; without this its lines would also reach ours (twice in logs)
    logging.getLogger("lightning").propagate = False
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)  # its CPU-feature probing is not news
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    warn_deprecated_options(getattr(args, "command", ""), words)
    stopped = {}

    def terminate(signum, frame):  # SIGTERM outside training (which stops at a step end itself): as Ctrl-C
        stopped["signum"] = signum
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, terminate) if threading.current_thread() is threading.main_thread() else None
    try:
        return args.func(args)
    except StegosegError as exc:
        print(f"stegoseg: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except OSError as exc:
        # the environment refused a file operation: one line naming the file, not a traceback
        if exc.errno not in _FILE_ERRNOS:
            raise
        where = f"{exc.filename}: " if exc.filename else ""
        advice = _FILE_ERRNOS[exc.errno]
        print(f"stegoseg: error: {where}{exc.strerror or exc} ({advice})", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        signum = stopped.get("signum", signal.SIGINT)
        print(f"stegoseg: interrupted by {signal.Signals(signum).name}: what was finished is kept (the feature cache, "
              "pseudo masks, clusterbook, label maps of segment and counts of evaluation on Ray resume by themselves; "
              "training checkpoints with --resume): run the same "
              "command again" + (" with --resume" if getattr(args, "command", "") in ("train", "run") else ""),
              file=sys.stderr)
        return 128 + int(signum)
    finally:
        from stegoseg.preflight import release_out_locks

        release_out_locks()
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
