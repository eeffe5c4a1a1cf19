"""Sparsity sweep: CTS against the baselines on scikit-learn's digits with the demo's residual CNN.

    python bench/cts_sweep.py                       # the quick grid (see --help for the defaults)
    python bench/cts_sweep.py --j 2 4 6 8 10 12 14 16 18 20 --settings trained rewind --seeds 0 1 2 \\
        --methods cts cts:ce magnitude snip synflow random imp          # the full grid (hours on 2 cores)

Every point is a whole ticket: search (built-in recipe `cts` for CTS, same search length, batch and
sparsity for everyone) then the same fine-tune as `ticketforge compress` (BN re-estimated, then
`finetune.epochs`, or for `rewind` the rest of the `train` schedule), validation accuracy on the
held-out 10% of digits. A method is a registry name, optionally with a CTS objective after a colon
(cts:ce, cts:forward_kl). Appends to bench/results/cts_sweep.csv (finished points are skipped on a
re-run) and redraws bench/results/cts_sweep.png.
"""
from __future__ import annotations

import argparse
import copy
import csv
import time
from collections import defaultdict
from pathlib import Path

import torch

from ticketforge import finetune, models, recipe as recipes, structures
from ticketforge.finetune import Schedule
from ticketforge.search.base import SearchContext
from ticketforge.data import load_data, loader
from ticketforge.loading import LoadedModel

OUT = Path(__file__).parent / "results"
FIELDS = ["setting", "method", "seed", "j", "density", "sparsity", "accuracy", "dense_accuracy", "before_finetune",
          "search_s", "finetune_s", "total_s", "achieved_sparsity"]


def dense_model(arch: str, bundle, seed: int, epochs: int) -> tuple[torch.nn.Module, float]:
    torch.manual_seed(seed)
    model = models.build(arch)
    device = torch.device("cpu")
    finetune.train(model, loader(bundle.train, 64, shuffle=True, seed=seed), epochs=epochs, lr=0.05, device=device)
    return model.eval(), finetune.evaluate(model, loader(bundle.val, 256), device)


def point(method: str, setting: str, sparsity: float, dense, arch, bundle, seed: int, sets: list[str]) -> dict:
    name, _, objective = method.partition(":")
    # A method with its own built-in recipe (magnitude, imp) runs that; the others take cts's settings.
    base = name if name in recipes.builtin_names() else "cts"
    items = [f"search.method={name}", f"search.sparsity={sparsity}", f"search.start={setting}", *sets]
    if objective:
        items.append(f"search.objective={objective}")
    recipe = recipes.resolve(base, items)
    device = torch.device("cpu")
    model = copy.deepcopy(dense)
    ctx = SearchContext(model=model, loaded=LoadedModel(model=model, arch=arch), data=bundle, recipe=recipe,
                               device=device, seed=seed)
    torch.manual_seed(seed)
    t0 = time.perf_counter()
    found = structures.find_ticket(ctx)
    t1 = time.perf_counter()
    before = None
    if found.mask is not None:
        probe = copy.deepcopy(found.model)
        found.mask.apply(probe)
        finetune.recalibrate_bn(probe, loader(bundle.train, 128, shuffle=True, seed=seed), device)
        before = finetune.evaluate(probe, loader(bundle.val, 256), device)
    schedule = found.schedule or Schedule.finetune(recipe)
    acc = finetune.fit(found.model, found.mask, schedule, bundle, device, seed=seed,
                       bn_recalibrate=recipe.finetune.bn_recalibrate).accuracy
    t2 = time.perf_counter()
    return {"accuracy": acc, "before_finetune": before, "search_s": t1 - t0, "finetune_s": t2 - t1,
            "total_s": t2 - t0, "achieved_sparsity": found.mask.sparsity}


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    settings = sorted({r["setting"] for r in rows})
    fig, axes = plt.subplots(1, len(settings), figsize=(6 * len(settings), 4.2), squeeze=False)
    for ax, setting in zip(axes[0], settings):
        curves = defaultdict(lambda: defaultdict(list))
        dense = [float(r["dense_accuracy"]) for r in rows if r["setting"] == setting]
        for r in rows:
            if r["setting"] == setting:
                curves[r["method"]][float(r["density"])].append(float(r["accuracy"]))
        for method, pts in sorted(curves.items()):
            xs = sorted(pts)
            ys = [sum(pts[x]) / len(pts[x]) for x in xs]
            ax.plot([100 * x for x in xs], [100 * y for y in ys], "o-", label=method)
        if dense:
            ax.axhline(100 * sum(dense) / len(dense), color="gray", ls="--", lw=1, label="dense")
        ax.set_xscale("log")
        ax.invert_xaxis()
        ax.set_xlabel("density % (log; sparser to the right)")
        ax.set_ylabel("validation accuracy % (mean over seeds)")
        ax.set_title(f"digits, digits-resnet, start = {setting}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--methods", nargs="+", default=["cts", "cts:ce", "magnitude", "snip", "synflow", "random"])
    p.add_argument("--j", nargs="+", type=int, default=[10, 14, 18], help="density 0.8^j")
    p.add_argument("--settings", nargs="+", default=["trained"], choices=["trained", "rewind", "init"])
    p.add_argument("--seeds", nargs="+", type=int, default=[0])
    p.add_argument("--arch", default="digits-resnet")
    p.add_argument("--dense-epochs", type=int, default=15, help="training of the dense model (as the demo)")
    p.add_argument("--dense", type=Path, help="use this trained checkpoint (e.g. exported/demo.pt) instead of "
                   "training one per seed")
    p.add_argument("--set", dest="sets", action="append", default=[], help="extra recipe override, KEY=VALUE")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=OUT / "cts_sweep.csv")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    done = []
    if args.out.exists():
        done = list(csv.DictReader(open(args.out)))
    seen = {(r["setting"], r["method"], r["seed"], r["j"]) for r in done}
    new = not args.out.exists()
    with open(args.out, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=FIELDS)
        if new:
            w.writeheader()
        for seed in args.seeds:
            bundle = load_data("digits", 0.1, seed)
            if args.dense:
                dense = models.build(args.arch)
                dense.load_state_dict(torch.load(args.dense, weights_only=True)["state_dict"])
                dense.eval()
                dense_acc = finetune.evaluate(dense, loader(bundle.val, 256), torch.device("cpu"))
            else:
                dense, dense_acc = dense_model(args.arch, bundle, seed, args.dense_epochs)
            for setting in args.settings:
                for j in args.j:
                    for method in args.methods:
                        if (setting, method, str(seed), str(j)) in seen:
                            continue
                        density = 0.8 ** j
                        res = point(method, setting, 1 - density, dense, args.arch, bundle, seed, args.sets)
                        row = {"setting": setting, "method": method, "seed": seed, "j": j, "density": density,
                               "sparsity": 1 - density, "dense_accuracy": dense_acc, **res}
                        w.writerow(row)
                        f.flush()
                        done.append({k: str(v) for k, v in row.items()})
                        print(f"{setting:8s} {method:12s} seed {seed} density {100 * density:6.2f}% "
                              f"acc {res['accuracy']:.4f} (before fine-tune {res['before_finetune']:.4f}) "
                              f"search {res['search_s']:.1f}s total {res['total_s']:.1f}s", flush=True)
    plot(done, args.out.with_suffix(".png"))


if __name__ == "__main__":
    main()
