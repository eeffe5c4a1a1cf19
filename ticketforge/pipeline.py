"""The whole job, stage by stage: load -> search -> fine-tune -> convert -> export -> validate -> report.

Every stage is a module with its own Python API; this module only wires them together and
makes the output folder appear complete or not at all."""
from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import os
import random
import shutil
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

import ticketforge
from ticketforge import convert as convert_stage, data as data_stage, device as device_mod, distributed
from ticketforge import adapt, export as export_stage, hf
from ticketforge import finetune, gate as gate_stage, nm, quantize, report as report_stage, sanity, search, validate
from ticketforge.data import DataBundle, check_against_model, load_data, loader
from ticketforge.errors import UserError
from ticketforge.loading import LoadedModel, load_model
from ticketforge.masks import Mask, prunable
from ticketforge.recipe import Recipe
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


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)


def stage_seed(seed: int, stage: str) -> int:
    """Each stage starts from its own seed, so a resumed run that skips earlier stages draws the
    same random numbers in the later ones as an uninterrupted run."""
    return int(hashlib.sha256(f"{seed}:{stage}".encode()).hexdigest()[:8], 16)


def plain(obj):
    """A report fragment as plain Python values (loadable with weights_only=True)."""
    return json.loads(json.dumps(obj, default=lambda o: o.item() if hasattr(o, "item") else str(o)))


def cpu_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}


def structure(model: torch.nn.Module) -> dict[str, tuple]:
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


class Stages:
    """Which stages an earlier run finished, and saving them as they finish. Only rank 0 reads and
    writes the run state; under torchrun it hands its decisions and results to the other ranks."""

    def __init__(self, store: Store | None, ui: UI):
        self.store, self.ui = store, ui
        self.skipped: list[str] = []

    def resume(self, name: str, store: Store | None = None, everyone: bool = True):
        """The saved result of a finished stage, or None if it has to run. everyone=False: a stage
        only rank 0 runs (no hand-over to the other ranks)."""
        store = store or self.store
        share = distributed.broadcast if everyone else (lambda x: x)
        found = share(store is not None and store.has(name))
        if not found:
            return None
        result = share(store.load(name) if distributed.is_main() else None)
        self.skipped.append(name)
        self.ui.log(f"skipped {name} (finished in an earlier run)")
        return result

    def finish(self, name: str, result: dict, store: Store | None = None) -> None:
        store = store or self.store
        if store is not None and distributed.is_main():
            store.save(name, result)


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


def prepare(job: Job) -> tuple[LoadedModel, DataBundle, int]:
    """Load model and data and check they fit each other: every input error surfaces here,
    before anything is written."""
    loaded = load_model(job.model_path, job.arch, job.arch_kwargs, job.trust_pickle)
    spec = job.data or loaded.data
    if spec is None:
        raise UserError("no data: pass --data (digits, a .npz file, or package.module:callable)")
    bundle = load_data(spec, job.val_fraction, job.seed, job.recipe.data)
    loaded.io = adapt.fit(loaded.model, bundle.inputs, bundle.example(2))
    classes = check_against_model(bundle, loaded.model)
    return loaded, bundle, classes


def compress(job: Job) -> dict | None:
    """Run the whole job; returns the report (also written to the output folder). Under torchrun
    every rank runs it and only rank 0 writes and returns the report (the others return None)."""
    out = Path(job.out or default_out(job.model_path, job.recipe))
    if out.exists() and not job.force and finished_key(out) is None:  # not ours: fail before any work
        refuse_existing(out)
    if "tensorrt" in job.recipe.export.targets:
        from ticketforge import tensorrt as trt_stage

        trt_stage.require()  # before any work: a missing extra must not cost a whole search
    device = device_mod.pick(job.device)
    joined = distributed.launched() and not distributed.active()
    device = distributed.init(device)
    try:
        return _compress(job, out, device)
    finally:
        if joined:
            distributed.shutdown()


