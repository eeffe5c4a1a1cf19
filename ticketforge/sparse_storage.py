"""Files that are really smaller: mostly-zero weights stored as ONNX sparse_initializers.

A sparse initializer holds the non-zero values and their flat positions (int64, as the ONNX
checker requires); ONNX Runtime turns it back into a dense tensor when it loads the model, so the
outputs are the same and nothing changes at run time. It pays where a tensor is less than about a
third non-zero (float32: 4 + 8 bytes per kept value against 4 per value; int8: 1 + 8 against 1), so
`auto` decides per tensor. A 2:4 tensor is half non-zero, which int64 positions cannot beat: it
stays dense under `auto` (gzip, which the report also gives, still gains on its zeros).

Everything here works on onnx protos and numpy only."""
from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from ticketforge.errors import VerificationError

INDEX_BYTES = 8  # int64 flat positions
MODES = ("auto", "always", "never")


def to_dense(sp: onnx.SparseTensorProto) -> np.ndarray:
    """The dense array a sparse initializer stands for (flat [NNZ] or coordinate [NNZ, rank] indices)."""
    values = numpy_helper.to_array(sp.values)
    dims = tuple(int(d) for d in sp.dims)
    dense = np.zeros(int(np.prod(dims)), dtype=values.dtype)
    if values.size:
        idx = numpy_helper.to_array(sp.indices).astype(np.int64)
        if idx.ndim == 2:
            idx = np.ravel_multi_index(tuple(idx.T), dims)
        dense[idx.reshape(-1)] = values.reshape(-1)
    return dense.reshape(dims)


def densify(model: onnx.ModelProto) -> onnx.ModelProto:
    """`model` with every sparse initializer turned back into a dense one (in place; returned), for
    tools that only read graph.initializer (the quantizer, TensorRT's parser, our own read-backs)."""
    for sp in model.graph.sparse_initializer:
        model.graph.initializer.append(numpy_helper.from_array(to_dense(sp), sp.values.name))
    del model.graph.sparse_initializer[:]
    return model


def load_dense(path: str | Path) -> onnx.ModelProto:
    return densify(onnx.load(str(path)))


def _sparse_bytes(arr: np.ndarray) -> int:
    return int(np.count_nonzero(arr)) * (arr.itemsize + INDEX_BYTES)


def _candidate(init: onnx.TensorProto) -> bool:
    """Weights only: matrices and kernels of a numeric type (never shape or index constants)."""
    return len(init.dims) >= 2 and init.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16,
                                                      onnx.TensorProto.DOUBLE, onnx.TensorProto.INT8,
                                                      onnx.TensorProto.UINT8, onnx.TensorProto.BFLOAT16)


def sparsify(model: onnx.ModelProto, mode: str) -> dict:
    """Move weights to sparse initializers (in place): `always` every weight, `auto` those that get
    smaller, `never` none. Returns what was moved and the bytes of the tensors before and after."""
    if mode not in MODES:
        raise ValueError(f"sparse storage mode {mode!r}, expected one of {MODES}")
    keep, moved = [], []
    dense_bytes = sparse_bytes = 0
    for init in model.graph.initializer:
        if mode == "never" or not _candidate(init):
            keep.append(init)
            continue
        arr = numpy_helper.to_array(init)
        small = _sparse_bytes(arr)
        if mode == "auto" and small >= arr.nbytes:
            keep.append(init)
            continue
        flat = arr.reshape(-1)
        idx = np.flatnonzero(flat)
        model.graph.sparse_initializer.append(onnx.helper.make_sparse_tensor(
            numpy_helper.from_array(flat[idx], init.name),
            numpy_helper.from_array(idx.astype(np.int64), f"{init.name}.indices"), list(arr.shape)))
        moved.append(init.name)
        dense_bytes += arr.nbytes
        sparse_bytes += small
    if moved:
        del model.graph.initializer[:]
        model.graph.initializer.extend(keep)
    return {"mode": mode, "sparse_tensors": len(moved), "tensor_bytes_dense": dense_bytes,
            "tensor_bytes_sparse": sparse_bytes}


def sizes(path: str | Path) -> dict:
    """Size on disk and gzip size (level 6, what a compressed download costs), in bytes."""
    data = Path(path).read_bytes()
    return {"bytes": len(data), "gzip_bytes": len(gzip.compress(data, compresslevel=6, mtime=0))}


def store(path: str | Path, mode: str, inputs: dict, tol: float = 1e-6) -> dict:
    """Rewrite the ONNX file at `path` with sparse storage (`mode`), after checking that ONNX Runtime
    loads the new file and gives the same outputs as the dense-stored one on `inputs` (a feed dict).
    Nothing is replaced when no tensor moves; a disagreement is a VerificationError."""
    from ticketforge import latency  # onnxruntime: only for the check

    path = Path(path)
    model = onnx.load(str(path))
    info = sparsify(model, mode)
    if not info["sparse_tensors"]:
        return {**info, "max_abs_diff": 0.0}
    tmp = path.with_name(f".{path.name}.sparse")
    try:
        onnx.save_model(model, str(tmp))
        onnx.checker.check_model(str(tmp))
        try:
            got = latency.session(tmp, threads=0).run(None, inputs)
        except Exception as exc:  # ORT's own exception types
            raise VerificationError(f"ONNX Runtime cannot load the sparse-stored {path.name}: "
                                    f"{str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__}"
                                    " (export.sparse_storage=never keeps it dense)") from None
        ref = latency.session(path, threads=0).run(None, inputs)
        diff = max(float(np.max(np.abs(a.astype(np.float64) - b.astype(np.float64)), initial=0.0))
                   for a, b in zip(ref, got))
        scale = max(float(np.max(np.abs(a), initial=0.0)) for a in ref)
        if not diff <= tol * max(1.0, scale):
            raise VerificationError(f"the sparse-stored {path.name} disagrees with the dense-stored one: max abs "
                                    f"difference {diff:.3e} (export.sparse_storage=never keeps it dense)")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return {**info, "max_abs_diff": diff}
