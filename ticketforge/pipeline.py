"""The whole job, stage by stage: load -> search -> fine-tune -> convert -> export -> validate -> report.

Every stage is a module with its own Python API; this module only wires them together and
makes the output folder appear complete or not at all."""
from __future__ import annotations

import copy
import dataclasses
import os
import random
import shutil
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

import ticketforge
from ticketforge import convert as convert_stage
from ticketforge import export as export_stage
from ticketforge import finetune, gate as gate_stage, nm, quantize, report as report_stage, sanity, search, validate
from ticketforge.data import DataBundle, check_against_model, load_data, loader
from ticketforge.errors import UserError
from ticketforge.loading import LoadedModel, load_model
from ticketforge.masks import Mask, prunable
from ticketforge.recipe import Recipe
from ticketforge.runstate import RunState, run_key
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


def default_out(model_path: Path, recipe: Recipe) -> Path:
    return Path("exported") / f"{Path(model_path).stem}-{recipe.name}"


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device is available (use --device auto or cpu)")
    if name not in ("cpu", "cuda") and not name.startswith("cuda:"):
        raise UserError(f"--device {name!r}: expected auto, cpu or cuda")
    return torch.device(name)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)


@contextmanager
def atomic_folder(out: Path, force: bool):
    """Yield a temporary folder beside `out`; on success it replaces `out` in one rename, on any
    error it is removed. An existing `out` is only replaced with force."""
    out = Path(out)
    if out.exists() and not force:
        raise UserError(f"output folder {out} already exists; pass --force to replace it")
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


def prepare(job: Job) -> tuple[LoadedModel, DataBundle, int]:
    """Load model and data and check they fit each other: every input error surfaces here,
    before anything is written."""
    loaded = load_model(job.model_path, job.arch, job.arch_kwargs, job.trust_pickle)
    spec = job.data or loaded.data
    if spec is None:
        raise UserError("no data: pass --data (digits, a .npz file, or package.module:callable)")
    bundle = load_data(spec, job.val_fraction, job.seed)
    classes = check_against_model(bundle, loaded.model)
    return loaded, bundle, classes


def compress(job: Job) -> dict:
    """Run the whole job; returns the report (also written to the output folder)."""
    ui, recipe = job.ui, job.recipe
    out = Path(job.out or default_out(job.model_path, recipe))
    if out.exists() and not job.force:
        raise UserError(f"output folder {out} already exists; pass --force to replace it")
    if "tensorrt" in recipe.export.targets:
        from ticketforge import tensorrt as trt_stage

        trt_stage.require()  # before any work: a missing extra must not cost a whole search
    device = pick_device(job.device)
    seed_everything(job.seed)
    t_start = time.perf_counter()
    loaded, bundle, classes = prepare(job)
    ui.log(f"loaded {job.model_path} ({loaded.kind}), data {bundle.spec}: {len(bundle.train)} train / "
           f"{len(bundle.val)} validation samples, {classes} classes; device {device}")
    val_loader = loader(bundle.val, 256)
    dense = loaded.model.to(device).eval()
    dense_copy = copy.deepcopy(dense)
    timings: dict[str, float] = {}
    dense_acc = finetune.evaluate(dense, val_loader, device)
    ui.log(f"dense model: validation accuracy {dense_acc:.4f}")

    key = run_key({"recipe": recipe.to_dict(), "seed": job.seed, "model": Path(job.model_path), "arch": loaded.arch,
                   "arch_kwargs": loaded.arch_kwargs, "data": bundle.spec, "val_fraction": job.val_fraction})
    with RunState(out, key) as state, atomic_folder(out, job.force) as tmp:
        # search
        t = time.perf_counter()
        ui.log(f"search: {recipe.search.method} (target sparsity {recipe.search.sparsity:g}, "
               f"structure {recipe.convert.structure})")
        ctx = search.SearchContext(model=dense, loaded=loaded, data=bundle, recipe=recipe, device=device,
                                   seed=job.seed, ui=ui, workdir=state.subdir("search"))
        found = search.run(ctx)
        model, mask = found.model, found.mask
        timings["search"] = time.perf_counter() - t

        # sanity checks: before the fine-tune, which changes found.model in place
        sanity_section = None
        if recipe.search.sanity and mask is not None:
            t = time.perf_counter()
            sanity_section = sanity.run(model, mask, found.scores, loaded.fresh, recipe, found.finetune, bundle,
                                        device, job.seed, ui)
            timings["sanity"] = time.perf_counter() - t

        # fine-tune
        t = time.perf_counter()
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
        timings["finetune"] = time.perf_counter() - t

        # convert
        t = time.perf_counter()
        conv = convert_stage.convert(model, mask, recipe)
        model, mask = conv.model.eval(), conv.mask
        compressed_acc = finetune.evaluate(model, val_loader, device)
        ui.log(f"ticket: accuracy {acc_before:.4f} before fine-tuning, {compressed_acc:.4f} after")
        timings["convert"] = time.perf_counter() - t

        # export
        t = time.perf_counter()
        example = bundle.example(2)
        export_stage.export_onnx(dense_copy, example, tmp / "dense.onnx", recipe.export)
        export_stage.export_onnx(model, example, tmp / "model.onnx", recipe.export)
        save_ticket(tmp / "ticket.pt", model, mask, loaded, conv.spec, recipe)
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
        stats_d, stats_c = validate.onnx_stats(tmp / "dense.onnx"), validate.onnx_stats(tmp / "model.onnx")
        lat = validate.latency(tmp / "dense.onnx", tmp / "model.onnx", bundle.input_shape,
                               recipe.validate.latency_batches, recipe.validate.repeats, recipe.validate.warmup)
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
            "model": {"path": str(job.model_path), "kind": loaded.kind, "arch": loaded.arch},
            "data": {"spec": bundle.spec, "train": len(bundle.train), "val": len(bundle.val),
                     "input_shape": list(bundle.input_shape), "classes": classes},
            "search": found.info,
            "convert": conv.info,
            "sparsity": {"target": found.info.get("target_sparsity", recipe.search.sparsity), "achieved": stats_c["sparsity"],
                         "torch": mask.sparsity if mask is not None else 0.0, "per_layer": per_layer},
            "params": {"dense": stats_d["params_nonzero"], "compressed": stats_c["params_nonzero"],
                       "dense_weights": stats_d["weights"], "compressed_weights": stats_c["weights"]},
            "macs": {"dense": stats_d["macs"], "compressed": stats_c["macs"]},
            "size_mb": {"dense": stats_d["size_mb"], "compressed": stats_c["size_mb"]},
            "accuracy": {"dense": dense_acc, "compressed": compressed_acc, "onnx": onnx_acc,
                         "dense_onnx": dense_onnx_acc, "before_finetune": acc_before, **extra_acc},
            "parity": par,
            "latency": lat,
            "timings": {k: round(v, 3) for k, v in timings.items()},
            "notes": found.info.get("notes", []) + conv.info.get("notes", []),
            **({"nm": nm_section} if nm_section else {}),
            **({"sanity": {**sanity_section, "ticket": compressed_acc}} if sanity_section else {}),
            **deploy,
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
        "spec": spec,
        "prunable": list(prunable(model)),
        "recipe": recipe.to_dict(),
    }, path)
