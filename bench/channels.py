"""MAC reduction against measured ONNX Runtime speed-up and accuracy, for structure that runs faster.

On scikit-learn's 8x8 digits (real data, no download), a trained `digits-resnet` is compressed to
`--target` of its MACs by:
  cts-channels, magnitude-channels   ticketforge's recipes (through the pipeline's Python API)
  cts-blocks                         ticketforge's residual-block removal (recipe `layers`)
  tp-metapruner                      torch-pruning's MetaPruner (L1 importance, uniform ratio found by
                                     bisection to meet the same MAC budget), same fine-tune
  scratch                            cts-channels' shrunk architecture re-initialised and trained
                                     for the dense schedule plus the fine-tune ("Rethinking the
                                     Value of Network Pruning")
Every row is measured on its exported ONNX file: MACs by shape inference, accuracy on the held-out
split in ONNX Runtime, speed-up as a ratio of medians timed alternately with the dense export.

    python bench/channels.py            # writes bench/results/channels.csv and channels.png
"""
from __future__ import annotations

import argparse
import copy
import csv
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ticketforge import finetune, models, recipe as recipes, ticket, validate  # noqa: E402
from ticketforge.data import load_data, loader  # noqa: E402
from ticketforge.export import export_onnx  # noqa: E402
from ticketforge.pipeline import Job, compress  # noqa: E402
from ticketforge.ui import SILENT  # noqa: E402

RESULTS = Path(__file__).parent / "results"


def train(model, bundle, epochs, lr=0.05):
    finetune.train(model, loader(bundle.train, 64, shuffle=True), epochs=epochs, lr=lr, device=torch.device("cpu"))
    return model.eval()


def measure(name, model_path, dense_path, bundle, seconds, batches):
    stats_d, stats = validate.onnx_stats(dense_path), validate.onnx_stats(model_path)
    lat = validate.latency(dense_path, model_path, bundle.input_shape, batches, repeats=30, warmup=5)
    row = {"method": name, "macs_kept": stats["macs"] / stats_d["macs"], "weights_kept": stats["weights"] / stats_d["weights"],
           "accuracy": validate.onnx_accuracy(model_path, bundle.val),
           "dense_accuracy": validate.onnx_accuracy(dense_path, bundle.val), "seconds": round(seconds, 1)}
    for r in lat:
        row[f"speedup_b{r['batch']}"] = r["speedup"]
    print(", ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()), flush=True)
    return row


def metapruner(dense, bundle, target, round_to, epochs, work):
    import torch_pruning as tp

    example = bundle.example(2)
    base, _ = tp.utils.count_ops_and_params(dense, example)
    last = [m for m in dense.modules() if isinstance(m, torch.nn.Linear)][-1:]

    def pruned(ratio):
        m = copy.deepcopy(dense)
        p = tp.pruner.MetaPruner(m, example, importance=tp.importance.MagnitudeImportance(p=1), pruning_ratio=ratio,
                                 ignored_layers=last, round_to=round_to)
        p.step()
        return m

    lo, hi = 0.0, 0.95
    for _ in range(12):  # bisection on the uniform ratio for the same MAC budget
        mid = (lo + hi) / 2
        macs, _ = tp.utils.count_ops_and_params(pruned(mid), example)
        lo, hi = (mid, hi) if macs > target * base else (lo, mid)
    model = pruned(hi)
    t = time.perf_counter()
    finetune.recalibrate_bn(model, loader(bundle.train, 128, shuffle=True), torch.device("cpu"))
    train(model, bundle, epochs, lr=0.01)
    export_onnx(model, example, work / "metapruner.onnx", recipes.ExportConfig())
    return work / "metapruner.onnx", time.perf_counter() - t


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--target", type=float, default=0.5)
    ap.add_argument("--round-to", type=int, default=16)
    ap.add_argument("--width", type=int, default=32)
    ap.add_argument("--dense-epochs", type=int, default=15)
    ap.add_argument("--epochs", type=int, default=5, help="fine-tune epochs, the same for every method")
    ap.add_argument("--search-steps", type=int, default=100)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 64])
    args = ap.parse_args()
    torch.manual_seed(0)
    work = Path(tempfile.mkdtemp(prefix="tf-bench-channels-"))
    bundle = load_data("digits", 0.2, 0)
    kwargs = {"width": args.width}
    dense = train(models.build("digits-resnet", kwargs), bundle, args.dense_epochs)
    torch.save(dense.state_dict(), work / "dense.pt")
    dense_onnx = export_onnx(dense, bundle.example(2), work / "dense.onnx", recipes.ExportConfig())
    rows = []

    # each recipe gets the settings its method and structure read (any other key is refused)
    extra = {"cts-channels": [f"convert.round_to={args.round_to}", f"search.steps={args.search_steps}"],
             "magnitude-channels": [f"convert.round_to={args.round_to}"],
             "cts-blocks": [f"search.steps={args.search_steps}"]}
    for name, own in extra.items():
        sets = [f"search.target_macs={args.target}", f"finetune.epochs={args.epochs}", "validate.repeats=3", *own]
        t = time.perf_counter()
        compress(Job(model_path=work / "dense.pt", recipe=recipes.resolve(name, sets), data="digits",
                     arch="digits-resnet", arch_kwargs=kwargs, out=work / name, force=True, val_fraction=0.2,
                     ui=SILENT))
        rows.append(measure(name, work / name / "model.onnx", dense_onnx, bundle, time.perf_counter() - t, args.batches))

    path, seconds = metapruner(dense, bundle, args.target, args.round_to, args.epochs, work)
    rows.append(measure("tp-metapruner", path, dense_onnx, bundle, seconds, args.batches))

    if (work / "cts-channels" / "ticket.pt").exists():
        shrunk = ticket.load(work / "cts-channels" / "ticket.pt")
        for m in shrunk.modules():
            if hasattr(m, "reset_parameters"):
                m.reset_parameters()
        t = time.perf_counter()
        train(shrunk, bundle, args.dense_epochs + args.epochs)
        export_onnx(shrunk, bundle.example(2), work / "scratch.onnx", recipes.ExportConfig())
        rows.append(measure("scratch (cts-channels arch)", work / "scratch.onnx", dense_onnx, bundle,
                            time.perf_counter() - t, args.batches))

    RESULTS.mkdir(exist_ok=True)
    with open(RESULTS / "channels.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    plot(rows, args.batches[-1])


def plot(rows, batch):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 2, figsize=(10, 4))
    for r in rows:
        ax[0].scatter(r["macs_kept"], r[f"speedup_b{batch}"], label=r["method"])
        ax[1].scatter(r["macs_kept"], r["accuracy"], label=r["method"])
    ax[0].set(xlabel="MACs kept (of dense)", ylabel=f"ORT speed-up, batch {batch}", title="speed")
    ax[1].set(xlabel="MACs kept (of dense)", ylabel="held-out accuracy (ONNX)", title="accuracy")
    ax[1].axhline(rows[0]["dense_accuracy"], color="grey", ls="--", label="dense")
    ax[1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(RESULTS / "channels.png", dpi=100)


if __name__ == "__main__":
    main()
