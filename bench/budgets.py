"""Accuracy at equal measured speed-up: a latency budget against MAC budgets and Torch-Pruning.

On MNIST-1D (generated locally, accuracy far from saturated), a trained `mnist1d-cnn` (width 64) is
shrunk by channel removal to several sizes by:
  cts-latency      ticketforge `cts-channels` with `search.target_speedup` = 1.5, 2, 3 (the measured
                   latency table as the gates' cost and in the rounded selection, then the budget step)
  cts-macs         ticketforge `cts-channels` with `search.target_macs` (the MAC model)
  magnitude-macs   ticketforge `magnitude-channels` with `search.target_macs` (L1 per channel)
  tp-metapruner    Torch-Pruning's MetaPruner (L1 importance, uniform pruning ratio, round_to 16)
Every method gets the same fine-tune (the `finetune` section: --finetune epochs, SGD lr 0.01 cosine,
BatchNorm re-estimated first) and the ticketforge methods the same CTS search length.

Every exported model is then timed against the dense export here, the same way for all: ONNX
Runtime CPU, 1 intra-op thread, batch 64, dense and compressed interleaved in 3 blocks of --pairs
pairs, and the speed-up is the median over the blocks of the ratio of the two minimum times. Minima,
not medians: this machine is shared (load 4-13 on 2 cores while this ran), and under that load a
run that takes longer is more often pre-empted, which inflates a median ratio (the same pair of
files measured 2.2x by minima and 5.8x by medians). Accuracy is measured on the 1000 held-out signals in ONNX Runtime.

For each method and seed the (speed-up, accuracy) points are interpolated linearly at 1.5x, 2x and
3x; a speed-up outside a method's measured range is not extrapolated ("-").

    python bench/budgets.py                          # the grid (results/budgets.csv, resumable)
    python bench/budgets.py --table                  # the docs/benchmarks.md table and plot from the CSV
"""
from __future__ import annotations

import argparse
import copy
import csv
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from cts_vs_ltr import mnist1d_bundle  # noqa: E402  (also registers the mnist1d-cnn architecture)
from tables import mean_sd  # noqa: E402

from ticketforge import finetune, latency, models, recipe as recipes, validate  # noqa: E402
from ticketforge.data import loader  # noqa: E402
from ticketforge.export import export_onnx  # noqa: E402
from ticketforge.finetune import Schedule  # noqa: E402
from ticketforge.pipeline import Job, compress  # noqa: E402
from ticketforge.ui import SILENT  # noqa: E402

OUT = Path(__file__).parent / "results"
SPEEDUPS = (1.5, 2.0, 3.0)
METHODS = ("cts-latency", "cts-macs", "magnitude-macs", "tp-metapruner")
FIELDS = ["method", "seed", "setting", "speedup", "speedup_median", "accuracy", "dense_accuracy", "macs_kept",
          "dense_ms", "compressed_ms", "seconds"]
DEVICE = torch.device("cpu")
ARCH, KWARGS = "mnist1d-cnn", {"width": 64}


def timed_speedup(dense: Path, model: Path, batch: int, pairs: int, blocks: int = 3) -> dict:
    """Interleaved dense/compressed runs at `batch`, one thread, in `blocks` blocks of `pairs` pairs:
    the median over blocks of the ratio of minima (one block whose compressed runs never met a quiet
    moment measured a 1.35x model at 0.97x), and the ratio of medians for comparison."""
    sd, sm = (latency.session(p, "CPUExecutionProvider", 1) for p in (dense, model))
    x = {sd.get_inputs()[0].name: np.random.default_rng(0).random((batch, 1, 40), dtype=np.float32)}
    xm = {sm.get_inputs()[0].name: x[sd.get_inputs()[0].name]}
    for _ in range(3):
        sd.run(None, x), sm.run(None, xm)
    ratios, td_all, tm_all = [], [], []
    for _ in range(blocks):
        td, tm = [], []
        for i in range(pairs):
            for s, feed, t in ((sd, x, td), (sm, xm, tm)) if i % 2 == 0 else ((sm, xm, tm), (sd, x, td)):
                t0 = time.perf_counter()
                s.run(None, feed)
                t.append(time.perf_counter() - t0)
        ratios.append(min(td) / min(tm))
        td_all += td
        tm_all += tm
    return {"speedup": float(np.median(ratios)), "speedup_median": float(np.median(td_all) / np.median(tm_all)),
            "dense_ms": 1e3 * min(td_all), "compressed_ms": 1e3 * min(tm_all)}


