"""N:M tickets: the search method scores every weight of the eligible layers (|w| for magnitude, as
apex ASP's m4n2_1d; CTS gates at density N/M over the eligible layers only, the others staying dense
in the forward), then the N highest scores of every M are kept."""
from __future__ import annotations

import torch

from ticketforge.errors import UserError
from ticketforge.masks import prunable
from ticketforge.search.base import SearchContext, SearchResult, Units
from ticketforge.structures.nm import pattern as nm


def search(ctx: SearchContext, method, pat: nm.Pattern) -> SearchResult:
    eligible, ineligible = nm.split_layers(ctx.model, pat)
    if not eligible:
        raise UserError(f"{pat}: no layer of this model qualifies (out channels % {pat.out_multiple} == 0 and input "
                        f"channels per group % {max(pat.in_multiple, pat.m)} == 0); use an unstructured or "
                        "channels recipe")
    weights = prunable(ctx.model)
    density = pat.n / pat.m

    def overrides(soft):
        return {n: weights[n] * soft[n].to(weights[n].dtype) for n in soft}

    units = Units(kind="weights", model=ctx.model, shapes={n: tuple(weights[n].shape) for n in eligible},
                  costs={n: torch.ones((), dtype=torch.float32) for n in eligible},
                  kept=density * sum(weights[n].numel() for n in eligible), density=density, apply=overrides,
                  magnitude=lambda: {n: weights[n].detach().abs() for n in eligible}, label=str(pat))
    scores, info = method.score(ctx, units)
    mask = nm.nm_masks(ctx.model, scores, pat)
    # The report's target sparsity is what the pattern really removes: 1 - N/M of the eligible weights.
    info.update({"eligible": len(eligible), "ineligible": len(ineligible), "kept": mask.kept, "total": mask.total,
                 "target_sparsity": mask.sparsity, "pattern": str(pat)})
    return SearchResult(model=ctx.model, mask=mask, info=info, scores=scores)
