"""Whole attention heads as channel groups, as Torch-Pruning does for HF ViT, BERT and Llama.

The query, key and value projections of an attention layer are reshaped into heads, so their
output channels can only go a whole head at a time: one group per attention layer, one unit per
key/value head, each unit that head's `head_dim` rows of the key and value projections, the rows
of the query heads that read it, the same query heads' columns of the output projection, and the
head's column of any per-head table (Swin's relative position bias). With grouped-query attention
(Llama, Qwen2: fewer key/value heads than query heads, each shared by `heads / kv_heads` query
heads) a unit is a whole KV group, so every kept key/value head keeps all the query heads it
serves and the ratio HF's `repeat_kv` reads stays what it was; without (BERT, ViT, GPT-2) a unit is
one head. Removing a unit changes nothing else: the masked model (rows and columns zeroed) computes
what the shrunk one does, since the output projection no longer reads what those heads compute.
HF's attention layers infer the number of heads from the projections' width (`view(..., -1,
head_dim)`); the head-count and width attributes are updated too, for the code that reads them.

Found by the names HF gives the projections (q_proj/k_proj/v_proj, query/key/value,
q_lin/k_lin/v_lin, or GPT-2's fused c_attn, rows [q | k | v]) next to a head-count or head-width
attribute. The output projection is the layer's own Linear that reads the heads (o_proj, c_proj,
out_lin); such a layer is one node of Torch-Pruning's graph (`opaque`). Where the
output projection sits outside the layer (BERT's and ViT's SelfOutput) it is the Linear that reads
the value projection's channels in the dependency graph."""
from __future__ import annotations

import contextlib
import inspect
from dataclasses import dataclass

import torch
import torch_pruning as tp
from torch import nn

from ticketforge.structures.channels.group import ChannelGroup, Member

PROJECTIONS = (("q_proj", "k_proj", "v_proj"), ("query", "key", "value"), ("q_lin", "k_lin", "v_lin"))
FUSED = (("c_attn", "split_size"),)  # (fused q|k|v projection, the attribute holding one part's width)
HEAD_COUNT = ("num_attention_heads", "n_heads", "num_heads")
KV_HEAD_COUNT = ("num_key_value_heads",)
HEAD_DIM = ("head_dim", "attention_head_size")
HEAD_WIDTH = ("all_head_size", "split_size")


@dataclass
class Attention:
    """One attention layer: its projections (names relative to it) and head counts."""

    heads: int                      # query heads
    kv_heads: int                   # key/value heads: fewer with grouped-query attention
    head_dim: int
    parts: tuple                    # ((module, first row, rows), ...) of q, k and v, in that order
    out: str | None                 # its own output projection; None: a sibling (BERT's SelfOutput)

    @property
    def fused(self) -> bool:
        return len({p[0] for p in self.parts}) == 1


def _int_attr(mod: nn.Module, names) -> int | None:
    return next((getattr(mod, a) for a in names if isinstance(getattr(mod, a, None), int)), None)


