"""Size budgets for weight-level structures (unstructured, 2:4): the sparsity at which the deployed
file meets `search.max_size_mb`, and the size of the file a run deploys.

The file's bytes are what it stores: every initializer that is not a prunable weight as it is, and
each prunable weight either dense (item size per value) or, where that is smaller, as a sparse
initializer (item size + 8 bytes of int64 position per non-zero: ticketforge.sparse_storage). Which
weights a search keeps is not known before it runs; magnitude on the trained weights stands in for
it (LAMP scores when the run is `magnitude` with its default scope, global |w| otherwise; most
methods keep a similar number per layer), and the verify step measures the real file and removes
more if it is over."""
from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from ticketforge.masks import prunable
from ticketforge.sparse_storage import INDEX_BYTES

ITEM_BYTES = {"none": 4, "fp16": 2, "int8": 1}


def _exported_bytes(model, example, quantize: str) -> int:
    """Bytes of the dense model exported (and quantized) as the run will deploy it, all stored dense.
    A quantized graph carries far more than its weights (Quantize/Dequantize pairs, scales, names),
    so it is measured, not estimated; its size does not depend on the calibration data."""
    from torch.utils.data import TensorDataset

    from ticketforge import quantize as quant
    from ticketforge.export import export_dense_copy

    with tempfile.TemporaryDirectory() as tmp:
        path = export_dense_copy(model, example, Path(tmp) / "dense.onnx")
        if quantize == "int8":
            x = example.cpu()
            quant.quantize_int8(path, Path(tmp) / "q.onnx", TensorDataset(x, torch.zeros(len(x), dtype=torch.long)))
            path = Path(tmp) / "q.onnx"
        elif quantize == "fp16":
            quant.convert_fp16(path, Path(tmp) / "q.onnx")
            path = Path(tmp) / "q.onnx"
        return path.stat().st_size


def predictor(model, example, quantize: str = "none", storage: str = "auto", lamp: bool = False):
    """A function sparsity -> predicted bytes of the deployed file, for this trained model, with its
    weights stored as export.sparse_storage says (`storage`), kept by |w| or by LAMP score."""
    from ticketforge.search.magnitude import lamp_scores

    weights = {k: w.detach().abs().float().cpu() for k, w in prunable(model).items()}
    weights = {k: w.flatten() for k, w in (lamp_scores(weights) if lamp else weights).items()}
    item = ITEM_BYTES[quantize]
    numel = {k: w.numel() for k, w in weights.items()}
    total = sum(numel.values())
    # the rest of the file: tensors that are not prunable weights, and the graph itself
    rest = _exported_bytes(model, example, quantize) - item * total
    ordered = {k: torch.sort(w).values for k, w in weights.items()}
    everything = torch.sort(torch.cat(list(weights.values()))).values

    def size(sparsity: float) -> float:
        drop = int(round(sparsity * total))
        if drop <= 0:
            return rest + item * total
        threshold = everything[min(drop, total) - 1]
        out = rest
        for k, s in ordered.items():
            nnz = numel[k] - int(torch.searchsorted(s, threshold, right=True))
            dense, sparse = item * numel[k], (item + INDEX_BYTES) * nnz
            out += {"auto": min(dense, sparse), "always": sparse, "never": dense}[storage]
        return out

    return size


def sparsity_for(model, example, max_bytes: float, quantize: str = "none", storage: str = "auto",
                 lamp: bool = False) -> tuple[float, dict]:
    """The lowest sparsity (to 1e-4) whose predicted file meets max_bytes, and what was predicted."""
    size = predictor(model, example, quantize, storage, lamp)
    lo, hi = 0.0, 0.9999
    if size(hi) > max_bytes:
        return hi, {"predicted_mb": size(hi) / 2 ** 20, "reachable": False}
    if size(lo) <= max_bytes:
        return lo, {"predicted_mb": size(lo) / 2 ** 20, "reachable": True}
    while hi - lo > 1e-4:
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if size(mid) <= max_bytes else (mid, hi)
    return hi, {"predicted_mb": size(hi) / 2 ** 20, "reachable": True}


def deployed_file(recipe) -> str:
    """The file a size budget applies to."""
    q = recipe.export.quantize
    return "model.onnx" if q == "none" else f"model.{q}.onnx"


def deployed_bytes(folder: Path, recipe, bundle) -> int:
    """Bytes of the deployed file: model.onnx as exported, or its quantized copy, written to a
    temporary folder exactly as the deploy step will write it (same calibration, same storage)."""
    from ticketforge import quantize, sparse_storage, validate

    q = recipe.export.quantize
    if q == "none":
        return (folder / "model.onnx").stat().st_size
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"model.{q}.onnx"
        if q == "int8":
            quantize.quantize_int8(folder / "model.onnx", path, bundle.train)
        else:
            quantize.convert_fp16(folder / "model.onnx", path)
        if recipe.export.sparse_storage != "never":
            x = bundle.example(validate.CHECK_SAMPLES)
            sparse_storage.store(path, recipe.export.sparse_storage, validate.feed(path, x))
        return path.stat().st_size
