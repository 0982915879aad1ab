"""Small statistics helpers shared by the client and the report."""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence


def percentile(values: Sequence[float], q: float) -> float:
    """Return the nearest-rank ``q``-th percentile (0 < q <= 100), or NaN for no values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


def median(values: Sequence[float]) -> float:
    """Return the median of the finite values, or NaN when there is none."""
    finite = [v for v in values if not math.isnan(v)]
    return statistics.median(finite) if finite else math.nan


def ratio(value: float, reference: float) -> float:
    """Return value / reference, or NaN when either is missing or the reference is zero."""
    if math.isnan(value) or math.isnan(reference) or reference == 0:
        return math.nan
    return value / reference
