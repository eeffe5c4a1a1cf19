"""The whole job: load, then the named steps (ticketforge.steps) under one runner
(ticketforge.runner), then the report. This module only wires them together and makes the output
folder appear complete or not at all."""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch

import ticketforge
from ticketforge import adapt, data as data_stage, device as device_mod, distributed, gate as gate_stage, latency, steps
from ticketforge import errors, structures, tasks
from ticketforge import report as report_stage
from ticketforge.data import DataBundle, check_against_model, load_data
from ticketforge.errors import UserError
from ticketforge.loading import LoadedModel, load_model
from ticketforge.masks import include_lm_head
from ticketforge.recipe import Recipe
from ticketforge.report_schema import Report
from ticketforge.runner import Runner, seed_everything
from ticketforge.runstate import RunState, Store, run_key
from ticketforge.ui import UI


@dataclass
class Job:
    model_path: Path
    recipe: Recipe
    data: str | None = None
    out: Path | None = None
    arch: str | None = None
    arch_kwargs: dict | None = None
    trust_pickle: bool = False
    device: str = "auto"
    seed: int = 0
    force: bool = False
    val_fraction: float = 0.1
    ui: UI = field(default_factory=UI)
    # Results that do not depend on the recipe's target (dense baseline, warm-up weights), kept
    # here across runs (a sweep's points share it); default: inside this run's own state.
    shared: Path | None = None


def default_out(model_path: Path, recipe: Recipe) -> Path:
    return Path("exported") / f"{Path(model_path).stem}-{recipe.name}"


