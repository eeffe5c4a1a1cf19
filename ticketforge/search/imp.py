"""Iterative magnitude pruning (IMP): each round removes `search.prune_fraction` of the remaining
prunable weights by global magnitude, then retrains the survivors; rounds repeat until the target
sparsity, the last round landing exactly on it.

- search.start trained: learning-rate rewinding (Renda et al. 2020). The weights are kept; every
  round replays the last `search.epochs` epochs of the `train` schedule (the schedule the model was
  trained with: SGD, train.lr, cosine over train.epochs), learning rates included.
- search.start rewind / init: lottery ticket rewinding (Frankle & Carbin 2018; Frankle et al.
  2019). The dense network is trained from the start point (train.rewind_steps, an iteration, or
  train.rewind_epochs) for the rest of the `train` schedule; each round the survivors are reset to
  the start-point weights and retrained for the whole rest of that schedule.

Every finished round is saved (mask and weights) in the run's work folder, and a re-run of the same
command continues after the last finished round, as open_lth's runner does: each step returns
early when its output exists. A round's randomness (data order, any dropout) is seeded from
(seed, round), so a resumed run ends with the same mask as an uninterrupted one."""
from __future__ import annotations

import copy
import dataclasses
import math
import os
import time
from pathlib import Path

import torch

from ticketforge import distributed, finetune
from ticketforge.finetune import Schedule
from ticketforge.data import loader
from ticketforge.errors import UserError
from ticketforge.masks import Mask, global_topk, keep_count, prunable
from ticketforge.search.base import SearchContext, SearchResult
from ticketforge.search import start as start_mod


def round_count(sparsity: float, fraction: float) -> int:
    """Rounds to reach `sparsity` removing `fraction` of the remaining weights per round:
    ceil(log(1 - s) / log(1 - f)) (the last round removes less when it would overshoot)."""
    if sparsity <= 0:
        return 0
    # The tolerance keeps exact powers (s = 1 - 0.8^2 = 0.36) at their round count despite rounding.
    return max(1, math.ceil(math.log(1 - sparsity) / math.log(1 - fraction) - 1e-9))


def schedule(total: int, sparsity: float, fraction: float) -> list[int]:
    """Weights kept after each round; the last entry is exactly the target count."""
    n = round_count(sparsity, fraction)
    target = keep_count(total, sparsity)
    kept = [max(target, int(round(total * (1 - fraction) ** r))) for r in range(1, n)]
    return kept + [target] if n else []


def round_seed(seed: int, r: int) -> int:
    """Each round's own random stream, so that a resumed round replays exactly."""
    return (seed * 1_000_003 + r) % 2 ** 63


def prune_step(model: torch.nn.Module, mask: Mask, keep: int) -> Mask:
    """Global magnitude over the survivors: weights pruned earlier never come back."""
    scores = {n: torch.where(mask[n].to(w.device), w.detach().abs(), torch.full_like(w, -1.0)).cpu()
              for n, w in prunable(model).items()}
    return global_topk(scores, keep)


def _save(path: Path, obj: dict) -> None:
    if not distributed.is_main():  # under torchrun rank 0 keeps the rounds; the others read them
        return
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")  # per process: ranks of a torchrun write alike
    torch.save(obj, tmp)
    os.replace(tmp, path)  # a round counts as finished only once its whole file is there


def _load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


class _Trainer:
    """How one round (and, for rewind/init, the dense run) trains."""

    def __init__(self, ctx: SearchContext, schedule: Schedule | None):
        self.ctx = ctx
        tr = ctx.recipe.train
        if schedule is None:  # learning-rate rewinding: the last search.epochs of the `train` schedule, replayed
            epochs = max(1, int(round(ctx.recipe.search.epochs)))
            if epochs > tr.epochs:
                raise UserError(f"recipe: IMP with learning-rate rewinding replays the last search.epochs ({epochs}) "
                                f"of the train schedule's train.epochs ({tr.epochs}); raise train.epochs or lower "
                                "search.epochs")
            schedule = Schedule.rest_of_training(ctx.recipe, tr.epochs - epochs, labeled=ctx.data.labeled)
        self.schedule = schedule
        self.kw = schedule.train_kwargs()
        self.batch_size = schedule.batch_size

    def __call__(self, model, mask: Mask | None, r: int, desc: str) -> float:
        ctx = self.ctx
        with torch.random.fork_rng(devices=[ctx.device] if ctx.device.type == "cuda" else []):
            torch.manual_seed(round_seed(ctx.seed, r))
            data = loader(ctx.data.train, self.batch_size, shuffle=True, seed=round_seed(ctx.seed, r))
            finetune.train(model, data, device=ctx.device, mask=mask, ui=ctx.ui, desc=desc, **self.kw,
                           **ctx.teacher_kwargs(self.schedule, dense_training=mask is None))
        return finetune.evaluate(model, loader(ctx.data.val, 256), ctx.device)


