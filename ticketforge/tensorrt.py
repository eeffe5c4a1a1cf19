"""TensorRT engines (`export.targets: [onnx, tensorrt]`): model.engine built from the exported ONNX
with TensorRT's Python API, then validated on the GPU like the ONNX model.

NOT YET RUN: TensorRT cannot be installed on the machines this was written on (no GPU, no
reachable wheel). The code follows the documented TensorRT 8.6/10 Python API; treat its first
run on a GPU as its test. What is tested here is `require()`: asking for an engine without
TensorRT or CUDA is a clear exit-2 error before any work starts."""
from __future__ import annotations

import importlib
from pathlib import Path

import numpy as np
import torch

from ticketforge import structures, tasks, validate
from ticketforge.data import loader
from ticketforge.errors import UserError
from ticketforge.sparse_storage import load_dense

INSTALL = "pip install ticketforge[tensorrt]"


def require():
    """The tensorrt module, or a UserError naming what to install."""
    try:
        trt = importlib.import_module("tensorrt")
    except ImportError:
        raise UserError(f"export.targets includes tensorrt but TensorRT is not installed: {INSTALL} "
                        "(needs an NVIDIA GPU with CUDA; add ticketforge[gpu] for onnxruntime-gpu)") from None
    if not torch.cuda.is_available():
        raise UserError("export.targets includes tensorrt but no CUDA device is visible to torch; "
                        "TensorRT engines are built and run on an NVIDIA GPU")
    return trt


def _logger(trt):
    """A TensorRT logger that keeps the build log: the sparse-kernel choices are reported there."""
    class Logger(trt.ILogger):
        def __init__(self):
            trt.ILogger.__init__(self)
            self.lines: list[str] = []

        def log(self, severity, msg):
            if severity <= trt.ILogger.Severity.INFO:
                self.lines.append(msg)
    return Logger()


def _sparse_layers(lines: list[str]) -> list[str]:
    """Layers TensorRT picked a sparse tactic for; the builder logs
    'TRT inference plan picked sparse implementation for layers: a, b' when SPARSE_WEIGHTS is set."""
    marker = "picked sparse implementation for layers:"
    for line in lines:
        if marker in line:
            return [n.strip() for n in line.split(marker, 1)[1].split(",") if n.strip()]
    return []


