"""The one percentile definition of the gateway and its benchmarks."""

from __future__ import annotations

from collections.abc import Sequence


def percentile(sorted_values: Sequence[float], p: float) -> float | None:
    """Linear interpolation between closest ranks (numpy's default), ``p`` in 0..1, of
    values sorted ascending; None when empty. An exact rank returns that value itself,
    so an infinite value (a failed request in a benchmark) counts only where it lies."""
    if not sorted_values:
        return None
    k = (len(sorted_values) - 1) * p
    lo = int(k)
    hi = min(lo + 1, len(sorted_values) - 1)
    if k == lo or sorted_values[hi] == sorted_values[lo]:
        return sorted_values[lo]
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (k - lo)
