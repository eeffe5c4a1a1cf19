"""What a search method gets (SearchContext) and returns (SearchResult)."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

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