def dense_model(bundle, seed: int, epochs: int):
    torch.manual_seed(seed)
    model = models.build(ARCH, KWARGS)
    finetune.train(model, loader(bundle.train, 128, shuffle=True, seed=seed), epochs=epochs, lr=0.1, device=DEVICE)
    return model.eval()


def ticketforge_run(method: str, setting: float, work: Path, seed: int, args) -> Path:
    """One compress() through the library; returns its output folder."""
    name = "magnitude-channels" if method == "magnitude-macs" else "cts-channels"
    # the budget on one thread, as this bench times every method
    sets = [f"finetune.epochs={args.finetune}", "validate.latency_batches=[64]", "validate.max_seconds=1",
            "validate.repeats=20", "validate.budget_threads=1"]
    if name == "cts-channels":
        sets.append(f"search.epochs={args.search_epochs}")
    sets.append(f"search.target_speedup={setting}" if method == "cts-latency" else f"search.target_macs={setting}")
    out = work / f"{method}-{setting}"
    compress(Job(model_path=work / "dense.pt", recipe=recipes.resolve(name, sets), data=str(work / "data.npz"),
                 arch=ARCH, arch_kwargs=KWARGS, out=out, force=True, seed=seed, ui=SILENT))
    return out / "model.onnx"


def metapruner_run(ratio: float, dense, bundle, work: Path, seed: int, args) -> Path:
    import torch_pruning as tp

    model = copy.deepcopy(dense)
    example = bundle.example(2)
    last = [m for m in model.modules() if isinstance(m, torch.nn.Linear)][-1:]
    tp.pruner.MetaPruner(model, example, importance=tp.importance.MagnitudeImportance(p=1), pruning_ratio=ratio,
                         ignored_layers=last, round_to=16).step()
    recipe = recipes.resolve("magnitude-channels", [f"finetune.epochs={args.finetune}"])
    finetune.fit(model, None, Schedule.finetune(recipe), bundle, DEVICE, seed=seed)
    path = work / f"metapruner-{ratio}.onnx"
    export_onnx(model.eval(), example, path, recipes.ExportConfig())
    return path


def run_grid(args) -> None:
    args.out.parent.mkdir(parents=True, exist_ok=True)
    done = {(r["method"], r["seed"], r["setting"]) for r in csv.DictReader(open(args.out))} if args.out.exists() else set()
    new = not args.out.exists()
    bundle = mnist1d_bundle()
    settings = {"cts-latency": args.speedups, "cts-macs": args.macs, "magnitude-macs": args.macs,
                "tp-metapruner": args.ratios}
    with open(args.out, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=FIELDS)
        if new:
            w.writeheader()
        for seed in args.seeds:
            todo = [(m, s) for m in args.methods for s in settings[m] if (m, str(seed), str(s)) not in done]
            if not todo:
                continue
            work = Path(tempfile.mkdtemp(prefix=f"tf-bench-budgets-{seed}-"))
            np.savez(work / "data.npz", x=bundle.train.tensors[0].numpy(), y=bundle.train.tensors[1].numpy(),
                     x_val=bundle.val.tensors[0].numpy(), y_val=bundle.val.tensors[1].numpy())
            t = time.perf_counter()
            dense = dense_model(bundle, seed, args.dense_epochs)
            torch.save(dense.state_dict(), work / "dense.pt")
            dense_onnx = export_onnx(dense, bundle.example(2), work / "dense.onnx", recipes.ExportConfig())
            dense_acc = validate.onnx_accuracy(dense_onnx, bundle.val)
            dense_macs = validate.onnx_stats(dense_onnx)["macs"]
            print(f"seed {seed}: dense accuracy {dense_acc:.4f} ({time.perf_counter() - t:.0f} s)", flush=True)
            for method, setting in todo:
                t = time.perf_counter()
                if method == "tp-metapruner":
                    path = metapruner_run(setting, dense, bundle, work, seed, args)
                else:
                    path = ticketforge_run(method, setting, work, seed, args)
                seconds = time.perf_counter() - t
                row = {"method": method, "seed": seed, "setting": setting, "accuracy": validate.onnx_accuracy(path, bundle.val),
                       "dense_accuracy": dense_acc, "macs_kept": validate.onnx_stats(path)["macs"] / dense_macs,
                       "seconds": round(seconds, 1), **timed_speedup(dense_onnx, path, 64, args.pairs)}
                w.writerow({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()})
                f.flush()
                print(f"seed {seed} {method:15s} {setting:<5g} speed-up {row['speedup']:.2f}x (median-based "
                      f"{row['speedup_median']:.2f}x) accuracy {row['accuracy']:.4f} MACs {row['macs_kept']:.3f} "
                      f"({seconds:.0f} s)", flush=True)


# ---------------------------------------------------------------- the table and plot

