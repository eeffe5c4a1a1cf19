"""Channel structure: which channels are coupled, what each costs, how to mask them, how to remove
them physically, and how to rebuild the shrunk model without pickles.

Three concerns as Torch-Pruning separates them: the coupling comes from its DependencyGraph
(residual adds, concat, depthwise convs, flatten -> Linear); the choice of channels is the
search's (`select` meets a MAC budget at counts rounded to the runtime's vector width); the
surgery is Torch-Pruning's prune functions. A channel mask zeroes the removed channels' rows in
their producers *and* columns in their consumers, so the masked model computes exactly what the
shrunk one does; a shift that a removed channel still carries (a BatchNorm beta through the
activation) is first folded into the consumers' biases (`fold_shifts`)."""
from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
import torch_pruning as tp
from torch import nn

from ticketforge import models
from ticketforge.errors import UserError
from ticketforge.masks import Mask

CONV_LINEAR = (nn.modules.conv._ConvNd, nn.Linear)
NORMS = (nn.modules.batchnorm._BatchNorm, nn.LayerNorm)
# Op nodes whose index mapping may not survive removing a channel (views into heads, splits):
# a group through one of them is tried on a copy before it is offered to the search.
RESHAPING_OPS = (tp.ops._ReshapeOp, tp.ops._SplitOp, tp.ops._UnbindOp, tp.ops._SliceOp, tp.ops._ExpandOp,
                 tp.ops._CustomizedOp)
SPEC_ATTRS = {nn.modules.conv._ConvNd: ("in_channels", "out_channels", "groups"),
              nn.modules.batchnorm._BatchNorm: ("num_features",),
              nn.Linear: ("in_features", "out_features"),
              nn.LayerNorm: ("normalized_shape",)}


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

    def marginal_costs(self, counts: list[float]) -> list[float]:
        """dMACs / d(one channel of group g) at `counts`: the per-gate cost for CTS's budget."""
        base = self.macs(counts)
        out = []
        for i, g in enumerate(self.groups):
            bumped = list(counts)
            bumped[i] = counts[i] - 1
            out.append(base - self.macs(bumped))
        return out

    def uniform_counts(self, target: float) -> list[float]:
        """Fractional counts keeping the same fraction of every group so MACs = target x dense."""
        lo, hi = 0.0, 1.0
        for _ in range(50):
            mid = (lo + hi) / 2
            if self.macs([mid * g.size for g in self.groups]) > target * self.dense_macs:
                hi = mid
            else:
                lo = mid
        return [lo * g.size for g in self.groups]


# ---------------------------------------------------------------- discovery

def _module_macs(model: nn.Module, example: torch.Tensor) -> tuple[dict, dict, set]:
    """Dense MACs per sample and input width of every Conv/Linear, and the layers whose output is
    the model's output (never pruned: they define the output shape)."""
    macs, width, hooks, outputs = {}, {}, [], {}
    names = {m: n for n, m in model.named_modules()}

    def hook(mod, inp, out):
        n = names[mod]
        per_sample = out.numel() / example.shape[0]
        if isinstance(mod, nn.Linear):
            macs[n] = macs.get(n, 0.0) + per_sample * mod.in_features
            width[n] = mod.in_features
        else:
            k = mod.weight[0].numel()  # in_channels / groups x kernel
            macs[n] = macs.get(n, 0.0) + per_sample * k
            width[n] = mod.in_channels
        outputs[n] = out

    for m in model.modules():
        if isinstance(m, CONV_LINEAR):
            hooks.append(m.register_forward_hook(hook))
    try:
        with torch.no_grad():
            y = model(example)
    finally:
        for h in hooks:
            h.remove()
    final = {n for n, o in outputs.items() if o is y or (o.data_ptr() == y.data_ptr() and o.shape == y.shape)}
    return macs, width, final


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
    macs, width, final = _module_macs(model, example)
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


# ---------------------------------------------------------------- choosing channels

def allowed_counts(size: int, round_to: int) -> list[int]:
    """Kept-channel counts a group may take: multiples of round_to (at least one), or all of it."""
    return sorted({size} | {m for m in range(round_to, size, round_to)})


