"""Search time and accuracy of the built-in `cts` recipe against the search it replaced (25 epochs,
Adam lr 0.1, temperature 2/3, no step floor), on the benchmark model (bench/cts_vs_ltr.py's MNIST-1D
CNN, trained 8 epochs). Per seed and sparsity the two searches run back to back in one process, so
they see the same machine state; each ticket is then fine-tuned 3 epochs and scored on the test split.

    python bench/cts_search_time.py                     # 5 seeds x 90/95/98/99% (see docs/benchmarks.md)
    python bench/cts_search_time.py --seeds 0 --sparsities 0.95

Rows go to bench/results/cts_search_time.csv, the plot to bench/results/cts_search_time.png, and the
table in docs/benchmarks.md is printed.
"""
import argparse
import copy
import csv
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from cts_vs_ltr import mnist1d_bundle  # noqa: E402  (registers the mnist1d-cnn model)
from tables import mean_sd  # noqa: E402

from ticketforge import finetune, models, recipe as recipes, structures  # noqa: E402
from ticketforge.finetune import Schedule  # noqa: E402
from ticketforge.search.base import SearchContext  # noqa: E402
from ticketforge.data import loader  # noqa: E402
from ticketforge.loading import LoadedModel  # noqa: E402

OUT = Path(__file__).parent / "results"
# The `cts` recipe before issue 15's short search, as overrides of today's recipe.
BEFORE = ["search.epochs=25", "search.lr=0.1", f"search.temperature={2 / 3!r}", "search.min_steps=0"]
FIELDS = ["tag", "seed", "sparsity", "search_s", "steps", "stop", "accuracy"]


def one(tag, sets, dense, bundle, seed, sparsity, device):
    recipe = recipes.resolve("cts", [*sets, "search.sanity=false"], sparsity=sparsity, epochs=3)
    model = copy.deepcopy(dense)
    ctx = SearchContext(model=model, loaded=LoadedModel(model=model, arch="mnist1d-cnn"), data=bundle,
                        recipe=recipe, device=device, seed=seed)
    torch.manual_seed(seed)
    t0 = time.perf_counter()
    found = structures.find_ticket(ctx)
    seconds = time.perf_counter() - t0
    acc = finetune.fit(found.model, found.mask, found.schedule or Schedule.finetune(recipe), bundle, device,
                       seed=seed, bn_recalibrate=recipe.finetune.bn_recalibrate).accuracy
    return {"tag": tag, "seed": seed, "sparsity": sparsity, "search_s": round(seconds, 3),
            "steps": found.info["steps"], "stop": (found.info.get("stop") or {}).get("reason"), "accuracy": acc}


def table(rows):
    by = defaultdict(list)
    for r in rows:
        by[(float(r["sparsity"]), r["tag"])].append(r)
    lines = ["| sparsity | search s, before (steps) | search s, now (steps) | time ratio | accuracy before | accuracy now |",
             "|---|---:|---:|---:|---:|---:|"]
    for s in sorted({k[0] for k in by}):
        b, a = by[(s, "before")], by[(s, "now")]
        tb, ta = (statistics.mean(float(r["search_s"]) for r in v) for v in (b, a))
        lines.append(f"| {s * 100:g}% | {tb:.2f} ({b[0]['steps']}) | {ta:.2f} ({a[0]['steps']}) | {ta / tb:.3f} | "
                     f"{mean_sd([float(r['accuracy']) * 100 for r in b])} | "
                     f"{mean_sd([float(r['accuracy']) * 100 for r in a])} |")
    total = {t: sum(float(r["search_s"]) for r in rows if r["tag"] == t) for t in ("before", "now")}
    lines.append(f"\nAll searches: {total['now']:.1f} s now against {total['before']:.1f} s before "
                 f"(ratio {total['now'] / total['before']:.3f}).")
    return "\n".join(lines)


def plot(rows, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    sparsities = sorted({float(r["sparsity"]) for r in rows})
    for i, (tag, color) in enumerate((("before", "#9e9e9e"), ("now", "#1f77b4"))):
        sel = [[r for r in rows if r["tag"] == tag and float(r["sparsity"]) == s] for s in sparsities]
        xs = [j + (i - 0.5) * 0.38 for j in range(len(sparsities))]
        ax1.bar(xs, [statistics.mean(float(r["search_s"]) for r in v) for v in sel], 0.38, color=color, label=tag)
        ax2.bar(xs, [statistics.mean(float(r["accuracy"]) * 100 for r in v) for v in sel], 0.38, color=color,
                yerr=[statistics.stdev(float(r["accuracy"]) * 100 for r in v) if len(v) > 1 else 0 for v in sel],
                label=tag)
    for ax, label in ((ax1, "search seconds (1 thread)"), (ax2, "test accuracy after 3 fine-tune epochs, %")):
        ax.set_xticks(range(len(sparsities)), [f"{s * 100:g}%" for s in sparsities])
        ax.set_ylabel(label)
        ax.legend()
    fig.suptitle("cts recipe: the 25-epoch search it replaced (before) and today's (now), MNIST-1D")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--sparsities", nargs="+", type=float, default=[0.9, 0.95, 0.98, 0.99])
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3, 4])
    p.add_argument("--epochs", type=int, default=8, help="dense training epochs")
    p.add_argument("--out", type=Path, default=OUT / "cts_search_time.csv")
    args = p.parse_args()
    torch.set_num_threads(1)
    device = torch.device("cpu")
    bundle = mnist1d_bundle()
    rows = []
    for seed in args.seeds:
        torch.manual_seed(seed)
        dense = models.build("mnist1d-cnn")
        finetune.train(dense, loader(bundle.train, 128, shuffle=True, seed=seed), epochs=args.epochs, lr=0.1,
                       device=device)  # its optimizer also pays the process's one-off torch._dynamo import
        dense.eval()
        for s in args.sparsities:
            for tag, sets in (("before", BEFORE), ("now", [])):
                rows.append(one(tag, sets, dense, bundle, seed, s, device))
                print(rows[-1], flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=FIELDS)
        w.writeheader()
        w.writerows(rows)
    plot(rows, args.out.with_suffix(".png"))
    print(table(rows))


if __name__ == "__main__":
    main()
