"""Peer complaint 1: the pruned model isn't faster. Removing channels (in multiples of 16) makes
the ONNX export smaller and, timed side by side with the dense export, measurably faster: the low
end of the speed-up's 95% interval (ticketforge.latency), not one median, is what is asserted, and
only against 1.0 where the expected ratio is ~2-3x (a ratio: no absolute time)."""
import torch

from tests.channel_nets import randomize_bn
from ticketforge import latency, models, validate
from ticketforge.structures.channels import graph, select, surgery
from ticketforge.export import export_onnx
from ticketforge.recipe import ExportConfig


def test_shrunk_export_smaller_and_faster(tmp_path):
    model = randomize_bn(models.build("digits-resnet", {"width": 64}))
    x = torch.randn(2, 1, 16, 16)
    plan = graph.discover(model, x)
    keep, info = select.select(plan, select.l1_scores(model, plan), 0.3, 16)
    assert info["budget_met"] and all(len(k) % 16 == 0 for k in keep)
    mask = surgery.channel_mask(model, plan, keep)
    mask.apply(model)
    shrunk = surgery.shrink(model, plan, keep, x)
    export_onnx(model, x, tmp_path / "dense.onnx", ExportConfig())
    export_onnx(shrunk, x, tmp_path / "model.onnx", ExportConfig())
    d, s = validate.onnx_stats(tmp_path / "dense.onnx"), validate.onnx_stats(tmp_path / "model.onnx")
    assert s["macs"] <= 0.3 * d["macs"] * 1.001 and s["weights"] < 0.5 * d["weights"]
    # 0.3 of the MACs: a real speed-up of ~2-3x. On a loaded machine the interval only widens; its
    # low end stays above 1.0 unless the measurement truly cannot tell the two apart.
    settings = latency.Settings(min_runs=20, warmup=3, max_seconds=3.0, ci_target=0.05)
    rows = validate.latency(tmp_path / "dense.onnx", tmp_path / "model.onnx", (1, 16, 16), [64], settings=settings)
    assert rows[0]["speedup_ci"][0] > 1.0, rows
