"""Channel structure, step 1 of 4: graph discovery. Which channels are coupled (Torch-Pruning's
DependencyGraph: residual adds, concat, depthwise convs, flatten -> Linear) and what each group
costs (the MAC model a budget is met on).

The other steps, kept apart as Torch-Pruning keeps graph, importance and pruner apart:
select.py (which channels stay), surgery.py (masks, BatchNorm-shift folding, physical removal),
spec.py (rebuilding a shrunk model from plain data)."""
from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
import torch_pruning as tp
from torch import nn

from ticketforge.errors import UserError
from ticketforge.macs import CONV_LINEAR, layer_macs

NORMS = (nn.modules.batchnorm._BatchNorm, nn.LayerNorm)
# Op nodes whose index mapping may not survive removing a channel (views into heads, splits):
# a group through one of them is tried on a copy before it is offered to the search.
RESHAPING_OPS = (tp.ops._ReshapeOp, tp.ops._SplitOp, tp.ops._UnbindOp, tp.ops._SliceOp, tp.ops._ExpandOp,
                 tp.ops._CustomizedOp)


@dataclass
class Member:
    module: str        # module name in the model
    kind: str          # "out": a Conv/Linear producing the channels (depthwise too), "in": one reading them, "norm"
    idx: list[int]     # indices along the pruned dimension of this module
    root: list[int]    # the group channel each index belongs to


@dataclass
class ChannelGroup:
    root: str          # the Conv/Linear the group was found from
    size: int          # channels in the group
    members: list[Member]

    def of(self, kind: str) -> list[Member]:
        return [m for m in self.members if m.kind == kind]


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
    """A grouped conv that is not depthwise: its channels are tied in blocks; left whole."""
    return isinstance(mod, nn.modules.conv._ConvNd) and 1 < mod.groups and not (
        mod.groups == mod.in_channels == mod.out_channels)


def _probe(model: nn.Module, example: torch.Tensor, root: str, expected_shape) -> str | None:
    """Remove one channel of the group from a copy and run it: a group whose removal breaks the
    forward pass (e.g. a reshape into attention heads) is left whole. Returns why, or None."""
    trial = copy.deepcopy(model)
    try:
        dg = tp.DependencyGraph().build_dependency(trial, example_inputs=example, verbose=False)
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


def discover(model: nn.Module, example: torch.Tensor) -> ChannelPlan:
    """Coupled channel groups of `model` (traced on `example`) and their MAC model."""
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
        dg = tp.DependencyGraph().build_dependency(model, example_inputs=example, verbose=False)
        ignored = [m for n, m in model.named_modules() if n in final]
        groups, skipped = [], []
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
                if _grouped(mod):
                    why = f"grouped conv {name} (groups={mod.groups})"
                elif isinstance(mod, CONV_LINEAR):
                    kind = "out" if dg.is_out_channel_pruning_fn(dep.handler) else "in"
                    members.append(Member(name, kind, [int(i) for i in item.idxs], [int(r) for r in item.root_idxs]))
                elif isinstance(mod, NORMS):
                    members.append(Member(name, "norm", [int(i) for i in item.idxs], [int(r) for r in item.root_idxs]))
                else:
                    why = f"{type(mod).__name__} {name} has no channel rule here"
            root = names[group[0].dep.target.module]
            size = len(group[0].idxs)
            if why is None and risky:
                why = _probe(model, example, root, expected)
            if why is None and size > 1:
                groups.append(ChannelGroup(root, size, members))
            elif why is not None:
                skipped.append(f"{root}: {why}")
    model.train(was_training)
    return ChannelPlan(groups, macs, width, skipped)
