"""Where a ticket search starts (`search.start`), shared by every search method.

- trained: the user's trained weights; the ticket is then fine-tuned ("Lottery Jackpots Exist in
  Pre-trained Models": good sparse subnetworks already sit inside trained weights).
- rewind: the CTS paper's setting. Re-initialise the architecture, train it for
  `train.rewind_epochs` epochs of the `train` schedule, search there, and retrain the ticket from
  those weights for the rest of the same schedule (the learning-rate schedule continues, it does
  not restart).
- init: search at a fresh initialisation, then train the ticket with the full `train` schedule.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from ticketforge import finetune
from ticketforge.data import loader
from ticketforge.errors import UserError
from ticketforge.finetune import Schedule
from ticketforge.search.base import SearchContext


@dataclass
class StartPoint:
    model: nn.Module          # the weights the search runs on, on ctx.device, in eval mode
    schedule: Schedule | None = None  # how the ticket is trained next (SearchResult.schedule); None: `finetune`
    info: dict = field(default_factory=dict)      # for the report (search.start)


def fresh_model(ctx: SearchContext, seed: int | None = None) -> nn.Module:
    """A new initialisation of the user's architecture, reproducible from the seed and without
    disturbing the global random stream the rest of the run draws from."""
    if isinstance(ctx.model, torch.jit.ScriptModule) and ctx.loaded.arch is None:
        raise UserError(f"search.start={ctx.recipe.search.start} re-initialises the model, which a TorchScript "
                        "archive cannot do: give a state_dict with --arch")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(ctx.seed if seed is None else seed)
        model = ctx.loaded.fresh()
    return model.to(ctx.device).eval()


def rewind_epochs(ctx: SearchContext) -> int:
    tr = ctx.recipe.train
    k = int(round(tr.rewind_epochs))
    if k >= tr.epochs:
        raise UserError(f"recipe: train.rewind_epochs ({tr.rewind_epochs:g}) must be less than train.epochs "
                        f"({tr.epochs}): the ticket is retrained for the rest of the schedule")
    return k


def starting_point(ctx: SearchContext) -> StartPoint:
    start = ctx.recipe.search.start
    if start == "trained":
        return StartPoint(model=ctx.model, info={"start": "trained"})
    if ctx.loaded.arch is None:
        raise UserError(f"search.start={start} needs to re-initialise the model: pass --arch "
                        "(a built-in name or package.module:callable)")
    model = fresh_model(ctx)
    if start == "init":
        return StartPoint(model=model, schedule=Schedule.rest_of_training(ctx.recipe, 0),
                          info={"start": "init", "train_epochs": ctx.recipe.train.epochs})
    tr = ctx.recipe.train
    k = rewind_epochs(ctx)
    info = {"start": "rewind", "rewind_epochs": k, "train_epochs": tr.epochs}
    if k != tr.rewind_epochs:
        info["notes"] = [f"train.rewind_epochs {tr.rewind_epochs:g} rounded to {k} whole epochs"]
    if k:
        data = loader(ctx.data.train, tr.batch_size, shuffle=True, seed=ctx.seed)
        finetune.train(model, data, epochs=k, lr=tr.lr, device=ctx.device, optimizer="sgd",
                       momentum=tr.momentum, weight_decay=tr.weight_decay, total_epochs=tr.epochs,
                       grad_clip=ctx.recipe.finetune.grad_clip, ui=ctx.ui, desc=f"rewind: train {k} of {tr.epochs} epochs")
    model.eval()
    return StartPoint(model=model, schedule=Schedule.rest_of_training(ctx.recipe, k), info=info)
