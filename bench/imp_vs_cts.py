"""Time to a ticket: CTS against IMP (learning-rate rewinding) at the same sparsity, and what layer
pruning buys, on the demo model (digits-resnet trained on scikit-learn's digits).

    .venv/bin/python bench/imp_vs_cts.py [--sparsities 0.95 0.98] [--imp-epochs 1 3] [--methods cts imp layers]
                                         [--csv out.csv]

Each point is a whole `compress` run with the built-in recipe; the time is that of search plus
fine-tune (export and validation are the same for every method and left out), both wall clock and
this process's CPU time (the CPU time is the fairer number on a shared machine). Accuracy is the
exported model's, in ONNX Runtime, on the validation split. The paper's headline is CTS reaching
99.3% sparsity in about 1/12 of LTR's time (ResNet-20, CIFAR-10)."""
from __future__ import annotations

import argparse
import csv
import sys
import tempfile
import time
from pathlib import Path

import onnx
import torch

from ticketforge import recipe as recipes
from ticketforge.demo import train_demo_model
from ticketforge.pipeline import Job, compress
from ticketforge.ui import UI

FAST = ["validate.repeats=20", "validate.latency_batches=[1,64]"]


def convs(path: Path) -> int:
    return sum(n.op_type == "Conv" for n in onnx.load(str(path)).graph.node)


def run(model: Path, out: Path, recipe: str, sets: list[str], sparsity: float | None, seed: int) -> dict:
    r = recipes.resolve(recipe, FAST + sets, sparsity=sparsity)
    c0 = time.process_time()
    rep = compress(Job(model_path=model, recipe=r, out=out, seed=seed, ui=UI(quiet=True)))
    cpu = time.process_time() - c0
    t = rep["timings"]
    return {"recipe": recipe, "settings": " ".join(sets), "seed": seed, "sparsity": rep["sparsity"]["achieved"],
            "accuracy": rep["accuracy"]["onnx"], "dense_accuracy": rep["accuracy"]["dense_onnx"],
            "seconds": t["search"] + t["finetune"], "cpu_seconds_total": cpu,
            "macs_kept": rep["macs"]["compressed"] / rep["macs"]["dense"],
            "convs": f"{convs(out / 'dense.onnx')} -> {convs(out / 'model.onnx')}",
            "speedup_b64": next(x["speedup"] for x in rep["latency"] if x["batch"] == 64),
            "rounds": len(rep["search"].get("rounds", [])) or ""}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sparsities", type=float, nargs="+", default=[0.95, 0.98])
    ap.add_argument("--imp-epochs", type=int, nargs="+", default=[1, 3], help="retraining epochs per IMP round")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--methods", nargs="+", default=["cts", "imp", "layers"], choices=["cts", "imp", "layers"])
    ap.add_argument("--csv", type=Path, default=Path("bench/results/imp_vs_cts.csv"))
    args = ap.parse_args()
    torch.set_num_threads(min(2, torch.get_num_threads()))
    rows = []
    args.csv.parent.mkdir(parents=True, exist_ok=True)

    def add(row):  # the CSV grows row by row: a long sweep cut short keeps what it measured
        rows.append(row)
        print(row, file=sys.stderr, flush=True)
        with open(args.csv, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for seed in args.seeds:
            model = tmp / f"demo-{seed}.pt"
            train_demo_model(model, seed=seed, ui=UI(quiet=True))
            for s in args.sparsities:
                cases = [("cts", [])] + [("imp", [f"search.epochs={e}"]) for e in args.imp_epochs]
                for recipe, sets in cases:
                    if recipe in args.methods:
                        add(run(model, tmp / f"{recipe}-{s}-{len(rows)}", recipe, sets, s, seed))
            if "layers" in args.methods:
                add(run(model, tmp / f"layers-{seed}", "layers", [], None, seed))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; rows also in {args.csv}")
    print("| recipe | settings | sparsity | ONNX acc (dense) | search+fine-tune s | CPU s (whole run) | IMP rounds | "
          "MACs kept | Conv nodes | ORT speed-up b64 |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---|---:|")
    for r in rows:
        print(f"| {r['recipe']} | {r['settings']} | {r['sparsity']:.4f} | {r['accuracy']:.4f} ({r['dense_accuracy']:.4f}) | "
              f"{r['seconds']:.1f} | {r['cpu_seconds_total']:.1f} | {r['rounds']} | {r['macs_kept']:.2f} | {r['convs']} | "
              f"{r['speedup_b64']:.2f}x |")
    for seed in args.seeds:
        for s in args.sparsities:
            pts = [r for r in rows if r["seed"] == seed and r["recipe"] in ("cts", "imp") and abs(r["sparsity"] - s) < 1e-3]
            cts = next((r for r in pts if r["recipe"] == "cts"), None)
            for r in pts:
                if r["recipe"] == "imp" and cts:
                    print(f"seed {seed}, sparsity {s:g}: time CTS / IMP ({r['settings']}) = {cts['seconds'] / r['seconds']:.2f} "
                          f"(CPU {cts['cpu_seconds_total'] / r['cpu_seconds_total']:.2f}); accuracy CTS {cts['accuracy']:.4f}, "
                          f"IMP {r['accuracy']:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