def build_engine(onnx_path: Path, engine_path: Path, input_shape: tuple[int, ...], trt_batch: list[int], *,
                 int8: bool, sparse: bool) -> dict:
    """Serialize an engine for `onnx_path` (a QDQ model when int8: explicit quantization)."""
    trt = require()
    logger = _logger(trt)
    builder = trt.Builder(logger)
    explicit = 0 if int(trt.__version__.split(".")[0]) >= 10 else \
        1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)  # implicit batch is gone in TRT 10
    network = builder.create_network(explicit)
    parser = trt.OnnxParser(network, logger)
    # Weights stored as sparse initializers (export.sparse_storage) are handed over dense.
    if not parser.parse(load_dense(onnx_path).SerializeToString(), str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise UserError(f"TensorRT cannot parse {onnx_path.name}: {errors}")
    config = builder.create_builder_config()
    config.profiling_verbosity = trt.ProfilingVerbosity.DETAILED
    lo, opt, hi = trt_batch
    profile = builder.create_optimization_profile()
    name = network.get_input(0).name
    profile.set_shape(name, (lo, *input_shape), (opt, *input_shape), (hi, *input_shape))
    config.add_optimization_profile(profile)
    precisions = ["fp32"]
    if builder.platform_has_fast_fp16:
        config.set_flag(trt.BuilderFlag.FP16)
        precisions.append("fp16")
    if int8:
        config.set_flag(trt.BuilderFlag.INT8)  # scales come from the QDQ nodes
        precisions.append("int8")
    if sparse:
        config.set_flag(trt.BuilderFlag.SPARSE_WEIGHTS)
        precisions.append("2:4 sparse")
    blob = builder.build_serialized_network(network, config)
    if blob is None:
        raise UserError("TensorRT could not build an engine: " + " | ".join(logger.lines[-3:]))
    engine_path.write_bytes(bytes(blob))
    return {"file": engine_path.name, "source": onnx_path.name, "precisions": precisions,
            "profile": {"min": lo, "opt": opt, "max": hi}, "sparse_layers": _sparse_layers(logger.lines),
            "tensorrt_version": trt.__version__}


class Engine:
    """A deserialized engine run on torch CUDA tensors (no pycuda needed)."""

    def __init__(self, path: Path):
        trt = require()
        self.trt = trt
        self.engine = trt.Runtime(_logger(trt)).deserialize_cuda_engine(path.read_bytes())
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.inp = next(n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT)
        self.out = next(n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT)
        self.stream = torch.cuda.Stream()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to("cuda", torch.float32).contiguous()
        self.context.set_input_shape(self.inp, tuple(x.shape))
        y = torch.empty(tuple(self.context.get_tensor_shape(self.out)), device="cuda", dtype=torch.float32)
        self.context.set_tensor_address(self.inp, x.data_ptr())
        self.context.set_tensor_address(self.out, y.data_ptr())
        self.stream.wait_stream(torch.cuda.current_stream())  # x and y were made on the caller's stream
        self.context.execute_async_v3(self.stream.cuda_stream)
        torch.cuda.current_stream().wait_stream(self.stream)
        return y

    def inspect(self) -> str:
        """The engine inspector's per-layer JSON (tactics and precisions), for the report's folder."""
        return self.engine.create_engine_inspector().get_engine_information(self.trt.LayerInformationFormat.JSON)


def _cuda_ms(fn, x: torch.Tensor, repeats: int, warmup: int, stream: torch.cuda.Stream) -> float:
    """Median latency timed with CUDA events on the engine's stream."""
    times = []
    with torch.cuda.stream(stream):
        for i in range(warmup + repeats):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record(stream)
            fn(x)
            end.record(stream)
            end.synchronize()
            if i >= warmup:
                times.append(start.elapsed_time(end))
    return float(np.median(times))


def build_and_validate(folder: Path, recipe, bundle, ui) -> tuple[dict, list]:
    """The pipeline stage: build model.engine (and dense.engine, to time the speed-up the same way),
    measure accuracy and latency; ONNX Runtime's CUDA / TensorRT providers are timed beside it
    when onnxruntime-gpu is installed."""
    import onnxruntime as ort

    cfg = recipe.export
    int8 = cfg.quantize == "int8"
    source = folder / ("model.int8.onnx" if int8 else "model.onnx")
    sparse = structures.get(recipe.convert.structure).sparse_kernels
    info = build_engine(source, folder / "model.engine", bundle.input_shape, cfg.trt_batch, int8=int8, sparse=sparse)
    build_engine(folder / "dense.onnx", folder / "dense.engine", bundle.input_shape, cfg.trt_batch,
                 int8=False, sparse=False)
    ui.log(f"tensorrt: sparse kernels on {len(info['sparse_layers'])} layers")
    engine, dense = Engine(folder / "model.engine"), Engine(folder / "dense.engine")
    (folder / "model.engine.json").write_text(engine.inspect())
    correct = total = 0
    with torch.no_grad():
        for x, y in loader(bundle.val, min(256, cfg.trt_batch[2])):
            right, n = tasks.correct(bundle.task, engine(x).cpu(), x, y)
            correct += right
            total += n
    info["accuracy"] = correct / max(total, 1)
    rows = []
    v = recipe.validate
    for b in v.latency_batches:
        if not cfg.trt_batch[0] <= b <= cfg.trt_batch[2]:
            continue  # outside the optimization profile the engine cannot run
        x = torch.rand(b, *bundle.input_shape, device="cuda")
        d = _cuda_ms(dense, x, v.repeats, v.warmup, dense.stream)
        c = _cuda_ms(engine, x, v.repeats, v.warmup, engine.stream)
        rows.append({"backend": "tensorrt", "batch": b, "dense_ms": round(d, 4), "compressed_ms": round(c, 4),
                     "speedup": round(d / c, 3)})
    for provider, backend in (("CUDAExecutionProvider", "onnxruntime-cuda"),
                              ("TensorrtExecutionProvider", "onnxruntime-tensorrt")):
        if provider in ort.get_available_providers():
            rows += validate.latency(folder / "dense.onnx", folder / "model.onnx", bundle.input_shape,
                                     v.latency_batches, backend=backend, provider=provider,
                                     settings=validate.latency_settings(v))
    return info, rows
