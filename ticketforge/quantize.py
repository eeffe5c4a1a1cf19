"""Post-training quantization of the exported model for CPU and edge runtimes: INT8 (static,
calibrated on training batches, QDQ format, which is also what TensorRT takes for INT8) and FP16.

The INT8 defaults are the fastest variant measured on our CPUs (bench/quantize_int8.py, docs/benchmarks.md
"INT8 variants"): the graph is pre-processed (shape inference and ORT's fusions folded into the
file) so that Conv+Relu pairs quantize as one unit and no extra Quantize/Dequantize pairs sit
between them; weights are quantized per output channel, which keeps accuracy at 8 bits without
needing wider activations."""
from __future__ import annotations

import logging
import tempfile
from pathlib import Path

import numpy as np
import onnx
from torch.utils.data import Dataset

from ticketforge import sparse_storage
from ticketforge.data import loader

QUANT_OPS = ("QuantizeLinear", "QLinearConv", "ConvInteger", "QLinearMatMul", "MatMulInteger")


class BatchReader:
    """onnxruntime's CalibrationDataReader over the first `max_samples` training samples."""

    def __init__(self, input_name: str, ds: Dataset, batch_size: int, max_samples: int):
        self.input_name, self.ds, self.batch_size, self.max_samples = input_name, ds, batch_size, max_samples
        self.rewind()

    def rewind(self) -> None:
        self._batches = iter(loader(self.ds, self.batch_size))
        self._seen = 0

    def get_next(self):
        if self._seen >= self.max_samples:
            return None
        x = next(self._batches, None)
        if x is None:
            return None
        self._seen += len(x[0])
        return {self.input_name: x[0].numpy().astype(np.float32)}


def quantize_int8(fp32: str | Path, out: str | Path, calib: Dataset, *, preprocess: bool = True,
                  per_channel: bool = True, fmt: str = "qdq", reduce_range: bool = False,
                  batch_size: int = 64, max_samples: int = 512) -> dict:
    """Write a statically quantized INT8 copy of `fp32` to `out`; returns what was done."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    fp32, out = Path(fp32), Path(out)
    logging.getLogger("root").setLevel(logging.ERROR)  # the quantizer logs every skipped node at WARNING
    with tempfile.TemporaryDirectory() as tmp:
        src = fp32
        m = onnx.load(str(fp32))
        if m.graph.sparse_initializer:  # the quantizer reads graph.initializer only
            src = Path(tmp) / "dense.onnx"
            onnx.save_model(sparse_storage.densify(m), str(src))
        if preprocess:
            pre = Path(tmp) / "pre.onnx"
            quant_pre_process(str(src), str(pre), skip_symbolic_shape=True)
            src = pre
        input_name = onnx.load(str(src), load_external_data=False).graph.input[0].name
        reader = BatchReader(input_name, calib, batch_size, max_samples)
        quantize_static(str(src), str(out), reader,
                        quant_format=QuantFormat.QDQ if fmt == "qdq" else QuantFormat.QOperator,
                        per_channel=per_channel, reduce_range=reduce_range,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        calibrate_method=CalibrationMethod.MinMax)
    onnx.checker.check_model(str(out))
    return {"format": fmt, "per_channel": per_channel, "preprocess": preprocess, "reduce_range": reduce_range,
            "calibration_samples": min(max_samples, len(calib)), "quantized_ops": count_ops(out)}


def count_ops(path: str | Path) -> dict[str, int]:
    counts: dict[str, int] = {}
    for node in onnx.load(str(path)).graph.node:
        if node.op_type in QUANT_OPS:
            counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return counts


def convert_fp16(fp32: str | Path, out: str | Path) -> dict:
    """Write an FP16 copy of `fp32`; inputs and outputs stay float32 so the same data feeds both."""
    from onnxruntime.transformers.float16 import convert_float_to_float16
    from onnxruntime.transformers.onnx_model import OnnxModel

    model = OnnxModel(convert_float_to_float16(sparse_storage.load_dense(fp32), keep_io_types=True))
    model.topological_sort()  # the converter appends the input Cast nodes at the end of the graph
    onnx.save_model(model.model, str(out))
    onnx.checker.check_model(str(out))
    return {"format": "fp16", "keep_io_types": True}


def export_quantized(folder: Path, kind: str, bundle, repeats: int, warmup: int, batches: list[int], *,
                     settings=None, storage: str = "never") -> tuple[dict, list]:
    """The pipeline stage: write model.<kind>.onnx from model.onnx, store its weights as
    `storage` says (export.sparse_storage; checked on validation samples), measure its
    accuracy and (INT8) its latency against the dense fp32 export; returns (report section,
    latency rows)."""
    from ticketforge import validate

    path = folder / f"model.{kind}.onnx"
    rows = []
    if kind == "int8":
        info = quantize_int8(folder / "model.onnx", path, bundle.train)
    else:
        # FP16 is a GPU format (TensorRT, CUDA): ONNX Runtime's CPU kernels are mostly fp32 and would
        # insert casts, so a CPU timing says nothing about its target; only accuracy is measured.
        info = convert_fp16(folder / "model.onnx", path)
    if storage != "never":
        x = bundle.example(validate.CHECK_SAMPLES)
        info["storage"] = sparse_storage.store(path, storage, validate.feed(path, x))
    if kind == "int8":
        rows = validate.latency(folder / "dense.onnx", path, bundle.input_shape, batches, repeats, warmup,
                                backend="onnxruntime-cpu-int8", settings=settings)
    ours = validate.onnx_outputs(path, bundle.val, bundle.task)
    dense = validate.onnx_outputs(folder / "dense.onnx", bundle.val, bundle.task)
    # top-1 agreement with dense.onnx always; accuracy only where there are labels
    info.update(file=path.name, agreement=validate.agreement(ours.pred, dense.pred),
                accuracy=validate.agreement(ours.pred, ours.target) if bundle.labeled else None,
                size_mb=path.stat().st_size / 2 ** 20, size=sparse_storage.sizes(path))
    return info, rows