def describe(mod: nn.Module) -> Attention | None:
    """The attention layer `mod` is, or None."""
    count, dim = _int_attr(mod, HEAD_COUNT), _int_attr(mod, HEAD_DIM)
    found = None
    for names in PROJECTIONS:
        projs = [getattr(mod, n, None) for n in names]
        if all(isinstance(p, nn.Linear) for p in projs):
            q, k, v = projs
            d = dim or (q.out_features // count if count else None)
            if not d or k.out_features != v.out_features or q.out_features % d or k.out_features % d:
                return None
            found = (q.out_features // d, k.out_features // d, d,
                     tuple((n, 0, p.out_features) for n, p in zip(names, projs)))
            break
    for name, width_attr in FUSED:
        proj, width = getattr(mod, name, None), getattr(mod, width_attr, None)
        if found is None and isinstance(proj, nn.Linear) and isinstance(width, int) and count \
                and proj.out_features == 3 * width and width % count == 0:
            found = (count, count, width // count, tuple((name, i * width, width) for i in range(3)))
    if found is None:
        return None
    heads, kv, d, parts = found
    if (count is not None and count != heads) or not kv or heads % kv:
        return None
    inputs = {id(getattr(mod, p[0])) for p in parts}
    outs = [n for n, c in mod.named_modules() if isinstance(c, nn.Linear) and id(c) not in inputs
            and c.in_features == heads * d]
    return Attention(heads, kv, d, parts, outs[0] if len(outs) == 1 else None)


def attention_layers(model: nn.Module, min_units: int = 2) -> list[tuple[str, Attention]]:
    """(name, description) of every attention layer with at least `min_units` key/value heads."""
    found = []
    for name, mod in model.named_modules():
        att = describe(mod)
        if att is not None and att.kv_heads >= min_units:
            found.append((name, att))
    return found


def _full(attn: str, rel: str) -> str:
    return f"{attn}.{rel}" if attn else rel


class _LayerPruner(tp.pruner.function.BasePruningFunc):
    """An attention layer with its own output projection as one node of Torch-Pruning's graph: its
    input channels are its projections' inputs, its output channels the output projection's."""

    TARGET_MODULES = None

    def _parts(self, layer):
        att = describe(layer)
        ins = {p[0]: layer.get_submodule(p[0]) for p in att.parts}
        return list(ins.values()), layer.get_submodule(att.out)

    def prune_out_channels(self, layer, idxs):
        tp.prune_linear_out_channels(self._parts(layer)[1], idxs)
        return layer

    def prune_in_channels(self, layer, idxs):
        for proj in self._parts(layer)[0]:
            tp.prune_linear_in_channels(proj, idxs)
        return layer

    def get_out_channels(self, layer):
        return self._parts(layer)[1].out_features

    def get_in_channels(self, layer):
        return self._parts(layer)[0][0].in_features


def _first_input(mod: nn.Module, args: tuple, kwargs: dict):
    if args:
        return args[0]
    first = next(iter(inspect.signature(mod.forward).parameters), None)
    return kwargs.get(first)


def _passes_input(mod, args, kwargs, out):
    x = _first_input(mod, args, kwargs)
    main = out[0] if isinstance(out, tuple) else out
    if not isinstance(x, torch.Tensor) or not isinstance(main, torch.Tensor) or x.shape != main.shape:
        return None
    return (x * 1, *out[1:]) if isinstance(out, tuple) else x * 1


@contextlib.contextmanager
def opaque(model: nn.Module):
    """While Torch-Pruning traces `model`: each attention layer that holds its own output projection
    returns its input as its output (same width), so the traced graph holds the layer as one node
    (`_LayerPruner`: its channels in and out are the residual stream's) and nothing of its inside.
    Tracing through rotary embeddings and repeated KV heads makes Torch-Pruning's group search run
    for minutes on a two-layer Llama; what the inside couples is heads.py's. Yields Torch-Pruning's
    `customized_pruners` (per class: every layer of the class is one node)."""
    pruner, pruners, hooks = _LayerPruner(), {}, []
    for _, mod in model.named_modules():
        att = describe(mod)
        if att is not None and att.out is not None:
            pruners[type(mod)] = pruner
            hooks.append(mod.register_forward_hook(_passes_input, with_kwargs=True))
    try:
        yield pruners
    finally:
        for h in hooks:
            h.remove()


def groups(model: nn.Module, dg: tp.DependencyGraph, names: dict) -> tuple[list, list[str], set[str]]:
    """(head groups, why some attention layers were left whole, the projections they cover)."""
    mods = dict(model.named_modules())
    out, skipped, covered = [], [], set()
    for attn, att in attention_layers(model, min_units=1):
        d, r = att.head_dim, att.heads // att.kv_heads
        q, k, v = (_full(attn, p[0]) for p in att.parts)
        covered.update((q, k, v))
        if att.kv_heads < 2:
            continue  # one key/value head: nothing to choose from
        width = att.heads * d
        if att.out is not None:
            readers = [_full(attn, att.out)]
        else:
            readers = []
            for item in dg.get_pruning_group(mods[v], tp.prune_linear_out_channels, idxs=list(range(width))):
                target = item.dep.target.module
                if isinstance(target, nn.Linear) and target not in (mods[q], mods[k], mods[v]) \
                        and not dg.is_out_channel_pruning_fn(item.dep.handler) and target.in_features == width:
                    readers.append(names[target])
        if len(set(readers)) != 1:
            skipped.append(f"{attn}: attention heads left whole (the value projection is read by "
                           f"{len(set(readers))} layers, expected one output projection)")
            continue
        query_root = [h // r for h in range(att.heads) for _ in range(d)]
        kv_root = [g for g in range(att.kv_heads) for _ in range(d)]
        members = []
        for (rel, first, rows), part, root in zip(att.parts, "qkv", (query_root, kv_root, kv_root)):
            members.append(Member(_full(attn, rel), "out", list(range(first, first + rows)), root,
                                  part=part if att.fused else ""))
        members.append(Member(readers[0], "in", list(range(width)), query_root))
        for pname, p in mods[attn].named_parameters():
            owner = pname.rpartition(".")[0]
            if r == 1 and p.dim() == 2 and p.shape[-1] == att.heads and not isinstance(
                    mods[attn].get_submodule(owner) if owner else mods[attn], nn.Linear):
                members.append(Member(_full(attn, pname), "param", list(range(att.heads)), list(range(att.heads))))
        gate = f"{v}:v" if att.fused else v  # a CTS gate scales the value rows (group.py)
        out.append(ChannelGroup(root=attn, size=att.kv_heads, members=members, unit=d, gate=(gate,), kind="heads"))
    return out, skipped, covered


@torch.no_grad()
def remove(model: nn.Module, group, kept: torch.Tensor) -> None:
    """Shrink one attention layer to its kept key/value heads (and the query heads they serve), in place."""
    mods = dict(model.named_modules())
    kept_units = sorted(int(u) for u in kept)
    gone_units = set(range(group.size)) - set(kept_units)
    if not gone_units:
        return
    rows, cols = {}, {}  # a fused projection loses its q, k and v rows in one cut
    for m in group.members:
        gone = [i for i, r in zip(m.idx, m.root) if r in gone_units]
        if m.kind == "out":
            rows.setdefault(m.module, []).extend(gone)
        elif m.kind == "in":
            cols.setdefault(m.module, []).extend(gone)
        elif m.kind == "param":
            owner_name, _, attr = m.module.rpartition(".")
            owner = mods[owner_name]
            old = getattr(owner, attr)
            setattr(owner, attr, nn.Parameter(old[:, kept_units].clone(), requires_grad=old.requires_grad))
    for name, gone in rows.items():
        tp.prune_linear_out_channels(mods[name], sorted(gone))
    for name, gone in cols.items():
        tp.prune_linear_in_channels(mods[name], sorted(gone))
    attn = mods[group.root]
    query_heads = len(group.of("in")[0].idx) // group.unit
    per_unit = query_heads // group.size
    for names, value in ((HEAD_COUNT, len(kept_units) * per_unit), (KV_HEAD_COUNT, len(kept_units)),
                         (HEAD_WIDTH, len(kept_units) * per_unit * group.unit)):
        for a in names:
            if isinstance(getattr(attn, a, None), int):
                setattr(attn, a, value)


def spec_attrs(model: nn.Module) -> dict[str, dict]:
    """The head-count and width attributes of every attention layer, for the architecture spec."""
    out = {}
    for name, _ in attention_layers(model, min_units=1):
        mod = model.get_submodule(name)
        out[name] = {a: getattr(mod, a) for a in HEAD_COUNT + KV_HEAD_COUNT + HEAD_WIDTH
                     if isinstance(getattr(mod, a, None), int)}
    return out
