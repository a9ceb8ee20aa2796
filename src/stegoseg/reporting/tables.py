"""The one markdown table writer (rows of dicts -> a table) and the metric columns every
method's table shares."""
from __future__ import annotations

from typing import Sequence


def fmt(v) -> str:
    return "-" if v is None else f"{v:.1f}"


def markdown_table(rows: Sequence[dict], columns: Sequence[tuple]) -> str:
    """Rows of dicts as a markdown table; ``columns`` = (header, key or callable)."""
    lines = ["| " + " | ".join(h for h, _ in columns) + " |", "|" + "---|" * len(columns)]
    for r in rows:
        cells = []
        for _, key in columns:
            v = key(r) if callable(key) else r.get(key)
            cells.append(fmt(v) if isinstance(v, (float, type(None))) else str(v))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


METRIC_COLUMNS = (
    ("cluster acc (strict)", "cluster_strict_acc"),
    ("cluster mIoU (strict)", "cluster_strict_miou"),
    ("cluster acc (parity)", "cluster_parity_acc"),
    ("cluster mIoU (parity)", "cluster_parity_miou"),
    ("linear acc", "linear_acc"),
    ("linear mIoU", "linear_miou"),
)


def metrics_table(rows: Sequence[dict], first: Sequence[tuple]) -> str:
    """Rows of metric summaries (``summary_rows`` keys) with leading columns ``first``."""
    return markdown_table(rows, (*first, *METRIC_COLUMNS))
