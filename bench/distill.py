"""Fine-tuning a ticket with and without distillation from the dense model, same steps.

    nice -n 5 python bench/distill.py                    # the grid below (a few minutes on 2 cores)
    python bench/distill.py --table                      # markdown table and plot from the CSV

Three model families, each trained dense here on local data first (no download):

- residual CNN   `digits-resnet` (width 16) on scikit-learn's digits, SGD, the cts_vs_ltr schedule
- 1-D CNN        `mnist1d-cnn` (bench/cts_vs_ltr.py) on MNIST-1D, generated from its templates
- transformer    `vit` (image_size 8, patch_size 2, dim 64, depth 4) on digits, AdamW

Per family and seed, the trained model is pruned one-shot by the built-in `magnitude` recipe (LAMP)
at the family's sparsity, then the same ticket is fine-tuned by `finetune.fit` once with labels only
(w=0) and once per `--weights` x `--temperatures` (`finetune.distill`, `finetune.distill_temperature`),
with the same schedule, data order and steps; only the loss differs. Reported: validation accuracy, and top-1 agreement with the
dense model on the validation split. Rows go to bench/results/distill.csv, the per-family means
to distill.json, the plot to distill.png.
"""
from __future__ import annotations

import argparse
import copy
import csv
import json
import statistics
import time
from pathlib import Path

import torch

from cts_vs_ltr import DATA, DEVICE, context
from tables import mean_sd
from ticketforge import finetune, models, recipe as recipes, search
from ticketforge.data import loader
from ticketforge.finetune import Schedule

OUT = Path(__file__).parent / "results"
FIELDS = ["family", "seed", "distill", "temperature", "sparsity", "finetune_epochs", "accuracy", "agreement",
          "before_accuracy", "before_agreement", "dense_accuracy", "time_s"]

# family -> (data set, architecture, kwargs, dense training, fine-tune recipe overrides, sparsity)
FAMILIES = {
    "resnet-cnn": ("digits", "digits-resnet", {"width": 16}, {"epochs": 8, "lr": 0.1, "optimizer": "sgd"}, [], 0.9),
    "1d-cnn": ("mnist1d", "mnist1d-cnn", {}, {"epochs": 8, "lr": 0.1, "optimizer": "sgd"}, [], 0.9),
    # transformers train with AdamW at a small learning rate, dense and fine-tune alike
    "vit": ("digits", "vit", {"in_channels": 1, "image_size": 8, "patch_size": 2, "dim": 64, "depth": 4,
                              "heads": 4, "mlp_dim": 128},
            {"epochs": 30, "lr": 2e-3, "optimizer": "adamw"},
            ["finetune.optimizer=adamw", "finetune.lr=0.001", "finetune.weight_decay=0.01"], 0.8),
}


@torch.no_grad()
def agreement(model, dense, ds) -> float:
    """Fraction of `ds` on which the two models' top-1 classes agree."""
    model.eval()
    same = total = 0
    for x, _ in loader(ds, 256):
        same += int((model(x).argmax(1) == dense(x).argmax(1)).sum())
        total += len(x)
    return same / max(total, 1)


def dense_model(arch, kwargs, train, bundle, seed):
    torch.manual_seed(seed)
    model = models.build(arch, kwargs)
    finetune.train(model, loader(bundle.train, 128, shuffle=True, seed=seed), epochs=train["epochs"],
                   lr=train["lr"], optimizer=train["optimizer"], device=DEVICE,
                   weight_decay=0.05 if train["optimizer"] == "adamw" else 5e-4)
    return model.eval(), finetune.evaluate(model, loader(bundle.val, 256), DEVICE)


def rows_for(family: str, seed: int, variants: list[tuple[float, float]], epochs: int) -> list[dict]:
    """One row per (distill weight, temperature) in `variants`, all from the same ticket."""
    data, arch, kwargs, train, sets, sparsity = FAMILIES[family]
    bundle = DATA[data][0](seed)
    dense, dense_acc = dense_model(arch, kwargs, train, bundle, seed)
    base = recipes.resolve("magnitude", [f"search.sparsity={sparsity}", f"finetune.epochs={epochs}", *sets])
    torch.manual_seed(seed)
    found = search.run(context(copy.deepcopy(dense), arch, kwargs, bundle, base, seed))
    rows = []
    for w, temperature in variants:
        recipe = recipes.with_value(recipes.with_value(base, "finetune.distill", w), "finetune.distill_temperature",
                                    temperature)
        model = copy.deepcopy(found.model)
        torch.manual_seed(seed)  # the same data order and dropout draws for every weight
        t = time.perf_counter()
        tuned = finetune.fit(model, found.mask, Schedule.finetune(recipe), bundle, DEVICE, seed=seed,
                             bn_recalibrate=recipe.finetune.bn_recalibrate, teacher=dense)
        seconds = time.perf_counter() - t
        probe = copy.deepcopy(found.model)
        found.mask.apply(probe)
        finetune.recalibrate_bn(probe, loader(bundle.train, 128, shuffle=True, seed=seed), DEVICE)
        rows.append({"family": family, "seed": seed, "distill": w, "temperature": temperature, "sparsity": sparsity,
                     "finetune_epochs": epochs, "accuracy": tuned.accuracy,
                     "agreement": agreement(model, dense, bundle.val), "before_accuracy": tuned.accuracy_before,
                     "before_agreement": agreement(probe, dense, bundle.val), "dense_accuracy": dense_acc,
                     "time_s": seconds})
        print({k: round(v, 4) if isinstance(v, float) else v for k, v in rows[-1].items()}, flush=True)
    return rows


