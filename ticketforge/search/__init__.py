"""Ticket search methods, registered by name. A method takes a SearchContext and returns a
SearchResult: the mask it chose (and possibly a changed model, e.g. blocks removed)."""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from ticketforge.data import DataBundle, loader
from ticketforge.loading import LoadedModel
from ticketforge.masks import Mask
from ticketforge.recipe import Recipe
from ticketforge.ui import SILENT, UI


@dataclass
class SearchContext:
    model: nn.Module            # the trained model, on `device`, in eval mode; a method may change it
    loaded: LoadedModel         # loaded.fresh() rebuilds the architecture at a new init
    data: DataBundle
    recipe: Recipe
    device: torch.device
    seed: int = 0
    ui: UI = SILENT
    workdir: Path | None = None  # where a long method keeps per-step results to resume from
    # Where to keep results that do not depend on the target sparsity (e.g. warm-up weights), so
    # that a sweep's points share them (rank 0 only). Under torchrun every rank reads workdir
    # (a shared file system) and only rank 0 writes (ticketforge.distributed.is_main()).
    shared: Path | None = None

    def train_loader(self, batch_size: int | None = None, shuffle: bool = True):
        return loader(self.data.train, batch_size or self.recipe.search.batch_size, shuffle=shuffle,
                      seed=self.seed)


@dataclass
class SearchResult:
    model: nn.Module
    mask: Mask | None
    info: dict = field(default_factory=dict)   # goes into the report under "search"
    # The per-weight scores the mask was chosen from (higher = keep): sanity checks and 2:4
    # selection reuse them.
    scores: dict | None = None
    # Overrides of the fine-tune stage, e.g. rewind starts retrain for the rest of the schedule.
    finetune: dict = field(default_factory=dict)


METHODS: dict[str, Callable[[SearchContext], SearchResult]] = {}


def register(name: str):
    def deco(fn):
        METHODS[name] = fn
        return fn
    return deco


def run(ctx: SearchContext) -> SearchResult:
    return METHODS[ctx.recipe.search.method](ctx)


# Importing the method modules fills the registry.
for _module in ("magnitude", "cts", "baselines", "imp", "layers", "nm", "channels"):
    importlib.import_module(f"ticketforge.search.{_module}")
