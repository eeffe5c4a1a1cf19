"""Cost of one CTS search step against one plain training step of the same model and batch.

    python bench/search_step.py [--arch digits-resnet] [--batch 128] [--steps 30] [--device cpu]

Both are timed through the library's own loops (ticketforge.search.cts.concrete_search and
ticketforge.finetune.train) on scikit-learn's digits, after a warm-up, median of --repeats runs.
Writes bench/results/search_step.{csv,json}. The goal (issue 3): a search step <= 1.5x a training step.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import time
from pathlib import Path

import torch
from torch.utils.data import Subset

from ticketforge import finetune, models, recipe as recipes
from ticketforge.data import load_data, loader
from ticketforge.loading import LoadedModel
from ticketforge.search.base import SearchContext
from ticketforge.search.cts import cts

OUT = Path(__file__).parent / "results"


def time_search(model, loaded, bundle, device, batch, steps) -> float:
    recipe = recipes.resolve("cts", [f"search.steps={steps}", f"search.batch_size={batch}", "search.sparsity=0.95",
                                     "search.stop_overlap=1"])  # exactly `steps` steps: no early stop
    ctx = SearchContext(model=model, loaded=loaded, data=bundle, recipe=recipe, device=device)
    t = time.perf_counter()
    cts(ctx)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t) / steps


def time_train(model, bundle, device, batch, steps) -> float:
    data = loader(Subset(bundle.train, range(batch * steps)), batch, shuffle=True, drop_last=True)
    t = time.perf_counter()
    finetune.train(model, data, epochs=1, lr=0.01, device=device)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t) / steps


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", default="digits-resnet")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    bundle = load_data("digits", 0.1, 0)
    args.steps = min(args.steps, len(bundle.train) // args.batch)
    model = models.build(args.arch).to(device).eval()
    loaded = LoadedModel(model=model, arch=args.arch)
    time_search(model, loaded, bundle, device, args.batch, 2)  # warm-up
    time_train(model, bundle, device, args.batch, 2)
    search_s, train_s = [], []
    for _ in range(args.repeats):  # interleaved, so a load spike on a shared machine hits both
        search_s.append(time_search(model, loaded, bundle, device, args.batch, args.steps))
        train_s.append(time_train(model, bundle, device, args.batch, args.steps))
    row = {"arch": args.arch, "device": str(device), "threads": args.threads, "batch": args.batch,
           "steps": args.steps, "repeats": args.repeats,
           "search_step_ms": 1e3 * statistics.median(search_s), "train_step_ms": 1e3 * statistics.median(train_s),
           "load_avg_1min": os.getloadavg()[0]}
    row["ratio"] = row["search_step_ms"] / row["train_step_ms"]
    OUT.mkdir(parents=True, exist_ok=True)
    with open(OUT / "search_step.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(row))
        w.writeheader()
        w.writerow(row)
    (OUT / "search_step.json").write_text(json.dumps(row, indent=2) + "\n")
    print(json.dumps(row))


if __name__ == "__main__":
    main()
