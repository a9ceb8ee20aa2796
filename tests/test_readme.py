"""Every stegoseg command line in the README and the docs parses with today's options
(commands are parsed, not run: the end-to-end tests run them)."""
import shlex
from pathlib import Path

import pytest

from stegoseg.cli import STUDIES, build_parser

ROOT = Path(__file__).resolve().parents[1]


def command_lines():
    found = []
    for doc in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        in_code, pending = False, ""
        for n, line in enumerate(doc.read_text().splitlines(), 1):
            if line.startswith("```"):
                in_code = not in_code
                continue
            if in_code and line.rstrip().endswith("\\"):  # a continued shell line
                pending += line.rstrip()[:-1] + " "
                continue
            line, pending = pending + line, ""
            text = line.split(" #")[0].strip() if not line.lstrip().startswith("#") else ""
            if not in_code or "stegoseg" not in text:
                continue
            words = shlex.split(text.replace("[--denoise light|deeplabv3]", "--denoise light"))
            command = []
            for word in words + ["&&"]:
                if word in ("&&", ";"):
                    if command[:1] == ["stegoseg"]:
                        found.append((f"{doc.name}:{n}", command[1:]))
                    command = []
                else:
                    command.append(word)
    return found


@pytest.mark.parametrize("where, words", command_lines(), ids=[w for w, _ in command_lines()])
def test_documented_command_parses(where, words):
    line = " ".join(words)
    if words and words[0] == "--help":
        return
    parser = build_parser(next((w for w in words if w in STUDIES), None))
    try:
        args = parser.parse_args(words)
    except SystemExit as exc:
        pytest.fail(f"{where}: `{line}` does not parse (exit {exc.code})")
    assert getattr(args, "func", None) is not None, f"{where}: {line}"


def test_the_readme_documents_commands():
    assert len(command_lines()) >= 20
