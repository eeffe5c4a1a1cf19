"""Removed channels: the ticket's channels physically gone from every Conv / Linear / norm that
carries them, coupled groups (residual adds, depthwise convs, concat, flatten) removed together.
Faster on any runtime. Four steps, one module each: graph.py (which channels are coupled, what
they cost), select.py (which stay), surgery.py (masks, BatchNorm-shift folding, removal), spec.py
(rebuilding the shrunk model from plain data)."""
from __future__ import annotations

from ticketforge.budget import LATENCY_KEYS, SIZE_KEY, TUNING_KEYS, describe
from ticketforge.structures import Converted, Structure, register


@register
class Channels(Structure):
    name = "channels"
    summary = "removed channels (faster on any runtime)"
    units = "channels"
    budget_keys = ("target_macs",) + LATENCY_KEYS + (SIZE_KEY,)
    tuning_keys = TUNING_KEYS
    sweep_key = "target_macs"
    convert_keys = ("round_to",)

    def accepts(self, method) -> bool:
        # A method that scores no channels gives a weight-level ticket, turned into channels: the
        # channels its mask left emptiest go.
        return True

    def search_keys(self, method) -> tuple[str, ...]:
        # a weight-level ticket has its own sparsity, then channels meet target_macs
        return super().search_keys(method) + (() if self.scores_units(method) else ("sparsity",))

    def search(self, ctx, method):
        if not self.scores_units(method):
            return super().search(ctx, method)
        from ticketforge.structures.channels.search import search

        return search(ctx, method)

    def budget(self, recipe) -> str:
        return describe(recipe) or f"target MACs {recipe.search.target_macs:g} of dense"

    def _selection(self, model, mask, recipe, example):
        """The channel groups and which channels stay. A mask from a channel search says it directly;
        any other mask (an unstructured ticket) is turned into one by dropping the channels it left
        emptiest until search.target_macs is met, their BatchNorm shift folded into the consumers."""
        from ticketforge.structures.channels import cost, graph, select, surgery

        plan = graph.discover(model, example)
        keep = surgery.keep_from_mask(plan, mask, model) if mask is not None else None
        info: dict = {"structure": self.name, "groups": len(plan.groups), "left_whole": plan.skipped}
        if keep is None:
            scores = (select.mask_density_scores(plan, mask) if mask is not None else select.l1_scores(model, plan))
            measure, target, cost_info = cost.for_recipe(model, plan, recipe, example)
            keep, sel = cost.select_for(model, plan, scores, target, measure, recipe, example)
            sel["fold_spread"] = surgery.fold_shifts(model, plan, keep, example)
            mask = surgery.channel_mask(model, plan, keep)
            info.update(sel)
            info.update(cost_info)
            info["notes"] = sel.get("notes", []) + [
                f"the ticket was not channel-structured: the channels its mask left emptiest were dropped to keep "
                f"{sel['macs_kept']:.3f} of the dense MACs"]
        return plan, keep, mask, info

    def prepare(self, model, mask, recipe, example):
        _, _, mask, info = self._selection(model, mask, recipe, example)
        return model, mask, info

    def convert(self, model, mask, recipe, example) -> Converted:
        """Physically remove the masked channels; the report gets the largest logit difference between
        the masked model and the shrunk one (0 up to float rounding: the shrunk model is the ticket)."""
        import copy

        import torch

        from ticketforge.structures.channels import spec, surgery

        plan, keep, mask, info = self._selection(model, mask, recipe, example)
        masked = copy.deepcopy(model).eval()
        mask.apply(masked)
        shrunk = surgery.shrink(masked, plan, keep, example)
        with torch.no_grad():
            x = example.to(next(masked.parameters()).device)
            info["max_logit_diff_vs_masked"] = float((masked(x) - shrunk(x)).abs().max())
        info["kept_channels"] = {g.root: int(len(k)) for g, k in zip(plan.groups, keep)}
        info["group_sizes"] = {g.root: g.size for g in plan.groups}
        return Converted(model=shrunk, mask=None, info=info, spec=spec.arch_spec(shrunk))

    def tighten(self, model, mask, recipe, example, keep, info):
        """More channels go: the budget's cost (the measured latency table, cached from the search,
        or bytes) falls to `keep` x its current value, the chunks with the least L1 (of the fine-tuned
        weights) per unit of cost saved first. The channels already removed have no weight left, so
        they stay removed."""
        from ticketforge.structures.channels import cost, graph, select, surgery

        plan = graph.discover(model, example)
        current = surgery.keep_from_mask(plan, mask, model) if mask is not None else None
        if current is None:
            return None
        measure, _, _ = cost.for_recipe(model, plan, recipe, example)
        counts = [len(k) for k in current]
        target = measure(counts) * keep / measure.dense
        scores = select.l1_scores(model, plan)
        new, _ = select.select(plan, scores, target, recipe.convert.round_to, cost=cost.plain(measure))
        if [len(k) for k in new] == counts:
            return None
        surgery.fold_shifts(model, plan, new, example)
        mask = surgery.channel_mask(model, plan, new)
        mask.apply(model)
        return model, mask

    def verify(self, onnx_path, dense_onnx_path, converted, recipe):
        from ticketforge.validate import fewer_weights

        fewer_weights(onnx_path, dense_onnx_path, "channels: no channel was removed")
        return None

    def describe_change(self, info: dict) -> str:
        return "channels kept " + ", ".join(f"{k} {v}" for k, v in info.get("kept_channels", {}).items())

    def reads_spec(self, spec: dict) -> bool:
        return "modules" in spec and "shapes" in spec  # channels/spec.py's arch_spec

    def rebuild(self, model, spec_data):
        from ticketforge.structures.channels.spec import apply_spec

        return apply_spec(model, spec_data)

