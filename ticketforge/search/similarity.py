"""Residual blocks ranked by how much they change the hidden state (ShortGPT, Men et al. 2024, "Block
Influence"): BI = 1 - mean cos(h_in, h_out) over the calibration tokens, h_in the block's input (the
residual stream) and h_out its output. A block whose output is nearly its input scores near 0 and
goes first. One pass over the calibration sample, no gradients; only a score for the `blocks`
structure's units (it has no weight-level search).

A token is a row of the hidden state along its features: the last dim of a transformer's (N, L, D),
a convolution's channels at one pixel of (N, C, H, W) (a block with a convolution in it); the
cosine of every position is averaged, positions an attention mask zeroes left out."""
from __future__ import annotations

import torch
from torch import nn

from ticketforge.search.base import SearchContext, Units
from ticketforge.search.calibration import calibration
from ticketforge.structures.blocks.residual import GatedBlock, gate_name

UNSEEN = 2.0


def _first_tensor(value):
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, (tuple, list)) and value and isinstance(value[0], torch.Tensor):
        return value[0]
    return getattr(value, "last_hidden_state", None)


def block_influence(model: nn.Module, blocks: dict[str, nn.Module], calib) -> dict[str, float]:
    """name -> 1 - mean cos(input, output) of each block over the calibration sample."""
    sums = {n: torch.zeros((), dtype=torch.float64) for n in blocks}
    counts = dict.fromkeys(blocks, 0)
    inputs = {}

    def feature_dim(block):
        return 1 if any(isinstance(m, nn.modules.conv._ConvNd) for m in block.modules()) else -1

    def before(name, block, args, kwargs):
        given = {**dict(zip(block.params, args)), **kwargs}
        inputs[name] = given.get(block.tensors[0])

    def after(name, block, args, kwargs, out):
        h_in, h_out = inputs.pop(name, None), _first_tensor(out)
        if h_in is None or h_out is None or h_in.shape != h_out.shape:
            return
        dim = feature_dim(block)
        a, b = calib.rows(h_in.detach(), dim).float(), calib.rows(h_out.detach(), dim).float()
        cos = nn.functional.cosine_similarity(a, b, dim=-1)
        sums[name] += cos.sum().double().cpu()
        counts[name] += cos.numel()

    handles = []
    for n, b in blocks.items():
        handles.append(b.register_forward_pre_hook(lambda m, a, k, n=n: before(n, m, a, k), with_kwargs=True))
        handles.append(b.register_forward_hook(lambda m, a, k, o, n=n: after(n, m, a, k, o), with_kwargs=True))
    try:
        calib.run(model)
    finally:
        for h in handles:
            h.remove()
    # a block whose input or output was not seen gets BI's upper bound (cos -1): it goes last
    return {n: 1.0 - float(sums[n]) / counts[n] if counts[n] else UNSEEN for n in blocks}


def score_units(ctx: SearchContext, units: Units) -> tuple[dict[str, torch.Tensor], dict]:
    """The blocks' BI (higher = keep) under their gates' names, as the blocks structure reads them."""
    blocks = {n: m for n, m in units.model.named_modules()
              if isinstance(m, GatedBlock) and gate_name(n) in units.shapes}
    calib = calibration(ctx, units.model)
    influence = block_influence(units.model, blocks, calib)
    return ({gate_name(n): torch.tensor(v) for n, v in influence.items()},
            {"method": "similarity", "calibration_samples": calib.samples,
             "block_influence": {n: round(v, 6) for n, v in influence.items()}})
