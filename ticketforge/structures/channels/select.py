"""Channel structure, step 2 of 4: selection. Which channels of each coupled group stay, from any
per-channel scores, under a MAC budget, with kept counts rounded to the runtime's vector width."""
from __future__ import annotations

import torch
from torch import nn

from ticketforge.masks import Mask
from ticketforge.structures.channels.graph import ChannelPlan

def allowed_counts(size: int, round_to: int, unit: int = 1) -> list[int]:
    """Kept counts a group may take: multiples of round_to channels (at least one), or all of it.
    A group of `unit`-channel units (attention heads) rounds whole units: any count of 64-wide heads."""
    step = max(1, -(-round_to // unit))
    return sorted({size} | {m for m in range(step, size, step)})


def select(plan: ChannelPlan, scores: list[torch.Tensor], target: float, round_to: int,
           cost=None) -> tuple[list[torch.Tensor], dict]:
    """Kept channels per group: starting from all, repeatedly drop the chunk (down to the next
    allowed count) with the least score per MAC saved, until the exact MACs meet target x dense.
    Rounding is part of the search, so the budget holds for the counts actually exported.
    `cost` (channels/cost.py: measured latency, bytes) replaces the MACs where a budget is in those."""
    measure = cost or plan.macs
    budget = target * (cost.dense if cost is not None else plan.dense_macs)
    order = [torch.argsort(s.float().cpu(), descending=True) for s in scores]
    counts = [g.size for g in plan.groups]
    current = measure(counts)
    while current > budget:
        best = None
        for i, g in enumerate(plan.groups):
            lower = [c for c in allowed_counts(g.size, round_to, g.unit) if c < counts[i]]
            if not lower:
                continue
            trial = list(counts)
            trial[i] = lower[-1]
            saved = current - measure(trial)
            lost = float(scores[i].float().cpu()[order[i][lower[-1]:counts[i]]].sum())
            ratio = lost / max(saved, 1e-12)
            if best is None or ratio < best[0]:
                best = (ratio, trial)
        if best is None:
            break
        counts = best[1]
        current = measure(counts)
    counts, current = _give_back(plan, scores, order, counts, current, budget, round_to, measure)
    keep = [order[i][:counts[i]].sort().values for i in range(len(plan.groups))]
    narrow = [g.root for g in plan.groups if allowed_counts(g.size, round_to, g.unit) == [g.size]]
    info = {"groups": len(plan.groups), "kept_channels": {g.root: int(c) for g, c in zip(plan.groups, counts)},
            "group_sizes": {g.root: g.size for g in plan.groups},
            "macs_kept": plan.macs(counts) / max(plan.dense_macs, 1e-12),
            "target_macs": target, "round_to": round_to, "budget_met": current <= budget * (1 + 1e-9) + 1e-6,
            "left_whole": plan.skipped, "narrower_than_round_to": narrow}
    # Groups that cannot shrink are said in the report, not only in its tables: a reader of "kept
    # 0.9 of the MACs" should see which channels were never on offer, and why.
    whole = ([f"channels: {len(narrow)} group(s) no wider than convert.round_to ({round_to}) stay whole: "
              f"{', '.join(narrow[:4])}{' ...' if len(narrow) > 4 else ''}"] if narrow else []) + \
            ([f"channels: {len(plan.skipped)} group(s) left whole: {'; '.join(plan.skipped[:3])}"
              f"{' ...' if len(plan.skipped) > 3 else ''}"] if plan.skipped else [])
    if cost is not None:
        del info["target_macs"]
        info.update({"cost": cost.name, "target_cost": target, "cost_kept": current / max(cost.dense, 1e-12)})
        if not info["budget_met"]:
            whole.insert(0, f"channels: every prunable group is at its smallest count and the predicted {cost.name} "
                            f"is still {info['cost_kept']:.3f} of dense, above the {target:.3f} the budget needs "
                            f"(groups left whole: {len(plan.skipped)})")
        if whole:
            info["notes"] = whole
        return keep, info
    if not info["budget_met"]:
        whole.insert(0, f"channels: kept {info['macs_kept']:.3f} of the dense MACs, above search.target_macs "
                        f"{target:g}: every prunable group is at its smallest count (groups left whole: "
                        f"{len(plan.skipped)})")
    if whole:
        info["notes"] = whole
    return keep, info


def _give_back(plan, scores, order, counts, current, budget, round_to, measure):
    """The last chunk dropped usually overshoots the budget by most of a chunk: put back, best score
    per unit of cost first, every chunk that still fits."""
    if current > budget:
        return counts, current
    while True:
        best = None
        for i, g in enumerate(plan.groups):
            higher = [c for c in allowed_counts(g.size, round_to) if c > counts[i]]
            if not higher:
                continue
            trial = list(counts)
            trial[i] = higher[0]
            value = measure(trial)
            if value > budget:
                continue
            gained = float(scores[i].float().cpu()[order[i][counts[i]:higher[0]]].sum())
            if gained <= 0:  # channels a tightened ticket already emptied stay out
                continue
            ratio = gained / max(value - current, 1e-12)
            if best is None or ratio > best[0]:
                best = (ratio, trial, value)
        if best is None:
            return counts, current
        counts, current = best[1], best[2]


def l1_scores(model: nn.Module, plan: ChannelPlan) -> list[torch.Tensor]:
    """L1 norm of each channel's producer rows, summed over the group's producers and divided by the
    group's mean so that groups of different layers compare."""
    params = dict(model.named_modules())
    out = []
    for g in plan.groups:
        s = torch.zeros(g.size)
        for m in g.of("out"):
            w = params[m.module].weight.detach().float().cpu()
            s.index_add_(0, torch.tensor(m.root), w[m.idx].abs().reshape(len(m.idx), -1).sum(1))
        out.append(s / s.mean().clamp_min(1e-12))
    return out


def mask_density_scores(plan: ChannelPlan, mask: Mask) -> list[torch.Tensor]:
    """Fraction of each channel's producer weights an (unstructured) mask keeps."""
    out = []
    for g in plan.groups:
        kept, total = torch.zeros(g.size), torch.zeros(g.size)
        for m in g.of("out"):
            rows = mask[f"{m.module}.weight"][m.idx].reshape(len(m.idx), -1).float().cpu()
            kept.index_add_(0, torch.tensor(m.root), rows.sum(1))
            total.index_add_(0, torch.tensor(m.root), torch.full((len(m.idx),), float(rows.shape[1])))
        out.append(kept / total.clamp_min(1))
    return out


