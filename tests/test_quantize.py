"""INT8 and FP16 exports: quantized operators, they run in ONNX Runtime, the report has their numbers."""
import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from click.testing import CliRunner

from ticketforge import export, models, quantize
from ticketforge.cli import cli
from ticketforge.data import load_data
from ticketforge.demo import train_demo_model
from ticketforge.recipe import ExportConfig


def test_int8_export_has_quantized_ops_and_runs(tmp_path):
    train_demo_model(Path("demo.pt"), epochs=1)
    result = CliRunner().invoke(cli, ["compress", "demo.pt", "--recipe", "magnitude", "--sparsity", "0.5",
                                      "--epochs", "1", "--quiet", "--out", "out", "--set", "validate.repeats=3",
                                      "--set", "validate.max_seconds=0.5", "--set", "export.quantize=int8"])
    assert result.exit_code == 0, result.output
    q = onnx.load("out/model.int8.onnx")
    ops = {n.op_type for n in q.graph.node}
    assert "QuantizeLinear" in ops and "DequantizeLinear" in ops
    report = json.loads(Path("out/report.json").read_text())
    assert report["quantize"]["quantized_ops"]["QuantizeLinear"] > 0
    assert abs(report["accuracy"]["int8"] - report["accuracy"]["onnx"]) < 0.05
    assert [r["batch"] for r in report["latency"] if r["backend"] == "onnxruntime-cpu-int8"] == [1, 64]
    bundle = load_data("digits", 0.1, 0)
    x = torch.stack([bundle.val[i][0] for i in range(32)]).numpy()
    s = ort.InferenceSession("out/model.int8.onnx", providers=["CPUExecutionProvider"])
    assert s.run(None, {s.get_inputs()[0].name: x})[0].shape == (32, 10)


def test_fp16_keeps_float32_io(tmp_path):
    torch.manual_seed(0)
    model = models.build("digits-resnet").eval()
    x = torch.rand(4, 1, 8, 8)
    export.export_onnx(model, x, "m.onnx", ExportConfig())
    quantize.convert_fp16("m.onnx", "m.fp16.onnx")
    half = [i for i in onnx.load("m.fp16.onnx").graph.initializer if i.data_type == onnx.TensorProto.FLOAT16]
    assert half
    out32 = ort.InferenceSession("m.onnx", providers=["CPUExecutionProvider"]).run(None, {"input": x.numpy()})[0]
    out16 = ort.InferenceSession("m.fp16.onnx", providers=["CPUExecutionProvider"]).run(None, {"input": x.numpy()})[0]
    assert out16.dtype == np.float32
    assert np.abs(out16 - out32).max() < 2e-2 * max(1.0, np.abs(out32).max())