def imp(ctx: SearchContext) -> SearchResult:
    if isinstance(ctx.model, torch.jit.ScriptModule):
        raise UserError("IMP retrains the model between rounds, which needs an eager nn.Module: "
                        "give a state_dict with --arch instead of a TorchScript archive")
    cfg = ctx.recipe.search
    total = sum(w.numel() for w in prunable(ctx.model).values())
    if total == 0:
        raise UserError("IMP: the model has no prunable Conv or Linear weights")
    return lottery(ctx, schedule(total, cfg.sparsity, cfg.prune_fraction))


def lottery(ctx: SearchContext, plan: list[int]) -> SearchResult:
    """The IMP rounds for a plan of kept counts (one per round). `imp` plans 20% of the remaining
    weights per round; a benchmark may insert its intermediate targets as extra rounds to read
    several sparsities off one trajectory."""
    cfg = ctx.recipe.search
    work = ctx.workdir
    done = 0
    if work is not None:
        while done < len(plan) and (work / f"round-{done + 1:03d}.pt").exists():
            done += 1

    rows: list[dict] = []
    rewinding = cfg.start != "trained"
    if not rewinding:
        train_round = _Trainer(ctx, None)
        kw = train_round.kw
        model, info = ctx.model, {"start": "trained", "retrain": (
            f"learning-rate rewinding: epochs {kw['start_epoch']}-{kw['total_epochs']} of the train schedule "
            "replayed each round")}
    else:
        # Round 0 of the lottery procedure: the dense network trained from the start point to the
        # end of the schedule; the start point is what every round rewinds to.
        dense_file = work / "dense.pt" if work is not None else None
        if dense_file is not None and dense_file.exists():
            saved = _load(dense_file)
            model = start_mod.fresh_model(ctx)
            model.load_state_dict(saved["trained"])
            train_round = _Trainer(ctx, start_mod.rest_of_training(ctx, saved["info"].get("rewind_step", 0)))
            ctx.ui.log("resuming: the dense training is already done, skipped")
        else:
            sp = start_mod.starting_point(ctx)
            model, train_round = sp.model, _Trainer(ctx, sp.schedule)
            saved = {"start": copy.deepcopy(model.state_dict()), "info": sp.info}
            t = time.perf_counter()
            acc = train_round(model, None, 0, "IMP dense training")
            saved.update({"trained": model.state_dict(),
                          "row": {"round": 0, "sparsity": 0.0, "accuracy": acc, "seconds": time.perf_counter() - t}})
            if dense_file is not None:
                _save(dense_file, saved)
        start_state = saved["start"]
        info = {**saved["info"], "retrain": "weight rewinding"}
        rows.append(saved["row"])

    mask = Mask.ones_like(model)
    if done:
        ctx.ui.log(f"resuming: {'round 1' if done == 1 else f'rounds 1-{done}'} of {len(plan)} already done, skipped")
        for r in range(1, done + 1):
            last = _load(work / f"round-{r:03d}.pt")
            rows.append(last["row"])
        model.load_state_dict(last["state_dict"])
        mask = Mask(last["mask"])

    for r in range(done + 1, len(plan) + 1):
        t = time.perf_counter()
        mask = prune_step(model, mask, plan[r - 1])
        if rewinding:
            model.load_state_dict(start_state)
        acc = train_round(model, mask, r, f"IMP round {r}/{len(plan)}")
        row = {"round": r, "sparsity": mask.sparsity, "accuracy": acc, "seconds": time.perf_counter() - t}
        rows.append(row)
        ctx.ui.log(f"IMP round {r}/{len(plan)}: sparsity {mask.sparsity:.4f}, validation accuracy {acc:.4f}, "
                   f"{row['seconds']:.1f} s")
        if work is not None:
            _save(work / f"round-{r:03d}.pt", {"mask": mask.state_dict(), "state_dict": model.state_dict(),
                                                 "row": row})

    info.update({"method": "imp", "rounds": rows, "planned_rounds": len(plan), "resumed_rounds": done,
                 "prune_fraction": cfg.prune_fraction, "kept": mask.kept, "total": mask.total,
                 "epochs_per_round": train_round.kw["epochs"],
                 "notes": [f"IMP: {len(plan)} rounds of {cfg.prune_fraction:g} of the remaining weights; the last "
                           "round's retraining is the fine-tune (finetune.epochs adds more on top)"]})
    scores = {n: w.detach().abs() for n, w in prunable(model).items()}
    # A rewound ticket has already been retrained for the whole schedule: no second fine-tune.
    return SearchResult(model=model, mask=mask, info=info, scores=scores,
                        schedule=dataclasses.replace(train_round.schedule, epochs=0) if rewinding else None)
