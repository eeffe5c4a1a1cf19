"""What a search method gets (SearchContext) and returns (SearchResult), and what a structure asks
a method to score (Units)."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from ticketforge.data import DataBundle, loader
from ticketforge.finetune import Schedule
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
    # Where a long method keeps per-step results to resume from. Under torchrun every rank reads
    # it (a shared file system) and only rank 0 writes (ticketforge.distributed.is_main()).
    workdir: Path | None = None
    # The dense model as loaded, on `device`, never trained: what retraining a ticket distills from
    # (finetune.distill), and the only target there is for data without labels.
    teacher: nn.Module | None = None

    def teacher_kwargs(self, schedule: Schedule, dense_training: bool = False) -> dict:
        """finetune.train()'s teacher arguments under `schedule`. Dense training from a fresh init (to
        a rewind point, IMP's round 0) learns from the labels, as the papers train; without labels
        it distills like everything else."""
        if dense_training and self.data.labeled:
            return {}
        return schedule.teacher_kwargs(self.teacher)

    def train_loader(self, batch_size: int | None = None, shuffle: bool = True):
        return loader(self.data.train, batch_size or self.recipe.search.batch_size, shuffle=shuffle,
                      seed=self.seed)

    def example(self, n: int = 8) -> torch.Tensor:
        return self.data.example(n).to(self.device)


@dataclass
class SearchResult:
    model: nn.Module
    mask: Mask | None
    info: dict = field(default_factory=dict)   # goes into the report under "search"
    # The per-weight scores the mask was chosen from (higher = keep): sanity checks and 2:4
    # selection reuse them.
    scores: dict | None = None
    # How the ticket is trained next; None: the recipe's `finetune` section. A rewind start
    # retrains for the rest of the `train` schedule, IMP with rewinding has already trained it.
    schedule: Schedule | None = None


@dataclass
class Units:
    """A structure's units for a method to score, one score tensor per group (higher = keep): what a
    unit is, what keeping it costs, and how a soft keep value acts on the model. The structure
    chooses from the scores (N of M, channel counts under a budget, blocks); the method only scores.

    - `kind`: "weights", "channels" or "blocks" (a method scores the kinds in Method.units);
    - `model`: the model the keep values act on (blocks: a copy with a gate on every block);
    - `shapes`: group name -> shape of its score tensor;
    - `costs`: group name -> cost of keeping one unit (broadcastable to the shape), and `kept`: the
      cost the structure keeps; a method that learns its scores under a budget (CTS) aims at it;
    - `density`: the kept fraction at the start (a gate's initial keep probability);
    - `apply`: keep values per group (soft, in [0, 1]) -> the parameters to substitute in the forward;
    - `magnitude`: the structure's own magnitude of each unit (|w|, L1 of a channel's weights), or None;
    - `label`: what the units are, for progress lines ("2:4", "channels", "blocks")."""

    kind: str
    model: nn.Module
    shapes: dict[str, tuple]
    costs: dict[str, torch.Tensor]
    kept: float
    density: float
    apply: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]]
    magnitude: Callable[[], dict[str, torch.Tensor]] | None = None
    label: str = ""
