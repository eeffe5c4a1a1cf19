"""Channel structure, step 1 of 4: graph discovery. Which channels are coupled (Torch-Pruning's
DependencyGraph: residual adds, concat, depthwise convs, flatten -> Linear) and what each group
costs (the MAC model a budget is met on).

The other steps, kept apart as Torch-Pruning keeps graph, importance and pruner apart:
select.py (which channels stay), surgery.py (masks, BatchNorm-shift folding, physical removal),
spec.py (rebuilding a shrunk model from plain data)."""
from __future__ import annotations

import copy
import weakref
from dataclasses import dataclass, field

import torch
import torch_pruning as tp
from torch import nn

from ticketforge.errors import UserError
from ticketforge.macs import CONV_LINEAR, layer_macs
from ticketforge.structures.channels import heads
from ticketforge.structures.channels.group import ChannelGroup, Member

NORMS = (nn.modules.batchnorm._BatchNorm, nn.LayerNorm)
# Op nodes whose index mapping may not survive removing a channel (views into heads, splits):
# a group through one of them is tried on a copy before it is offered to the search.
RESHAPING_OPS = (tp.ops._ReshapeOp, tp.ops._SplitOp, tp.ops._UnbindOp, tp.ops._SliceOp, tp.ops._ExpandOp,
                 tp.ops._CustomizedOp)


@dataclass
class ChannelPlan:
    """The prunable channel groups of a model and the MAC model used to meet a budget."""

    groups: list[ChannelGroup]
    layer_macs: dict[str, float]        # dense MACs per sample of every Conv/Linear
    layer_in: dict[str, int]            # input width of every Conv/Linear (channels or features)
    skipped: list[str] = field(default_factory=list)  # groups left whole, with why

    @property
    def dense_macs(self) -> float:
        return sum(self.layer_macs.values())

    def macs(self, counts: list[float]) -> float:
        """MACs per sample with `counts[g]` channels kept in group g (fractional counts allowed)."""
        frac_out = {name: 1.0 for name in self.layer_macs}
        removed_in = {name: 0.0 for name in self.layer_macs}
        for g, k in zip(self.groups, counts):
            f = k / g.size
            for m in g.of("out"):
                frac_out[m.module] = f
            for m in g.of("in"):
                removed_in[m.module] += len(m.idx) * (1 - f)
        return sum(macs * frac_out[n] * (1 - removed_in[n] / self.layer_in[n]) for n, macs in self.layer_macs.items())

    def marginal_costs(self, counts: list[float], cost=None) -> list[float]:
        """dMACs / d(one channel of group g) at `counts`: the per-gate cost for CTS's budget (or of
        another cost of the counts, e.g. the measured latency: channels/cost.py)."""
        cost = cost or self.macs
        base = cost(counts)
        out = []
        for i, g in enumerate(self.groups):
            bumped = list(counts)
            bumped[i] = counts[i] - 1
            out.append(base - cost(bumped))
        return out

    def uniform_counts(self, target: float, cost=None) -> list[float]:
        """Fractional counts keeping the same fraction of every group so MACs (or `cost`) = target x dense."""
        dense = cost.dense if cost is not None else self.dense_macs
        cost = cost or self.macs
        lo, hi = 0.0, 1.0
        for _ in range(50):
            mid = (lo + hi) / 2
            if cost([mid * g.size for g in self.groups]) > target * dense:
                hi = mid
            else:
                lo = mid
        return [lo * g.size for g in self.groups]


# ---------------------------------------------------------------- discovery

def _grouped(mod: nn.Module) -> bool:
    """A grouped conv that is not depthwise: its channels are tied in blocks."""
    return isinstance(mod, nn.modules.conv._ConvNd) and 1 < mod.groups and not (
        mod.groups == mod.in_channels == mod.out_channels)


def _whole_groups_of_grouped_convs(model: nn.Module, group: ChannelGroup) -> tuple[ChannelGroup, str | None]:
    """A group through a grouped conv (RegNet, ResNeXt) keeps the conv's number of groups: a unit is
    one position within a conv group, i.e. one channel of every conv group (channel c belongs to
    unit c % width), so every conv group loses the same channels and the conv stays a grouped conv
    with narrower groups. Returns the group in units, or why it is left whole."""
    mods = dict(model.named_modules())
    grouped = {m.module: mods[m.module] for m in group.members if _grouped(mods[m.module])}
    if not grouped:
        return group, None
    counts = {conv.groups for conv in grouped.values()}
    if len(counts) != 1 or any(conv.in_channels != group.size or conv.out_channels != group.size
                               for conv in grouped.values()) \
            or any(m.idx != m.root for m in group.members if m.module in grouped):
        return group, f"grouped convs {', '.join(grouped)} do not map the group's channels one to one"
    conv_groups = counts.pop()
    width = group.size // conv_groups
    members = [Member(m.module, m.kind, m.idx, [r % width for r in m.root]) for m in group.members]
    return ChannelGroup(group.root, width, members, unit=conv_groups), None


