"""cts-blocks: which residual blocks to remove (layer pruning, "When Layers Play the Lottery").

One Binary Concrete gate per block scales its residual branch, x + g f(x); the weights are frozen
and the gates are trained with the CTS objective (the network's outputs stay close to the dense
network's) and GRADBALANCE on a MAC budget, cost = the block's MACs (search/cts.py). The trained
gate logit is the block's score: the paper aggregates a data-driven score per block and leaves the
aggregation open; a gate over the whole block measures directly what the network loses without
that block, together with the other blocks' gates, instead of summing per-weight saliencies that
say nothing about the block as a unit. Blocks are removed lowest score first until the budget
holds: `search.blocks` blocks, or else the MACs fall to `search.target_macs` of the dense model;
at least one block always goes. Finding and removing blocks is ticketforge.structures.blocks."""
from __future__ import annotations

import copy
import dataclasses
import math

import torch

from ticketforge.errors import UserError
from ticketforge.macs import layer_macs
from ticketforge.search.base import SearchContext, SearchResult
from ticketforge.search.cts import concrete_search
from ticketforge.structures.blocks.residual import choose, gate_name, install_gates, removable_blocks, remove_blocks


def cts_blocks(ctx: SearchContext) -> SearchResult:
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
    total = counted.total
    macs = {n: counted.within(n) for n in names}
    ctx.ui.log(f"layer pruning: {len(names)} removable blocks: "
               + ", ".join(f"{n} ({macs[n] / total:.1%} of MACs)" for n in names))

    # Search: one gate per block on a copy whose blocks scale their branch by the gate.
    gated = install_gates(copy.deepcopy(ctx.model), names, example)
    keys = {n: gate_name(n) for n in names}
    if cfg.blocks:
        costs = {keys[n]: torch.ones(()) for n in names}
        kept_cost = float(len(names) - cfg.blocks)
    else:
        costs = {keys[n]: torch.tensor(float(macs[n])) for n in names}
        kept_cost = max(0.0, cfg.target_macs * total - (total - sum(macs.values())))
    density = min(max(kept_cost / float(sum(c for c in costs.values())), 0.05), 0.95)
    logits = {k: torch.full((), math.log(density / (1 - density))) for k in costs}
    trained, info = concrete_search(dataclasses.replace(ctx, model=gated), logits, costs, max(kept_cost, 1.0),
                                    overrides=lambda soft: soft, desc="search (block gates)")
    scores = {n: float(trained[keys[n]]) for n in names}

    chosen = choose(scores, macs, total, cfg.blocks, cfg.target_macs)
    model = remove_blocks(ctx.model, chosen, example=example)
    kept = total - sum(macs[n] for n in chosen)
    info.update({"method": "cts-blocks", "candidates": names, "removed": chosen,
                 "scores": scores, "block_macs": macs, "macs_kept_fraction": kept / total,
                 "budget": f"{cfg.blocks} blocks" if cfg.blocks else f"target_macs {cfg.target_macs:g}"})
    notes = [f"layer pruning removed {len(chosen)} of {len(names)} residual blocks ({', '.join(chosen)}); "
             f"{kept / total:.1%} of the MACs kept"]
    if not cfg.blocks and kept > cfg.target_macs * total:
        notes.append(f"search.target_macs={cfg.target_macs:g} is below what removing every removable block "
                     f"reaches ({kept / total:.1%})")
    info["notes"] = notes
    ctx.ui.log(notes[0])
    return SearchResult(model=model, mask=None, info=info)