def select(plan: ChannelPlan, scores: list[torch.Tensor], target: float, round_to: int) -> tuple[list[torch.Tensor], dict]:
    """Kept channels per group: starting from all, repeatedly drop the chunk (down to the next
    allowed count) with the least score per MAC saved, until the exact MACs meet target x dense.
    Rounding is part of the search, so the budget holds for the counts actually exported."""
    budget = target * plan.dense_macs
    order = [torch.argsort(s.float().cpu(), descending=True) for s in scores]
    counts = [g.size for g in plan.groups]
    current = plan.macs(counts)
    while current > budget:
        best = None
        for i, g in enumerate(plan.groups):
            lower = [c for c in allowed_counts(g.size, round_to) if c < counts[i]]
            if not lower:
                continue
            trial = list(counts)
            trial[i] = lower[-1]
            saved = current - plan.macs(trial)
            lost = float(scores[i].float().cpu()[order[i][lower[-1]:counts[i]]].sum())
            ratio = lost / max(saved, 1e-12)
            if best is None or ratio < best[0]:
                best = (ratio, trial)
        if best is None:
            break
        counts = best[1]
        current = plan.macs(counts)
    keep = [order[i][:counts[i]].sort().values for i in range(len(plan.groups))]
    info = {"groups": len(plan.groups), "kept_channels": {g.root: int(c) for g, c in zip(plan.groups, counts)},
            "group_sizes": {g.root: g.size for g in plan.groups}, "macs_kept": current / max(plan.dense_macs, 1e-12),
            "target_macs": target, "round_to": round_to, "budget_met": current <= budget + 1e-6,
            "left_whole": plan.skipped}
    if not info["budget_met"]:
        info["notes"] = [f"channels: kept {info['macs_kept']:.3f} of the dense MACs, above search.target_macs "
                         f"{target:g}: every prunable group is at its smallest count (groups left whole: "
                         f"{len(plan.skipped)})"]
    return keep, info


def magnitude_scores(model: nn.Module, plan: ChannelPlan) -> list[torch.Tensor]:
    """L1 norm of each channel's producer rows, summed over the group's producers and divided by the
    group's mean so that groups of different layers compare."""
    params = dict(model.named_modules())
    out = []
    for g in plan.groups:
        s = torch.zeros(g.size)
        for m in g.of("out"):
            w = params[m.module].weight.detach().float().cpu()
            s.index_add_(0, torch.tensor(m.root), w[m.idx].abs().reshape(len(m.idx), -1).sum(1))
        out.append(s / s.mean().clamp_min(1e-12))
    return out


def mask_density_scores(plan: ChannelPlan, mask: Mask) -> list[torch.Tensor]:
    """Fraction of each channel's producer weights an (unstructured) mask keeps."""
    out = []
    for g in plan.groups:
        kept, total = torch.zeros(g.size), torch.zeros(g.size)
        for m in g.of("out"):
            rows = mask[f"{m.module}.weight"][m.idx].reshape(len(m.idx), -1).float().cpu()
            kept.index_add_(0, torch.tensor(m.root), rows.sum(1))
            total.index_add_(0, torch.tensor(m.root), torch.full((len(m.idx),), float(rows.shape[1])))
        out.append(kept / total.clamp_min(1))
    return out


# ---------------------------------------------------------------- masks and folding

def _removed(g: ChannelGroup, kept: torch.Tensor) -> torch.Tensor:
    gone = torch.ones(g.size, dtype=torch.bool)
    gone[kept] = False
    return gone


def channel_mask(model: nn.Module, plan: ChannelPlan, keep: list[torch.Tensor]) -> Mask:
    """The weight Mask of a channel selection: producer rows and consumer columns of removed channels."""
    mask = Mask.ones_like(model)
    for g, kept in zip(plan.groups, keep):
        gone = _removed(g, kept)
        for m in g.members:
            if m.kind == "norm":
                continue
            sel = [i for i, r in zip(m.idx, m.root) if gone[r]]
            w = mask[f"{m.module}.weight"]
            if m.kind == "out":
                w[sel] = False
            else:
                w[:, sel] = False
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
    was_training = model.training
    model.eval()
    try:
        model(example)
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
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
            contrib = mod.weight[:, sel].sum(dim=tuple(range(2, mod.weight.dim()))) @ c
        spread = max(spread, float((vals - c.unsqueeze(0 if isinstance(mod, nn.Linear) else 1)).abs().max()))
        if mod.bias is None:
            mod.bias = nn.Parameter(torch.zeros(mod.weight.shape[0], device=mod.weight.device, dtype=mod.weight.dtype))
        mod.bias += contrib
        mod.weight[:, sel] = 0
    return spread


