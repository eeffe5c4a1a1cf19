"""Wanda (Sun et al. 2023, "A Simple and Effective Pruning Approach for Large Language Models"):
a weight's score is |W_ij| * ||X_j||_2, its magnitude times the L2 norm of the input feature it
multiplies over all calibration tokens; no gradients, no weight update.

- Unstructured: every output unit keeps the same fraction of its weights (the paper's comparison
  group: per output, a Linear's row, a convolution's output channel), so no output is starved.
- N:M (a structure's "weights" units): the scores go to the structure, which keeps the N highest
  of every M along the reduction dimension, as the paper's N:M variant does.

A Linear's input feature is the last dim of its input; a convolution's is an input channel, its
norm taken over samples and spatial positions and shared by every kernel position (and, in a
grouped convolution, read from the channels of the weight's own group). The norms are collected in
one pass over the calibration sample (ticketforge.search.calibration) with every layer's input
from the dense model; the paper's code instead feeds each transformer block the output of the
already-pruned blocks before it. A layer the calibration forward never reaches (or calls by
keyword) scores by |W|."""
from __future__ import annotations

import torch
from torch import nn

from ticketforge.masks import Mask, keep_count, prunable
from ticketforge.search.base import SearchContext, SearchResult, Units
from ticketforge.search.calibration import Calibration, calibration, feature_dim
from ticketforge.search.start import starting_point


def owner(model: nn.Module, weight: str) -> nn.Module:
    """The layer a prunable weight (ticketforge.masks.prunable's name) belongs to."""
    return model.get_submodule(weight.rpartition(".")[0])


def input_norms(model: nn.Module, names: list[str], calib: Calibration) -> dict[str, torch.Tensor]:
    """name -> ||X_j||_2 of each input feature of the weight's layer over the calibration sample."""
    layers = {n: owner(model, n) for n in names}
    squares: dict[str, torch.Tensor] = {}

    def hook(name, module, args):
        if not args:  # called by keyword: scored by |W|
            return
        rows = calib.rows(args[0].detach(), feature_dim(module)).float()
        total = rows.pow(2).sum(0)
        squares[name] = squares[name] + total if name in squares else total

    handles = [m.register_forward_pre_hook(lambda mod, args, n=n: hook(n, mod, args)) for n, m in layers.items()]
    try:
        calib.run(model)
    finally:
        for h in handles:
            h.remove()
    return {n: s.sqrt() for n, s in squares.items()}


def input_scale(module: nn.Module, norms: torch.Tensor) -> torch.Tensor:
    """The input norms laid out to broadcast against the layer's weight."""
    w = module.weight
    if not isinstance(module, nn.modules.conv._ConvNd):
        return norms.reshape(1, -1)
    kernel = [1] * (w.dim() - 2)
    if module.transposed:  # weight (in, out / groups, *kernel)
        return norms.reshape(-1, 1, *kernel)
    groups = module.groups
    per_group = norms.reshape(groups, -1)  # (groups, in / groups)
    return per_group.repeat_interleave(w.shape[0] // groups, dim=0).reshape(w.shape[0], -1, *kernel)


def wanda_scores(model: nn.Module, names: list[str], calib: Calibration) -> dict[str, torch.Tensor]:
    norms = input_norms(model, names, calib)
    weights = prunable(model)
    out = {}
    for n in names:
        magnitude = weights[n].detach().abs().float()
        out[n] = magnitude * input_scale(owner(model, n), norms[n]).to(magnitude.device) if n in norms else magnitude
    return out


def output_rows(module: nn.Module, t: torch.Tensor) -> torch.Tensor:
    """(outputs, weights of each) view of a weight-shaped tensor: a Linear's rows, a convolution's
    output channels."""
    if isinstance(module, nn.modules.conv._ConvNd) and module.transposed:
        t = t.movedim(1, 0)
    return t.reshape(t.shape[0], -1)


def per_output_mask(model: nn.Module, scores: dict[str, torch.Tensor], sparsity: float) -> Mask:
    """Every output unit of every layer keeps its highest-scored weights, the same count in each."""
    mask = Mask()
    for n, s in scores.items():
        module = owner(model, n)
        rows = output_rows(module, s.detach().float().cpu())
        kept = torch.zeros_like(rows, dtype=torch.bool)
        kept.scatter_(1, torch.topk(rows, keep_count(rows.shape[1], sparsity), dim=1, sorted=False).indices, True)
        if isinstance(module, nn.modules.conv._ConvNd) and module.transposed:
            shape = s.movedim(1, 0).shape
            mask[n] = kept.reshape(shape).movedim(0, 1).contiguous()
        else:
            mask[n] = kept.reshape(s.shape)
    return mask


def wanda(ctx: SearchContext) -> SearchResult:
    start = starting_point(ctx)
    calib = calibration(ctx, start.model)
    scores = wanda_scores(start.model, list(prunable(start.model)), calib)
    mask = per_output_mask(start.model, scores, ctx.recipe.search.sparsity)
    info = {"method": "wanda", "calibration_samples": calib.samples, "comparison": "per output", **start.info}
    return SearchResult(model=start.model, mask=mask, info=info, scores=scores, schedule=start.schedule)


def score_units(ctx: SearchContext, units: Units) -> tuple[dict[str, torch.Tensor], dict]:
    """Wanda scores of the weights a structure asks about (N:M chooses within its groups)."""
    calib = calibration(ctx, units.model)
    return wanda_scores(units.model, list(units.shapes), calib), {"method": "wanda",
                                                                   "calibration_samples": calib.samples}
