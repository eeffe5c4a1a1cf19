"""Turn a fine-tuned ticket into the structure named by `convert.structure`."""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from ticketforge import nm, structure
from ticketforge.errors import UserError, VerificationError
from ticketforge.masks import Mask
from ticketforge.recipe import Recipe


@dataclass
class Converted:
    model: nn.Module
    mask: Mask | None
    info: dict = field(default_factory=dict)   # goes into the report under "convert"
    spec: dict | None = None                   # architecture spec to rebuild a shrunk model without pickles


# A converter gets the fine-tuned model, its mask, the recipe and an example input batch (to trace
# the model's dependencies).
CONVERTERS: dict[str, Callable[[nn.Module, Mask | None, Recipe, torch.Tensor], Converted]] = {}
# Optional per structure: make the search's mask fit the structure *before* fine-tuning, so that
# the fine-tune trains the network that will be exported. Returns (model, mask, info).
PREPARERS: dict[str, Callable[[nn.Module, Mask | None, Recipe, torch.Tensor], tuple]] = {}


def register(name: str):
    def deco(fn):
        CONVERTERS[name] = fn
        return fn
    return deco


@register("unstructured")
def keep_zeros(model: nn.Module, mask: Mask | None, recipe: Recipe, example: torch.Tensor) -> Converted:
    """Scattered zeros stay as they are: smaller when compressed, not faster on dense kernels."""
    if mask is not None:
        mask.apply(model)
    return Converted(model=model, mask=mask, info={"structure": "unstructured"})


@register("blocks")
def removed_blocks(model: nn.Module, mask: Mask | None, recipe: Recipe, example: torch.Tensor) -> Converted:
    """The layer search already removed the blocks physically; record which, so that ticket.pt can be
    rebuilt (ticketforge.search.layers.remove_blocks on a fresh model, then load_state_dict)."""
    from ticketforge.search.layers import RemovedBlock

    removed = {n: m.was for n, m in model.named_modules() if isinstance(m, RemovedBlock)}
    if not removed:
        raise UserError("convert.structure blocks: no residual block was removed; it goes with search.method layers")
    if mask is not None:
        mask.apply(model)
    return Converted(model=model, mask=mask, info={"structure": "blocks", "removed_blocks": removed},
                     spec={"removed_blocks": list(removed)})


@register("2:4")
def to_2to4(model: nn.Module, mask: Mask | None, recipe: Recipe, example: torch.Tensor) -> Converted:
    """The zeros stay in a dense tensor (as apex ASP and ModelOpt export them); a runtime with
    sparse kernels (TensorRT with SPARSE_WEIGHTS on Ampere or newer) compresses them."""
    if mask is None:
        raise VerificationError("2:4 conversion got no mask: use a 2:4 search method (magnitude_2to4, cts_2to4)")
    mask.apply(model)
    state = nm.summary(model)
    if state["bad_groups"]:
        raise VerificationError(f"2:4: {state['bad_groups']} of {state['groups']} weight groups in eligible layers "
                                "have more than 2 non-zeros after fine-tuning")
    notes = ["2:4 zeros make no CPU runtime faster (measured 0.98-1.04x); the speed-up needs sparse tensor "
             "cores: TensorRT >= 8 with SPARSE_WEIGHTS (trtexec --sparsity=enable) on Ampere or newer"]
    if state["ineligible"]:
        notes.append(f"2:4: {len(state['ineligible'])} layer(s) left dense, not eligible "
                     f"(out % 8, in % 16): {', '.join(state['ineligible'])}")
    return Converted(model=model, mask=mask, info={"structure": "2:4", **state, "notes": notes})


def _channel_selection(model: nn.Module, mask: Mask | None, recipe: Recipe, example: torch.Tensor):
    """The channel groups and which channels stay. A mask from a channel search says it directly;
    any other mask (an unstructured ticket) is turned into one by dropping the channels it left
    emptiest until search.target_macs is met, their BatchNorm shift folded into the consumers."""
    plan = structure.discover(model, example)
    keep = structure.keep_from_mask(plan, mask, model) if mask is not None else None
    info: dict = {"structure": "channels", "groups": len(plan.groups), "left_whole": plan.skipped}
    if keep is None:
        scores = (structure.mask_density_scores(plan, mask) if mask is not None
                  else structure.magnitude_scores(model, plan))
        keep, sel = structure.select(plan, scores, recipe.search.target_macs, recipe.convert.round_to)
        sel["fold_spread"] = structure.fold_shifts(model, plan, keep, example)
        mask = structure.channel_mask(model, plan, keep)
        info.update(sel)
        info["notes"] = [f"the ticket was not channel-structured: the channels its mask left emptiest were "
                         f"dropped to keep {sel['macs_kept']:.3f} of the dense MACs"]
    return plan, keep, mask, info


def prepare_channels(model: nn.Module, mask: Mask | None, recipe: Recipe, example: torch.Tensor):
    _, _, mask, info = _channel_selection(model, mask, recipe, example)
    return model, mask, info


PREPARERS["channels"] = prepare_channels


@register("channels")
def remove_channels(model: nn.Module, mask: Mask | None, recipe: Recipe, example: torch.Tensor) -> Converted:
    """Physically remove the masked channels; the report gets the largest logit difference between
    the masked model and the shrunk one (0 up to float rounding: the shrunk model is the ticket)."""
    plan, keep, mask, info = _channel_selection(model, mask, recipe, example)
    masked = copy.deepcopy(model).eval()
    mask.apply(masked)
    shrunk = structure.shrink(masked, plan, keep, example)
    with torch.no_grad():
        x = example.to(next(masked.parameters()).device)
        info["max_logit_diff_vs_masked"] = float((masked(x) - shrunk(x)).abs().max())
    info["kept_channels"] = {g.root: int(len(k)) for g, k in zip(plan.groups, keep)}
    info["group_sizes"] = {g.root: g.size for g in plan.groups}
    return Converted(model=shrunk, mask=None, info=info, spec=structure.arch_spec(shrunk))


def prepare(model: nn.Module, mask: Mask | None, recipe: Recipe, example: torch.Tensor):
    """Before fine-tuning: fit the mask to the target structure where that structure has a rule."""
    fn = PREPARERS.get(recipe.convert.structure)
    return fn(model, mask, recipe, example) if fn else (model, mask, {})


def convert(model: nn.Module, mask: Mask | None, recipe: Recipe, example: torch.Tensor) -> Converted:
    return CONVERTERS[recipe.convert.structure](model, mask, recipe, example)
