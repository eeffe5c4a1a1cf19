"""The structures a ticket becomes, one descriptor each, registered by name.

A structure is everything the rest of the pipeline needs to know about one target form:
- which search methods' tickets it accepts (`methods`) and which `search` keys set its budget
  (`budget_keys`; `sweep_key` is the one a sweep varies);
- `check(recipe)`: its rules for a recipe, run by the recipe schema before any work, so a bad
  combination is exit 2 with nothing written;
- `prepare(...)`: fit the search's mask to the structure before fine-tuning, and `mask_scale(recipe)`:
  its training hook (e.g. 2:4's mask decay);
- `convert(...)`: turn the fine-tuned ticket into the structure (a `Converted`), `verify(...)`: check
  the exported file really has it (a report section, or a VerificationError);
- budgets users think in (ticketforge.budget): `plan_budget(...)` turns one into the structure's own
  key before the search (a size into a sparsity), `tighten(...)` removes more when the exported
  model misses it;
- `rebuild(model, spec)`: redo the conversion on a freshly built model from the plain-data spec
  that `convert` wrote into ticket.pt, so that every ticket loads as the MODEL of a later run.

This module and the descriptors import no torch (the recipe schema uses them); each descriptor
imports its implementation modules (torch, torch-pruning, onnx) inside its methods.
Adding a structure: one module with a Structure subclass, registered in STRUCTURES below (see the
docs/adding-a-structure.md)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

from ticketforge.errors import UserError
from ticketforge.registry import Registry

if TYPE_CHECKING:  # type names only: importing them here would load torch
    from torch import nn

    from ticketforge.masks import Mask
    from ticketforge.recipe import Recipe


@dataclass
class Converted:
    model: "nn.Module"
    mask: "Mask | None"
    info: dict = field(default_factory=dict)   # goes into the report under "convert"
    spec: dict | None = None                   # plain data for rebuild(); None when the shapes did not change


class Structure:
    name: str = ""
    summary: str = ""
    methods: tuple[str, ...] = ()        # search methods whose tickets this structure takes
    budget_keys: tuple[str, ...] = ()    # `search` keys that set the budget
    tuning_keys: tuple[str, ...] = ()    # `search` keys that tune how a budget is met, without setting one
    fixed_keys: tuple[str, ...] = ()     # budget keys accepted but not free to choose (2:4's sparsity)
    sweep_key: str | None = None         # the `search` key a sweep varies; None: nothing to sweep
    convert_keys: tuple[str, ...] = ()   # `convert` keys it reads beyond `structure`
    sparse_kernels: bool = False         # TensorRT builds the engine with its sparse (2:4) tactics

    # ------------------------------------------------------------ before any work
    def check(self, recipe: "Recipe") -> None:
        """Raise UserError when the recipe does not fit this structure."""
        from ticketforge import budget

        if recipe.search.method not in self.methods:
            raise UserError(f"recipe: convert.structure '{self.name}' takes tickets of the search methods "
                            f"{', '.join(self.methods)}; got search.method '{recipe.search.method}'")
        budget.check(recipe, self.choosable())

    def search_keys(self, method: str) -> tuple[str, ...]:
        """The `search` keys this structure reads with `method` (its budget, and how it is met)."""
        return self.budget_keys + self.tuning_keys

    def choosable(self) -> tuple[str, ...]:
        """The budget keys of which a run sets exactly one."""
        return tuple(k for k in self.budget_keys if k not in self.fixed_keys)

    def budget(self, recipe: "Recipe") -> str:
        """The budget in words, for the log."""
        from ticketforge import budget

        return budget.describe(recipe) or ", ".join(
            f"{k} {getattr(recipe.search, k):g}" for k in self.budget_keys
            if k not in budget.USER_KEYS) or "fixed"

    def target_sparsity(self, recipe: "Recipe") -> float | None:
        """The weight sparsity the recipe asks for, where it asks for one."""
        return None

    def plan_budget(self, model, recipe: "Recipe", example, log) -> tuple["Recipe", dict]:
        """Before the search: the recipe with a user budget (ticketforge.budget) turned into this
        structure's own key where the search needs one, and what was planned (for the report)."""
        return recipe, {}

    # ------------------------------------------------------------ around the fine-tune
    def prepare(self, model, mask, recipe, example) -> tuple[Any, Any, dict]:
        """Fit the search's mask to the structure before fine-tuning: (model, mask, info)."""
        return model, mask, {}

    def mask_scale(self, recipe: "Recipe") -> Callable[[float], float] | None:
        """Training hook: the value pruned weights are scaled by at a fraction of training, or None
        for a hard mask."""
        return None

    # ------------------------------------------------------------ after it
    def convert(self, model, mask, recipe, example) -> Converted:
        raise NotImplementedError

    def verify(self, onnx_path, dense_onnx_path, converted: Converted, recipe: "Recipe") -> dict | None:
        """Check the exported file has the structure; returns a report section (or None)."""
        return None

    def tighten(self, model, mask, recipe: "Recipe", example, keep: float, info: dict):
        """The budget step found the export over its budget: remove more from the fine-tuned `model`
        (in place) so that its cost falls to about `keep` x what it is, least useful parts first.
        `info` is the search's report section. Returns (model, mask), or None when nothing is left."""
        return None

    def rebuild(self, model, spec: dict):
        """Apply a ticket's spec to a freshly built model (weights loaded afterwards)."""
        return model


def fewer_weights(onnx_path, dense_onnx_path, what: str) -> None:
    """A structure that removes weights must leave fewer in the exported file than in the dense one:
    a run that changed nothing is never reported as a success."""
    from ticketforge.errors import VerificationError
    from ticketforge.validate import onnx_stats

    ours, dense = (onnx_stats(p, count_macs=False)["weights"] for p in (onnx_path, dense_onnx_path))
    if ours >= dense:
        raise VerificationError(f"{what} (model.onnx holds {ours:,} weights, dense.onnx {dense:,})")


STRUCTURES: Registry[Structure] = Registry("structure")


def get(name: str) -> Structure:
    return STRUCTURES.get(name, "convert.structure")


def _register_builtins() -> None:
    from ticketforge.structures.blocks import Blocks
    from ticketforge.structures.channels import Channels
    from ticketforge.structures.nm import NM
    from ticketforge.structures.unstructured import Unstructured

    for cls in (Unstructured, NM, Channels, Blocks):
        STRUCTURES.add(cls.name, cls())


_register_builtins()