# ---------------------------------------------------------------- surgery and spec

def shrink(model: nn.Module, plan: ChannelPlan, keep: list[torch.Tensor], example: torch.Tensor) -> nn.Module:
    """A copy of `model` with the removed channels physically gone (Torch-Pruning's prune functions
    on the dependency groups)."""
    model = copy.deepcopy(model).eval()
    example = example.to(next(model.parameters()).device)
    with torch.enable_grad():
        dg = tp.DependencyGraph().build_dependency(model, example_inputs=example, verbose=False)
        mods = dict(model.named_modules())
        for g, kept in zip(plan.groups, keep):
            gone = _removed(g, kept).nonzero().flatten().tolist()
            if not gone:
                continue
            root = mods[g.root]
            fn = tp.prune_linear_out_channels if isinstance(root, nn.Linear) else tp.prune_conv_out_channels
            dg.get_pruning_group(root, fn, idxs=gone).prune()
    return model


def arch_spec(model: nn.Module) -> dict:
    """Plain data that turns the original architecture into the shrunk one: the width attributes of
    every Conv/Linear/norm and the shape of every state_dict entry (as timm's pruned models do)."""
    modules = {}
    for name, mod in model.named_modules():
        for cls, attrs in SPEC_ATTRS.items():
            if isinstance(mod, cls):
                modules[name] = {a: (list(getattr(mod, a)) if isinstance(getattr(mod, a), tuple) else getattr(mod, a))
                                 for a in attrs}
    shapes = {k: list(v.shape) for k, v in model.state_dict().items()}
    return {"format": "ticketforge.spec/1", "modules": modules, "shapes": shapes}


def apply_spec(model: nn.Module, spec: dict) -> nn.Module:
    """Resize a freshly built model to `spec` in place (weights still to be loaded)."""
    mods = dict(model.named_modules())
    for name, attrs in spec["modules"].items():
        if name not in mods:
            raise UserError(f"the architecture spec names a layer {name!r} that this architecture does not have")
        for a, v in attrs.items():
            setattr(mods[name], a, tuple(v) if isinstance(v, list) else v)
    for key, shape in spec["shapes"].items():
        owner_name, _, attr = key.rpartition(".")
        owner = mods.get(owner_name)
        if owner is None:
            raise UserError(f"the architecture spec names {key!r} that this architecture does not have")
        current = getattr(owner, attr, None)
        if isinstance(current, torch.Tensor) and list(current.shape) == shape:
            continue
        blank = torch.zeros(shape, dtype=current.dtype if isinstance(current, torch.Tensor) else torch.float32)
        if attr in owner._buffers:
            owner._buffers[attr] = blank
        else:
            setattr(owner, attr, nn.Parameter(blank))
    return model


def load_shrunk(path) -> nn.Module:
    """Rebuild a shrunk model from a ticket.pt (torch.load with weights_only=True: no pickles)."""
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise UserError(f"{path} is not a readable ticket: {str(exc).splitlines()[0] if str(exc) else exc}") from None
    if not isinstance(obj, dict) or "state_dict" not in obj:
        raise UserError(f"{path} is not a ticketforge ticket (no state_dict)")
    if not obj.get("arch"):
        raise UserError(f"{path} does not name its architecture (it was compressed from a pickled or "
                        "TorchScript model), so the shrunk model cannot be rebuilt from plain data")
    model = models.build(obj["arch"], obj.get("arch_kwargs") or {})
    if obj.get("spec"):
        apply_spec(model, obj["spec"])
    model.load_state_dict(obj["state_dict"])
    return model.eval()
