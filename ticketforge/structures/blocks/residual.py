"""Residual blocks, found and removed ("When Layers Play the Lottery", Jordao et al. 2023).

Which blocks can go. A block is a submodule whose forward adds its own input to a branch computed
from that input: out = post(x + f(x)), e.g. relu(x + f(x)) (ResNet basic block) or x + f(x)
(MobileNetV2 inverted residual); a transformer block, x' = x + a(x); x' + m(x'), is one too
(zeroing a leaves x' = x, so the second add adds the input again). Found generically with torch.fx,
not by class: each submodule is traced on its own and its graph searched for an add with one
operand the module's input (directly or through nn.Identity) and the other depending on it.
Downsampling blocks (shortcut conv) do not qualify: their shortcut is not the input.

Real models put the adds wherever their authors did, and the tracing is built for that:
- Each submodule is traced as it is really called (its arguments recorded in one forward pass on
  example data): tensor arguments (the residual stream first, then e.g. an attention mask) are the
  graph's inputs; every other argument (None, flags, sizes such as Swin's input_dimensions) is
  fixed to the value it had. So HF layers with optional arguments and `**kwargs` trace.
- A submodule that does not trace on its own (data-dependent Python, TF-style padding computed from
  the input's shape, attention kernels dispatched through registries) stays a single opaque call
  in its parent's graph. The adds are found around such calls, e.g. HF's ViTOutput and
  BertSelfOutput that receive the block's input as a second argument are traced through, wherever
  the add sits.
- A guard such as MobileNetV2's `x + f(x) if self.use_residual else f(x)` is plain Python on a
  constant: the trace holds the add exactly when the block has one.

What removing means. The branch is set to zero, exactly: what is left computes post(x), with
every op of the branch gone (the traced graph with the add replaced by its identity operand,
dead code eliminated, repeated while weights of the branch remain). For a pre-norm transformer
block or a ResNet block without a final activation that is the identity; relu(x + f(x)) becomes
relu(x); a post-norm block (BERT: LayerNorm(x + f(x)), twice) becomes LayerNorm2(LayerNorm1(x)),
not the identity: the norms stay, with their weights. A block qualifies only if no Conv, Linear or
Embedding survives that. Nested candidates are reduced to the innermost one.

Which blocks go is the search's (ticketforge.search.block_methods); `choose` turns its scores into
the removed set under the budget."""
from __future__ import annotations

import inspect
import operator

import torch
from torch import fx, nn

from ticketforge.errors import UserError
from ticketforge.macs import forward_with_hooks
from ticketforge.masks import PRUNABLE_TYPES

_ADDS = {operator.add, operator.iadd, torch.add}
GATE = "gate"  # the buffer a gated block scales its branches by
# Weights that make a block worth removing: while any of them is left, a branch is.
BRANCH_TYPES = PRUNABLE_TYPES + (nn.Embedding,)
CONSTANTS = (type(None), bool, int, float, str, torch.dtype, torch.device)
MAX_TENSOR_INPUTS = 5


# ---------------------------------------------------------------- how a block is called

def _constant(v) -> bool:
    return isinstance(v, CONSTANTS) or (isinstance(v, (tuple, list)) and all(_constant(i) for i in v))


