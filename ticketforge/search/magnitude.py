"""Magnitude pruning: keep the largest weights, compared across layers in one of two ways.

- `global`: raw |w| over all prunable weights at once. Layer scales differ (BatchNorm makes a
  conv's scale arbitrary, weight decay shrinks large layers more), so at high sparsity global
  magnitude empties the largest layers first: on a small residual CNN at 95% it left 0.4% of the
  widest convs and 80% of the stem.
- `lamp` (Layer-Adaptive Magnitude-based Pruning, Lee et al., ICLR 2021): a weight's score is its
  squared magnitude over the sum of the squares of the weights of its layer that are at least as
  large. Within a layer the order is that of |w|; across layers the scores are comparable, and
  each layer's largest weight scores 1, so no layer is emptied. (Torch-Pruning's LAMPImportance
  scores channel groups, not single weights, so the per-weight score is computed here: a sort and
  a cumulative sum per layer.)"""
from __future__ import annotations

import torch

from ticketforge.errors import UserError
from ticketforge.masks import global_topk, keep_count, prunable
from ticketforge.search.base import SearchContext, SearchResult, Units
from ticketforge.search.start import starting_point


def magnitude_scores(model):
    return {k: w.detach().abs() for k, w in prunable(model).items()}


def lamp_scores(magnitudes: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """LAMP score of every weight, from its magnitude."""
    out = {}
    for k, m in magnitudes.items():
        sq = m.detach().float().reshape(-1) ** 2
        order = torch.argsort(sq)  # ascending
        ranked = sq[order]
        # sum over the weights at or above each position: a reversed cumulative sum
        tail = torch.flip(torch.cumsum(torch.flip(ranked, [0]), 0), [0])
        score = torch.empty_like(sq)
        score[order] = ranked / tail.clamp_min(torch.finfo(tail.dtype).tiny)
        out[k] = score.reshape(m.shape)
    return out


def magnitude(ctx: SearchContext) -> SearchResult:
    start = starting_point(ctx)
    scores = magnitude_scores(start.model)
    scope = ctx.recipe.search.scope
    ranked = lamp_scores(scores) if scope == "lamp" else scores
    total = sum(s.numel() for s in scores.values())
    mask = global_topk(ranked, keep_count(total, ctx.recipe.search.sparsity))
    return SearchResult(model=start.model, mask=mask, info={"method": "magnitude", "scope": scope, **start.info},
                        scores=ranked, schedule=start.schedule)


def score_units(ctx: SearchContext, units: Units) -> tuple[dict[str, torch.Tensor], dict]:
    """Magnitude of a structure's units, as the structure measures it (|w| for N:M, as apex ASP;
    the L1 norm of a channel's weights, the classic filter-pruning score)."""
    if units.magnitude is None:
        raise UserError(f"search method 'magnitude' cannot score {units.kind}: the structure has no magnitude "
                        "for them; use search.method cts")
    return units.magnitude(), {"method": "magnitude"}