def _compress(job: Job, out: Path, device: torch.device) -> dict | None:
    recipe = job.recipe
    main = distributed.is_main()
    ui = job.ui if main else UI(quiet=True)  # one voice under torchrun
    seed_everything(job.seed)
    t_start = time.perf_counter()
    loaded, bundle, classes = prepare(job)
    data_stage.use_device(device)
    world = distributed.world_size()
    ui.log(f"loaded {job.model_path} ({loaded.kind}), data {bundle.spec}: {len(bundle.train)} train / "
           f"{len(bundle.val)} validation samples, {classes} classes; device {device}"
           + (f"; {world} processes, each batch split {world} ways" if world > 1 else ""))
    if bundle.info.get("images"):
        ui.log(f"image folder: {bundle.info['images']} images in {len(bundle.info['classes'])} classes, "
               f"{bundle.info['cached']} decoded into memory ({bundle.info['cache_mb']} MiB) in {bundle.info['decode_seconds']} s")
    if loaded.io.get("output", "tensor") != "tensor":
        ui.log(f"model output: logits taken from {loaded.io['output']}")
    val_loader = loader(bundle.val, 256)
    dense_copy = copy.deepcopy(loaded.model).eval()
    dense = device_mod.to_device(loaded.model, device).eval()
    timings: dict[str, float] = {}

    common = {"seed": job.seed, "model": Path(job.model_path), "arch": loaded.arch,
              "arch_kwargs": loaded.arch_kwargs, "data": bundle.spec, "val_fraction": job.val_fraction}
    key = run_key({"recipe": recipe.to_dict(), **common})
    if out.exists() and not job.force:
        if finished_key(out) != key:
            refuse_existing(out)
        # Re-running a finished run is a no-op, as every step of it would be skipped.
        ui.log(f"skipped every stage: {out} already holds this run's finished result (same recipe, model, "
               "data and seed); pass --force to recompute it")
        return json.loads((out / "report.json").read_text()) if main else None
    state_cm = RunState(out, key) if main else nullcontext(None)
    out_cm = atomic_folder(out, job.force) if main else nullcontext(None)
    with state_cm as state, out_cm as tmp:
        stages = Stages(state, ui)
        if job.shared is not None:
            shared = Store(Path(job.shared) / run_key(common)) if main else None
        else:
            shared = Store(state.subdir("shared")) if main else None

        # dense baseline (shared by every recipe on the same model and data)
        r = stages.resume("dense", shared)
        if r is None:
            seed_everything(stage_seed(job.seed, "dense"))
            r = {"accuracy": finetune.evaluate(dense, val_loader, device)}
            stages.finish("dense", r, shared)
        dense_acc = r["accuracy"]
        ui.log(f"dense model: validation accuracy {dense_acc:.4f}")

        # search
        t = time.perf_counter()
        target = (f"target MACs {recipe.search.target_macs:g} of dense" if recipe.convert.structure == "channels"
                  else f"target sparsity {recipe.search.sparsity:g}")
        ui.log(f"search: {recipe.search.method} ({target}, structure {recipe.convert.structure})")
        r = stages.resume("search")
        if r is None:
            seed_everything(stage_seed(job.seed, "search"))
            ctx = search.SearchContext(model=dense, loaded=loaded, data=bundle, recipe=recipe, device=device,
                                       seed=job.seed, ui=ui, workdir=state.subdir("search") if main else RunState(out, key).dir / "search",
                                       shared=shared.subdir("search") if main else None)
            found = search.run(ctx)
            if structure(found.model) == structure(dense_copy):
                stages.finish("search", {
                    "model": cpu_state(found.model), "info": plain(found.info), "finetune": plain(found.finetune),
                    "mask": found.mask.state_dict() if found.mask is not None else None,
                    "scores": {k: v.detach().cpu() for k, v in found.scores.items()} if found.scores else None})
            else:  # a changed architecture is rebuilt by running the (seeded) search again on resume
                ui.log("search changed the model's structure: a resumed run repeats it")
        else:
            dense.load_state_dict(r["model"])
            found = search.SearchResult(model=dense, mask=Mask(r["mask"]) if r["mask"] is not None else None,
                                        info=r["info"], scores=r["scores"], finetune=r["finetune"])
        model, mask = found.model, found.mask
        if mask is not None:
            distributed.check_identical(mask, "mask found by the search")
        model, mask, prepared = convert_stage.prepare(model, mask, recipe, bundle.example(8).to(device))
        timings["search"] = time.perf_counter() - t

        # sanity checks: before the fine-tune, which changes found.model in place
        sanity_section = None
        if recipe.search.sanity and mask is not None:
            t = time.perf_counter()
            sanity_section = stages.resume("sanity")
            if sanity_section is None:
                seed_everything(stage_seed(job.seed, "sanity"))
                sanity_section = plain(sanity.run(model, mask, found.scores, loaded.fresh, recipe, found.finetune,
                                                  bundle, device, job.seed, ui))
                stages.finish("sanity", sanity_section)
            timings["sanity"] = time.perf_counter() - t

        # fine-tune
        t = time.perf_counter()
        r = stages.resume("finetune")
        if r is None:
            seed_everything(stage_seed(job.seed, "finetune"))
            ft = recipe.finetune
            # A method may override the schedule: rewind retrains for the rest of the `train` schedule.
            over = found.finetune
            train_loader = loader(bundle.train, over.get("batch_size", ft.batch_size), shuffle=True, seed=job.seed)
            if mask is not None:
                mask.apply(model)
            if ft.bn_recalibrate:
                finetune.recalibrate_bn(model, train_loader, device)
            acc_before = finetune.evaluate(model, val_loader, device)
            epochs = over.get("epochs", ft.epochs)
            if epochs:
                finetune.train(model, train_loader, epochs=epochs, lr=over.get("lr", ft.lr), device=device,
                               optimizer=over.get("optimizer", ft.optimizer), momentum=over.get("momentum", ft.momentum),
                               weight_decay=over.get("weight_decay", ft.weight_decay), grad_clip=ft.grad_clip,
                               mask=mask, ui=ui, start_epoch=over.get("start_epoch", 0),
                               total_epochs=over.get("total_epochs"),
                               mask_scale=nm.pgf_scale if recipe.convert.structure == "2:4"
                               and recipe.convert.nm_decay == "exponential" else None)
            stages.finish("finetune", {"model": cpu_state(model), "acc_before": acc_before,
                                       "mask": mask.state_dict() if mask is not None else None})
        else:
            model.load_state_dict(r["model"])
            mask = Mask(r["mask"]) if r["mask"] is not None else None
            acc_before = r["acc_before"]
        timings["finetune"] = time.perf_counter() - t

        # convert (deterministic and quick: done again on resume)
        t = time.perf_counter()
        conv = convert_stage.convert(model, mask, recipe, bundle.example(8).to(device))
        model, mask = conv.model.eval(), conv.mask
        compressed_acc = finetune.evaluate(model, val_loader, device)
        ui.log(f"ticket: accuracy {acc_before:.4f} before fine-tuning, {compressed_acc:.4f} after")
        timings["convert"] = time.perf_counter() - t
        mask_digest = distributed.check_identical(mask, "final mask") if mask is not None else None
        if world > 1 and mask_digest:
            ui.log(f"mask identical on all {world} processes (sha256 {mask_digest[:12]})")
        if not main:
            return None  # rank 0 exports, validates and writes; the others are done
        model = model.cpu()  # the exported files are checked on the CPU, where ONNX Runtime runs

        # export (into the run state first, so a resumed run keeps finished files)
        t = time.perf_counter()
        example = bundle.example(2)
        files = state.dir / "export"
        if stages.resume("export", everyone=False) is None:
            shutil.rmtree(files, ignore_errors=True)  # a killed run's partial files
            files = state.subdir("export")
            export_stage.export_onnx(dense_copy, example, files / "dense.onnx", recipe.export, bundle.inputs)
            export_stage.export_onnx(model, example, files / "model.onnx", recipe.export, bundle.inputs)
            save_ticket(files / "ticket.pt", model, mask, loaded, conv.spec, recipe)
            if hf.is_model(model) and structure(model) == structure(dense_copy):
                # unstructured and 2:4 keep every shape: the user's HF tooling reads the result as it is
                hf.save_folder(model, files / "hf", Path(job.model_path))
            stages.finish("export", {"files": sorted(p.name for p in files.iterdir())})
        for name in state.load("export")["files"]:
            (shutil.copytree if (files / name).is_dir() else shutil.copy2)(files / name, tmp / name)
        timings["export"] = time.perf_counter() - t

        # validate
        t = time.perf_counter()
        ui.log("validate: ONNX Runtime accuracy, parity and latency")
        par = validate.parity(model, tmp / "model.onnx", example.repeat(8, *[1] * (example.dim() - 1))[:16])
        if par > recipe.validate.parity_tol:
            from ticketforge.errors import VerificationError
            raise VerificationError(f"model.onnx disagrees with the torch model: max abs logit difference "
                                    f"{par:.3e} > validate.parity_tol {recipe.validate.parity_tol:g}")
        nm_section = (nm.read_back(tmp / "model.onnx", conv.info, recipe.convert.nm_decay)
                      if recipe.convert.structure == "2:4" else None)
        onnx_acc = validate.onnx_accuracy(tmp / "model.onnx", bundle.val)
        dense_onnx_acc = validate.onnx_accuracy(tmp / "dense.onnx", bundle.val)
        sample = example[0].numpy()
        stats_d, stats_c = validate.onnx_stats(tmp / "dense.onnx", sample), validate.onnx_stats(tmp / "model.onnx", sample)
        lat = validate.latency(tmp / "dense.onnx", tmp / "model.onnx", bundle.input_shape,
                               recipe.validate.latency_batches, recipe.validate.repeats, recipe.validate.warmup,
                               example=bundle.example(64).numpy())
        timings["validate"] = time.perf_counter() - t

        # deployment targets beyond model.onnx
        extra_acc, deploy = {}, {}
        if recipe.export.quantize != "none":
            t = time.perf_counter()
            ui.log(f"quantize: model.{recipe.export.quantize}.onnx")
            deploy["quantize"], rows = quantize.export_quantized(
                tmp, recipe.export.quantize, bundle, recipe.validate.repeats, recipe.validate.warmup,
                recipe.validate.latency_batches)
            extra_acc[recipe.export.quantize] = deploy["quantize"]["accuracy"]
            lat += rows
            timings["quantize"] = time.perf_counter() - t
        if "tensorrt" in recipe.export.targets:
            from ticketforge import tensorrt as trt_stage

            t = time.perf_counter()
            ui.log("tensorrt: build and validate model.engine")
            deploy["tensorrt"], rows = trt_stage.build_and_validate(tmp, recipe, bundle, ui)
            extra_acc["engine"] = deploy["tensorrt"]["accuracy"]
            lat += rows
            timings["tensorrt"] = time.perf_counter() - t
        timings["total"] = time.perf_counter() - t_start

        per_layer = mask.per_layer() if mask is not None else {}
        report = {
            "ticketforge_version": ticketforge.__version__,
            "recipe": recipe.to_dict(),
            "seed": job.seed,
            "device": str(device),
            "model": {"path": str(job.model_path), "kind": loaded.kind, "arch": loaded.arch,
                      "output": loaded.io.get("output", "tensor"),
                      **({"hf_class": type(dense_copy).__name__} if loaded.hf_config else {})},
            "data": {"spec": bundle.spec, "train": len(bundle.train), "val": len(bundle.val),
                     "input_shape": list(bundle.input_shape), "inputs": bundle.inputs, "classes": classes,
                     **({"image_folder": {k: v for k, v in bundle.info.items() if k != "classes"}}
                        if bundle.info else {})},
            "search": found.info,
            "convert": conv.info,
            "sparsity": {"target": found.info.get("target_sparsity", recipe.search.sparsity), "achieved": stats_c["sparsity"],
                         "torch": mask.sparsity if mask is not None else 0.0, "per_layer": per_layer},
            "params": {"dense": stats_d["params_nonzero"], "compressed": stats_c["params_nonzero"],
                       "dense_weights": stats_d["weights"], "compressed_weights": stats_c["weights"]},
            "macs": {"dense": stats_d["macs"], "compressed": stats_c["macs"],
                     **({"unknown": stats_d["macs_unknown"] or stats_c["macs_unknown"]}
                        if stats_d["macs"] is None or stats_c["macs"] is None else {})},
            "size_mb": {"dense": stats_d["size_mb"], "compressed": stats_c["size_mb"]},
            "accuracy": {"dense": dense_acc, "compressed": compressed_acc, "onnx": onnx_acc,
                         "dense_onnx": dense_onnx_acc, "before_finetune": acc_before, **extra_acc},
            "parity": par,
            "latency": lat,
            "timings": {k: round(v, 3) for k, v in timings.items()},
            "notes": found.info.get("notes", []) + prepared.get("notes", []) + conv.info.get("notes", []),
            **({"nm": nm_section} if nm_section else {}),
            **({"sanity": {**sanity_section, "ticket": compressed_acc}} if sanity_section else {}),
            **deploy,
            "run": {"key": key, "processes": world, "resumed_stages": stages.skipped, "mask_sha256": mask_digest},
        }
        report["gate"] = gate_stage.evaluate(report, dataclasses.asdict(recipe.gate))
        report_stage.write(report, tmp)
        state.finish()
    ui.log(f"wrote {out}/: accuracy {dense_acc:.4f} -> {onnx_acc:.4f} (ONNX), sparsity {stats_c['sparsity']:.4f}, "
           + ", ".join(f"{r['backend']} batch {r['batch']} {r['speedup']:.2f}x" for r in lat))
    failed = [c["name"] for c in report["gate"]["checks"] if not c["passed"]]
    if report["gate"]["checks"]:
        ui.log(f"gate: {'FAILED ' + ', '.join(failed) if failed else 'passed'} ({len(report['gate']['checks'])} checks)")
    return report


def save_ticket(path: Path, model: torch.nn.Module, mask: Mask | None, loaded: LoadedModel, spec: dict | None,
                recipe: Recipe) -> None:
    """Masks and compressed weights, loadable with torch.load(weights_only=True)."""
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    torch.save({
        "format": "ticketforge.ticket/1",
        "state_dict": state,
        "masks": mask.state_dict() if mask is not None else {},
        "arch": loaded.arch,
        "arch_kwargs": loaded.arch_kwargs,
        "hf_config": loaded.hf_config,
        "spec": spec,
        "prunable": list(prunable(model)),
        "recipe": recipe.to_dict(),
    }, path)
