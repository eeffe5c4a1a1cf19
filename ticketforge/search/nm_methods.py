"""2:4 tickets: in every group of 4 weights along the reduction dimension of each eligible layer,
keep the 2 with the highest scores: |w| (magnitude-2to4) or CTS logits (cts-2to4)."""
from __future__ import annotations

import torch

from ticketforge.errors import UserError
from ticketforge.masks import prunable
from ticketforge.search.base import SearchContext, SearchResult
from ticketforge.search.cts import concrete_search, weight_logits
from ticketforge.search.magnitude import magnitude_scores
from ticketforge.structures.nm import pattern as nm


def _eligible(model) -> list[str]:
    eligible, _ = nm.split_layers(model)
    if not eligible:
        raise UserError("2:4: no layer of this model qualifies (out channels % 8 == 0 and input channels per "
                        "group % 16 == 0); use an unstructured or channels recipe")
    return eligible


def _result(ctx: SearchContext, method: str, scores: dict, info: dict) -> SearchResult:
    mask = nm.nm_masks(ctx.model, scores)
    eligible, ineligible = nm.split_layers(ctx.model)
    # The report's target sparsity is what 2:4 really removes: half of the eligible weights.
    info.update({"method": method, "eligible": len(eligible), "ineligible": len(ineligible),
                 "kept": mask.kept, "total": mask.total, "target_sparsity": mask.sparsity})
    return SearchResult(model=ctx.model, mask=mask, info=info, scores=scores)


def magnitude_2to4(ctx: SearchContext) -> SearchResult:
    """apex ASP's m4n2_1d: the 2 largest |w| of every 4 (the best of the 6 patterns by sum of |w|)."""
    _eligible(ctx.model)
    return _result(ctx, "magnitude-2to4", magnitude_scores(ctx.model), {})


def cts_2to4(ctx: SearchContext) -> SearchResult:
    """CTS at 50% density over the eligible layers only (the others stay dense and keep their
    weights in the forward), then the 2 highest logits of every 4."""
    if isinstance(ctx.model, torch.jit.ScriptModule):
        raise UserError("CTS needs an eager nn.Module (it substitutes masked weights in the forward); "
                        "give a state_dict with --arch instead of a TorchScript archive")
    eligible = _eligible(ctx.model)
    weights = prunable(ctx.model)
    logits = {n: a for n, a in weight_logits(ctx.model, nm.N / nm.M).items() if n in eligible}
    costs = {n: torch.ones((), dtype=torch.float32) for n in logits}
    kept = nm.N / nm.M * sum(weights[n].numel() for n in logits)

    def overrides(soft):
        return {n: weights[n] * soft[n].to(weights[n].dtype) for n in soft}

    trained, info = concrete_search(ctx, logits, costs, kept, overrides, desc="search (CTS, 2:4)")
    return _result(ctx, "cts-2to4", trained, info)
