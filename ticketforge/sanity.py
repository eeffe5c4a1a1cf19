"""Sanity checks of a ticket (Frankle et al. 2021, "Pruning Neural Networks at Initialization: Why
are We Missing the Mark?"): if a ticket is more than a choice of per-layer densities, each of these
variants, trained with the same budget as the real ticket, must do *worse* than it.

- shuffled: every layer's mask permuted at random (same per-layer density, random positions);
- inverted: the lowest scores kept instead of the highest (same total count);
- reinit:   the same mask on freshly initialised weights.
"""
from __future__ import annotations

import copy

import torch
from torch import nn

from ticketforge import finetune
from ticketforge.data import DataBundle
from ticketforge.finetune import Schedule
from ticketforge.masks import Mask, global_topk
from ticketforge.recipe import Recipe
from ticketforge.structures import Structure
from ticketforge.ui import SILENT, UI

VARIANTS = ("shuffled", "inverted", "reinit")


def shuffled(mask: Mask, seed: int = 0) -> Mask:
    g = torch.Generator().manual_seed(seed)
    out = Mask()
    for k, m in mask.items():
        flat = m.reshape(-1).cpu()
        out[k] = flat[torch.randperm(flat.numel(), generator=g)].reshape(m.shape)
    return out


def inverted(scores: dict[str, torch.Tensor], keep: int) -> Mask:
    return global_topk({k: -s.detach().float() for k, s in scores.items()}, keep)


def variants(model: nn.Module, mask: Mask, scores: dict | None, fresh, seed: int) -> dict:
    """name -> (weights, mask) of every variant that can be built; name -> reason for the others.
    `fresh()` returns a new initialisation of the architecture, or raises."""
    out, skipped = {}, {}
    out["shuffled"] = (copy.deepcopy(model), shuffled(mask, seed))
    if scores is not None:
        out["inverted"] = (copy.deepcopy(model), inverted(scores, mask.kept))
    else:
        skipped["inverted"] = "the search method gives no per-weight scores"
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed + 1)  # never the init a rewind/init start drew from `seed`
            out["reinit"] = (fresh().to(next(model.parameters()).device), Mask(mask))
    except Exception as exc:  # no --arch, TorchScript: the check cannot be built, the run goes on
        skipped["reinit"] = str(exc)
    return out, skipped


def run(model: nn.Module, mask: Mask, scores: dict | None, fresh, recipe: Recipe, schedule: Schedule,
        structure: Structure, bundle: DataBundle, device: torch.device, seed: int = 0, ui: UI = SILENT,
        teacher: nn.Module | None = None) -> dict:
    """Train every variant exactly as the ticket is trained (finetune.fit: the same schedule, BatchNorm
    re-estimation, the structure's training hook and distillation from `teacher`). `model` holds the
    weights the ticket starts fine-tuning from (it is not changed)."""
    built, skipped = variants(model, mask, scores, fresh, seed)
    results = {}
    for name, (net, m) in built.items():
        ui.log(f"sanity check: {name} ticket ({m.kept:,} of {m.total:,} weights kept)")
        tuned = finetune.fit(net, m, schedule, bundle, device, seed=seed,
                             bn_recalibrate=recipe.finetune.bn_recalibrate, mask_scale=structure.mask_scale(recipe),
                             ui=ui, desc=f"sanity: {name}", teacher=teacher)
        results[name] = {"accuracy": tuned.accuracy, "kept": m.kept,
                         "per_layer_density": {k: float(v.float().mean()) for k, v in m.items()}}
    return {"variants": results, "skipped": skipped, "epochs": schedule.epochs}


def to_markdown(section: dict, ticket_acc: float) -> list[str]:
    lines = ["", f"Sanity checks (each variant trained with the ticket's budget, {section['epochs']} epochs; "
             "a real ticket beats them all):", "", "| ticket | validation accuracy | vs ticket |", "|---|---:|---:|",
             f"| the ticket | {100 * ticket_acc:.2f}% | |"]
    for name, v in section["variants"].items():
        lines.append(f"| {name} | {100 * v['accuracy']:.2f}% | {100 * (v['accuracy'] - ticket_acc):+.2f} |")
    for name, why in section["skipped"].items():
        lines.append(f"| {name} | not run: {why} | |")
    return lines
