"""Multiply-accumulates, counted two ways for two purposes, both here:

- `layer_macs`: per Conv / Linear layer of a torch model, from one forward pass with hooks: the
  cost model the channel and block searches meet a budget on.
- `count`: per sample of an exported ONNX model, the one count every report gives, for every
  model. It is read from what ONNX Runtime computes, not from static shape inference: HF models
  build their reshapes from `Shape` ops at run time (attention heads, token counts, window
  partitions), which onnx's shape inference cannot follow, so a static count silently skipped
  those layers (and read 0 for whole models). The graph is run once on one sample with every
  operand of a Conv, Gemm or MatMul exposed as an output, and each node's MACs come from the
  shapes it really saw; attention's activation-by-activation MatMuls (QK^T, AV) count too. When
  the count cannot be made, the answer is None with the reason, never 0."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import nn

CONV_LINEAR = (nn.modules.conv._ConvNd, nn.Linear)


@dataclass
class LayerMacs:
    macs: dict[str, float]   # MACs per sample of every Conv/Linear, by module name
    widths: dict[str, int]   # input width of every Conv/Linear (channels or features)
    outputs: set[str]        # layers whose output is the model's output

    @property
    def total(self) -> float:
        return sum(self.macs.values())

    def within(self, prefix: str) -> float:
        """MACs of the layers inside submodule `prefix`."""
        return sum(v for k, v in self.macs.items() if k.startswith(prefix + "."))


@torch.no_grad()
def layer_macs(model: nn.Module, example: torch.Tensor) -> LayerMacs:
    macs, widths, outputs, hooks = {}, {}, {}, []
    names = {m: n for n, m in model.named_modules()}

    def hook(mod, inp, out):
        n = names[mod]
        per_sample = out.numel() / example.shape[0]
        # weight[0] of a conv is (in_channels / groups) x kernel: the MACs of one output value
        k = mod.in_features if isinstance(mod, nn.Linear) else mod.weight[0].numel()
        macs[n] = macs.get(n, 0.0) + per_sample * k  # a module called twice costs twice
        widths[n] = mod.in_features if isinstance(mod, nn.Linear) else mod.in_channels
        outputs[n] = out

    for m in model.modules():
        if isinstance(m, CONV_LINEAR):
            hooks.append(m.register_forward_hook(hook))
    y = forward_with_hooks(model, example, hooks)
    final = {n for n, o in outputs.items() if o is y or (o.data_ptr() == y.data_ptr() and o.shape == y.shape)}
    return LayerMacs(macs, widths, final)


# ---------------------------------------------------------------- the exported model

OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")
_DTYPES = {onnx.TensorProto.FLOAT: np.float32, onnx.TensorProto.INT64: np.int64, onnx.TensorProto.INT32: np.int32,
           onnx.TensorProto.DOUBLE: np.float64, onnx.TensorProto.FLOAT16: np.float16, onnx.TensorProto.BOOL: np.bool_}


def _zeros(model: onnx.ModelProto, inits: set[str]) -> dict[str, np.ndarray]:
    """One all-zero sample per graph input (token id 0 and a zero mask are valid inputs too)."""
    feeds = {}
    for inp in model.graph.input:
        if inp.name in inits:
            continue
        t = inp.type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") else None for d in t.shape.dim]
        if None in dims[1:] or t.elem_type not in _DTYPES:
            raise ValueError(f"input {inp.name!r} has no fixed sample shape or a type we cannot make up")
        feeds[inp.name] = np.zeros([1, *dims[1:]], dtype=_DTYPES[t.elem_type])
    return feeds


def node_macs(node: onnx.NodeProto, shapes: dict[str, tuple[int, ...]]) -> int:
    """MACs of one Conv/ConvTranspose/Gemm/MatMul node from the shapes of its operands and output."""
    out = shapes[node.output[0]]
    a, w = shapes[node.input[0]], shapes[node.input[1]]
    if node.op_type == "Conv":  # weight (K, C/groups, *kernel): each output element reads C/groups x kernel
        return int(np.prod(out)) * int(np.prod(w[1:]))
    if node.op_type == "ConvTranspose":  # each input element is scattered through (K/groups) x kernel
        return int(np.prod(a)) * int(np.prod(w[1:]))
    attrs = {at.name: onnx.helper.get_attribute_value(at) for at in node.attribute}
    k = a[-2] if node.op_type == "Gemm" and attrs.get("transA", 0) else a[-1]
    return int(np.prod(out)) * int(k)


def count(model: str | Path | onnx.ModelProto, sample: np.ndarray | dict | None = None) -> tuple[int | None, str | None]:
    """(MACs per sample, None), or (None, why it could not be counted). `model`: an ONNX file or a
    loaded model; `sample`: one input sample (or a feed dict for one sample); default all zeros of
    the graph's input shapes."""
    if not isinstance(model, onnx.ModelProto):
        try:
            model = onnx.load(str(model))
        except Exception as exc:
            return None, f"the ONNX file does not load: {type(exc).__name__}"
    copy_ = onnx.ModelProto()
    copy_.CopyFrom(model)  # outputs are added below: never to the caller's model
    model = copy_
    inits = {i.name for i in model.graph.initializer}
    static = {i.name: tuple(i.dims) for i in model.graph.initializer}
    nodes = [n for n in model.graph.node if n.op_type in OPS and len(n.input) >= 2]
    if not nodes:
        return None, "the graph has no Conv, Gemm or MatMul node"
    wanted = sorted({name for n in nodes for name in (*n.input[:2], n.output[0]) if name and name not in static})
    existing = {o.name for o in model.graph.output}
    for name in wanted:
        if name not in existing:
            model.graph.output.append(onnx.helper.make_empty_tensor_value_info(name))
    try:
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # keep every node as exported
        opts.log_severity_level = 3
        sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
        if isinstance(sample, dict):
            feeds = sample
        elif sample is not None:
            from ticketforge.adapt import inputs
            feeds = inputs([i.name for i in sess.get_inputs()], np.asarray(sample)[None])
        else:
            feeds = _zeros(model, inits)
        names = [o.name for o in sess.get_outputs()]
        values = sess.run(names, feeds)
    except Exception as exc:
        text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return None, f"ONNX Runtime could not run the graph to read its shapes: {text[:160]}"
    shapes = {**static, **{n: tuple(np.shape(v)) for n, v in zip(names, values)}}
    return sum(node_macs(n, shapes) for n in nodes), None


def forward_with_hooks(model: nn.Module, example, hooks: list):
    """One forward pass in eval mode with the given hook handles, which are removed afterwards; the
    model comes back in the mode it was in. Returns the output."""
    was_training = model.training
    model.eval()
    try:
        return model(example)
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