@contextmanager
def atomic_folder(out: Path, force: bool):
    """Yield a temporary folder beside `out`; on success it replaces `out` in one rename, on any
    error it is removed. An existing `out` is only replaced with force."""
    out = Path(out)
    if out.exists() and not force:
        refuse_existing(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp"  # the run's lock protects it; a stale one is from a killed run
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if out.exists():
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        os.replace(out, old)
    os.replace(tmp, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def refuse_existing(path: Path) -> None:
    """A user's files are never replaced unless they pass --force."""
    raise UserError(f"{path} already exists; pass --force to replace it")


def finished_key(out: Path) -> str | None:
    """The run key of a finished ticketforge output folder, or None if `out` is anything else."""
    try:
        return json.loads((out / "report.json").read_text())["run"]["key"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def load_inputs(job: Job) -> tuple[LoadedModel, DataBundle, int]:
    """Load model and data and check they fit each other: every input error surfaces here,
    before anything is written."""
    loaded = load_model(job.model_path, job.arch, job.arch_kwargs, job.trust_pickle)
    spec = job.data or loaded.data
    if spec is None:
        raise UserError("no data: pass --data (digits, a .npz file, or package.module:callable)")
    folder = Path(job.model_path)
    bundle = load_data(spec, job.val_fraction, job.seed, job.recipe.data,
                       tokenizer=folder / "tokenizer.json" if folder.is_dir() else None)
    loaded.io = adapt.fit(loaded.model, bundle.inputs, bundle.example(2))
    classes = check_against_model(bundle, loaded.model, (loaded.hf_config or {}).get("architectures"))
    loaded.io["task"] = tasks.of(loaded.model)  # rebuilt models (a fresh init, a ticket) get it back
    if job.recipe.convert.prune_lm_head:  # the copies built later get it from io (adapt.apply)
        loaded.io["prune_lm_head"] = True
        include_lm_head(loaded.model, True)
    return loaded, bundle, classes


def compress(job: Job) -> dict | None:
    """Run the whole job; returns report.json's content (also written to the output folder). Under torchrun
    every rank runs it and only rank 0 writes and returns the report (the others return None)."""
    out = Path(job.out or default_out(job.model_path, job.recipe))
    if out.exists() and not job.force and finished_key(out) is None:  # not ours: fail before any work
        refuse_existing(out)
    if "tensorrt" in job.recipe.export.targets:
        from ticketforge import tensorrt

        tensorrt.require()  # before any work: a missing extra must not cost a whole search
    device = device_mod.pick(job.device)
    device_mod.return_freed_memory()
    joined = distributed.launched() and not distributed.active()
    device = distributed.init(device)
    try:
        return _compress(job, out, device)
    finally:
        if joined:
            distributed.shutdown()


def _compress(job: Job, out: Path, device: torch.device) -> dict | None:
    main = distributed.is_main()
    ui = job.ui if main else UI(quiet=True)  # one voice under torchrun
    seed_everything(job.seed)
    t_start = time.perf_counter()
    loaded, bundle, classes = load_inputs(job)
    data_stage.use_device(device)
    world = distributed.world_size()
    ui.log(f"loaded {job.model_path} ({loaded.kind}), data {bundle.spec}: {len(bundle.train)} train / "
           f"{len(bundle.val)} validation samples, "
           + (f"{classes} classes" if tasks.of(loaded.model) == tasks.CLASSIFY else
              f"{classes} outputs per token ({tasks.of(loaded.model)})") + f"; device {device}"
           + (f"; {world} processes, each batch split {world} ways" if world > 1 else ""))
    if bundle.info.get("images"):
        where = f"in {len(bundle.info['classes'])} classes" if bundle.labeled else "without class folders (no labels)"
        ui.log(f"image folder: {bundle.info['images']} images {where}, "
               f"{bundle.info['cached']} decoded into memory ({bundle.info['cache_mb']} MiB) in {bundle.info['decode_seconds']} s")
    if loaded.io.get("output", "tensor") != "tensor":
        ui.log(f"model output: logits taken from {loaded.io['output']}")
    common = {"seed": job.seed, "model": Path(job.model_path), "arch": loaded.arch,
              "arch_kwargs": loaded.arch_kwargs, "data": bundle.spec, "val_fraction": job.val_fraction,
              "ticketforge": ticketforge.__version__}
    key = run_key({"recipe": job.recipe.to_dict(), **common})
    if out.exists() and not job.force:
        if finished_key(out) != key:
            refuse_existing(out)
        # Re-running a finished run is a no-op, as every step of it would be skipped.
        ui.log(f"skipped every stage: {out} already holds this run's finished result (same recipe, model, "
               "data and seed); pass --force to recompute it")
        return json.loads((out / "report.json").read_text()) if main else None

    run = steps.start(job.recipe, structures.get(job.recipe.convert.structure), loaded, bundle, device, job.seed, ui)
    with (RunState(out, key) if main else nullcontext(None)) as state, \
            (atomic_folder(out, job.force) if main else nullcontext(None)) as tmp:
        shared = None
        if main:  # the dense baseline does not depend on the recipe: a sweep's points share it
            shared = Store(Path(job.shared) / run_key(common)) if job.shared else Store(state.subdir("shared"))
        run.state, run.out = state, tmp
        runner = Runner(state, shared, job.seed, ui)
        for step in steps.STEPS:
            runner(step, run)
        errors.raise_if_terminated()  # a stop request a library swallowed: never commit the output
        if not main:
            distributed.wait_for_all()
            return None  # rank 0 exports, measures and writes
        runner.timings["total"] = time.perf_counter() - t_start
        report = build_report(job, run, runner, classes, key)
        report_stage.write(report, tmp)
        state.finish()
    distributed.wait_for_all()
    lat = report.latency
    quality = (f"accuracy {run.dense_accuracy:.4f} -> {report.accuracy['onnx']:.4f} (ONNX)" if report.accuracy
               else f"top-1 agreement with the dense model {report.agreement['onnx']:.4f} (ONNX, no labels)")
    ui.log(f"wrote {out}/: {quality}, sparsity {report.sparsity['achieved']:.4f}, "
           + ", ".join(f"{r['backend']} batch {r['batch']} {latency.describe(r)}" for r in lat))
    failed = [c["name"] for c in report.gate["checks"] if not c["passed"]]
    if report.gate["checks"]:
        ui.log(f"gate: {'FAILED ' + ', '.join(failed) if failed else 'passed'} ({len(report.gate['checks'])} checks)")
    return report.to_dict()


def _plain(obj):
    """A report fragment as plain JSON values."""
    return json.loads(json.dumps(obj, default=lambda o: o.item() if hasattr(o, "item") else str(o)))


def _deployed(run: steps.Run, key: str) -> dict:
    """Accuracy or agreement (`key`) of each file built beyond model.onnx, under the gate's names for them."""
    out = {}
    if "quantize" in run.deploy:
        out[run.recipe.export.quantize] = run.deploy["quantize"][key]
    if "tensorrt" in run.deploy and key == "accuracy":
        out["engine"] = run.deploy["tensorrt"]["accuracy"]
    return out


def _quality(run: steps.Run) -> dict:
    """The report's `accuracy` and `agreement` sections. Without labels the torch evaluations were
    made against the dense model's top-1 (data.label_with_dense): they are agreements, and there is
    no accuracy."""
    m = run.measured
    agreement = {"onnx": m["onnx_agreement"], **_deployed(run, "agreement")}
    if not run.bundle.labeled:
        engine = _deployed(run, "accuracy").get("engine")  # its evaluation used the dense model's top-1 too
        return {"agreement": {**agreement, "compressed": run.accuracy, "before_finetune": run.accuracy_before,
                              **({"engine": engine} if engine is not None else {})}}
    return {"accuracy": {"dense": run.dense_accuracy, "compressed": run.accuracy, "onnx": m["onnx_accuracy"],
                         "dense_onnx": m["dense_onnx_accuracy"], "before_finetune": run.accuracy_before,
                         **_deployed(run, "accuracy")},
            "agreement": agreement}


def build_report(job: Job, run: steps.Run, runner: Runner, classes: int, key: str) -> Report:
    recipe, m, found, conv = job.recipe, run.measured, run.found, run.converted
    mask = conv.mask
    report = {
        "ticketforge_version": ticketforge.__version__,
        "recipe": recipe.to_dict(),
        "seed": job.seed,
        "device": str(run.device),
        "model": {"path": str(job.model_path), "kind": run.loaded.kind, "arch": run.loaded.arch,
                  "conversions_before": [c["structure"] for c in run.loaded.conversions],
                  "output": run.loaded.io.get("output", "tensor"),
                  **({"hf_class": type(run.dense_copy).__name__} if run.loaded.hf_config else {})},
        "data": {"spec": run.bundle.spec, "train": len(run.bundle.train), "val": len(run.bundle.val),
                 "input_shape": list(run.bundle.input_shape), "inputs": run.bundle.inputs, "classes": classes,
                 "labels": run.bundle.labeled,
                 **({"image_folder": {k: v for k, v in run.bundle.info.items() if k != "classes"}}
                    if run.bundle.info else {})},
        "search": _plain(found.info),
        "convert": _plain(conv.info),
        "sparsity": {"target": found.info.get("target_sparsity", run.structure.target_sparsity(recipe)),
                     "achieved": m["compressed"]["sparsity"], "torch": mask.sparsity if mask is not None else 0.0,
                     "per_layer": mask.per_layer() if mask is not None else {}},
        "params": {"dense": m["dense"]["params_nonzero"], "compressed": m["compressed"]["params_nonzero"],
                   "dense_weights": m["dense"]["weights"], "compressed_weights": m["compressed"]["weights"]},
        "macs": {"dense": m["dense"]["macs"], "compressed": m["compressed"]["macs"],
                 **({"unknown": m["dense"]["macs_unknown"] or m["compressed"]["macs_unknown"]}
                    if m["dense"]["macs"] is None or m["compressed"]["macs"] is None else {})},
        "size_mb": {"dense": m["dense"]["size_mb"], "compressed": m["compressed"]["size_mb"]},
        "size": m["size"],
        **_quality(run),
        **({"perplexity": m["perplexity"]} if "perplexity" in m else {}),
        "parity": m["parity"]["max"],
        "parity_mean": m["parity"]["mean"],
        "parity_samples": m["parity"]["samples"],
        "latency": m["latency"],
        **({"budget": m["budget"]} if "budget" in m else {}),
        "latency_env": latency.environment("CPUExecutionProvider", m["timing"].threads),
        "timings": {k: round(v, 3) for k, v in runner.timings.items()},
        "notes": run.notes + ([] if run.bundle.labeled else [
            f"data without labels: every training was pure distillation from the dense model (finetune.distill 1, "
            f"not {recipe.finetune.distill:g}; temperature {recipe.finetune.distill_temperature:g}), and accuracy is "
            "top-1 agreement with the dense model (report.json: agreement)"]),
        **({"structure": {run.structure.name: m["structure"]}} if m["structure"] else {}),
        **({"sanity": {**run.sanity, "ticket": run.accuracy}} if run.sanity else {}),
        **run.deploy,
        "run": {"key": key, "processes": distributed.world_size(), "resumed_stages": runner.skipped,
                "mask_sha256": m.get("mask_sha256")},
    }
    report = Report.from_dict(_plain(report))
    report.gate = gate_stage.evaluate(report, dataclasses.asdict(recipe.gate))
    return report
