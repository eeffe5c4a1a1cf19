"""What makes INT8 pay in ONNX Runtime on this CPU: time variants of static quantization
against the fp32 export, alternately in one process (as validate.latency does), and measure accuracy.

    .venv/bin/python bench/quantize_int8.py [--repeats 30]

Models: the demo digits-resnet (trained briefly on digits, 1x8x8 inputs) and a CIFAR ResNet-20
(random weights, 3x32x32: latency only). Prints one table row per (model, variant, batch)."""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from ticketforge import export, finetune, models, quantize
from ticketforge.data import load_data, loader
from ticketforge.recipe import ExportConfig

VARIANTS = {  # name: (quantize_int8 keyword arguments, ORT graph optimization level)
    "plain QDQ (per-tensor, no pre-process)": (dict(preprocess=False, per_channel=False), "all"),
    "plain QDQ, ORT basic fusion only": (dict(preprocess=False, per_channel=False), "basic"),
    "pre-process + QDQ per-tensor": (dict(per_channel=False), "all"),
    "pre-process + QDQ per-channel": (dict(), "all"),
    "pre-process + QDQ per-channel + reduce_range": (dict(reduce_range=True), "all"),
    "pre-process + QOperator per-channel": (dict(fmt="qoperator"), "all"),
    "pre-process + QOperator per-channel + reduce_range": (dict(fmt="qoperator", reduce_range=True), "all"),
}
LEVELS = {"all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL, "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC}


def sess(path, level):
    o = ort.SessionOptions()
    o.graph_optimization_level = LEVELS[level]
    o.log_severity_level = 3
    return ort.InferenceSession(str(path), o, providers=["CPUExecutionProvider"])


def time_pair(a, b, shape, repeats):
    x = np.random.default_rng(0).random(shape, dtype=np.float32)
    ta, tb = [], []
    for i in range(5 + repeats):
        for s, t in ((a, ta), (b, tb)):
            t0 = time.perf_counter()
            s.run(None, {s.get_inputs()[0].name: x})
            if i >= 5:
                t.append(time.perf_counter() - t0)
    return np.median(ta) * 1e3, np.median(tb) * 1e3


def accuracy(s, ds):
    correct = n = 0
    for x, y in loader(ds, 256):
        correct += int((s.run(None, {s.get_inputs()[0].name: x.numpy()})[0].argmax(1) == y.numpy()).sum())
        n += len(y)
    return correct / n


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=30)
    args = ap.parse_args()
    torch.manual_seed(0)
    digits = load_data("digits", 0.1, 0)
    demo = models.build("digits-resnet")
    finetune.train(demo, loader(digits.train, 64, shuffle=True, seed=0), epochs=5, lr=0.05, device=torch.device("cpu"))
    cifar = torch.utils.data.TensorDataset(torch.rand(512, 3, 32, 32), torch.zeros(512, dtype=torch.long))
    cases = [("digits-resnet", demo, digits.train, digits.val, (1, 8, 8)),
             ("resnet20", models.build("resnet20"), cifar, None, (3, 32, 32))]
    print(f"onnxruntime {ort.__version__}, torch threads {torch.get_num_threads()}")
    print("| model | variant | batch | fp32 ms | int8 ms | speed-up | int8 acc (fp32) |")
    print("|---|---|---:|---:|---:|---:|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for name, model, train, val, shape in cases:
            fp32 = Path(tmp) / f"{name}.onnx"
            export.export_onnx(model.eval(), torch.rand(2, *shape), fp32, ExportConfig())
            for i, (variant, (kw, level)) in enumerate(VARIANTS.items()):
                q = Path(tmp) / f"{name}-{i}.int8.onnx"
                quantize.quantize_int8(fp32, q, train, **kw)
                sf, sq = sess(fp32, level), sess(q, level)
                acc = f"{accuracy(sq, val):.4f} ({accuracy(sf, val):.4f})" if val is not None else "-"
                for b in (1, 64):
                    f, i8 = time_pair(sf, sq, (b, *shape), args.repeats)
                    print(f"| {name} | {variant} | {b} | {f:.3f} | {i8:.3f} | {f / i8:.2f}x | {acc} |", flush=True)


if __name__ == "__main__":
    main()
