"""Did a memory cut change what CTS finds? Tickets of the same dense model, before and after.

    python bench/memory_quality.py --label after                # from this checkout
    PYTHONPATH=/path/to/old/checkout python bench/memory_quality.py --label before
    python bench/memory_quality.py --compare before after       # the table

A digits-resnet (width 32) trained for 6 epochs on scikit-learn's digits (seed 0, the same weights
for every label); CTS (the `cts` recipe: 200 steps at batch 128) at 90% and 95% with seeds 0-2,
then the recipe's fine-tune for 2 epochs. Each row: accuracy after BN re-estimation and after
the fine-tune; masks are saved, and --compare gives, per sparsity and seed, the overlap
|A & B| / kept of the two labels' masks next to the overlap between two seeds of one label (the
X
"""
from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
MASKS = RESULTS / "memory_quality_masks.tmp"  # kept out of git (.gitignore)


def dense(bundle):
    from ticketforge import finetune, models
    from ticketforge.data import loader

    torch.manual_seed(0)
    model = models.build("digits-resnet")
    finetune.train(model, loader(bundle.train, 64, shuffle=True, seed=0), epochs=6, lr=0.05,
                   device=torch.device("cpu"))
    return model.eval()


def run(a) -> list[dict]:
    from ticketforge import finetune, recipe as recipes
    from ticketforge.data import load_data, loader
    from ticketforge.loading import LoadedModel
    from ticketforge.search.base import SearchContext
    from ticketforge.search.cts import cts

    torch.set_num_threads(a.threads)
    bundle = load_data("digits", 0.1, 0)
    base = dense(bundle)
    acc = finetune.evaluate(base, loader(bundle.val, 256), torch.device("cpu"))
    rows = []
    MASKS.mkdir(parents=True, exist_ok=True)
    for sparsity in a.sparsities:
        for seed in a.seeds:
            recipe = recipes.resolve("cts", [f"search.sparsity={sparsity}", "finetune.epochs=2"])
            model = copy.deepcopy(base)
            ctx = SearchContext(model=model, loaded=LoadedModel(model=model, arch="digits-resnet"), data=bundle,
                                recipe=recipe, device=torch.device("cpu"), seed=seed)
            torch.manual_seed(seed)
            found = cts(ctx)
            torch.save(found.mask.state_dict(), MASKS / f"{a.label}-{sparsity}-{seed}.pt")
            tuned = finetune.fit(found.model, found.mask, finetune.Schedule.finetune(recipe), bundle,
                                 torch.device("cpu"), seed=seed)
            row = {"label": a.label, "sparsity": sparsity, "seed": seed, "dense_accuracy": acc,
                   "steps": found.info["steps"], "accuracy_before_finetune": tuned.accuracy_before,
                   "accuracy": tuned.accuracy, "seconds": round(found.info["seconds"], 1)}
            print(json.dumps(row), flush=True)
            rows.append(row)
    return rows


def overlap(a: dict, b: dict) -> float:
    kept = sum(int(m.sum()) for m in a.values())
    return sum(int((a[k] & b[k]).sum()) for k in a) / kept


def compare(rows: list[dict], old: str, new: str) -> str:
    def load(label, sp, seed):
        return torch.load(MASKS / f"{label}-{sp}-{seed}.pt", weights_only=True)

    lines = [f"| sparsity | {old} accuracy | {new} accuracy | overlap {old}-{new}, same seed | "
             f"overlap {old} seed s-s+1 | overlap {new} seed s-s+1 |", "|---:|---:|---:|---:|---:|---:|"]
    for sp in sorted({r["sparsity"] for r in rows}):
        seeds = sorted({r["seed"] for r in rows if r["sparsity"] == sp and r["label"] == old}
                       & {r["seed"] for r in rows if r["sparsity"] == sp and r["label"] == new})
        acc = {lab: [r["accuracy"] for r in rows if r["label"] == lab and r["sparsity"] == sp and r["seed"] in seeds]
               for lab in (old, new)}
        same = [overlap(load(old, sp, s), load(new, sp, s)) for s in seeds]
        across = {lab: [overlap(load(lab, sp, s), load(lab, sp, t)) for s, t in zip(seeds, seeds[1:])]
                  for lab in (old, new)}

        def ms(v):
            return f"{statistics.mean(v):.3f}" + (f" +- {statistics.stdev(v):.3f}" if len(v) > 1 else "")
        lines.append(f"| {sp} | {ms(acc[old])} | {ms(acc[new])} | {ms(same)} | {ms(across[old])} | {ms(across[new])} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--label")
    ap.add_argument("--sparsities", type=float, nargs="+", default=[0.9, 0.95])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--compare", nargs=2, metavar=("OLD", "NEW"))
    a = ap.parse_args()
    path = RESULTS / "memory_quality.json"
    rows = json.loads(path.read_text())["rows"] if path.exists() else []
    if a.label:
        new = run(a)
        keys = {(r["label"], r["sparsity"], r["seed"]) for r in new}
        rows = [r for r in rows if (r["label"], r["sparsity"], r["seed"]) not in keys] + new
        path.write_text(json.dumps({"rows": rows}, indent=1) + "\n")
    if a.compare:
        table = compare(rows, *a.compare)
        (RESULTS / "memory_quality.md").write_text(table)
        print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
