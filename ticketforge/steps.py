"""The named steps of `compress`, each only its own work (resume, seeding, timing and process
rank are the runner's: ticketforge.runner). They share one `Run`: its inputs, and what each step
leaves for the next.

    dense -> search -> sanity -> finetune -> convert -> export -> budget -> measure -> deploy
"""
from __future__ import annotations

import copy
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ticketforge import distributed, finetune, hf, sparse_storage, structures, tasks, ticket, validate
from ticketforge import data as data_mod, export as export_mod
from ticketforge.data import DataBundle, loader
from ticketforge.errors import VerificationError
from ticketforge.finetune import Schedule
from ticketforge.loading import LoadedModel
from ticketforge.masks import Mask
from ticketforge.recipe import Recipe
from ticketforge.runner import Step
from ticketforge.runstate import Store
from ticketforge.search.base import SearchContext, SearchResult
from ticketforge.structures import Converted, Structure
from ticketforge.ui import UI

@dataclass
class Run:
    """One compress job as the steps see it."""

    recipe: Recipe
    structure: Structure
    loaded: LoadedModel
    bundle: DataBundle
    device: torch.device
    seed: int
    ui: UI
    model: nn.Module                  # the loaded model on `device`; the search starts from it
    dense_copy: nn.Module             # the loaded model, untouched (dense.onnx, the baseline)
    state: Store | None = None        # this run's saved steps (rank 0)
    out: Path | None = None           # the temporary output folder (rank 0)
    # what the steps produce, in order
    dense_accuracy: float | None = None
    found: SearchResult | None = None
    mask: Mask | None = None
    notes: list[str] = field(default_factory=list)
    sanity: dict | None = None
    accuracy_before: float | None = None
    converted: Converted | None = None
    accuracy: float | None = None     # the converted torch model's
    measured: dict = field(default_factory=dict)
    deploy: dict = field(default_factory=dict)
    _teacher: nn.Module | None = None

    def val_loader(self):
        return loader(self.bundle.val, 256)

    def example(self, n: int = 8) -> torch.Tensor:
        return self.bundle.example(n).to(self.device)

    @property
    def schedule(self) -> Schedule:
        """How the ticket is trained: the search's say, else the recipe's `finetune` section."""
        if self.found.schedule is not None:
            return self.found.schedule
        return Schedule.finetune(self.recipe, labeled=self.bundle.labeled)

    @property
    def teacher(self) -> nn.Module | None:
        """The untouched dense model on `device`, which training distills from; None when no training
        does (finetune.distill 0 on labeled data), so that no copy is made."""
        if self.bundle.labeled and self.recipe.finetune.distill == 0:
            return None
        if self._teacher is None:
            from ticketforge import device as device_mod

            same = self.device.type == "cpu"  # dense_copy lives on the CPU: used as it is there
            self._teacher = (self.dense_copy if same else
                             device_mod.to_device(copy.deepcopy(self.dense_copy), self.device)).eval()
        return self._teacher


def _shapes(model: nn.Module) -> dict[str, tuple]:
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def _cpu_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}


def _mask_state(mask: Mask | None):
    return mask.state_dict() if mask is not None else None


# ---------------------------------------------------------------- dense

def dense(run: Run) -> dict:
    run.dense_accuracy = finetune.evaluate(run.model, run.val_loader(), run.device)
    _dense_log(run)
    return {"accuracy": run.dense_accuracy}


def _dense_log(run: Run) -> None:
    if run.bundle.labeled:
        run.ui.log(f"dense model: validation accuracy {run.dense_accuracy:.4f}")
    else:
        run.ui.log("data without labels: the dense model is the teacher (pure distillation), and accuracy is "
                   "top-1 agreement with it")


def _restore_dense(run: Run, saved: dict) -> None:
    run.dense_accuracy = saved["accuracy"]
    _dense_log(run)


# ---------------------------------------------------------------- search

def _search_log(run: Run) -> None:
    r = run.recipe
    run.ui.log(f"search: {r.search.method} ({run.structure.budget(r)}, structure {run.structure.name})")


