"""What the benchmarks' README tables have in common."""
from __future__ import annotations

import statistics


def mean_sd(values: list[float], count: bool = True) -> str:
    """'mean ± std (n)' to one decimal; '-' for no values, no ± for one."""
    if not values:
        return "-"
    sd = f" ± {statistics.stdev(values):.1f}" if len(values) > 1 else ""
    return f"{statistics.mean(values):.1f}{sd}" + (f" ({len(values)})" if count else "")
