"""Magnitude pruning's scope: LAMP scores against raw global |w|, after a short and a longer fine-tune.

    python bench/magnitude_scope.py                       # the grid (see docs/benchmarks.md)
    python bench/magnitude_scope.py --table               # docs/benchmarks.md table and plot from the CSV

Per data set and seed a dense model is trained (bench/cts_vs_ltr.py's models and `train` schedule:
MNIST-1D's 1-D CNN, digits' small residual CNN). Then, per target sparsity and scope, the built-in
`magnitude` recipe with `search.scope` set, through the library (search registry, BN re-estimated
after the mask, `finetune.fit` for `--finetune` epochs). Rows go to bench/results/magnitude_scope.csv
(finished points are skipped on a re-run), the plot to bench/results/magnitude_scope.png.
"""
from __future__ import annotations

import argparse
import copy
import csv
import statistics
import time
from collections import defaultdict
from pathlib import Path

import torch

from cts_vs_ltr import DATA, DEVICE, context, dense_model
from tables import density_axis, mean_sd
from ticketforge import finetune, recipe as recipes, structures
from ticketforge.data import loader
from ticketforge.finetune import Schedule

OUT = Path(__file__).parent / "results"
FIELDS = ["data", "scope", "seed", "finetune_epochs", "sparsity", "accuracy", "before_finetune", "dense_accuracy",
          "min_layer_density", "time_s"]
SCOPES = ["global", "lamp"]


def ticket(scope: str, sparsity: float, epochs: int, dense, arch, kwargs, bundle, seed) -> dict:
    recipe = recipes.resolve("magnitude", [f"search.scope={scope}", f"search.sparsity={sparsity}",
                                           f"finetune.epochs={epochs}"])
    model = copy.deepcopy(dense)
    torch.manual_seed(seed)
    t0 = time.perf_counter()
    found = structures.find_ticket(context(model, arch, kwargs, bundle, recipe, seed))
    probe = copy.deepcopy(found.model)
    found.mask.apply(probe)
    finetune.recalibrate_bn(probe, loader(bundle.train, 128, shuffle=True, seed=seed), DEVICE)
    before = finetune.evaluate(probe, loader(bundle.val, 256), DEVICE)
    acc = finetune.fit(found.model, found.mask, Schedule.finetune(recipe), bundle, DEVICE, seed=seed,
                       bn_recalibrate=recipe.finetune.bn_recalibrate).accuracy
    return {"accuracy": acc, "before_finetune": before, "time_s": time.perf_counter() - t0,
            "min_layer_density": min(1 - s for s in found.mask.per_layer().values())}


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sets = sorted({r["data"] for r in rows})
    epochs = sorted({int(r["finetune_epochs"]) for r in rows})
    fig, axes = plt.subplots(1, len(sets), figsize=(6.5 * len(sets), 4.5), squeeze=False)
    for ax, name in zip(axes[0], sets):
        for scope in SCOPES:
            for e, style in zip(epochs, ("o--", "o-", "s-", "^-")):
                acc = defaultdict(list)
                for r in rows:
                    if r["data"] == name and r["scope"] == scope and int(r["finetune_epochs"]) == e:
                        acc[float(r["sparsity"])].append(100 * float(r["accuracy"]))
                xs = sorted(acc)
                ax.plot([100 * (1 - x) for x in xs], [statistics.mean(acc[x]) for x in xs], style,
                        label=f"{scope}, {e} fine-tune epoch(s)")
        dense = [100 * float(r["dense_accuracy"]) for r in rows if r["data"] == name]
        ax.axhline(statistics.mean(dense), color="gray", ls=":", lw=1, label="dense")
        density_axis(ax, "validation accuracy % (mean of seeds)")
        ax.set_title(name)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def table(rows: list[dict]) -> str:
    out = []
    for name in sorted({r["data"] for r in rows}):
        sps = sorted({float(r["sparsity"]) for r in rows if r["data"] == name})
        dense = statistics.mean(100 * float(r["dense_accuracy"]) for r in rows if r["data"] == name)
        out += [f"**{name}** (dense {dense:.1f}%): accuracy %, mean ± std over seeds; smallest layer density at the "
                "sparsest point", "", "| scope | fine-tune epochs | " + " | ".join(f"{100 * s:g}%" for s in sps)
                + f" | min layer density at {100 * sps[-1]:g}% |", "|---|---:|" + "---:|" * (len(sps) + 1)]
        for e in sorted({int(r["finetune_epochs"]) for r in rows}):
            for scope in SCOPES:
                pick = [r for r in rows if r["data"] == name and r["scope"] == scope and int(r["finetune_epochs"]) == e]
                if not pick:
                    continue
                cells = []
                for s in sps:
                    acc = [100 * float(r["accuracy"]) for r in pick if float(r["sparsity"]) == s]
                    cells.append(mean_sd(acc, count=False))
                low = [float(r["min_layer_density"]) for r in pick if float(r["sparsity"]) == sps[-1]]
                out.append(f"| {scope} | {e} | " + " | ".join(cells) + f" | {100 * statistics.mean(low):.2f}% |")
        out.append("")
    return "\n".join(out)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--data", nargs="+", default=["mnist1d", "digits"], choices=sorted(DATA))
    p.add_argument("--sparsities", nargs="+", type=float, default=[0.8, 0.9, 0.95, 0.98, 0.99])
    p.add_argument("--finetune", nargs="+", type=int, default=[1, 3], help="fine-tune epochs")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--epochs", type=int, default=8, help="the dense model's train schedule")
    p.add_argument("--threads", type=int, default=1, help="1: on a shared 2-core machine more threads thrash")
    p.add_argument("--out", type=Path, default=OUT / "magnitude_scope.csv")
    p.add_argument("--table", action="store_true", help="print the markdown table of --out and redraw its plot")
    args = p.parse_args()
    if not args.table:
        torch.set_num_threads(args.threads)
        done = ({(r["data"], r["scope"], r["seed"], r["finetune_epochs"], r["sparsity"])
                 for r in csv.DictReader(open(args.out))} if args.out.exists() else set())
        new = not args.out.exists()
        with open(args.out, "a", newline="") as f:
            w = csv.DictWriter(f, fieldnames=FIELDS)
            if new:
                w.writeheader()
            for name in args.data:
                make, arch, kwargs = DATA[name]
                for seed in args.seeds:
                    bundle = make(seed)
                    dense = acc0 = None
                    for e in args.finetune:
                        for s in args.sparsities:
                            for scope in SCOPES:
                                if (name, scope, str(seed), str(e), str(s)) in done:
                                    continue
                                if dense is None:
                                    dense, acc0, _ = dense_model(arch, kwargs, bundle, seed, args)
                                row = ticket(scope, s, e, dense, arch, kwargs, bundle, seed)
                                row.update(data=name, scope=scope, seed=seed, finetune_epochs=e, sparsity=s,
                                           dense_accuracy=acc0)
                                w.writerow({k: (round(v, 5) if isinstance(v, float) else v) for k, v in row.items()})
                                f.flush()
                                print(row, flush=True)
    rows = list(csv.DictReader(open(args.out)))
    plot(rows, args.out.with_suffix(".png"))
    print(table(rows))


if __name__ == "__main__":
    main()