def _plan_budget(run: Run) -> dict:
    """A budget the structure meets by its own key (a size by a sparsity) is turned into it before
    the search; the search's report gets what was planned."""
    run.recipe, planned = run.structure.plan_budget(run.model, run.recipe, run.example(), run.ui.log)
    return planned


def search_step(run: Run) -> dict | None:
    _search_log(run)
    planned = _plan_budget(run)
    ctx = SearchContext(model=run.model, loaded=run.loaded, data=run.bundle, recipe=run.recipe, device=run.device,
                        seed=run.seed, ui=run.ui, workdir=run.state.subdir("search") if run.state else None,
                        teacher=run.teacher)
    found = structures.find_ticket(ctx)
    notes = found.info.get("notes", []) + planned.pop("notes", [])
    found.info.update(planned, **({"notes": notes} if notes else {}))
    _after_search(run, found)
    if _shapes(found.model) != _shapes(run.dense_copy):
        run.ui.log("search changed the model's structure: a resumed run repeats it")
        return None
    return {"model": _cpu_state(found.model), "info": found.info, "mask": _mask_state(found.mask),
            "schedule": found.schedule.to_dict() if found.schedule else None,
            "scores": {k: v.detach().cpu() for k, v in found.scores.items()} if found.scores else None}


def _restore_search(run: Run, saved: dict) -> None:
    _search_log(run)
    _plan_budget(run)
    run.model.load_state_dict(saved["model"])
    found = SearchResult(model=run.model, mask=Mask(saved["mask"]) if saved["mask"] is not None else None,
                         info=saved["info"], scores=saved["scores"],
                         schedule=Schedule(**saved["schedule"]) if saved["schedule"] else None)
    _after_search(run, found)


def _after_search(run: Run, found: SearchResult) -> None:
    """The structure fits the search's mask before anything trains it."""
    if found.mask is not None:
        distributed.check_identical(found.mask, "mask found by the search")
    model, mask, info = run.structure.prepare(found.model, found.mask, run.recipe, run.example())
    run.found, run.model, run.mask = found, model, mask
    run.notes = list(found.info.get("notes", [])) + list(info.get("notes", []))


# ---------------------------------------------------------------- sanity

def sanity_step(run: Run) -> dict:
    """Before the fine-tune, which changes the ticket's weights in place."""
    from ticketforge import sanity

    run.sanity = sanity.run(run.model, run.mask, run.found.scores, run.loaded.fresh, run.recipe, run.schedule,
                            run.structure, run.bundle, run.device, run.seed, run.ui, teacher=run.teacher)
    return run.sanity


def _restore_sanity(run: Run, saved: dict) -> None:
    run.sanity = saved


def _wants_sanity(run: Run) -> bool:
    return run.recipe.search.sanity and run.mask is not None


# ---------------------------------------------------------------- finetune

def finetune_step(run: Run) -> dict:
    tuned = finetune.fit(run.model, run.mask, run.schedule, run.bundle, run.device, seed=run.seed,
                         bn_recalibrate=run.recipe.finetune.bn_recalibrate,
                         mask_scale=run.structure.mask_scale(run.recipe), ui=run.ui, teacher=run.teacher)
    run.accuracy_before = tuned.accuracy_before
    return {"model": _cpu_state(run.model), "accuracy_before": tuned.accuracy_before, "mask": _mask_state(run.mask)}


def _restore_finetune(run: Run, saved: dict) -> None:
    run.model.load_state_dict(saved["model"])
    run.mask = Mask(saved["mask"]) if saved["mask"] is not None else None
    run.accuracy_before = saved["accuracy_before"]


# ---------------------------------------------------------------- convert (quick and deterministic: redone on resume)

