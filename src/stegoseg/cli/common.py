"""Shared helpers of the command modules."""
from __future__ import annotations

import argparse
from pathlib import Path


def out_arg(p: argparse.ArgumentParser, default: str) -> None:
    p.add_argument("--out", default=default, help=f"output folder (default: {default})")


def print_summary(result: dict, out: Path) -> None:
    summary = result.get("summary") or {}
    if summary:
        print("| metric | value |\n|---|---|")
        for k, v in summary.items():
            print(f"| {k} | {v:.2f} |")
    print(f"outputs: {out}")
