"""Ticket search methods, registered by name, and what each reads from the recipe.

This module is light on purpose (no torch): the recipe schema checks a recipe against the
catalogue below before any work, so `ticketforge recipes` and bad input stay cheap. The methods
themselves live in the modules named here and are imported when a search runs. A method takes a
SearchContext and returns a SearchResult (ticketforge.search.base)."""
from __future__ import annotations

import importlib
from dataclasses import dataclass

from ticketforge.registry import Registry

# Keys of the `search` section every method reads; the structure's budget keys come on top
# (ticketforge.structures).
COMMON_KEYS = ("method", "start", "sanity")
CTS_KEYS = ("epochs", "steps", "min_steps", "lr", "batch_size", "objective", "temperature", "balance", "budget_slack",
            "stop_overlap", "stop_window", "check_every")
CTS_WEIGHT_KEYS = CTS_KEYS + ("stages", "stage_epochs", "min_per_output")  # `cts` only (search/cts.py)
ALL_STARTS = ("trained", "rewind", "init")


@dataclass(frozen=True)
class Method:
    name: str
    target: str                    # "module:function" under ticketforge.search
    keys: tuple[str, ...] = ()     # `search` keys it reads beyond COMMON_KEYS and the budget
    starts: tuple[str, ...] = ALL_STARTS  # search.start values it honours
    summary: str = ""
    # How a size budget predicts, before the search, which weights this method zeroes: by "lamp" or
    # "global" magnitude, or as its recipe's `search.scope` says ("scope").
    size_stand_in: str = "global"

    def stand_in(self, recipe) -> str:
        return recipe.search.scope if self.size_stand_in == "scope" else self.size_stand_in

    def load(self):
        module, _, fn = self.target.partition(":")
        return getattr(importlib.import_module(f"ticketforge.search.{module}"), fn)


METHODS: Registry[Method] = Registry("search method")
for _m in (
    Method("magnitude", "magnitude:magnitude", ("scope",), summary="magnitude (LAMP or global)",
           size_stand_in="scope"),
    Method("random", "baselines:random_pruning", summary="uniformly random weights"),
    Method("snip", "baselines:snip", ("batch_size",), summary="SNIP connection sensitivity"),
    Method("grasp", "baselines:grasp", ("batch_size",), summary="GraSP gradient flow"),
    Method("synflow", "baselines:synflow", ("synflow_rounds",), summary="SynFlow, data-free"),
    Method("cts", "cts:cts", CTS_WEIGHT_KEYS, summary="Concrete Ticket Search"),
    Method("imp", "imp:imp", ("epochs", "steps", "prune_fraction"), summary="iterative magnitude pruning"),
    # Methods that search a structure directly. They search the trained weights only: a rewound or
    # fresh start would need the structure's own retraining schedule, which they do not have.
    Method("magnitude-2to4", "nm_methods:magnitude_2to4", starts=("trained",),
           summary="2 largest |w| of every 4 (apex ASP)"),
    Method("cts-2to4", "nm_methods:cts_2to4", CTS_KEYS, starts=("trained",), summary="CTS, then 2 of every 4"),
    Method("magnitude-channels", "channel_methods:magnitude_channels", starts=("trained",),
           summary="L1 norm per channel group"),
    Method("cts-channels", "channel_methods:cts_channels", CTS_KEYS, starts=("trained",),
           summary="CTS gates per channel"),
    Method("cts-blocks", "block_methods:cts_blocks", CTS_KEYS, starts=("trained",),
           summary="CTS gates per residual block"),
):
    METHODS.add(_m.name, _m)

# Names used before the methods were named like their recipes: a one-line message says what to write.
RENAMED = {"magnitude_2to4": "magnitude-2to4", "cts_2to4": "cts-2to4", "magnitude_channels": "magnitude-channels",
           "cts_channels": "cts-channels", "layers": "cts-blocks"}


def run(ctx):
    """Run the recipe's search method on `ctx` (a SearchContext)."""
    return METHODS.get(ctx.recipe.search.method).load()(ctx)
