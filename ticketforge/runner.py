"""Runs the named steps of a job (in the spirit of open_lth's runner). Everything a step would
otherwise repeat lives here, once:
- resume: a step whose result an earlier run saved is restored instead of run again;
- seeding: each step starts from its own seed, so a resumed run that skips earlier steps draws
  the same random numbers in the later ones as an uninterrupted run;
- timing: seconds per step, for the report;
- process rank: under torchrun only rank 0 reads and writes the run state and hands the saved
  results to the other ranks; steps marked `main_only` run on rank 0 alone.
A step is only its own work (ticketforge.steps)."""
from __future__ import annotations

import hashlib
import random
import time
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch

from ticketforge import distributed, errors
from ticketforge.runstate import Store
from ticketforge.ui import UI


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)


def step_seed(seed: int, step: str) -> int:
    return int(hashlib.sha256(f"{seed}:{step}".encode()).hexdigest()[:8], 16)


@dataclass(frozen=True)
class Step:
    name: str
    # Does the step's work on the run; returns what a resumed run restores (None: nothing to
    # save, the step runs again on resume).
    run: Callable[[Any], dict | None]
    # Puts a saved result back into the run. Steps without one are not saved.
    restore: Callable[[Any, dict], None] | None = None
    shared: bool = False      # saved where every recipe on the same model and data finds it
    main_only: bool = False   # rank 0 only (exporting and measuring files)
    when: Callable[[Any], bool] | None = None  # skip the step unless this holds


class Runner:
    def __init__(self, state: Store | None, shared: Store | None, seed: int, ui: UI):
        self.state, self.shared, self.seed, self.ui = state, shared, seed, ui
        self.timings: dict[str, float] = {}
        self.skipped: list[str] = []

    def _saved(self, step: Step, store: Store | None):
        if step.restore is None:
            return None
        share = (lambda x: x) if step.main_only else distributed.broadcast
        if not share(store is not None and store.has(step.name)):
            return None
        return share(store.load(step.name) if distributed.is_main() else None)

    def __call__(self, step: Step, run) -> None:
        errors.raise_if_terminated()
        if (step.main_only and not distributed.is_main()) or (step.when is not None and not step.when(run)):
            return
        store = self.shared if step.shared else self.state
        t = time.perf_counter()
        saved = self._saved(step, store)
        if saved is not None:
            step.restore(run, saved)
            self.skipped.append(step.name)
            self.ui.log(f"skipped {step.name} (finished in an earlier run)")
        else:
            seed_everything(step_seed(self.seed, step.name))
            result = step.run(run)
            if result is not None and step.restore is not None and store is not None and distributed.is_main():
                store.save(step.name, result)
        self.timings[step.name] = time.perf_counter() - t
