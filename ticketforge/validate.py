"""Measure what was exported: accuracy and logits in ONNX Runtime, latency side by side with
the dense export, and the sparsity, parameters and MACs read back from the ONNX files."""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnx import numpy_helper
from torch.utils.data import Dataset

from ticketforge.data import loader
from ticketforge.errors import VerificationError

WEIGHT_OPS = ("Conv", "Gemm", "MatMul", "ConvTranspose")


def session(path: str | Path, provider: str = "CPUExecutionProvider") -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.log_severity_level = 3
    try:
        return ort.InferenceSession(str(path), opts, providers=[provider])
    except Exception as exc:  # ORT raises its own pybind exception types for a model it cannot run
        raise VerificationError(f"ONNX Runtime ({provider}) cannot load {Path(path).name}: "
                                f"{str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__}") from None


def feed(sess: ort.InferenceSession, x: np.ndarray) -> dict[str, np.ndarray]:
    """ONNX Runtime's inputs for one batch as ticketforge holds it: float32 images or features,
    int64 token ids, and a packed attention mask (N, 2, L) split into the graph's second input."""
    x = np.asarray(x)
    x = x.astype(np.int64 if x.dtype.kind in "iub" else np.float32, copy=False)
    names = [i.name for i in sess.get_inputs()]
    if len(names) == 2:
        return {names[0]: np.ascontiguousarray(x[:, 0]), names[1]: np.ascontiguousarray(x[:, 1])}
    return {names[0]: x}


def run(sess: ort.InferenceSession, x: np.ndarray) -> np.ndarray:
    return sess.run(None, feed(sess, x))[0]


def onnx_accuracy(path: str | Path, ds: Dataset, batch_size: int = 256) -> float:
    sess = session(path)
    correct = total = 0
    for x, y in loader(ds, batch_size):
        pred = run(sess, x.numpy()).argmax(1)
        correct += int((pred == y.numpy()).sum())
        total += len(y)
    return correct / max(total, 1)


@torch.no_grad()
def parity(model: torch.nn.Module, path: str | Path, x: torch.Tensor) -> tuple[float, float]:
    """Largest and mean abs difference between the torch model's logits and the ONNX model's, on the CPU."""
    model.eval()
    ref = model(x.to(next(model.parameters()).device)).float().cpu().numpy()
    got = run(session(path), x.cpu().numpy())
    diff = np.abs(ref - got)
    return float(diff.max()), float(diff.mean())


def latency(dense: str | Path, compressed: str | Path, sample_shape: tuple[int, ...], batches: list[int],
            repeats: int = 30, warmup: int = 5, backend: str = "onnxruntime-cpu",
            provider: str = "CPUExecutionProvider", example: np.ndarray | None = None) -> list[dict]:
    """Median latency of both models, timed alternately in this process so that machine noise
    hits both alike. Inputs are random floats, or `example`'s samples repeated to the batch size
    (token ids must be valid ids)."""
    sd, sc = session(dense, provider), session(compressed, provider)
    rows = []
    rng = np.random.default_rng(0)
    for b in batches:
        x = (np.resize(example, (b, *example.shape[1:])) if example is not None
             else rng.random((b, *sample_shape), dtype=np.float32))
        td, tc = [], []
        for i in range(warmup + repeats):
            for sess, times in ((sd, td), (sc, tc)):
                t0 = time.perf_counter()
                run(sess, x)
                if i >= warmup:
                    times.append(time.perf_counter() - t0)
        d, c = float(np.median(td) * 1e3), float(np.median(tc) * 1e3)
        rows.append({"backend": backend, "batch": b, "dense_ms": round(d, 4), "compressed_ms": round(c, 4),
                     "speedup": round(d / c, 3)})
    return rows


def _weights(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    """Initializers used as the weight of a Conv/Gemm/MatMul (the prunable weights, BN folded in)."""
    inits = {i.name: i for i in model.graph.initializer}
    out = {}
    for node in model.graph.node:
        if node.op_type in WEIGHT_OPS:
            for name in node.input[:2]:
                if name in inits and len(inits[name].dims) >= 2 and name not in out:
                    out[name] = numpy_helper.to_array(inits[name])
    return out


def onnx_stats(path: str | Path, sample: np.ndarray | None = None) -> dict:
    """Sparsity, non-zero parameters, MACs per sample (ticketforge.macs; None with `macs_unknown`
    saying why when they cannot be counted) and file size, read from the ONNX file."""
    from ticketforge import macs

    model = onnx.load(str(path))
    weights = _weights(model)
    total = sum(w.size for w in weights.values())
    zeros = sum(int((w == 0).sum()) for w in weights.values())
    params = sum(int(np.count_nonzero(numpy_helper.to_array(i))) for i in model.graph.initializer)
    count, why = macs.count(path, sample)
    return {"weights": int(total), "zero_weights": int(zeros), "sparsity": zeros / max(total, 1),
            "params_nonzero": params, "macs": count, "macs_unknown": why,
            "size_mb": Path(path).stat().st_size / 2 ** 20}
