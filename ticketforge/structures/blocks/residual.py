"""Residual blocks, found and removed ("When Layers Play the Lottery", Jordao et al. 2023).

Which blocks can go. A block is a submodule whose forward adds its own input to a branch computed
from that input: out = post(x + f(x)), e.g. relu(x + f(x)) (ResNet basic block) or x + f(x)
(MobileNetV2 inverted residual); a transformer block, x' = x + a(x); x' + m(x'), is one too
(zeroing a leaves x' = x, so the second add adds the input again). Found generically with torch.fx,
not by class: each submodule is traced on its own and its graph searched for an add with one
operand the module's input (directly or through nn.Identity) and the other depending on it.
Downsampling blocks (shortcut conv) do not qualify: their shortcut is not the input.

What removing means. The branch is set to zero, exactly: what is left computes post(x), e.g.
relu(x), with every op of the branch gone (the traced graph with the add replaced by its identity
operand, dead code eliminated, repeated while weights remain). A block qualifies only if nothing
with weights survives that. Nested candidates are reduced to the innermost one.

Which blocks go is the search's (ticketforge.search.block_methods); `choose` turns its scores into
the removed set under the budget."""
from __future__ import annotations

import operator

import torch
from torch import fx, nn

from ticketforge.errors import UserError
from ticketforge.masks import PRUNABLE_TYPES

_ADDS = {operator.add, operator.iadd, torch.add}
GATE = "gate"  # the buffer a gated block scales its branches by


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
    gm.register_buffer(GATE, torch.ones((), device=next(module.parameters()).device))
    nodes = {n.name: n for n in gm.graph.nodes}
    for name, i in adds:
        add = nodes[name]
        with gm.graph.inserting_before(add):
            scaled = gm.graph.call_function(operator.mul, (add.args[1 - i], gm.graph.get_attr(GATE)))
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
