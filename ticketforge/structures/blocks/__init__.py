"""Removed residual blocks: each removed block computes what it computed with its residual branch
zeroed (e.g. relu(x) for relu(x + f(x))), with every op of the branch gone. Faster everywhere.
Finding and removing blocks is residual.py; choosing them is search.py."""
from __future__ import annotations

from ticketforge.budget import LATENCY_KEYS, SIZE_KEY, describe
from ticketforge.errors import UserError
from ticketforge.structures import Converted, Structure, register


@register
class Blocks(Structure):
    name = "blocks"
    summary = "removed residual blocks (faster everywhere)"
    units = "blocks"
    budget_keys = ("target_macs", "blocks") + LATENCY_KEYS + (SIZE_KEY,)
    tuning_keys = ("budget_margin",)
    sweep_key = "target_macs"

    def budget(self, recipe) -> str:
        s = recipe.search
        return describe(recipe) or (f"{s.blocks} blocks" if s.blocks else f"target MACs {s.target_macs:g} of dense")

    def search(self, ctx, method):
        from ticketforge.structures.blocks.search import search

        return search(ctx, method)

    def check(self, recipe) -> None:
        super().check(recipe)
        if recipe.search.sanity:
            raise UserError("recipe key 'search.sanity': the sanity checks vary a weight mask, and a blocks "
                            "ticket has none; remove search.sanity")

    def convert(self, model, mask, recipe, example) -> Converted:
        """The search already removed the blocks physically; record which, so that ticket.pt rebuilds."""
        from ticketforge.structures.blocks.residual import RemovedBlock, recorded_calls

        removed = {n: m.was for n, m in model.named_modules() if isinstance(m, RemovedBlock)}
        if not removed:
            raise UserError("convert.structure blocks: no residual block was removed")
        if mask is not None:
            mask.apply(model)
        kept = {n: sorted({p.rsplit(".", 1)[0].removeprefix("rest.") for p, _ in m.named_parameters()})
                for n, m in model.named_modules() if isinstance(m, RemovedBlock) and any(True for _ in m.parameters())}
        info = {"structure": self.name, "removed_blocks": removed}
        if kept:  # post-norm blocks: LayerNorm(x + f(x)) became LayerNorm(x)
            info["kept_in_removed_blocks"] = kept
        # How each block was called (plain data) rebuilds it from a ticket, as it was traced here.
        return Converted(model=model, mask=mask, info=info,
                         spec={"removed_blocks": list(removed), "calls": recorded_calls(model)})

    def tighten(self, model, mask, recipe, example, keep, info):
        """The next blocks by the search's gate score (lowest first) go until the budget's cost (the
        search's per-block costs) falls to `keep` x what it is now."""
        from ticketforge.structures.blocks.residual import RemovedBlock, remove_blocks

        costs, scores = info.get("block_costs"), info.get("scores")
        if not costs or not scores:
            return None
        gone = {n for n, m in model.named_modules() if isinstance(m, RemovedBlock)}
        left = sorted((n for n in costs if n not in gone), key=lambda n: scores[n])
        current = info["cost_total"] - sum(costs[n] for n in gone)
        chosen, saved = [], 0.0
        for n in left:
            if chosen and current - saved <= keep * current:
                break
            chosen.append(n)
            saved += costs[n]
        if not chosen:
            return None
        remove_blocks(model, chosen)
        return model, mask

    def verify(self, onnx_path, dense_onnx_path, converted, recipe):
        from ticketforge.validate import fewer_weights

        fewer_weights(onnx_path, dense_onnx_path, "blocks: no block was removed")
        return None

    def describe_change(self, info: dict) -> str:
        return "blocks removed " + ", ".join(info.get("removed_blocks", []))

    def reads_spec(self, spec: dict) -> bool:
        return "removed_blocks" in spec

    def rebuild(self, model, spec):
        from ticketforge.structures.blocks.residual import remove_blocks

        return remove_blocks(model, spec["removed_blocks"], spec.get("calls"))
