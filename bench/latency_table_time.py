"""How long building the latency table takes (ticketforge.latency_table), and how well it predicts.

For a model, the table the channel budgets use is built from scratch (no cache): every Conv / Linear
timed alone in ONNX Runtime (1 thread, batch --batch) at up to 5 x 5 (input, output) widths, multiples
of round_to 16, plus the whole dense model. Then a few uniformly narrowed selections are exported
and timed whole (ratio of minima of interleaved runs), against what the table predicted.

    python bench/latency_table_time.py --models resnet20 resnet50 --batch 64

resnet20 is the built-in CIFAR ResNet-20 (3 x 32 x 32); resnet50 is a ResNet-50 (bottleneck blocks
3-4-6-3, 224 x 224, 1000 classes) written here in plain torch, so that no torchvision is needed.
Writes bench/results/latency_table_time.json (or --out)."""
from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ticketforge import latency, latency_table, models, recipe as recipes  # noqa: E402
from ticketforge.export import export_onnx  # noqa: E402
from ticketforge.structures.channels import cost, graph, select, surgery  # noqa: E402


class Bottleneck(nn.Module):
    def __init__(self, cin, mid, stride):
        super().__init__()
        cout = 4 * mid
        self.body = nn.Sequential(models.conv_bn(cin, mid, 1), models.conv_bn(mid, mid, 3, stride),
                                  models.conv_bn(mid, cout, 1, act=False))
        self.shortcut = (nn.Identity() if stride == 1 and cin == cout
                         else models.conv_bn(cin, cout, 1, stride, act=False))

    def forward(self, x):
        return torch.relu(self.body(x) + self.shortcut(x))


def resnet50(num_classes=1000):
    layers = [nn.Conv2d(3, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64), nn.ReLU(), nn.MaxPool2d(3, 2, 1)]
    cin = 64
    for i, (mid, n) in enumerate(((64, 3), (128, 4), (256, 6), (512, 3))):
        for j in range(n):
            layers.append(Bottleneck(cin, mid, 2 if i > 0 and j == 0 else 1))
            cin = 4 * mid
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, num_classes)]
    return nn.Sequential(*layers)


MODELS = {"resnet20": (lambda: models.build("resnet20"), (3, 32, 32)), "resnet50": (resnet50, (3, 224, 224))}


def whole_speedup(dense_path, model_path, batch, sample, pairs=10):
    sd, sm = (latency.session(p, "CPUExecutionProvider", 1) for p in (dense_path, model_path))
    x = np.random.default_rng(0).random((batch, *sample), dtype=np.float32)
    td, tm = [], []
    sd.run(None, {sd.get_inputs()[0].name: x}), sm.run(None, {sm.get_inputs()[0].name: x})
    for _ in range(pairs):
        for s, t in ((sd, td), (sm, tm)):
            t0 = time.perf_counter()
            s.run(None, {s.get_inputs()[0].name: x})
            t.append(time.perf_counter() - t0)
    return min(td) / min(tm)


def one(name, batch, fractions, pairs):
    make, sample = MODELS[name]
    torch.manual_seed(0)
    model = make().eval()
    example = torch.rand(2, *sample)
    t = time.perf_counter()
    plan = graph.discover(model, example)
    layers = latency_table.layers_of(model, example)
    grids = cost.grids(plan, layers, 16)
    setup = time.perf_counter() - t
    with tempfile.TemporaryDirectory() as tmp:
        dense = Path(tmp) / "dense.onnx"
        export_onnx(model, example, dense, recipes.ExportConfig())
        table = latency_table.build(layers, grids, dense, sample, batch, 1, cache=False, log=print)
        latency = cost.LatencyCost(plan, layers, table)
        checks = []
        for f in fractions:  # uniformly narrowed selections, rounded to 16: predicted against timed whole
            counts = [min(g.size, max(16, int(round(f * g.size / 16)) * 16)) for g in plan.groups]
            keep = [torch.arange(c) for c in counts]
            shrunk = surgery.shrink(copy.deepcopy(model), plan, keep, example)
            path = Path(tmp) / f"narrow-{f}.onnx"
            export_onnx(shrunk, example, path, recipes.ExportConfig())
            checks.append({"fraction": f, "predicted_speedup": round(latency.dense / latency(counts), 3),
                           "measured_speedup": round(whole_speedup(dense, path, batch, sample, pairs), 3)})
            print(name, checks[-1], flush=True)
    return {"model": name, "batch": batch, "input": list(sample), "layers": len(layers), "groups": len(plan.groups),
            "entries": table.summary()["entries"], "table_seconds": round(table.seconds, 1),
            "discover_seconds": round(setup, 1), "dense_ms": round(table.dense_ms, 2),
            "layers_ms": round(table.layers_ms, 2), "context": table.context, "checks": checks,
            "allowed_counts_largest_group": len(select.allowed_counts(max(g.size for g in plan.groups), 16))}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=["resnet20", "resnet50"], choices=sorted(MODELS))
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--fractions", nargs="+", type=float, default=[0.75, 0.5])
    p.add_argument("--pairs", type=int, default=10)
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "latency_table_time.json")
    args = p.parse_args()
    torch.set_num_threads(1)
    rows = [one(m, args.batch, args.fractions, args.pairs) for m in args.models]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(rows, indent=1) + "\n")
    for r in rows:
        print(f"{r['model']}: {r['layers']} layers, {r['entries']} entries, table built in {r['table_seconds']} s "
              f"(dense model {r['dense_ms']} ms at batch {r['batch']})")


if __name__ == "__main__":
    main()
