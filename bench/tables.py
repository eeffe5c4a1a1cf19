"""What the benchmarks' tables in docs/benchmarks.md have in common."""
from __future__ import annotations

import statistics


def mean_sd(values: list[float], count: bool = True) -> str:
    """'mean ± std (n)' to one decimal; '-' for no values, no ± for one."""
    if not values:
        return "-"
    sd = f" ± {statistics.stdev(values):.1f}" if len(values) > 1 else ""
    return f"{statistics.mean(values):.1f}{sd}" + (f" ({len(values)})" if count else "")


def density_axis(ax, ylabel: str) -> None:
    """A plot against density on a log scale, sparser to the right (the sweeps' x axis)."""
    ax.set_xscale("log")
    ax.invert_xaxis()
    ax.set_xlabel("density % (log; sparser to the right)")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