def convert_step(run: Run) -> None:
    conv = run.structure.convert(run.model, run.mask, run.recipe, run.example())
    conv.model.eval()
    run.converted = conv
    run.accuracy = finetune.evaluate(conv.model, run.val_loader(), run.device)
    what = "accuracy" if run.bundle.labeled else "agreement with the dense model"
    run.ui.log(f"ticket: {what} {run.accuracy_before:.4f} before fine-tuning, {run.accuracy:.4f} after")
    digest = distributed.check_identical(conv.mask, "final mask") if conv.mask is not None else None
    if distributed.world_size() > 1 and digest:
        run.ui.log(f"mask identical on all {distributed.world_size()} processes (sha256 {digest[:12]})")
    run.measured["mask_sha256"] = digest
    run.notes += list(conv.info.get("notes", []))


# ---------------------------------------------------------------- export (into the run state, so a resumed run keeps the files)

def export_step(run: Run) -> dict:
    files = run.state.dir / "export"
    shutil.rmtree(files, ignore_errors=True)  # a killed run's partial files
    files = run.state.subdir("export")
    export_mod.export_onnx(run.dense_copy, run.bundle.example(2), files / "dense.onnx", run.recipe.export, run.bundle.inputs)
    storage = _write_model(run, files)
    result = {"files": sorted(p.name for p in files.iterdir()), "storage": storage}
    _restore_export(run, result)
    return result


def _write_model(run: Run, files: Path) -> dict:
    """model.onnx (with sparse storage), ticket.pt and, for an HF model whose shapes did not change, an
    HF folder of the converted model; returns the storage info."""
    model = run.converted.model.cpu()
    export_mod.export_onnx(model, run.bundle.example(2), files / "model.onnx", run.recipe.export, run.bundle.inputs)
    storage = sparse_storage.store(files / "model.onnx", run.recipe.export.sparse_storage,
                                   validate.feed(files / "model.onnx", run.bundle.example(validate.CHECK_SAMPLES)))
    conversions = list(run.loaded.conversions)
    if run.converted.spec is not None:
        conversions.append({"structure": run.structure.name, "spec": run.converted.spec})
    ticket.save(files / "ticket.pt", model, run.converted.mask, arch=run.loaded.arch,
                arch_kwargs=run.loaded.arch_kwargs, conversions=conversions, recipe=run.recipe.to_dict(),
                hf_config=run.loaded.hf_config)
    if hf.is_model(model) and not conversions and _shapes(model) == _shapes(run.dense_copy):
        # unstructured and 2:4 keep the architecture as its config describes it: the user's HF
        # tooling reads the result as it is
        hf.save_folder(model, files / "hf", run.loaded.source)
    return storage


def _restore_export(run: Run, saved: dict) -> None:
    run.measured["storage"] = saved["storage"]
    for name in saved["files"]:
        src = run.state.dir / "export" / name
        (shutil.copytree if src.is_dir() else shutil.copy2)(src, run.out / name)


# ---------------------------------------------------------------- budget: measure the export against it, adjust

def budget_step(run: Run) -> None:
    """Not saved: a resumed run restores the export as first written and verifies it again; files it
    rewrites go only to the output folder."""
    from ticketforge import budget_verify

    def rewrite(r: Run) -> None:
        r.measured["storage"] = _write_model(r, r.out)

    run.measured["budget"] = budget_verify.verify(run, rewrite)


def _has_budget(run: Run) -> bool:
    from ticketforge import budget

    return budget.key(run.recipe) is not None


# ---------------------------------------------------------------- measure

