"""The budget step: the exported model measured against the run's budget (speed-up, latency or
size), and, where it misses, made cheaper and measured again, a bounded number of times.

Timed budgets use the report's own method (ticketforge.latency: interleaved pairs with dense.onnx,
median of the per-pair ratios, 95% interval) at the budget's batch; size budgets read the deployed
file. Making it cheaper is the structure's `tighten` (channels: the next channels by least L1 per
predicted ms; blocks: the next block by least gate score; unstructured: the smallest remaining
weights), then the ticket is fine-tuned briefly (finetune.recover_epochs, BatchNorm statistics
re-estimated first), converted and model.onnx written again. What is removed here still costs some
accuracy, which is why the search aims beyond the target (search.budget_margin) and measures its
selections (search.measure_rounds), so that this loop rarely has to act."""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Callable

from ticketforge import budget, finetune, latency, size_model, validate
from ticketforge.data import loader


def time_model(dense: Path, model: Path, sample_shape: tuple[int, ...], batch: int, settings: latency.Settings) -> dict:
    """One latency row of model.onnx against dense.onnx (the report's method). Tests replace this."""
    return latency.compare(dense, model, [batch], settings, sample_shape=sample_shape)[0]


def plain_timing(dense: Path, model: Path, sample_shape: tuple[int, ...], batch: int, threads: int, runs: int) -> dict:
    """The final pair timed the plain way (latency.plain), after the report's own sessions are gone.
    Tests replace this."""
    return latency.plain(dense, model, batch, threads, runs, sample_shape=sample_shape)


def timing_settings(recipe) -> latency.Settings:
    """The report's latency method, with the budget's threads: how every timed budget is measured."""
    return dataclasses.replace(validate.latency_settings(recipe.validate), threads=budget.threads(recipe))


def verify(run, write_model: Callable[[object], None]) -> dict:
    """The report's budget section for `run` (a steps.Run after export); `write_model(run)` writes
    model.onnx and ticket.pt again after a change."""
    recipe = run.recipe
    target = budget.Target.of(recipe)
    b = budget.batch(recipe)
    settings = timing_settings(recipe)

    def measure() -> dict:
        if target.unit == "MB":
            return {"value": size_model.deployed_bytes(run.out, recipe, run.bundle) / 2 ** 20, "ci": None}
        row = time_model(run.out / "dense.onnx", run.out / "model.onnx", run.bundle.graph_input_shape, b, settings)
        speed = target.unit == "x"
        return {"value": row["speedup"] if speed else row["compressed_ms"],
                "ci": row["speedup_ci"] if speed else row.get("compressed_ms_ci"),
                "dense_ms": row["dense_ms"], "compressed_ms": row["compressed_ms"], "runs": row.get("runs")}

    def tighten(keep: float) -> bool:
        changed = run.structure.tighten(run.model, run.mask, recipe, run.example(), keep, run.found.info)
        if changed is None:
            return False
        run.model, run.mask = changed
        recovered = ""
        if recipe.finetune.recover_epochs:
            # What was removed cost accuracy (6.7 points once on the README's example, under load);
            # a short fine-tune of the masked ticket recovers most of it and changes no shape, so the
            # file timed next is the one the budget saw.
            schedule = dataclasses.replace(finetune.Schedule.finetune(recipe, run.bundle.labeled),
                                           epochs=recipe.finetune.recover_epochs)
            tuned = finetune.fit(run.model, run.mask, schedule, run.bundle, run.device, seed=run.seed,
                                 bn_recalibrate=recipe.finetune.bn_recalibrate, ui=run.ui,
                                 desc="budget: recovery fine-tune", teacher=run.teacher)
            recovered = f" {tuned.accuracy_before:.4f} before a {schedule.epochs}-epoch recovery fine-tune,"
        elif recipe.finetune.bn_recalibrate:
            finetune.recalibrate_bn(run.model, loader(run.bundle.train, recipe.finetune.batch_size, shuffle=True,
                                                      seed=run.seed), run.device)
        conv = run.structure.convert(run.model, run.mask, recipe, run.example())
        conv.model.eval()
        run.converted = conv
        run.accuracy = finetune.evaluate(conv.model, run.val_loader(), run.device)
        run.ui.log(f"budget: removed more ({run.structure.describe_change(conv.info)}); accuracy{recovered} "
                   f"{run.accuracy:.4f}" + ("" if recovered else " (no further fine-tuning)"))
        write_model(run)
        return True

    section = budget.close_loop(target, measure, tighten, recipe.validate.budget_rounds, log=run.ui.log)
    if target.unit == "MB":
        section["file"] = size_model.deployed_file(recipe)
    else:
        section.update(batch=b, backend="onnxruntime-cpu", threads=latency.resolve_threads(budget.threads(recipe)))
        if recipe.validate.plain_runs:
            section["plain"] = plain_timing(run.out / "dense.onnx", run.out / "model.onnx", run.bundle.graph_input_shape,
                                            b, budget.threads(recipe), recipe.validate.plain_runs)
            run.ui.log("budget:" + budget.plain_text(section["plain"]))
    if not section["met"]:
        run.notes.append(f"budget {section['key']} {target.fmt(target.value)} {section['verdict']}: "
                         + ("the structure has nothing left to remove at its smallest allowed sizes"
                            if section["stopped"] == "nothing left"
                            else f"validate.budget_rounds ({recipe.validate.budget_rounds}) adjustments were not enough"))
    return section
