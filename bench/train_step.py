"""Masked training step (finetune.train with a Mask held) vs a plain PyTorch training step of the
same model, same optimizer and schedule. Goal: the masked step costs at most 1.15x the plain one.

    python bench/train_step.py [--arch resnet20] [--batch 64] [--steps 30] [--repeats 5]

Writes bench/results/train_step.{csv,json}; prints one line per model."""
from __future__ import annotations

import argparse
import csv
import json
import math
import platform
import statistics
import time
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from ticketforge import finetune, models
from ticketforge.masks import Mask, global_topk, keep_count, prunable

CONFIGS = {  # arch -> (build kwargs, sample shape)
    "resnet20": ({"in_channels": 3, "width": 16}, (3, 32, 32)),
    "digits-resnet": ({}, (1, 8, 8)),
    "mlp": (None, (784,)),
}


def build(arch: str) -> nn.Module:
    if arch == "mlp":
        return nn.Sequential(nn.Linear(784, 1024), nn.ReLU(), nn.Linear(1024, 1024), nn.ReLU(), nn.Linear(1024, 10))
    return models.build(arch, CONFIGS[arch][0])


def plain_steps(model: nn.Module, loader: DataLoader, epochs: int, lr: float) -> None:
    """What a user would write: the same SGD + cosine schedule, no mask."""
    opt = finetune.make_optimizer(model, "sgd", lr, 0.9, 5e-4)
    total = epochs * len(loader)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, total) / total)))
    model.train()
    for _ in range(epochs):
        for x, y in loader:
            loss = nn.functional.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            loss.item()


def masked_steps(model: nn.Module, loader: DataLoader, epochs: int, lr: float, mask: Mask) -> None:
    finetune.train(model, loader, epochs=epochs, lr=lr, device=torch.device("cpu"), grad_clip=0.0, mask=mask)


def measure(arch: str, batch: int, steps: int, repeats: int, sparsity: float) -> dict:
    torch.manual_seed(0)
    shape = CONFIGS[arch][1]
    ds = TensorDataset(torch.randn(batch * steps, *shape), torch.randint(0, 10, (batch * steps,)))
    loader = DataLoader(ds, batch_size=batch, shuffle=False)
    base = build(arch)
    weights = prunable(base)
    mask = global_topk({k: w.abs() for k, w in weights.items()}, keep_count(sum(w.numel() for w in weights.values()), sparsity))
    runs = {"plain": lambda m: plain_steps(m, loader, 1, 0.01),
            "masked": lambda m: masked_steps(m, loader, 1, 0.01, mask)}
    times = {name: [] for name in runs}
    for fn in runs.values():
        fn(build(arch))  # warm-up (allocator, kernels)
    for _ in range(repeats):  # alternate, so that load changes on a shared machine hit both alike
        for name, fn in runs.items():
            model = build(arch)
            model.load_state_dict(base.state_dict())
            t = time.perf_counter()
            fn(model)
            times[name].append((time.perf_counter() - t) / steps * 1000)
    plain, masked = statistics.median(times["plain"]), statistics.median(times["masked"])
    return {"arch": arch, "batch": batch, "steps": steps, "repeats": repeats, "sparsity": sparsity,
            "plain_ms_per_step": round(plain, 3), "masked_ms_per_step": round(masked, 3),
            "ratio": round(masked / plain, 3), "threads": torch.get_num_threads(), "torch": torch.__version__,
            "cpu": platform.processor() or platform.machine()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", action="append", choices=sorted(CONFIGS), help="default: all")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--sparsity", type=float, default=0.9)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    out = Path(__file__).parent / "results"
    out.mkdir(exist_ok=True)
    rows = []
    for a in args.arch or sorted(CONFIGS):
        rows.append(r := measure(a, args.batch, args.steps, args.repeats, args.sparsity))
        print(f"{r['arch']:<14} batch {r['batch']}: plain {r['plain_ms_per_step']:.2f} ms/step, masked "
              f"{r['masked_ms_per_step']:.2f} ms/step, ratio {r['ratio']:.3f}x (goal <= 1.15x)", flush=True)
        with open(out / "train_step.csv", "w", newline="") as f:  # after each model: a long run keeps its rows
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
        (out / "train_step.json").write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