def measure(run: Run) -> None:
    """Everything the report says about the exported files, measured on them."""
    run.ui.log("validate: ONNX Runtime accuracy, parity and latency")
    out, recipe, model = run.out, run.recipe, run.converted.model.cpu()
    par = validate.parity(model, out / "model.onnx", run.bundle.example(validate.CHECK_SAMPLES))
    if par["max"] > recipe.validate.parity_tol:
        raise VerificationError(f"model.onnx disagrees with the torch model: max abs logit difference "
                                f"{par['max']:.3e} over {par['samples']} validation samples > validate.parity_tol "
                                f"{recipe.validate.parity_tol:g}")
    m = run.measured
    m["parity"] = par
    m["structure"] = run.structure.verify(out / "model.onnx", out / "dense.onnx", run.converted, recipe) or {}
    # One pass of each file over the validation split: accuracy (where there are labels) and top-1
    # agreement of model.onnx with dense.onnx (always; without labels it is the accuracy that counts).
    # A language model's rows are its real tokens, its accuracy next-token top-1, plus perplexity.
    task = run.bundle.task
    ours, dense = (validate.onnx_outputs(out / name, run.bundle.val, task) for name in ("model.onnx", "dense.onnx"))
    m["onnx_agreement"] = validate.agreement(ours.pred, dense.pred)
    if run.bundle.labeled:
        m["onnx_accuracy"] = validate.agreement(ours.pred, ours.target)
        m["dense_onnx_accuracy"] = validate.agreement(dense.pred, dense.target)
    if task == tasks.NEXT_TOKEN:
        m["perplexity"] = {"dense": dense.perplexity, "onnx": ours.perplexity, "tokens": len(ours.target)}
    sample = run.bundle.example(1)[0].numpy()  # MACs are counted on a real sample (ticketforge.macs)
    m["dense"], m["compressed"] = (validate.onnx_stats(out / "dense.onnx", sample),
                                   validate.onnx_stats(out / "model.onnx", sample))
    m["size"] = {"dense": sparse_storage.sizes(out / "dense.onnx"), "compressed": sparse_storage.sizes(out / "model.onnx"),
                 "storage": m.get("storage")}
    m["timing"] = validate.latency_settings(recipe.validate)
    m["latency"] = validate.latency(out / "dense.onnx", out / "model.onnx", run.bundle.graph_input_shape,
                                    recipe.validate.latency_batches, settings=m["timing"])


# ---------------------------------------------------------------- deploy: targets beyond model.onnx

def deploy(run: Run) -> None:
    recipe, v = run.recipe, run.recipe.validate
    if recipe.export.quantize != "none":
        from ticketforge import quantize

        run.ui.log(f"quantize: model.{recipe.export.quantize}.onnx")
        run.deploy["quantize"], rows = quantize.export_quantized(
            run.out, recipe.export.quantize, run.bundle, v.repeats, v.warmup, v.latency_batches,
            settings=run.measured["timing"], storage=recipe.export.sparse_storage)
        run.measured["latency"] += rows
    if "tensorrt" in recipe.export.targets:
        from ticketforge import tensorrt

        run.ui.log("tensorrt: build and validate model.engine")
        run.deploy["tensorrt"], rows = tensorrt.build_and_validate(run.out, recipe, run.bundle, run.ui)
        run.measured["latency"] += rows


def _wants_deploy(run: Run) -> bool:
    return run.recipe.export.quantize != "none" or "tensorrt" in run.recipe.export.targets


STEPS = (
    Step("dense", dense, _restore_dense, shared=True),
    Step("search", search_step, _restore_search),
    Step("sanity", sanity_step, _restore_sanity, when=_wants_sanity),
    Step("finetune", finetune_step, _restore_finetune),
    Step("convert", convert_step),
    Step("export", export_step, _restore_export, main_only=True),
    Step("budget", budget_step, main_only=True, when=_has_budget),
    Step("measure", measure, main_only=True),
    Step("deploy", deploy, main_only=True, when=_wants_deploy),
)


def start(recipe: Recipe, structure: Structure, loaded: LoadedModel, bundle: DataBundle, device: torch.device,
          seed: int, ui: UI) -> Run:
    from ticketforge import device as device_mod

    dense_copy = copy.deepcopy(loaded.model).eval()
    model = device_mod.to_device(loaded.model, device).eval()
    if not bundle.labeled:
        data_mod.label_with_dense(bundle, model, device)
    return Run(recipe=recipe, structure=structure, loaded=loaded, bundle=bundle, device=device, seed=seed, ui=ui,
               model=model, dense_copy=dense_copy)
