"""Turn a fine-tuned ticket into the structure named by `convert.structure`."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from torch import nn

from ticketforge.errors import UserError
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


def convert(model: nn.Module, mask: Mask | None, recipe: Recipe) -> Converted:
    return CONVERTERS[recipe.convert.structure](model, mask, recipe)