def call_of(module: nn.Module, args: tuple, kwargs: dict) -> dict | None:
    """How `module` was called, as plain data: {"params": forward's parameter names in order,
    "tensors": the names of the tensor arguments (the residual stream first; `name.i` is element i
    of a tuple of tensors, e.g. Llama's rotary `position_embeddings` (cos, sin)), "consts": the
    other arguments by name}. None when it cannot be traced that way (no tensor first, a tensor
    inside another container, an argument that is not plain data, *args)."""
    try:
        sig = inspect.signature(module.forward)
        bound = sig.bind(*args, **kwargs)
    except (TypeError, ValueError):
        return None
    params = [p.name for p in sig.parameters.values() if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    tensors, consts = [], {}
    for name, value in bound.arguments.items():
        kind = sig.parameters[name].kind
        if kind == inspect.Parameter.VAR_POSITIONAL:
            if value:
                return None
            continue
        items = value.items() if kind == inspect.Parameter.VAR_KEYWORD else [(name, value)]
        for k, v in items:
            if isinstance(v, torch.Tensor):
                tensors.append(k)
            elif isinstance(v, tuple) and v and all(isinstance(t, torch.Tensor) for t in v):
                tensors += [f"{k}.{i}" for i in range(len(v))]
            elif _constant(v):
                consts[k] = v
            else:
                return None
    if not params or not tensors or tensors[0] != params[0]:
        return None
    return {"params": params, "tensors": tensors, "consts": consts}


@torch.no_grad()
def observe_calls(model: nn.Module, example: torch.Tensor) -> dict[str, dict]:
    """name -> call_of() for every submodule, from one forward pass on `example` (first call)."""
    names = {m: n for n, m in model.named_modules()}
    calls, hooks = {}, []

    def hook(mod, args, kwargs):
        n = names[mod]
        if n not in calls:
            calls[n] = call_of(mod, args, kwargs)

    for m in model.modules():
        hooks.append(m.register_forward_pre_hook(hook, with_kwargs=True))
    forward_with_hooks(model, example, hooks)
    return {n: c for n, c in calls.items() if c is not None}


def _single_input(module: nn.Module) -> dict | None:
    """The call of a block called with its input alone (a ticket from before calls were recorded)."""
    try:
        params = [p.name for p in inspect.signature(module.forward).parameters.values()
                  if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    except (TypeError, ValueError):
        return None
    return {"params": params, "tensors": params[:1], "consts": {}} if params else None


class _Bound(nn.Module):
    """The block called the way it was observed, with only its tensor arguments as inputs: what fx
    traces. One forward per arity, since fx reads the traced forward's own signature."""

    def __init__(self, block: nn.Module, call: dict):
        super().__init__()
        self.block, self.call = block, call

    def invoke(self, *tensors):
        return self.block(**self.call["consts"], **_arguments(self.call["tensors"], tensors))


class _Bound1(_Bound):
    def forward(self, x):
        return self.invoke(x)


class _Bound2(_Bound):
    def forward(self, x, a):
        return self.invoke(x, a)


class _Bound3(_Bound):
    def forward(self, x, a, b):
        return self.invoke(x, a, b)


class _Bound4(_Bound):
    def forward(self, x, a, b, c):
        return self.invoke(x, a, b, c)


class _Bound5(_Bound):
    def forward(self, x, a, b, c, d):
        return self.invoke(x, a, b, c, d)


_BOUND = {1: _Bound1, 2: _Bound2, 3: _Bound3, 4: _Bound4, 5: _Bound5}


def _arguments(names: list[str], tensors) -> dict:
    """Keyword arguments from the tensors named as `call_of` names them (tuples reassembled)."""
    out, parts = {}, {}
    for name, t in zip(names, tensors):
        base, _, i = name.partition(".")
        if i:
            parts.setdefault(base, {})[int(i)] = t
        else:
            out[name] = t
    out.update({base: tuple(p[i] for i in sorted(p)) for base, p in parts.items()})
    return out


def _leaf(m: nn.Module) -> bool:
    """torch.fx's leaves (torch.nn's own layers), and any Conv or Linear whatever its class (GPT-2's
    Conv1D loaded as a Linear subclass, ticketforge.hf): traced into, its weights would look like
    an op of the residual stream instead of a branch."""
    return fx.Tracer().is_leaf_module(m, "") or isinstance(m, PRUNABLE_TYPES)


class _Tracer(fx.Tracer):
    """torch.fx's tracer, keeping the modules that do not trace on their own as opaque calls."""

    def __init__(self, opaque: set[int]):
        super().__init__()
        self.opaque = opaque

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return id(m) in self.opaque or _leaf(m)


class Tracing:
    """Traces a model's submodules as they were called; decides once per submodule whether it
    traces (children first: a child that does not becomes an opaque call in its parent)."""

    def __init__(self, model: nn.Module, calls: dict[str, dict] | None = None):
        self.model = model
        self.calls = calls or {}
        self.names = {id(m): n for n, m in model.named_modules()}
        self.opaque: set[int] = set()
        self.decided: set[int] = set()

    def call(self, name: str, module: nn.Module) -> dict | None:
        return self.calls.get(name) if self.calls else _single_input(module)

    def subtree(self, name: str) -> dict[str, dict]:
        """The recorded calls of `name` and its submodules that are traced (torch.nn's own layers
        are not), by name relative to it ("" itself)."""
        return {n[len(name):].lstrip("."): c for n, c in self.calls.items()
                if (n == name or n.startswith(name + ".")) and not _leaf(self.model.get_submodule(n))}

    def _decide(self, module: nn.Module) -> None:
        if id(module) in self.decided:
            return
        for child in module.children():
            self._decide(child)
        self.decided.add(id(module))
        if _leaf(module) or \
                self._trace(module, self.call(self.names.get(id(module), ""), module)) is None:
            self.opaque.add(id(module))

    def _trace(self, module: nn.Module, call: dict | None) -> fx.GraphModule | None:
        if call is None or len(call["tensors"]) > MAX_TENSOR_INPUTS:
            return None
        bound = _BOUND[len(call["tensors"])](module, call)
        try:
            graph = _Tracer(self.opaque).trace(bound)
        except Exception:  # data-dependent control flow etc.: not something we can rewrite safely
            return None
        # The block's own names, not the wrapper's: "block.conv" -> "conv".
        for node in graph.nodes:
            if node.op in ("call_module", "get_attr"):
                node.target = node.target.removeprefix("block.") if node.target != "block" else ""
        if any(n.op == "call_module" and n.target == "" for n in graph.nodes):
            return None  # the block itself is opaque
        try:
            return fx.GraphModule(module, graph, class_name=type(module).__name__)
        except Exception:
            return None

    def trace(self, name: str, module: nn.Module) -> fx.GraphModule | None:
        """The graph of `module` as it was called, its untraceable children opaque; None when the
        module itself does not trace."""
        for child in module.children():
            self._decide(child)
        return self._trace(module, self.call(name, module))


# ---------------------------------------------------------------- finding the residual adds

def _is_add(node: fx.Node) -> bool:
    return ((node.op == "call_function" and node.target in _ADDS)
            or (node.op == "call_method" and node.target in ("add", "add_"))) and len(node.args) == 2 \
        and not node.kwargs


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


def _weighted(gm: fx.GraphModule, node: fx.Node) -> bool:
    """An op that applies weights of a branch: a module holding a Conv, Linear or Embedding, or a
    bare parameter (a layer scale). Norms and activations are not."""
    if node.op == "call_module":
        return any(isinstance(m, BRANCH_TYPES) for m in gm.get_submodule(node.target).modules())
    if node.op == "get_attr":
        owner, _, attr = node.target.rpartition(".")
        return attr in gm.get_submodule(owner)._parameters
    return False


def _next_residual(gm: fx.GraphModule):
    """The first add of the residual stream with a branch computed from it: (add, index of the
    stream operand). The stream is the block's first input and what follows from it without
    weights (nn.Identity, the norm of a post-norm block: BERT's second add adds LayerNorm1(x));
    a branch is computed from the stream through weights."""
    xs = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if not xs:
        return None
    stream, weighted = {xs[0]}, set()  # nodes that depend on x: without, and through, weights
    for node in gm.graph.nodes:
        inputs = node.all_input_nodes
        if any(n in weighted for n in inputs) or (_weighted(gm, node) and any(n in stream for n in inputs)):
            weighted.add(node)
        elif any(n in stream for n in inputs):
            stream.add(node)
        if _is_add(node):
            for i in (0, 1):
                ident, branch = node.args[i], node.args[1 - i]
                if ident in stream and branch in weighted:
                    return node, i
    return None


def _branch_weights(gm: fx.GraphModule) -> bool:
    """Whether weights of a branch remain: a Conv, Linear or Embedding, or a bare parameter (a layer
    scale). What else may remain is what follows the adds, e.g. a post-norm block's LayerNorms."""
    return any(any(True for _ in m.parameters(recurse=False)) and (m is gm or isinstance(m, BRANCH_TYPES))
               for m in gm.modules())


def _zero_branches(gm: fx.GraphModule | None):
    """Zero the residual branches one after the other (a transformer block has two: once the first
    is gone the second adds the input too) until no weights of a branch are left. Returns the
    rewritten graph module and the (add node name, identity operand index) pairs, or None when
    it is not a removable block."""
    if gm is None:
        return None
    adds = []
    while _branch_weights(gm):
        found = _next_residual(gm)
        if found is not None:
            add, i = found
            adds.append((add.name, i))
            add.replace_all_uses_with(add.args[i])
            gm.graph.erase_node(add)
        elif not (adds and _drop_side_outputs(gm)):
            return None
        gm.graph.eliminate_dead_code()
        gm = fx.GraphModule(gm, gm.graph, class_name=type(gm).__name__)  # keeps only what the graph uses
    return (gm, adds) if adds else None


def _drop_side_outputs(gm: fx.GraphModule) -> bool:
    """A block that returns (output, attention weights) keeps its attention alive through the second
    element: once its branches are zeroed, outputs after the first that still come from a branch
    become None (the block's callers read the first; a removed block has no attention to report).
    Returns whether anything changed."""
    out = next(n for n in gm.graph.nodes if n.op == "output")
    result = out.args[0]
    if not isinstance(result, (tuple, list)) or len(result) < 2:
        return False
    x = next(n for n in gm.graph.nodes if n.op == "placeholder")
    side = [isinstance(r, fx.Node) and _through_weights(gm, r, x) for r in result[1:]]
    if not any(side):
        return False
    out.args = (type(result)([result[0], *(None if s else r for s, r in zip(side, result[1:]))]),)
    return True


def _through_weights(gm: fx.GraphModule, node: fx.Node, x: fx.Node) -> bool:
    """`node` is computed from `x` through a weighted op."""
    seen, todo = set(), [node]
    while todo:
        n = todo.pop()
        if n in seen:
            continue
        seen.add(n)
        if _weighted(gm, n) and _depends_on(n, x):
            return True
        todo.extend(n.all_input_nodes)
    return False


# ---------------------------------------------------------------- removed and gated blocks

class RemovedBlock(nn.Module):
    """Stands where a residual block was: computes what the block computes with its branch zeroed,
    called the way the block was (its tensor arguments are picked from the call by name)."""

    def __init__(self, rest: nn.Module, was: str, call: dict, calls: dict | None = None):
        super().__init__()
        self.rest = rest
        self.was = was  # class name of the removed block, for the report
        self.params, self.tensors = list(call["params"]), list(call["tensors"])
        # How the block and its submodules were called (relative names): what rebuilds it from a ticket.
        self.calls = calls or {}

    def forward(self, *args, **kwargs):
        given = {**dict(zip(self.params, args)), **kwargs}
        return self.rest(*(_pick(given, n) for n in self.tensors))


def passes_input(module: nn.Module) -> bool:
    """A removed block that computes the identity (a pre-norm transformer layer: nothing of it is
    left), so a layer list may drop it; a post-norm block keeps its norms and may not."""
    if not isinstance(module, RemovedBlock) or any(True for _ in module.rest.parameters()):
        return False
    graph = getattr(module.rest, "graph", None)
    if graph is None:
        return False
    first = next((n for n in graph.nodes if n.op == "placeholder"), None)
    out = next(n for n in graph.nodes if n.op == "output")
    return first is not None and out.args[0] is first


def _pick(given: dict, name: str):
    """The argument `call_of` named `name` (`name.i`: element i of a tuple) from a call's arguments."""
    base, _, i = name.partition(".")
    value = given.get(base)
    return value[int(i)] if i and value is not None else value


def removed_version(module: nn.Module, tracing: Tracing | None = None, name: str = "") -> RemovedBlock | None:
    """The block with its residual branches zeroed, or None if it is not a removable block."""
    tracing = tracing or Tracing(module)
    found = _zero_branches(tracing.trace(name, module))
    if found is None:
        return None
    return RemovedBlock(found[0], type(module).__name__, tracing.call(name, module), tracing.subtree(name))


class GatedBlock(RemovedBlock):
    """A block whose residual branches are scaled by its `gate` buffer (1: the block, 0: removed)."""

    @property
    def gate(self) -> torch.Tensor:
        return self.rest.get_buffer(GATE)


def gated_version(module: nn.Module, tracing: Tracing | None = None, name: str = "") -> GatedBlock:
    """The block computing post(x + gate * f(x)) (every residual branch scaled by the same gate),
    with `gate` a buffer (`gate_name`): 1 is the block as it is, 0 the block removed."""
    tracing = tracing or Tracing(module)
    _, adds = _zero_branches(tracing.trace(name, module))
    gm = tracing.trace(name, module)
    gm.register_buffer(GATE, torch.ones((), device=next(module.parameters()).device))
    nodes = {n.name: n for n in gm.graph.nodes}
    for add_name, i in adds:
        add = nodes[add_name]
        with gm.graph.inserting_before(add):
            scaled = gm.graph.call_function(operator.mul, (add.args[1 - i], gm.graph.get_attr(GATE)))
        args = list(add.args)
        args[1 - i] = scaled
        add.args = tuple(args)
    gm.recompile()
    return GatedBlock(gm, type(module).__name__, tracing.call(name, module))


def gate_name(block: str) -> str:
    """The gate buffer of a gated block, by the block's name."""
    return f"{block}.rest.{GATE}"


def _tracing(model: nn.Module, calls: dict[str, dict] | None, example: torch.Tensor | None) -> Tracing:
    if isinstance(model, torch.jit.ScriptModule):
        raise UserError("layer pruning rewrites the model's modules, which needs an eager nn.Module: "
                        "give a state_dict with --arch instead of a TorchScript archive")
    return Tracing(model, calls if calls is not None else observe_calls(model, example) if example is not None else None)


def removable_blocks(model: nn.Module, example: torch.Tensor | None = None) -> list[str]:
    """Names of the submodules that are removable residual blocks. With `example` every submodule
    is traced as it is called on it; without, as called with its input alone.

    Candidates nest (a ConvNeXt stage of blocks is itself a residual block, and so is BERT's
    attention inside its layer): the inner ones are taken, unless the outer one has residual adds
    of its own beyond theirs (BertLayer: its FFN's add sits in BertOutput, which is no block), so a
    stage is split into its blocks and a transformer layer goes whole."""
    tracing = _tracing(model, None, example)
    adds = {}
    for name, mod in model.named_modules():
        if not name or isinstance(mod, PRUNABLE_TYPES) or not any(True for _ in mod.parameters()):
            continue
        found = _zero_branches(tracing.trace(name, mod))
        if found is not None:
            adds[name] = len(found[1])

    def inside(outer: str) -> list[str]:
        deeper = [n for n in adds if n.startswith(outer + ".")]
        return [n for n in deeper if not any(n.startswith(o + ".") for o in deeper)]

    chosen = []

    def visit(name: str) -> None:
        kids = inside(name)
        if kids and adds[name] <= sum(adds[k] for k in kids):
            for k in kids:
                visit(k)
        else:
            chosen.append(name)

    for name in adds:
        if not any(name.startswith(o + ".") for o in adds):
            visit(name)
    return chosen


def install_gates(model: nn.Module, names: list[str], example: torch.Tensor | None = None) -> nn.Module:
    """Replace each named block by its gated version, in place (`gate_name` names the gates)."""
    tracing = _tracing(model, None, example)
    for name in names:
        model.set_submodule(name, gated_version(model.get_submodule(name), tracing, name))
    return model


def recorded_calls(model: nn.Module) -> dict[str, dict]:
    """The recorded calls of every removed block of `model` and its submodules, by full name:
    plain data for a ticket's spec (with `remove_blocks` they rebuild the model)."""
    calls = {}
    for name, m in model.named_modules():
        if isinstance(m, RemovedBlock):
            calls.update({f"{name}.{rel}" if rel else name: c for rel, c in m.calls.items()})
    return calls


def remove_blocks(model: nn.Module, names: list[str], calls: dict[str, dict] | None = None,
                  example: torch.Tensor | None = None) -> nn.Module:
    """Replace each named block by its zero-branch version, in place. The blocks are traced as
    they are called on `example`, or as `calls` (`recorded_calls`, from a ticket) say."""
    tracing = _tracing(model, calls, example)
    for name in names:
        rest = removed_version(model.get_submodule(name), tracing, name)
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
