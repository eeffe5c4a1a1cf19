"""Channel structure, step 3 of 4: surgery. A channel mask zeroes the removed channels' rows in
their producers *and* columns in their consumers, so the masked model computes exactly what the
shrunk one does; a shift a removed channel still carries (a BatchNorm beta through the
activation) is first folded into the consumers' biases. Removal itself is Torch-Pruning's prune
functions on the dependency groups."""
from __future__ import annotations

import copy

import torch
import torch_pruning as tp
from torch import nn

from ticketforge.macs import forward_with_hooks
from ticketforge.masks import Mask
from ticketforge.structures.channels import heads
from ticketforge.structures.channels.graph import ChannelGroup, ChannelPlan, _grouped, dependency_graph

def in_columns(mod: nn.Module, channels: list[int]) -> list[int]:
    """The weight columns that read these input channels: a grouped conv's weight holds each conv
    group's channels in the same columns (channel c in column c % (in_channels / groups))."""
    if _grouped(mod):
        per_group = mod.in_channels // mod.groups
        return sorted({c % per_group for c in channels})
    return channels


def dense_weight(mod: nn.Module) -> torch.Tensor:
    """The conv's weight as if it were not grouped: (out, in_channels, *kernel), zero across groups."""
    if not _grouped(mod):
        return mod.weight
    w = mod.weight
    out_per, in_per = w.shape[0] // mod.groups, w.shape[1]
    full = w.new_zeros((w.shape[0], mod.in_channels, *w.shape[2:]))
    for g in range(mod.groups):
        full[g * out_per:(g + 1) * out_per, g * in_per:(g + 1) * in_per] = w[g * out_per:(g + 1) * out_per]
    return full


def _removed(g: ChannelGroup, kept: torch.Tensor) -> torch.Tensor:
    gone = torch.ones(g.size, dtype=torch.bool)
    gone[kept] = False
    return gone


def channel_mask(model: nn.Module, plan: ChannelPlan, keep: list[torch.Tensor]) -> Mask:
    """The weight Mask of a channel selection: producer rows and consumer columns of removed channels."""
    mask = Mask.ones_like(model)
    mods = dict(model.named_modules())
    for g, kept in zip(plan.groups, keep):
        gone = _removed(g, kept)
        for m in g.members:
            if m.kind not in ("out", "in"):
                continue
            sel = [i for i, r in zip(m.idx, m.root) if gone[r]]
            w = mask[f"{m.module}.weight"]
            if m.kind == "out":
                w[sel] = False
            else:
                w[:, in_columns(mods[m.module], sel)] = False
    return mask


def keep_from_mask(plan: ChannelPlan, mask: Mask, model: nn.Module) -> list[torch.Tensor] | None:
    """The channel selection a mask expresses, or None if the mask is not channel-structured."""
    keep = []
    for g in plan.groups:
        alive = torch.zeros(g.size, dtype=torch.bool)
        for m in g.of("out"):
            rows = mask[f"{m.module}.weight"][m.idx].reshape(len(m.idx), -1).cpu()
            alive[torch.tensor(m.root)[rows.any(1)]] = True
        keep.append(alive.nonzero().flatten())
    expected = channel_mask(model, plan, keep)
    same = all(torch.equal(expected[k].cpu(), mask[k].cpu()) for k in expected)
    return keep if same else None


@torch.no_grad()
def fold_shifts(model: nn.Module, plan: ChannelPlan, keep: list[torch.Tensor], example: torch.Tensor) -> float:
    """Zero the removed channels' producers, then add what those channels still feed each consumer
    (a constant: BatchNorm's shift through the activation) to the consumer's bias, so that zeroing
    the consumer's columns changes nothing. Exact where the consumer is a Linear or an unpadded
    conv; at the borders of a zero-padded conv the constant's true contribution is smaller.
    Returns the largest spread of a removed channel's input (0 when it is truly constant)."""
    mods = dict(model.named_modules())
    example = example.to(next(model.parameters()).device)
    for g, kept in zip(plan.groups, keep):
        gone = _removed(g, kept)
        for m in g.of("out"):
            sel = [i for i, r in zip(m.idx, m.root) if gone[r]]
            mods[m.module].weight[sel] = 0
            if mods[m.module].bias is not None:
                mods[m.module].bias[sel] = 0
    consumers = {}
    for g, kept in zip(plan.groups, keep):
        gone = _removed(g, kept)
        for m in g.of("in"):
            consumers.setdefault(m.module, []).extend(i for i, r in zip(m.idx, m.root) if gone[r])
    inputs, hooks = {}, []
    for name in consumers:
        hooks.append(mods[name].register_forward_pre_hook(lambda mod, inp, name=name: inputs.__setitem__(name, inp[0])))
    forward_with_hooks(model, example, hooks)
    spread = 0.0
    for name, sel in consumers.items():
        if not sel:
            continue
        mod, x = mods[name], inputs[name]
        if isinstance(mod, nn.Linear):
            vals = x.reshape(-1, x.shape[-1])[:, sel]
            c = vals.mean(0)
            contrib = mod.weight[:, sel] @ c
        else:
            vals = x[:, sel].transpose(0, 1).reshape(len(sel), -1)
            c = vals.mean(1)
            contrib = dense_weight(mod)[:, sel].sum(dim=tuple(range(2, mod.weight.dim()))) @ c
        spread = max(spread, float((vals - c.unsqueeze(0 if isinstance(mod, nn.Linear) else 1)).abs().max()))
        if mod.bias is None:
            mod.bias = nn.Parameter(torch.zeros(mod.weight.shape[0], device=mod.weight.device, dtype=mod.weight.dtype))
        mod.bias += contrib
        mod.weight[:, in_columns(mod, sel)] = 0
    return spread


def shrink(model: nn.Module, plan: ChannelPlan, keep: list[torch.Tensor], example: torch.Tensor) -> nn.Module:
    """A copy of `model` with the removed channels physically gone (Torch-Pruning's prune functions
    on the dependency groups)."""
    model = copy.deepcopy(model).eval()
    example = example.to(next(model.parameters()).device)
    with torch.enable_grad():
        dg = dependency_graph(model, example)
        mods = dict(model.named_modules())
        for g, kept in zip(plan.groups, keep):
            if g.kind == "heads":
                continue
            removed = _removed(g, kept)
            # the root layer's channels of the removed units (a unit of a grouped conv is several)
            producer = next(m for m in g.of("out") if m.module == g.root)
            gone = [i for i, r in zip(producer.idx, producer.root) if removed[r]]
            if not gone:
                continue
            root = mods[g.root]
            fn = tp.prune_linear_out_channels if isinstance(root, nn.Linear) else tp.prune_conv_out_channels
            dg.get_pruning_group(root, fn, idxs=gone).prune()
    # Heads last: their projections' other dimension may have shrunk above, their own did not.
    for g, kept in zip(plan.groups, keep):
        if g.kind == "heads":
            heads.remove(model, g, kept)
    return model