def at_speedups(rows: list[dict], by_seed: bool = False) -> dict:
    """method -> target speed-up -> accuracies (one per seed whose points bracket it), or with
    `by_seed` {seed: accuracy}."""
    points = defaultdict(list)
    for r in rows:
        points[(r["method"], r["seed"])].append((float(r["speedup"]), float(r["accuracy"])))
    out = defaultdict(lambda: defaultdict(dict))
    for (method, seed), pts in points.items():
        pts.sort()
        xs, ys = [p[0] for p in pts], [p[1] for p in pts]
        for s in SPEEDUPS:
            if xs[0] <= s <= xs[-1]:
                out[method][s][seed] = float(np.interp(s, xs, ys))
    if by_seed:
        return out
    return {m: {s: list(v.values()) for s, v in per.items()} for m, per in out.items()}


def table(rows: list[dict]) -> str:
    acc = at_speedups(rows)
    dense = statistics.mean(float(r["dense_accuracy"]) for r in rows)
    seeds = sorted({r["seed"] for r in rows})
    lines = [f"MNIST-1D, `mnist1d-cnn` width 64, dense accuracy {100 * dense:.1f}% (mean of seeds {', '.join(seeds)}); "
             "accuracy % at equal measured speed-up (ONNX Runtime CPU, 1 thread, batch 64), mean ± std (seeds):", "",
             "| method | " + " | ".join(f"{s:g}x" for s in SPEEDUPS) + " |", "|---|" + "---:|" * len(SPEEDUPS)]
    for m in [m for m in METHODS if m in acc]:
        lines.append(f"| {m} | " + " | ".join(mean_sd([100 * v for v in acc[m].get(s, [])]) for s in SPEEDUPS) + " |")
    # the same seed's dense model under both methods: the paired difference is what separates them
    paired = at_speedups(rows, by_seed=True)
    for m in ("cts-latency", "cts-macs"):
        cells = []
        for s in SPEEDUPS:
            ours, theirs = paired.get(m, {}).get(s, {}), paired.get("tp-metapruner", {}).get(s, {})
            cells.append(mean_sd([100 * (ours[k] - theirs[k]) for k in ours if k in theirs]))
        lines.append(f"| {m} minus tp-metapruner, same seed (points) | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    acc = at_speedups(rows)
    for i, m in enumerate([m for m in METHODS if any(r["method"] == m for r in rows)]):
        pts = [(float(r["speedup"]), 100 * float(r["accuracy"])) for r in rows if r["method"] == m]
        ax.scatter(*zip(*pts), s=12, alpha=0.4, color=f"C{i}")
        xs = [s for s in SPEEDUPS if acc[m].get(s)]
        ax.plot(xs, [100 * statistics.mean(acc[m][s]) for s in xs], "o-", color=f"C{i}", label=m)
    ax.axhline(100 * statistics.mean(float(r["dense_accuracy"]) for r in rows), color="gray", ls="--", lw=1,
               label="dense")
    ax.set(xlabel="measured speed-up, ONNX Runtime CPU, batch 64 (ratio of minima)",
           ylabel="held-out accuracy % (ONNX)", title="MNIST-1D: accuracy at equal measured speed-up")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3, 4])
    # settings that bracket 1.5x-3x measured for each method (a point is only interpolated, never extrapolated)
    p.add_argument("--speedups", nargs="+", type=float, default=[1.2, 1.3, 1.5, 2.0, 3.0, 3.5],
                   help="cts-latency targets")
    p.add_argument("--macs", nargs="+", type=float, default=[0.75, 0.6, 0.4, 0.25, 0.15], help="MAC targets")
    p.add_argument("--ratios", nargs="+", type=float, default=[0.05, 0.1, 0.15, 0.25, 0.4, 0.55, 0.7],
                   help="MetaPruner ratios")
    p.add_argument("--dense-epochs", type=int, default=8)
    p.add_argument("--finetune", type=int, default=3, help="fine-tune epochs, the same for every method")
    p.add_argument("--search-epochs", type=float, default=3, help="CTS search epochs (both cts rows)")
    p.add_argument("--pairs", type=int, default=60)
    p.add_argument("--out", type=Path, default=OUT / "budgets.csv")
    p.add_argument("--table", action="store_true", help="print the docs/benchmarks.md table of --out and redraw its plot")
    args = p.parse_args()
    torch.set_num_threads(1)  # a shared 2-core machine: more threads thrash
    if not args.table:
        run_grid(args)
    rows = list(csv.DictReader(open(args.out)))
    plot(rows, args.out.with_suffix(".png"))
    print(table(rows))


if __name__ == "__main__":
    main()