def _probe(model: nn.Module, example: torch.Tensor, root: str, expected_shape) -> str | None:
    """Remove one channel of the group from a copy and run it: a group whose removal breaks the
    forward pass (e.g. a reshape into attention heads) is left whole. Returns why, or None."""
    trial = copy.deepcopy(model)
    try:
        dg = dependency_graph(trial, example)
        mod = dict(trial.named_modules())[root]
        fn = tp.prune_linear_out_channels if isinstance(mod, nn.Linear) else tp.prune_conv_out_channels
        dg.get_pruning_group(mod, fn, idxs=[0]).prune()
        with torch.no_grad():
            out = trial(example)
    except Exception as exc:  # any failure means this group cannot be shrunk safely
        return f"{type(exc).__name__}: {str(exc).splitlines()[0][:80] if str(exc) else ''}"
    if tuple(out.shape) != tuple(expected_shape):
        return f"output shape changed to {tuple(out.shape)}"
    return None


def dependency_graph(model: nn.Module, example: torch.Tensor) -> tp.DependencyGraph:
    """Torch-Pruning's graph of `model`, each attention layer that holds its own output projection
    one node of it (heads.py removes its heads)."""
    with heads.opaque(model) as pruners:
        return tp.DependencyGraph().build_dependency(model, example_inputs=example, verbose=False,
                                                     customized_pruners=pruners)


# Plans found earlier, per model object: the search, the step before fine-tuning and the conversion
# all ask for the same model's plan, and tracing a large model (ResNet-50, ViT-Base) takes seconds.
_PLANS: "weakref.WeakKeyDictionary[nn.Module, tuple]" = weakref.WeakKeyDictionary()


def discover(model: nn.Module, example: torch.Tensor) -> ChannelPlan:
    """Coupled channel groups of `model` (traced on `example`) and their MAC model. A plan depends on
    the model's layers and shapes and on the example's shape, not on the weights: it is found once
    per model object and kept while those stay the same."""
    key = (tuple(example.shape), example.dtype, tuple((k, tuple(v.shape)) for k, v in model.state_dict().items()))
    cached = _PLANS.get(model)
    if cached is not None and cached[0] == key:
        return cached[1]
    plan = _discover(model, example)
    _PLANS[model] = (key, plan)
    return plan


def _discover(model: nn.Module, example: torch.Tensor) -> ChannelPlan:
    if isinstance(model, torch.jit.ScriptModule):
        raise UserError("channel structure needs an eager nn.Module (a TorchScript archive cannot be traced "
                        "for dependencies or shrunk); give a state_dict with --arch")
    was_training = model.training
    model.eval()
    example = example.to(next(model.parameters()).device)
    counted = layer_macs(model, example)
    macs, width, final = counted.macs, counted.widths, counted.outputs
    with torch.no_grad():
        expected = tuple(model(example).shape)
    names = {m: n for n, m in model.named_modules()}
    with torch.enable_grad():
        dg = dependency_graph(model, example)
        ignored = [m for n, m in model.named_modules() if n in final]
        # Attention projections go a whole head at a time (heads.py), never a channel at a time.
        groups, skipped, projections = heads.groups(model, dg, names)
        ignored += [m for n, m in model.named_modules() if n in projections]
        for group in dg.get_all_groups(ignored_layers=ignored, root_module_types=CONV_LINEAR):
            members, why, risky = [], None, False
            for item in group:
                dep = item.dep
                mod = dep.target.module
                name = names.get(mod) if isinstance(mod, nn.Module) else None
                if name is None:
                    if isinstance(mod, nn.Parameter):
                        why = "a bare nn.Parameter (e.g. a position embedding) is coupled"
                    risky = risky or isinstance(mod, RESHAPING_OPS)
                    continue  # Torch-Pruning's own op nodes (add, concat, reshape): nothing to prune
                if isinstance(mod, CONV_LINEAR):
                    kind = "out" if dg.is_out_channel_pruning_fn(dep.handler) else "in"
                    members.append(Member(name, kind, [int(i) for i in item.idxs], [int(r) for r in item.root_idxs]))
                elif isinstance(mod, nn.LayerNorm) or type(mod).__name__.endswith("LayerNorm"):
                    # Its mean and variance run over these channels: with some of them zeroed the
                    # masked model would not compute what the shrunk one does.
                    why = f"LayerNorm {name} normalises over these channels"
                elif isinstance(mod, NORMS):
                    members.append(Member(name, "norm", [int(i) for i in item.idxs], [int(r) for r in item.root_idxs]))
                else:
                    why = f"{type(mod).__name__} {name} has no channel rule here"
            root = names[group[0].dep.target.module]
            size = len(group[0].idxs)
            group_ = ChannelGroup(root, size, members)
            if why is None:
                group_, why = _whole_groups_of_grouped_convs(model, group_)
            if why is None and risky:
                why = _probe(model, example, root, expected)
            if why is None and group_.size > 1:
                groups.append(group_)
            elif why is not None:
                skipped.append(f"{root}: {why}")
    model.train(was_training)
    if not groups:
        raise UserError("channels: the model has no channel group that can be removed (looked for the output "
                        "channels of every Conv and Linear with the layers that read them, and for attention "
                        "heads)" + (f"; left whole: {'; '.join(skipped[:3])}{' ...' if len(skipped) > 3 else ''}"
                                    if skipped else "") + "; use a blocks, 2:4 or unstructured recipe")
    return ChannelPlan(groups, macs, width, skipped)
