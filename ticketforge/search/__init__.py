"""Ticket search methods, registered by name, and what each reads from the recipe.

This module is light on purpose (no torch): the recipe schema checks a recipe against the
catalogue below before any work, so `ticketforge recipes` and bad input stay cheap. The methods
themselves live in the modules named here and are imported when a search runs. A method takes a
SearchContext and returns a SearchResult (ticketforge.search.base). A search runs through the
recipe's structure: ticketforge.structures.find_ticket."""
from __future__ import annotations

import importlib
from dataclasses import dataclass

from ticketforge.registry import Registry

# Keys of the `search` section every method reads; the structure's budget keys come on top
# (ticketforge.structures).
COMMON_KEYS = ("method", "start", "sanity")
CTS_KEYS = ("epochs", "steps", "min_steps", "lr", "batch_size", "objective", "temperature", "prior", "balance",
            "budget_slack", "stop_overlap", "stop_window", "check_every")
CTS_WEIGHT_KEYS = CTS_KEYS + ("stages", "stage_epochs", "min_per_output", "checkpoint")  # `cts` only (search/cts.py)
ALL_STARTS = ("trained", "rewind", "init")
CALIBRATION_KEYS = ("calibration_samples", "batch_size")  # one-shot methods' calibration data (search/calibration.py)


@dataclass(frozen=True)
class Method:
    """A search method: what it scores, and the keys it reads.

    A method scores single weights with its own ticket search (`target`, a SearchContext ->
    SearchResult function), and may also score the units of a structure's own search (`units`:
    "weights" for N:M, "channels", "blocks"), through `scorer`, a (SearchContext, Units) -> scores
    function (ticketforge.search.base.Units): the structure says what a unit is and chooses from the
    scores; the method only scores. Method and structure are chosen independently by the recipe
    (`search.method`, `convert.structure`)."""

    name: str
    target: str                    # "module:function" under ticketforge.search: the weight-level search; "": none
    keys: tuple[str, ...] = ()     # `search` keys it reads beyond COMMON_KEYS and the budget
    starts: tuple[str, ...] = ALL_STARTS  # search.start values it honours
    summary: str = ""
    # How a size budget predicts, before the search, which weights this method zeroes: by "lamp" or
    # "global" magnitude, or as its recipe's `search.scope` says ("scope").
    size_stand_in: str = "global"
    units: tuple[str, ...] = ()    # kinds of structure units it scores
    scorer: str = ""               # "module:function" scoring a structure's units
    unit_keys: tuple[str, ...] = ()  # `search` keys it reads when it scores a structure's units
    # Its unit scores are gate logits learned with Units.apply acting on the model: they saw what a
    # removed unit leaves behind (a channel's BatchNorm shift), and sigmoid(score) is a keep probability.
    gates: bool = False

    def stand_in(self, recipe) -> str:
        return recipe.search.scope if self.size_stand_in == "scope" else self.size_stand_in

    def load(self):
        return _load(self.target)

    def score(self, ctx, units):
        """The method's scores of a structure's units (higher = keep)."""
        return _load(self.scorer)(ctx, units)


def _load(target: str):
    module, _, fn = target.partition(":")
    return getattr(importlib.import_module(f"ticketforge.search.{module}"), fn)


METHODS: Registry[Method] = Registry("search method")
for _m in (
    Method("magnitude", "magnitude:magnitude", ("scope",), summary="magnitude (LAMP or global); of a structure's "
           "units: |w| (N:M, apex ASP), L1 per channel", size_stand_in="scope",
           units=("weights", "channels"), scorer="magnitude:score_units"),
    Method("random", "baselines:random_pruning", summary="uniformly random weights"),
    Method("snip", "baselines:snip", ("batch_size",), summary="SNIP connection sensitivity"),
    Method("grasp", "baselines:grasp", ("batch_size",), summary="GraSP gradient flow"),
    Method("synflow", "baselines:synflow", ("synflow_rounds",), summary="SynFlow, data-free"),
    Method("cts", "cts:cts", CTS_WEIGHT_KEYS, summary="Concrete Ticket Search; of a structure's units: one gate each",
           units=("weights", "channels", "blocks"), scorer="cts:score_units", unit_keys=CTS_KEYS, gates=True),
    Method("imp", "imp:imp", ("epochs", "steps", "prune_fraction"), summary="iterative magnitude pruning"),
    Method("wanda", "wanda:wanda", CALIBRATION_KEYS, summary="Wanda, |w| x input norm on calibration data, per "
           "output (Sun et al. 2023); of N:M groups: the same score", size_stand_in="lamp", units=("weights",),
           scorer="wanda:score_units", unit_keys=CALIBRATION_KEYS),
    Method("sparsegpt", "sparsegpt:sparsegpt", CALIBRATION_KEYS, starts=("trained",), summary="SparseGPT, layer-wise "
           "OBS with the kept weights updated, on calibration data (Frantar & Alistarh 2023); of N:M groups: the "
           "same, N of M chosen block by block", size_stand_in="lamp", units=("weights",),
           scorer="sparsegpt:score_units", unit_keys=CALIBRATION_KEYS),
    Method("similarity", "", starts=("trained",), summary="residual blocks by Block Influence, 1 - cos(input, "
           "output) on calibration data (ShortGPT, Men et al. 2024); blocks only", units=("blocks",),
           scorer="similarity:score_units", unit_keys=CALIBRATION_KEYS),
):
    METHODS.add(_m.name, _m)

# Method names of earlier versions, each one method on one structure: a recipe that names one gets
# that method and structure (the built-in recipes keep those names).
ALIASES = {"magnitude-2to4": ("magnitude", "2:4"), "cts-2to4": ("cts", "2:4"),
           "magnitude-channels": ("magnitude", "channels"), "cts-channels": ("cts", "channels"),
           "cts-blocks": ("cts", "blocks"), "layers": ("cts", "blocks")}
# Older spellings: a one-line message says what to write.
RENAMED = {"magnitude_2to4": "magnitude-2to4", "cts_2to4": "cts-2to4", "magnitude_channels": "magnitude-channels",
           "cts_channels": "cts-channels"}
