"""Where a ticket search starts (`search.start`), shared by every search method.

- trained: the user's trained weights; the ticket is then fine-tuned ("Lottery Jackpots Exist in
  Pre-trained Models": good sparse subnetworks already sit inside trained weights).
- rewind: the CTS paper's setting. Re-initialise the architecture, train it for
  `train.rewind_steps` optimizer steps (or `train.rewind_epochs` epochs) of the `train` schedule,
  search there, and retrain the ticket from those weights for the rest of the same schedule (the learning-rate schedule continues, it does
  not restart). With `train.rewind_accuracy` the rewind point is instead the first step (checked every
  `train.rewind_check` steps) where the network reaches that fraction of the given trained model's
  validation accuracy: a share of training is a poor proxy (MNIST-1D's network is 37% accurate at 0.5
  epoch of 8, and CTS searched against that teacher trails LTR by 45 points).
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


def steps_per_epoch(ctx: SearchContext) -> int:
    return len(loader(ctx.data.train, ctx.recipe.train.batch_size, shuffle=True, seed=ctx.seed))


def rest_of_training(ctx: SearchContext, start_step: int) -> Schedule:
    """The `train` schedule from optimizer step `start_step` to its end."""
    epoch, within = divmod(start_step, steps_per_epoch(ctx))
    return Schedule.rest_of_training(ctx.recipe, epoch, within, labeled=ctx.data.labeled)


def rewind_step(ctx: SearchContext) -> int:
    """The rewind point, in optimizer steps of the `train` schedule: train.rewind_steps, or else
    train.rewind_epochs (fractions allowed) worth of steps."""
    tr = ctx.recipe.train
    spe = steps_per_epoch(ctx)
    step = tr.rewind_steps if tr.rewind_steps > 0 else int(round(tr.rewind_epochs * spe))
    if step >= tr.epochs * spe:
        key = "rewind_steps" if tr.rewind_steps > 0 else "rewind_epochs"
        raise UserError(f"recipe: train.{key} ({getattr(tr, key):g}) must end before train.epochs ({tr.epochs}, "
                        f"{tr.epochs * spe} steps): the ticket is retrained for the rest of the schedule")
    return step


def rewind_by_accuracy(ctx: SearchContext, model: nn.Module) -> tuple[int, dict]:
    """Train `model` (a fresh init) on the `train` schedule until its validation accuracy reaches
    train.rewind_accuracy x the given trained model's; returns the step and what was measured. Stops
    one step before the end of the schedule at the latest (the ticket needs some schedule left)."""
    tr = ctx.recipe.train
    spe = steps_per_epoch(ctx)
    last = tr.epochs * spe - 1
    val = loader(ctx.data.val, 256)
    reference = finetune.evaluate(ctx.model, val, ctx.device)
    target = tr.rewind_accuracy * reference
    every = tr.rewind_check or max(1, spe // 8)
    seen = {"accuracy": finetune.evaluate(model, val, ctx.device), "step": 0, "done": 0}

    def reached(done: int) -> bool:
        seen["done"] = done
        if done % every and done < last:
            return False
        seen.update(accuracy=finetune.evaluate(model, val, ctx.device), step=done)
        return seen["accuracy"] >= target

    if seen["accuracy"] < target:
        data = loader(ctx.data.train, tr.batch_size, shuffle=True, seed=ctx.seed)
        finetune.train(model, data, epochs=tr.epochs, max_steps=last, lr=tr.lr, device=ctx.device, optimizer="sgd",
                       momentum=tr.momentum, weight_decay=tr.weight_decay, total_epochs=tr.epochs,
                       grad_clip=ctx.recipe.finetune.grad_clip, ui=ctx.ui, until=reached,
                       desc=f"rewind: train until {target:.1%} validation accuracy")
    step = seen["done"]
    if seen["accuracy"] < target:
        ctx.ui.log(f"rewind: validation accuracy {seen['accuracy']:.1%} at step {step} never reached "
                   f"{target:.1%} ({tr.rewind_accuracy:g} x {reference:.1%}) before the end of the schedule")
    info = {"rewind_accuracy_target": target, "rewind_reference_accuracy": reference,
            "rewind_accuracy": seen["accuracy"]}
    return step, info


def starting_point(ctx: SearchContext) -> StartPoint:
    start = ctx.recipe.search.start
    if start == "trained":
        return StartPoint(model=ctx.model, info={"start": "trained"})
    if ctx.loaded.arch is None:
        raise UserError(f"search.start={start} needs to re-initialise the model: pass --arch "
                        "(a built-in name or package.module:callable)")
    model = fresh_model(ctx)
    if start == "init":
        return StartPoint(model=model, schedule=rest_of_training(ctx, 0),
                          info={"start": "init", "train_epochs": ctx.recipe.train.epochs})
    tr = ctx.recipe.train
    spe = steps_per_epoch(ctx)
    if tr.rewind_accuracy > 0:
        k, measured = rewind_by_accuracy(ctx, model)
        model.eval()
        info = {"start": "rewind", "rewind_step": k, "rewind_epochs": k / spe, "train_epochs": tr.epochs, **measured}
        return StartPoint(model=model, schedule=rest_of_training(ctx, k), info=info)
    k = rewind_step(ctx)
    info = {"start": "rewind", "rewind_step": k, "rewind_epochs": k / spe, "train_epochs": tr.epochs}
    schedule = rest_of_training(ctx, k)
    if k:
        data = loader(ctx.data.train, tr.batch_size, shuffle=True, seed=ctx.seed)
        finetune.train(model, data, epochs=-(-k // spe), max_steps=k, lr=tr.lr, device=ctx.device, optimizer="sgd",
                       momentum=tr.momentum, weight_decay=tr.weight_decay, total_epochs=tr.epochs,
                       grad_clip=ctx.recipe.finetune.grad_clip, ui=ctx.ui,
                       desc=f"rewind: train {k} of {tr.epochs * spe} steps",
                       distill_temperature=schedule.distill_temperature,
                       **ctx.teacher_kwargs(schedule, dense_training=True))
    model.eval()
    return StartPoint(model=model, schedule=schedule, info=info)
