"""Turn a fine-tuned ticket into the structure named by `convert.structure`."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from torch import nn

from ticketforge import nm
from ticketforge.errors import UserError, VerificationError
from ticketforge.masks import Mask
from ticketforge.recipe import Recipe


@dataclass
class Converted:
    model: nn.Module
    mask: Mask | None
    info: dict = field(default_factory=dict)   # goes into the report under "convert"
    spec: dict | None = None                   # architecture spec to rebuild a shrunk model without pickles


CONVERTERS: dict[str, Callable[[nn.Module, Mask | None, Recipe], Converted]] = {}


def register(name: str):
    def deco(fn):
        CONVERTERS[name] = fn
        return fn
    return deco


@register("unstructured")
def keep_zeros(model: nn.Module, mask: Mask | None, recipe: Recipe) -> Converted:
    """Scattered zeros stay as they are: smaller when compressed, not faster on dense kernels."""
    if mask is not None:
        mask.apply(model)
    return Converted(model=model, mask=mask, info={"structure": "unstructured"})


@register("blocks")
def removed_blocks(model: nn.Module, mask: Mask | None, recipe: Recipe) -> Converted:
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
def to_2to4(model: nn.Module, mask: Mask | None, recipe: Recipe) -> Converted:
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


def convert(model: nn.Module, mask: Mask | None, recipe: Recipe) -> Converted:
    return CONVERTERS[recipe.convert.structure](model, mask, recipe)
