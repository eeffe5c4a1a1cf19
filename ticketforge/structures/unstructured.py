"""Scattered zeros: the ticket's mask as it is. Smaller once stored sparsely or compressed, not
faster on dense kernels."""
from __future__ import annotations

from ticketforge.structures import Converted, Structure, register

SIZE_AIM = 0.995  # a size budget's plan aims this fraction of the limit (see plan_sparsity)


@register
class Unstructured(Structure):
    name = "unstructured"
    summary = "scattered zeros (smaller when compressed, not faster on dense kernels)"
    budget_keys = ("sparsity", "max_size_mb")
    sweep_key = "sparsity"
    convert_keys = ("prune_lm_head",)

    def accepts(self, method) -> bool:
        return True  # every method has a weight-level search

    def target_sparsity(self, recipe):
        return recipe.search.sparsity

    def convert(self, model, mask, recipe, example) -> Converted:
        if mask is not None:
            mask.apply(model)
        return Converted(model=model, mask=mask, info={"structure": self.name})

    def plan_budget(self, model, recipe, example, log):
        """search.max_size_mb: the sparsity at which the deployed file is predicted to fit."""
        if recipe.search.max_size_mb is None:
            return recipe, {}
        return plan_sparsity(model, recipe, example, log)

    def tighten(self, model, mask, recipe, example, keep, info):
        """Fewer non-zeros, by about `keep` (a file's bytes follow its sparse-stored non-zeros): the
        smallest remaining weights go."""
        import math

        from ticketforge.masks import global_topk

        if mask is None or mask.kept <= 1:
            return None
        weights = dict(model.named_parameters())
        scores = {k: weights[k].detach().abs() * m.to(weights[k].device) for k, m in mask.items()}
        mask = global_topk(scores, max(1, math.floor(mask.kept * keep)))
        mask.apply(model)
        return model, mask


def plan_sparsity(model, recipe, example, log):
    """The recipe with search.sparsity set to meet search.max_size_mb (ticketforge.size_model)."""
    import copy
    import dataclasses

    from ticketforge import size_model
    from ticketforge.search import METHODS

    limit = recipe.search.max_size_mb
    lamp = METHODS.get(recipe.search.method).stand_in(recipe) == "lamp"
    # aimed 0.5% under the limit: the prediction is within a few hundred bytes of the file (protobuf
    # framing, names), and a plan at the limit itself misses it about half of the time
    sparsity, plan = size_model.sparsity_for(model, example, SIZE_AIM * limit * 2 ** 20, recipe.export.quantize,
                                             recipe.export.sparse_storage, lamp)
    log(f"budget: {size_model.deployed_file(recipe)} at most {limit:g} MB: sparsity {sparsity:.4f} "
        f"(predicted {plan['predicted_mb']:.3f} MB)")
    planned = dataclasses.replace(recipe, search=dataclasses.replace(recipe.search, sparsity=sparsity))
    planned.source = copy.deepcopy(getattr(recipe, "source", None))
    info = {"target_sparsity": sparsity, "budget_plan": {"sparsity": sparsity, **plan}}
    if not plan["reachable"]:
        info["notes"] = [f"search.max_size_mb {limit:g}: even at sparsity {sparsity:.4f} the file is predicted at "
                         f"{plan['predicted_mb']:.3f} MB (what is not a prunable weight does not shrink)"]
    return planned, info
