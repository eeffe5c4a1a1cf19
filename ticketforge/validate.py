"""Measure what was exported: accuracy and logits in ONNX Runtime, latency side by side with
the dense export, and the sparsity, parameters and MACs read back from the ONNX files."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnx import numpy_helper
from torch.utils.data import Dataset

from ticketforge import latency as latency_mod, tasks
from ticketforge.adapt import inputs
from ticketforge.data import loader
from ticketforge.errors import VerificationError
from ticketforge.sparse_storage import load_dense

WEIGHT_OPS = ("Conv", "Gemm", "MatMul", "ConvTranspose")
CHECK_SAMPLES = 64  # validation samples that parity and the sparse-storage check run on


def session(path: str | Path, provider: str = "CPUExecutionProvider") -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.log_severity_level = 3
    try:
        return ort.InferenceSession(str(path), opts, providers=[provider])
    except Exception as exc:  # ORT raises its own pybind exception types for a model it cannot run
        raise VerificationError(f"ONNX Runtime ({provider}) cannot load {Path(path).name}: "
                                f"{str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__}") from None


def run(sess: ort.InferenceSession, x) -> np.ndarray:
    return sess.run(None, inputs([i.name for i in sess.get_inputs()], x))[0]


def feed(path: str | Path, x) -> dict[str, np.ndarray]:
    """The input dict of the ONNX model at `path` for the batch x."""
    graph = onnx.load(str(path), load_external_data=False).graph
    weights = {i.name for i in graph.initializer}
    return inputs([i.name for i in graph.input if i.name not in weights], x)


@dataclass
class Outputs:
    """One pass of an ONNX model over a split: the top-1 and the target of every row that counts
    (a sample; a real token of a sequence task, ticketforge.tasks) and the summed negative
    log-likelihood of the targets (nats)."""

    pred: np.ndarray
    target: np.ndarray
    nll: float

    @property
    def perplexity(self) -> float:
        return tasks.perplexity(self.nll, len(self.target))


def _rows_per_batch(task: str, ds: Dataset) -> int:
    """Samples per ONNX call: a sequence task's logits are (batch, seq, vocab), so a batch of 256
    GPT-2 sequences of 128 tokens would hold 6.6 GB of them."""
    if not tasks.sequence(task):
        return 256
    return max(1, min(256, 2 ** 16 // max(1, ds[0][0].shape[-1])))


def onnx_outputs(path: str | Path, ds: Dataset, task: str = tasks.CLASSIFY, batch_size: int | None = None) -> Outputs:
    sess = session(path)
    preds, targets, nll = [], [], 0.0
    for x, y in loader(ds, batch_size or _rows_per_batch(task, ds)):
        out, target = tasks.numpy_rows(task, run(sess, x), x, y)
        logp = torch.log_softmax(torch.from_numpy(out).double(), -1)
        if len(target) and (target >= 0).all():  # labels from data without any are the dense model's top-1
            nll -= float(logp.gather(1, torch.from_numpy(target).long()[:, None]).sum())
        preds.append(out.argmax(-1))
        targets.append(target)
    return Outputs(np.concatenate(preds), np.concatenate(targets), nll)


def onnx_predictions(path: str | Path, ds: Dataset, batch_size: int | None = None, task: str = tasks.CLASSIFY) -> np.ndarray:
    """Top-1 of the ONNX model at `path` for every sample of `ds` (every counted token of a sequence
    task), in order."""
    return onnx_outputs(path, ds, task, batch_size).pred


def agreement(a: np.ndarray, b: np.ndarray) -> float:
    """Fraction of positions where two label arrays agree (accuracy, when one holds the labels)."""
    return float((np.asarray(a) == np.asarray(b)).mean()) if len(a) else 0.0


def onnx_accuracy(path: str | Path, ds: Dataset, batch_size: int | None = None, task: str = tasks.CLASSIFY) -> float:
    out = onnx_outputs(path, ds, task, batch_size)
    return agreement(out.pred, out.target)


@torch.no_grad()
def parity(model: torch.nn.Module, path: str | Path, x: torch.Tensor) -> dict:
    """Largest and mean abs difference between the torch model's logits and the ONNX model's, on
    the CPU, over the samples x (real validation samples: random inputs miss what real ones hit)."""
    model.eval()
    ref = model(x.to(next(model.parameters()).device)).float().cpu().numpy()
    got = run(session(path), x)
    diff = np.abs(ref - got)
    return {"max": float(diff.max()), "mean": float(diff.mean()), "samples": len(x)}


def latency_settings(cfg) -> latency_mod.Settings:
    """The timing settings of a recipe's `validate` section."""
    return latency_mod.Settings(min_runs=cfg.repeats, warmup=cfg.warmup, max_seconds=cfg.max_seconds,
                                ci_target=cfg.ci_target, threads=cfg.threads)


def latency(dense: str | Path, compressed: str | Path, sample_shape: tuple[int, ...], batches: list[int],
            repeats: int = 30, warmup: int = 5, backend: str = "onnxruntime-cpu",
            provider: str = "CPUExecutionProvider", settings: latency_mod.Settings | None = None) -> list[dict]:
    """Latency rows of the compressed model against the dense one, each with the speed-up's 95%
    interval (ticketforge.latency). `settings` (latency_settings(recipe.validate)) replaces
    repeats and warmup."""
    s = settings or latency_mod.Settings(min_runs=repeats, warmup=warmup)
    for path in (dense, compressed):
        session(path, provider)  # a file ONNX Runtime cannot load is a verification error, with its reason
    return latency_mod.compare(dense, compressed, batches, s, sample_shape=sample_shape, backend=backend,
                               provider=provider)


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


def onnx_stats(path: str | Path, sample: np.ndarray | None = None, count_macs: bool = True) -> dict:
    """Sparsity, non-zero parameters, MACs per sample (ticketforge.macs, on `sample`, one input
    sample; None with `macs_unknown` saying why when they cannot be counted) and file size, read
    from the ONNX file."""
    from ticketforge import macs

    model = load_dense(path)  # sparse-stored weights count as the tensors they stand for
    weights = _weights(model)
    total = sum(w.size for w in weights.values())
    zeros = sum(int((w == 0).sum()) for w in weights.values())
    params = sum(int(np.count_nonzero(numpy_helper.to_array(i))) for i in model.graph.initializer)
    count, why = macs.count(model, sample) if count_macs else (None, "not counted")
    return {"weights": int(total), "zero_weights": int(zeros), "sparsity": zeros / max(total, 1),
            "params_nonzero": params, "macs": count, "macs_unknown": why,
            "size_mb": Path(path).stat().st_size / 2 ** 20}


def fewer_weights(onnx_path, dense_onnx_path, what: str) -> None:
    """A structure that removes weights must leave fewer in the exported file than in the dense one:
    a run that changed nothing is never reported as a success."""
    ours, dense = (onnx_stats(p, count_macs=False)["weights"] for p in (onnx_path, dense_onnx_path))
    if ours >= dense:
        raise VerificationError(f"{what} (model.onnx holds {ours:,} weights, dense.onnx {dense:,})")
