"""Channel-level search: one score per channel of each group of coupled channels, under a budget of
MACs kept (`search.target_macs`, or a speed, latency or size budget through cost.py), with kept
counts rounded to `convert.round_to`.

- CTS: one Binary Concrete gate per channel of each group. A gate scales the channel after its
  normalisation (BatchNorm's affine, or the producer's weight and bias when the group has no norm):
  before a BatchNorm that normalises by batch statistics a gate would be divided out again. Each
  gate costs the MACs one channel of its group adds at the uniform solution, and the budget is the
  tangent plane of the exact (bilinear) MAC count there, so GRADBALANCE steers towards
  target_macs x dense.
- magnitude: the L1 norm of each channel's producer weights (the classic filter-pruning baseline),
  with the removed channels' BatchNorm shift folded into their consumers."""
from __future__ import annotations


import torch

from ticketforge.search.base import SearchContext, SearchResult, Units
from ticketforge.structures.channels import cost as channel_cost
from ticketforge.structures.channels.graph import discover
from ticketforge.structures.channels.select import l1_scores
from ticketforge.structures.channels.surgery import channel_mask, fold_shifts


def _gate_targets(model, plan) -> list[list[tuple[str, torch.Tensor, torch.Tensor]]]:
    """Per group: (parameter name, indices along dim 0, group channel of each index) of what a gate scales."""
    params = dict(model.named_parameters())
    out = []
    for g in plan.groups:
        targets = []
        for m in g.gated():
            for p in ("weight", "bias"):
                name = f"{m.module}.{p}"
                if name in params:
                    targets.append((name, torch.tensor(m.idx), torch.tensor(m.root)))
        out.append(targets)
    return out


def search(ctx: SearchContext, method) -> SearchResult:
    model = ctx.model
    example = ctx.example(8)
    plan = discover(model, example)
    # MACs, or with a budget in speed, latency or bytes the measured cost (channels/cost.py)
    cost, target, cost_info = channel_cost.for_recipe(model, plan, ctx.recipe, example, ctx.ui.log)
    uniform = plan.uniform_counts(target, cost)
    smallest = [min(g.size, ctx.recipe.convert.round_to) for g in plan.groups]
    if plan.groups and cost(smallest) > target * cost.dense:
        # What no group holds (embeddings, streams left whole) costs more than the target: the units
        # would start with nothing to keep. Search at the smallest selection instead; the selection
        # step says the budget is out of reach.
        uniform = [float(c) for c in smallest]
        ctx.ui.log(f"search: the budget is below the smallest channel selection ({cost(smallest) / cost.dense:.3f} "
                   f"of the dense {cost.name}); searching at that")
    frac = min(max(uniform[0] / plan.groups[0].size if plan.groups else 1.0, 1e-3), 1 - 1e-3)
    per_channel = plan.marginal_costs(uniform, cost)
    scale = cost.dense  # costs in units of the dense model's cost keep GRADBALANCE's numbers O(1)
    names = [f"group{i}" for i in range(len(plan.groups))]
    params = dict(model.named_parameters())
    targets = [[(p, idx.to(ctx.device), root.to(ctx.device)) for p, idx, root in t]
               for t in _gate_targets(model, plan)]

    def overrides(soft):
        out = {}
        for n, group_targets in zip(names, targets):
            gate = soft[n]
            for pname, idx, root in group_targets:
                w = out.get(pname, params[pname])
                full = torch.ones(w.shape[0], device=w.device, dtype=gate.dtype).index_copy(0, idx, gate[root])
                out[pname] = w * full.to(w.dtype).view(-1, *[1] * (w.dim() - 1))
        return out

    units = Units(kind="channels", model=model, shapes={n: (g.size,) for n, g in zip(names, plan.groups)},
                  costs={n: torch.full((g.size,), c / scale) for n, g, c in zip(names, plan.groups, per_channel)},
                  kept=sum(c * k for c, k in zip(per_channel, uniform)) / scale, density=frac, apply=overrides,
                  magnitude=lambda: dict(zip(names, l1_scores(model, plan))), label="channels")
    found, info = method.score(ctx, units)
    scores = [(torch.sigmoid(found[n]) if method.gates else found[n]).cpu() for n in names]
    keep, sel = channel_cost.select_for(model, plan, scores, target, cost, ctx.recipe, example, ctx.ui.log)
    if not method.gates:
        # a gate at 0 removed its channel's shift during the search; a score that never saw the
        # channel go has it folded into the consumers instead
        sel["fold_spread"] = fold_shifts(model, plan, keep, example)
    mask = channel_mask(model, plan, keep)
    info.update(sel)
    info.update(cost_info)
    info.update(channel_cost.describe_kept(cost, [len(k) for k in keep]))
    info["kept_budget_units"] = f"fraction of dense {cost.name}" + (" (linearised)" if method.gates else "")
    _log_kept(ctx, info)
    return SearchResult(model=model, mask=mask, info=info)


def _log_kept(ctx: SearchContext, sel: dict) -> None:
    extra = (f", predicted {sel['predicted_speedup']:.2f}x at batch {sel['latency_table']['batch']}"
             if "predicted_speedup" in sel else f", predicted {sel['predicted_mb']:.3f} MB" if "predicted_mb" in sel
             else "")
    ctx.ui.log(f"search: kept {sel['macs_kept']:.3f} of the dense MACs over {sel['groups']} channel groups "
               f"(counts rounded to multiples of {sel['round_to']}){extra}")
