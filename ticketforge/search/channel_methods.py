"""Channel-level search: one choice per group of coupled channels, under a budget of MACs kept
(`search.target_macs`), with kept counts rounded to `convert.round_to` (ticketforge.structures.channels).

cts-channels: CTS with one Binary Concrete gate per channel of each group. A gate scales the
channel after its normalisation (BatchNorm's affine, or the producer's weight and bias when the
group has no norm): before a BatchNorm that normalises by batch statistics a gate would be divided
out again. Each gate costs the MACs one channel of its group adds at the uniform solution, and
the budget is the tangent plane of the exact (bilinear) MAC count there, so GRADBALANCE steers
towards target_macs x dense.
magnitude-channels: the L1 norm of each channel's producer weights (the classic filter-pruning
baseline), with the removed channels' BatchNorm shift folded into their consumers."""
from __future__ import annotations

import math

import torch

from ticketforge.search.base import SearchContext, SearchResult
from ticketforge.search.cts import concrete_search
from ticketforge.structures.channels import cost as channel_cost
from ticketforge.structures.channels.graph import discover
from ticketforge.structures.channels.select import l1_scores
from ticketforge.structures.channels.surgery import channel_mask, fold_shifts


def _gate_targets(model, plan) -> list[list[tuple[str, torch.Tensor, torch.Tensor]]]:
    """Per group: (parameter name, indices along dim 0, group channel of each index) of what a gate scales."""
    params = dict(model.named_parameters())
    out = []
    for g in plan.groups:
        members = g.gated()
        targets = []
        for m in members:
            for p in ("weight", "bias"):
                name = f"{m.module}.{p}"
                if name in params:
                    targets.append((name, torch.tensor(m.idx), torch.tensor(m.root)))
        out.append(targets)
    return out


def cts_channels(ctx: SearchContext) -> SearchResult:
    model = ctx.model
    example = ctx.example(8)
    plan = discover(model, example)
    # MACs, or with a budget in speed, latency or bytes the measured cost (channels/cost.py)
    cost, target, cost_info = channel_cost.for_recipe(model, plan, ctx.recipe, example, ctx.ui.log)
    uniform = plan.uniform_counts(target, cost)
    frac = min(max(uniform[0] / plan.groups[0].size if plan.groups else 1.0, 1e-3), 1 - 1e-3)
    per_channel = plan.marginal_costs(uniform, cost)
    scale = cost.dense  # costs in units of the dense model's cost keep GRADBALANCE's numbers O(1)
    names = [f"group{i}" for i in range(len(plan.groups))]
    logits = {n: torch.full((g.size,), math.log(frac / (1 - frac))) for n, g in zip(names, plan.groups)}
    costs = {n: torch.full((g.size,), c / scale) for n, g, c in zip(names, plan.groups, per_channel)}
    kept_cost = sum(c * k for c, k in zip(per_channel, uniform)) / scale
    params = dict(model.named_parameters())
    targets = _gate_targets(model, plan)
    device = ctx.device
    targets = [[(p, idx.to(device), root.to(device)) for p, idx, root in t] for t in targets]

    def overrides(soft):
        out = {}
        for n, group_targets in zip(names, targets):
            gate = soft[n]
            for pname, idx, root in group_targets:
                w = out.get(pname, params[pname])
                full = torch.ones(w.shape[0], device=w.device, dtype=gate.dtype).index_copy(0, idx, gate[root])
                out[pname] = w * full.to(w.dtype).view(-1, *[1] * (w.dim() - 1))
        return out

    trained, info = concrete_search(ctx, logits, costs, kept_cost, overrides, desc="search (CTS, channels)")
    scores = [torch.sigmoid(trained[n]).cpu() for n in names]
    keep, sel = channel_cost.select_for(model, plan, scores, target, cost, ctx.recipe, example, ctx.ui.log)
    mask = channel_mask(model, plan, keep)
    info.update(sel)
    info.update(cost_info)
    info.update(channel_cost.describe_kept(cost, [len(k) for k in keep]))
    info.update({"method": "cts-channels", "kept_budget_units": f"fraction of dense {cost.name} (linearised)"})
    _log_kept(ctx, info)
    return SearchResult(model=model, mask=mask, info=info)


def _log_kept(ctx: SearchContext, sel: dict) -> None:
    extra = (f", predicted {sel['predicted_speedup']:.2f}x at batch {sel['latency_table']['batch']}"
             if "predicted_speedup" in sel else f", predicted {sel['predicted_mb']:.3f} MB" if "predicted_mb" in sel
             else "")
    ctx.ui.log(f"search: kept {sel['macs_kept']:.3f} of the dense MACs over {sel['groups']} channel groups "
               f"(counts rounded to multiples of {sel['round_to']}){extra}")


def magnitude_channels(ctx: SearchContext) -> SearchResult:
    model = ctx.model
    example = ctx.example(8)
    plan = discover(model, example)
    cost, target, cost_info = channel_cost.for_recipe(model, plan, ctx.recipe, example, ctx.ui.log)
    keep, sel = channel_cost.select_for(model, plan, l1_scores(model, plan), target, cost, ctx.recipe, example,
                                        ctx.ui.log)
    spread = fold_shifts(model, plan, keep, example)
    mask = channel_mask(model, plan, keep)
    sel.update(cost_info)
    sel.update(channel_cost.describe_kept(cost, [len(k) for k in keep]))
    sel.update({"method": "magnitude-channels", "scores": "L1 per channel, normalised per group",
                "fold_spread": spread})
    _log_kept(ctx, sel)
    return SearchResult(model=model, mask=mask, info=sel)
