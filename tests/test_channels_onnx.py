"""Peer complaint 5: the ONNX export fails or still holds the full-size graph. The exported file
must carry the shrunk shapes, and its MACs must be what the channel plan predicted."""
import onnx
import torch
from onnx import numpy_helper

from tests.channel_nets import Depthwise, masked_and_shrunk, randomize_bn
from ticketforge import validate
from ticketforge.export import export_onnx
from ticketforge.recipe import ExportConfig


def test_export_has_shrunk_shapes(tmp_path):
    x = torch.randn(2, 3, 8, 8)
    model = randomize_bn(Depthwise())
    plan, keep, masked, shrunk = masked_and_shrunk(model, x)
    export_onnx(model, x, tmp_path / "dense.onnx", ExportConfig())
    export_onnx(shrunk, x, tmp_path / "model.onnx", ExportConfig())
    m = onnx.load(str(tmp_path / "model.onnx"))
    inits = {i.name: numpy_helper.to_array(i) for i in m.graph.initializer}
    conv_shapes = sorted(tuple(inits[n.input[1]].shape) for n in m.graph.node if n.op_type == "Conv")
    want = sorted(tuple(mod.weight.shape) for mod in shrunk.modules() if isinstance(mod, torch.nn.Conv2d))
    assert conv_shapes == want
    dense, small = validate.onnx_stats(tmp_path / "dense.onnx"), validate.onnx_stats(tmp_path / "model.onnx")
    predicted = plan.macs([len(k) for k in keep])
    assert abs(small["macs"] - predicted) <= 1e-6 * predicted
    assert small["macs"] < 0.6 * dense["macs"] and small["params_nonzero"] < 0.6 * dense["params_nonzero"]
    assert validate.parity(masked, tmp_path / "model.onnx", torch.randn(8, 3, 8, 8))["max"] < 1e-4