def _variant(r: dict) -> str:
    w = float(r["distill"])
    return "w=0 (labels only)" if w == 0 else f"w={w:g}, T={float(r['temperature']):g}"


def _variants(rows: list[dict]) -> list[str]:
    """Variant names in the order the rows have them."""
    return list(dict.fromkeys(_variant(r) for r in rows))


def summary(rows: list[dict]) -> dict:
    """family -> variant -> mean accuracy and agreement (percent) over seeds."""
    out = {}
    for fam in sorted({r["family"] for r in rows}):
        out[fam] = {}
        for v in _variants(rows):
            pick = [r for r in rows if r["family"] == fam and _variant(r) == v]
            if pick:
                out[fam][v] = {k: round(100 * statistics.mean(float(r[k]) for r in pick), 2)
                               for k in ("accuracy", "agreement", "dense_accuracy", "before_accuracy")}
                out[fam][v]["seeds"] = len(pick)
    return out


def table(rows: list[dict]) -> str:
    variants = _variants(rows)
    head = "| family (sparsity, fine-tune epochs) | dense acc. | before fine-tune | " + " | ".join(
        f"{v}: acc. / agreement" for v in variants) + " |"
    lines = [head, "|---|---:|---:|" + "---:|" * len(variants)]
    for fam in sorted({r["family"] for r in rows}):
        pick = [r for r in rows if r["family"] == fam]
        cells = []
        for v in variants:
            sel = [r for r in pick if _variant(r) == v]
            cells.append(f"{mean_sd([100 * float(r['accuracy']) for r in sel], count=False)} / "
                         f"{mean_sd([100 * float(r['agreement']) for r in sel], count=False)}")
        dense = statistics.mean(100 * float(r["dense_accuracy"]) for r in pick)
        before = statistics.mean(100 * float(r["before_accuracy"]) for r in pick)
        lines.append(f"| {fam} ({100 * float(pick[0]['sparsity']):g}%, {pick[0]['finetune_epochs']}) | {dense:.1f} | "
                     f"{before:.1f} | " + " | ".join(cells) + " |")
    seeds = sorted({int(r["seed"]) for r in rows})
    return "\n".join(lines) + f"\n\nMean ± std over seeds {', '.join(map(str, seeds))}; percent on the validation split."


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fams = sorted({r["family"] for r in rows})
    variants = _variants(rows)
    width = 0.8 / len(variants)
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    for ax, key in zip(axes, ("accuracy", "agreement")):
        for i, v in enumerate(variants):
            means = [statistics.mean(100 * float(r[key]) for r in rows if r["family"] == f and _variant(r) == v)
                     for f in fams]
            ax.bar([j + (i - (len(variants) - 1) / 2) * width for j in range(len(fams))], means, width, label=v)
        lo = min(100 * float(r[key]) for r in rows)
        ax.set_ylim(max(0, lo - 5), 100)
        ax.set_xticks(range(len(fams)), fams)
        ax.set_ylabel(f"validation {key} % (mean of seeds)")
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("fine-tune of a magnitude ticket, same steps, with and without distillation from the dense model")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--families", nargs="+", default=list(FAMILIES), choices=list(FAMILIES))
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--weights", nargs="+", type=float, default=[0.5, 1.0], help="distillation weights besides 0")
    p.add_argument("--temperatures", nargs="+", type=float, default=[2.0, 4.0])
    p.add_argument("--finetune", type=int, default=5, help="fine-tune epochs (the recipes' default: 5)")
    p.add_argument("--threads", type=int, default=1, help="1: on a shared 2-core machine more threads thrash")
    p.add_argument("--out", type=Path, default=OUT / "distill.csv")
    p.add_argument("--table", action="store_true", help="print the markdown table of --out and redraw its plot")
    args = p.parse_args()
    if not args.table:
        torch.set_num_threads(args.threads)
        rows = []
        for fam in args.families:
            for seed in args.seeds:
                rows += rows_for(fam, seed, [(0.0, 1.0)] + [(w, t) for t in args.temperatures for w in args.weights],
                                 args.finetune)
        with open(args.out, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=FIELDS)
            w.writeheader()
            w.writerows({k: round(v, 5) if isinstance(v, float) else v for k, v in r.items()} for r in rows)
    rows = list(csv.DictReader(open(args.out)))
    args.out.with_suffix(".json").write_text(json.dumps(summary(rows), indent=2) + "\n")
    plot(rows, args.out.with_suffix(".png"))
    print(table(rows))


if __name__ == "__main__":
    main()
