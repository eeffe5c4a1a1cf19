"""Global magnitude pruning: keep the largest |w| over all prunable weights at once."""
from __future__ import annotations

from ticketforge.masks import global_topk, keep_count, prunable
from ticketforge.search.base import SearchContext, SearchResult
from ticketforge.search.start import starting_point


def magnitude_scores(model):
    return {k: w.detach().abs() for k, w in prunable(model).items()}


def magnitude(ctx: SearchContext) -> SearchResult:
    start = starting_point(ctx)
    scores = magnitude_scores(start.model)
    total = sum(s.numel() for s in scores.values())
    mask = global_topk(scores, keep_count(total, ctx.recipe.search.sparsity))
    return SearchResult(model=start.model, mask=mask, info={"method": "magnitude", "scope": "global", **start.info},
                        scores=scores, schedule=start.schedule)
