"""Whole attention heads as channel groups, as Torch-Pruning does for HF ViT and BERT.

The query, key and value projections of an attention layer are reshaped into heads, so their
output channels can only go a whole head at a time: one group per attention layer, one unit per
head, each unit the head's `head_dim` rows of the query, key and value projections (weights and
biases), the head's columns of the output projection, and the head's column of any per-head table
(Swin's relative position bias). Removing head h changes nothing else: the masked model (rows and
columns zeroed) computes what the shrunk one does, since the output projection no longer reads
what head h computes. HF's attention layers infer the number of heads from the projections'
width (`view(..., -1, head_dim)`); the head-count attributes are updated too, for the code that
reads them.

Found by the names HF gives the projections (q_proj/k_proj/v_proj, query/key/value,
q_lin/k_lin/v_lin) next to a head-count attribute; the output projection is the Linear that reads
the value projection's channels in Torch-Pruning's dependency graph."""
from __future__ import annotations

import torch
import torch_pruning as tp
from torch import nn

from ticketforge.structures.channels.group import ChannelGroup, Member

PROJECTIONS = (("q_proj", "k_proj", "v_proj"), ("query", "key", "value"), ("q_lin", "k_lin", "v_lin"))
HEAD_COUNT = ("num_attention_heads", "n_heads", "num_heads")
HEAD_WIDTH = ("all_head_size",)


def attention_layers(model: nn.Module, min_heads: int = 2) -> list[tuple[str, int, tuple[str, str, str]]]:
    """(attention module name, heads, (q, k, v) module names) of every attention layer found."""
    found = []
    for name, mod in model.named_modules():
        heads = next((getattr(mod, a) for a in HEAD_COUNT if isinstance(getattr(mod, a, None), int)), None)
        if heads is None or heads < min_heads:
            continue
        for names in PROJECTIONS:
            projs = [getattr(mod, n, None) for n in names]
            if all(isinstance(p, nn.Linear) for p in projs) and len({p.out_features for p in projs}) == 1 \
                    and projs[0].out_features % heads == 0:
                found.append((name, heads, tuple(f"{name}.{n}" if name else n for n in names)))
                break
    return found


def groups(model: nn.Module, dg: tp.DependencyGraph, names: dict) -> tuple[list, list[str], set[str]]:
    """(head groups, why some attention layers were left whole, the projections they cover)."""
    mods = dict(model.named_modules())
    out, skipped, covered = [], [], set()
    for attn, heads, (q, k, v) in attention_layers(model):
        width = mods[q].out_features
        d = width // heads
        readers = []
        for item in dg.get_pruning_group(mods[v], tp.prune_linear_out_channels, idxs=list(range(width))):
            target = item.dep.target.module
            if isinstance(target, nn.Linear) and target not in (mods[q], mods[k], mods[v]) \
                    and not dg.is_out_channel_pruning_fn(item.dep.handler) and target.in_features == width:
                readers.append(names[target])
        covered.update((q, k, v))
        if len(set(readers)) != 1:
            skipped.append(f"{attn}: attention heads left whole (the value projection is read by "
                           f"{len(set(readers))} layers, expected one output projection)")
            continue
        root = [h for h in range(heads) for _ in range(d)]
        members = [Member(p, "out", list(range(width)), root) for p in (q, k, v)]
        members.append(Member(readers[0], "in", list(range(width)), root))
        for pname, p in mods[attn].named_parameters():
            owner = pname.rpartition(".")[0]
            if p.dim() == 2 and p.shape[-1] == heads and not isinstance(mods[attn].get_submodule(owner) if owner else
                                                                     mods[attn], nn.Linear):
                members.append(Member(f"{attn}.{pname}" if attn else pname, "param", list(range(heads)),
                                      list(range(heads))))
        out.append(ChannelGroup(root=attn, size=heads, members=members, unit=d, gate=(v,), kind="heads"))
    return out, skipped, covered


@torch.no_grad()
def remove(model: nn.Module, group, kept: torch.Tensor) -> None:
    """Shrink one attention layer to its kept heads, in place."""
    mods = dict(model.named_modules())
    kept_heads = sorted(int(h) for h in kept)
    gone_heads = [h for h in range(group.size) if h not in kept_heads]
    if not gone_heads:
        return
    for m in group.members:
        gone = [i for i, r in zip(m.idx, m.root) if r in gone_heads]
        if m.kind == "out":
            tp.prune_linear_out_channels(mods[m.module], gone)
        elif m.kind == "in":
            tp.prune_linear_in_channels(mods[m.module], gone)
        elif m.kind == "param":
            owner_name, _, attr = m.module.rpartition(".")
            owner = mods[owner_name]
            old = getattr(owner, attr)
            setattr(owner, attr, nn.Parameter(old[:, kept_heads].clone(), requires_grad=old.requires_grad))
    attn = mods[group.root]
    for a in HEAD_COUNT:
        if isinstance(getattr(attn, a, None), int):
            setattr(attn, a, len(kept_heads))
    for a in HEAD_WIDTH:
        if isinstance(getattr(attn, a, None), int):
            setattr(attn, a, len(kept_heads) * group.unit)


def spec_attrs(model: nn.Module) -> dict[str, dict]:
    """The head-count attributes of every attention layer, for the architecture spec."""
    out = {}
    for name, heads, _ in attention_layers(model, min_heads=1):
        mod = model.get_submodule(name)
        out[name] = {a: getattr(mod, a) for a in HEAD_COUNT + HEAD_WIDTH if isinstance(getattr(mod, a, None), int)}
    return out
