"""Number formats and Markdown tables of the report."""

from __future__ import annotations

import math
from collections.abc import Sequence

Row = dict[str, float]
"""The median figures of one (scenario, target) pair, by name."""


def format_number(value: float, digits: int = 0) -> str:
    """Return the value with thousands separators, or a dash when it is missing."""
    if math.isnan(value):
        return "—"
    return f"{value:,.{digits}f}"


def format_ratio(value: float) -> str:
    return "—" if math.isnan(value) else f"{value:.2f}x"


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines
