"""Layer pruning: remove whole residual blocks ("When Layers Play the Lottery", Jordao et al. 2023).

Which blocks can go. A block is a submodule whose forward adds its own input to a branch computed
from that input: out = post(x + f(x)), e.g. relu(x + f(x)) (ResNet basic block) or x + f(x)
(MobileNetV2 inverted residual); a transformer block, x' = x + a(x); x' + m(x'), is one too
(zeroing a leaves x' = x, so the second add adds the input again). Found generically with torch.fx, not by class: each submodule is
traced on its own and its graph searched for an add with one operand the module's input (directly
or through nn.Identity) and the other depending on it. Downsampling blocks (shortcut conv) do not
qualify: their shortcut is not the input.

What removing means. The branch is set to zero, exactly: what is left computes post(x), e.g.
relu(x), with every op of the branch gone (the traced graph with the add replaced by its identity
operand, dead code eliminated, repeated while weights remain). A block qualifies only if nothing with weights survives that.
Nested candidates are reduced to the innermost one.

Which blocks go. One Binary Concrete gate per block scales its residual branch, x + g f(x); the
weights are frozen and the gates are trained with the CTS objective (the network's outputs stay
close to the dense network's) and GRADBALANCE on a MAC budget, cost = the block's MACs
(search/cts.py). The trained gate logit is the block's score: the paper aggregates a
data-driven score per block and leaves the aggregation open; a gate over the whole block measures
directly what the network loses without that block, together with the other blocks' gates,
instead of summing per-weight saliencies that say nothing about the block as a unit. Blocks are
removed lowest score first until the budget holds: `search.blocks` blocks, or else the MACs fall
to `search.target_macs` of the dense model; at least one block always goes."""
from __future__ import annotations

import copy
import dataclasses
import math
import operator

import torch
from torch import fx, nn

from ticketforge.errors import UserError
from ticketforge.masks import PRUNABLE_TYPES
from ticketforge.search import SearchContext, SearchResult, register
from ticketforge.search.cts import concrete_search

_ADDS = {operator.add, operator.iadd, torch.add}
_GATE = "gate"


class RemovedBlock(nn.Module):
    """Stands where a residual block was: computes what the block computes with its branch zeroed."""

    def __init__(self, rest: nn.Module, was: str):
        super().__init__()
        self.rest = rest
        self.was = was  # class name of the removed block, for the report

    def forward(self, x):
        return self.rest(x)


def _is_add(node: fx.Node) -> bool:
    return ((node.op == "call_function" and node.target in _ADDS)
            or (node.op == "call_method" and node.target in ("add", "add_"))) and len(node.args) == 2 \
        and not node.kwargs


def _is_input(gm: fx.GraphModule, node, x: fx.Node) -> bool:
    """`node` is the module's input, possibly passed through nn.Identity."""
    while isinstance(node, fx.Node) and node.op == "call_module" \
            and isinstance(gm.get_submodule(node.target), nn.Identity):
        node = node.args[0]
    return node is x


def _depends_on(node: fx.Node, x: fx.Node) -> bool:
    seen, todo = set(), [node]
    while todo:
        n = todo.pop()
        if n is x:
            return True
        if n not in seen:
            seen.add(n)
            todo.extend(n.all_input_nodes)
    return False


def _trace(module: nn.Module) -> fx.GraphModule | None:
    try:
        return fx.symbolic_trace(module)
    except Exception:  # data-dependent control flow etc.: not something we can rewrite safely
        return None


def _next_residual(gm: fx.GraphModule):
    """The first add of the input with a branch computed from it: (add, identity operand index)."""
    xs = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if len(xs) != 1:
        return None
    for node in gm.graph.nodes:
        if _is_add(node):
            for i in (0, 1):
                ident, branch = node.args[i], node.args[1 - i]
                if isinstance(branch, fx.Node) and _is_input(gm, ident, xs[0]) and not _is_input(gm, branch, xs[0]) \
                        and _depends_on(branch, xs[0]):
                    return node, i
    return None


def _zero_branches(module: nn.Module):
    """Zero the residual branches one after the other (a transformer block has two: once the first
    is gone the second adds the input too) until nothing with weights is left. Returns the
    rewritten graph module and the (add node name, identity operand index) pairs, or None when
    `module` is not a removable block."""
    gm = _trace(module)
    if gm is None:
        return None
    adds = []
    while any(True for _ in gm.parameters()):
        found = _next_residual(gm)
        if found is None:
            return None
        add, i = found
        adds.append((add.name, i))
        add.replace_all_uses_with(add.args[i])
        gm.graph.erase_node(add)
        gm.graph.eliminate_dead_code()
        gm.delete_all_unused_submodules()
        gm.recompile()
    return (gm, adds) if adds else None


def removed_version(module: nn.Module) -> RemovedBlock | None:
    """The block with its residual branches zeroed, or None if it is not a removable block."""
    found = _zero_branches(module)
    return None if found is None else RemovedBlock(found[0], type(module).__name__)


def gated_version(module: nn.Module) -> fx.GraphModule:
    """The block computing post(x + gate * f(x)) (every residual branch scaled by the same gate),
    with `gate` a buffer: 1 is the block as it is, 0 the block removed."""
    _, adds = _zero_branches(module)
    gm = _trace(module)
    gm.register_buffer(_GATE, torch.ones((), device=next(module.parameters()).device))
    nodes = {n.name: n for n in gm.graph.nodes}
    for name, i in adds:
        add = nodes[name]
        with gm.graph.inserting_before(add):
            scaled = gm.graph.call_function(operator.mul, (add.args[1 - i], gm.graph.get_attr(_GATE)))
        args = list(add.args)
        args[1 - i] = scaled
        add.args = tuple(args)
    gm.recompile()
    return gm


def removable_blocks(model: nn.Module) -> list[str]:
    """Names of the submodules that are removable residual blocks (innermost ones)."""
    if isinstance(model, torch.jit.ScriptModule):
        raise UserError("layer pruning rewrites the model's modules, which needs an eager nn.Module: "
                        "give a state_dict with --arch instead of a TorchScript archive")
    names = []
    for name, mod in model.named_modules():
        if not name or isinstance(mod, PRUNABLE_TYPES) or not any(True for _ in mod.parameters()):
            continue
        if removed_version(mod) is not None:
            names.append(name)
    return [n for n in names if not any(o.startswith(n + ".") for o in names)]


def remove_blocks(model: nn.Module, names: list[str]) -> nn.Module:
    """Replace each named block by its zero-branch version, in place (also rebuilds a saved ticket)."""
    for name in names:
        rest = removed_version(model.get_submodule(name))
        if rest is None:
            raise UserError(f"{name} is not a removable residual block of this model")
        model.set_submodule(name, rest)
    return model


@torch.no_grad()
def layer_macs(model: nn.Module, example: torch.Tensor) -> dict[str, int]:
    """Multiply-accumulates per sample of every Conv and Linear layer, by name, from one forward."""
    out, hooks = {}, []
    for name, mod in model.named_modules():
        if isinstance(mod, nn.modules.conv._ConvNd):
            def hook(m, inp, y, name=name):
                out[name] = y[0].numel() * (m.in_channels // m.groups) * math.prod(m.kernel_size)
        elif isinstance(mod, nn.Linear):
            def hook(m, inp, y, name=name):
                out[name] = y[0].numel() * m.in_features
        else:
            continue
        hooks.append(mod.register_forward_hook(hook))
    try:
        model.eval()(example)
    finally:
        for h in hooks:
            h.remove()
    return out


def choose(scores: dict[str, float], macs: dict[str, int], total_macs: int, blocks: int, target: float) -> list[str]:
    """Lowest score first: `blocks` of them, or until the MACs kept are at most `target` x total
    (at least one)."""
    order = sorted(scores, key=lambda n: scores[n])
    if blocks:
        return order[:blocks]
    chosen, kept = [], total_macs
    for n in order:
        if chosen and kept <= target * total_macs:
            break
        chosen.append(n)
        kept -= macs[n]
    return chosen


@register("layers")
def layers(ctx: SearchContext) -> SearchResult:
    cfg = ctx.recipe.search
    names = removable_blocks(ctx.model)
    if not names:
        raise UserError("layer pruning: the model has no removable residual block (a submodule computing "
                        "x + f(x) or act(x + f(x)) on its own input); use a channel or unstructured recipe")
    if cfg.blocks > len(names):
        raise UserError(f"search.blocks={cfg.blocks}, but the model has only {len(names)} removable blocks "
                        f"({', '.join(names)})")
    per_layer = layer_macs(ctx.model, ctx.data.example(2).to(ctx.device))
    total = sum(per_layer.values())
    macs = {n: sum(v for k, v in per_layer.items() if k.startswith(n + ".")) for n in names}
    ctx.ui.log(f"layer pruning: {len(names)} removable blocks: "
               + ", ".join(f"{n} ({macs[n] / total:.1%} of MACs)" for n in names))

    # Search: one gate per block on a copy whose blocks scale their branch by the gate.
    gated = copy.deepcopy(ctx.model)
    for n in names:
        gated.set_submodule(n, gated_version(gated.get_submodule(n)))
    keys = {n: f"{n}.{_GATE}" for n in names}
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
    model = remove_blocks(ctx.model, chosen)
    kept = total - sum(macs[n] for n in chosen)
    info.update({"method": "layers", "candidates": names, "removed": chosen,
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
