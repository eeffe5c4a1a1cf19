"""An N:M pattern as data (no torch: the structures' descriptors and the recipe schema read it)."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Pattern:
    """N of every M weights kept along the reduction dimension."""

    n: int
    m: int
    out_multiple: int = 8   # apex ASP: the tensor cores' tile along the output channels
    in_multiple: int = 16   # and along the reduction dimension (at least M)

    def __str__(self) -> str:
        return f"{self.n}:{self.m}"


TWO_FOUR = Pattern(2, 4)
