"""Scattered zeros: the ticket's mask as it is. Smaller once stored sparsely or compressed, not
faster on dense kernels."""
from __future__ import annotations

from ticketforge.structures import Converted, Structure

# Methods that score single weights; their tickets also feed the channels structure.
WEIGHT_METHODS = ("magnitude", "random", "snip", "grasp", "synflow", "cts", "imp")


class Unstructured(Structure):
    name = "unstructured"
    summary = "scattered zeros (smaller when compressed, not faster on dense kernels)"
    methods = WEIGHT_METHODS
    budget_keys = ("sparsity",)
    sweep_key = "sparsity"

    def target_sparsity(self, recipe):
        return recipe.search.sparsity

    def convert(self, model, mask, recipe, example) -> Converted:
        if mask is not None:
            mask.apply(model)
        return Converted(model=model, mask=mask, info={"structure": self.name})
