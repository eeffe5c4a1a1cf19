"""Which residual blocks to remove (layer pruning, "When Layers Play the Lottery"), scored by the
search method (CTS: ticketforge.search.cts.score_units).

With CTS, one Binary Concrete gate per block scales its residual branch, x + g f(x) (the units'
`apply`); the weights are frozen and the gates are trained with the CTS objective (the network's
outputs stay close to the dense network's) and GRADBALANCE on a MAC budget, cost = the block's MACs.
The trained gate logit is the block's score: the paper aggregates a data-driven score per block and leaves the
aggregation open; a gate over the whole block measures directly what the network loses without
that block, together with the other blocks' gates, instead of summing per-weight saliencies that
say nothing about the block as a unit. Blocks are removed lowest score first until the budget
holds: `search.blocks` blocks, or else the MACs fall to `search.target_macs` of the dense model;
at least one block always goes. Finding and removing blocks is ticketforge.structures.blocks."""
from __future__ import annotations

import copy

import torch

from ticketforge import budget
from ticketforge.errors import UserError
from ticketforge.macs import layer_macs
from ticketforge.search.base import SearchContext, SearchResult, Units
from ticketforge.structures.blocks.cost import block_costs
from ticketforge.structures.blocks.residual import choose, gate_name, install_gates, removable_blocks, remove_blocks


def search(ctx: SearchContext, method) -> SearchResult:
    cfg = ctx.recipe.search
    example = ctx.example(2)
    names = removable_blocks(ctx.model, example)
    if not names:
        raise UserError("layer pruning: the model has no removable residual block (looked for submodules that add "
                        "their own input to a branch computed from it with weights: x + f(x), act(x + f(x)), "
                        "norm(x + f(x))); use a channel or unstructured recipe")
    if cfg.blocks > len(names):
        raise UserError(f"search.blocks={cfg.blocks}, but the model has only {len(names)} removable blocks "
                        f"({', '.join(names)})")
    counted = layer_macs(ctx.model, example)
    macs = {n: counted.within(n) for n in names}
    # what the budget is met on: MACs, or measured latency or bytes with a budget in those
    block_cost, total, target, cost_info = block_costs(ctx.model, names, ctx.recipe, ctx.example(8), ctx.ui.log)
    ctx.ui.log(f"layer pruning: {len(names)} removable blocks: "
               + ", ".join(f"{n} ({block_cost[n] / total:.1%} of {cost_info['cost']})" for n in names))

    # Search: one gate per block on a copy whose blocks scale their branch by the gate.
    gated = install_gates(copy.deepcopy(ctx.model), names, example)
    keys = {n: gate_name(n) for n in names}
    if cfg.blocks:
        costs = {keys[n]: torch.ones(()) for n in names}
        kept_cost = float(len(names) - cfg.blocks)
    else:
        # costs as fractions of the dense model's: GRADBALANCE only sees their ratios to the budget
        costs = {keys[n]: torch.tensor(float(block_cost[n] / total)) for n in names}
        kept_cost = max(0.0, target - (1 - sum(block_cost.values()) / total))
    density = min(max(kept_cost / float(sum(c for c in costs.values())), 0.05), 0.95)
    units = Units(kind="blocks", model=gated, shapes={k: () for k in costs}, costs=costs,
                  kept=max(kept_cost, 1.0) if cfg.blocks else max(kept_cost, 1e-3), density=density,
                  apply=lambda soft: soft, label="blocks")
    trained, info = method.score(ctx, units)
    scores = {n: float(trained[keys[n]]) for n in names}

    chosen = choose(scores, block_cost, total, cfg.blocks, target)
    model = remove_blocks(ctx.model, chosen, example=example)
    kept = counted.total - sum(macs[n] for n in chosen)
    kept_cost = total - sum(block_cost[n] for n in chosen)
    info.update({"candidates": names, "removed": chosen,
                 "scores": scores, "block_macs": macs, "macs_kept_fraction": kept / counted.total,
                 "block_costs": block_cost, "cost_total": total, "cost_kept": kept_cost / total, **cost_info,
                 "budget": f"{cfg.blocks} blocks" if cfg.blocks else
                 (budget.describe(ctx.recipe) or f"target_macs {cfg.target_macs:g}")})
    if "latency_table" in cost_info:
        info["predicted_speedup"] = total / max(kept_cost, 1e-12)
    notes = [f"layer pruning removed {len(chosen)} of {len(names)} residual blocks ({', '.join(chosen)}); "
             f"{kept / counted.total:.1%} of the MACs kept"
             + (f", predicted {info['predicted_speedup']:.2f}x" if "predicted_speedup" in info else "")]
    if not cfg.blocks and kept_cost > target * total:
        notes.append(f"the budget ({info['budget']}) is beyond what removing every removable block reaches "
                     f"({kept_cost / total:.1%} of the dense {cost_info['cost']})")
    info["notes"] = notes
    ctx.ui.log(notes[0])
    return SearchResult(model=model, mask=None, info=info)
