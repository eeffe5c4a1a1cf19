"""The structures a ticket becomes, one descriptor each, registered by name where it is defined.

A structure is everything the rest of the pipeline needs to know about one target form:
- what it searches (`units`: "weights", "channels", "blocks"; a search method that scores such
  units, ticketforge.search.Method.units, searches the structure directly through `search`), which
  `search` keys set its budget (`budget_keys`; `sweep_key` is the one a sweep varies);
- `check(recipe)`: its rules for a recipe, run by the recipe schema before any work, so a bad
  combination is exit 2 with nothing written;
- `prepare(...)`: fit the search's mask to the structure before fine-tuning, and `mask_scale(recipe)`:
  its training hook (e.g. 2:4's mask decay);
- `convert(...)`: turn the fine-tuned ticket into the structure (a `Converted`), `verify(...)`: check
  the exported file really has it (its report section, or a VerificationError), `render(section)`:
  that section in report.md, `gate_checks(section)`: what the CI gate checks of it;
- budgets users think in (ticketforge.budget): `plan_budget(...)` turns one into the structure's own
  key before the search (a size into a sparsity), `tighten(...)` removes more when the exported
  model misses it;
- `rebuild(model, spec)`: redo the conversion on a freshly built model from the plain-data spec
  that `convert` wrote into ticket.pt, so that every ticket loads as the MODEL of a later run.

This module and the descriptors import no torch (the recipe schema uses them); each descriptor
imports its implementation modules (torch, torch-pruning, onnx) inside its methods.
Adding a structure: one module in this package (or any module named by `--plugin`, or a
`ticketforge.structures` entry point) with a Structure subclass decorated with `@register`; see
docs/adding-a-structure.md. The registry finds the modules of this package on its first lookup."""
from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass, field
from importlib import metadata
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
    # What the structure's own search scores ("weights", "channels", "blocks"); None: it takes the
    # method's weight ticket as it is (unstructured).
    units: str | None = None
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
        from ticketforge.search import METHODS

        if not self.searched_by(METHODS.get(recipe.search.method)):
            raise UserError(f"recipe: convert.structure '{self.name}' is searched by the methods "
                            f"{', '.join(self.methods())}; got search.method '{recipe.search.method}'")
        budget.check(recipe, self.choosable())

    # ------------------------------------------------------------ which methods, which keys
    def scores_units(self, method) -> bool:
        """The method scores this structure's units itself (ticketforge.search.Method.units)."""
        return self.units is not None and self.units in method.units

    def accepts(self, method) -> bool:
        """Whether `method` (a ticketforge.search.Method) can search this structure."""
        return self.scores_units(method)

    def searched_by(self, method) -> bool:
        """accepts(method), and the method has what this structure then runs: a score of its units, or
        a weight-level search (a method without one, Method.target "", only scores units)."""
        return self.accepts(method) and (self.scores_units(method) or bool(method.target))

    def methods(self) -> list[str]:
        from ticketforge.search import METHODS

        return [name for name, m in METHODS.items() if self.searched_by(m)]

    def method_keys(self, method) -> tuple[str, ...]:
        """The `search` keys `method` reads when it searches this structure."""
        return method.unit_keys if self.scores_units(method) else method.keys

    def starts(self, method) -> tuple[str, ...]:
        """The search.start values `method` honours here: a structure's own search scores the trained
        weights only (a rewound or fresh start would need the structure's own retraining schedule)."""
        return ("trained",) if self.scores_units(method) else method.starts

    def search_keys(self, method) -> tuple[str, ...]:
        """The `search` keys this structure reads with `method` (its budget, and how it is met)."""
        return self.budget_keys + self.tuning_keys

    def search(self, ctx, method):
        """Find the ticket (a ticketforge.search.base.SearchResult). By default the method's own
        weight-level search; a structure with units of its own searches them (ctx.recipe names the method)."""
        return method.load()(ctx)

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
        """Check the exported file has the structure; returns its report section (or None), kept in
        report.json under `structure` -> this structure's name."""
        return None

    def render(self, section: dict) -> list[str]:
        """The report section `verify` returned, as lines of report.md."""
        return []

    def gate_checks(self, section: dict) -> list[dict]:
        """Checks the CI gate adds for this structure's report section (ticketforge.gate.check rows):
        what the structure promises, read back from the exported file."""
        return []

    def describe_change(self, info: dict) -> str:
        """What `tighten` changed, in words, from the converted model's info (for the log)."""
        return self.name

    def tighten(self, model, mask, recipe: "Recipe", example, keep: float, info: dict):
        """The budget step found the export over its budget: remove more from the fine-tuned `model`
        (in place) so that its cost falls to about `keep` x what it is, least useful parts first.
        `info` is the search's report section. Returns (model, mask), or None when nothing is left."""
        return None

    def rebuild(self, model, spec: dict):
        """Apply a ticket's spec to a freshly built model (weights loaded afterwards)."""
        return model

    def reads_spec(self, spec: dict) -> bool:
        """Whether a spec of a format-1 ticket (one spec, no structure name) is this structure's."""
        return False


def _discover() -> None:
    """Import every module of this package (each registers the structures it defines), then those of
    installed plug-ins (entry point group `ticketforge.structures`)."""
    for info in pkgutil.iter_modules(__path__):
        if not info.name.startswith("_"):
            importlib.import_module(f"{__name__}.{info.name}")
    for entry in metadata.entry_points(group="ticketforge.structures"):
        entry.load()


STRUCTURES: Registry[Structure] = Registry("structure", discover=_discover)


def get(name: str) -> Structure:
    return STRUCTURES.get(name, "convert.structure")


def register(cls: type[Structure]) -> type[Structure]:
    """Class decorator: register a Structure subclass under its `name`."""
    STRUCTURES.add(cls.name, cls())
    return cls


def find_ticket(ctx):
    """Search the recipe's structure with the recipe's method (ctx: a SearchContext)."""
    from ticketforge.search import METHODS

    return get(ctx.recipe.convert.structure).search(ctx, METHODS.get(ctx.recipe.search.method))
