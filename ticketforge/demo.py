"""`ticketforge demo`: train the built-in model on scikit-learn's digits, then compress it."""
from __future__ import annotations

from pathlib import Path

import torch

from ticketforge import finetune, models
from ticketforge.data import load_data, loader
from ticketforge.ui import UI

DEMO_ARCH = "digits-resnet"


def train_demo_model(path: Path, seed: int = 0, epochs: int = 15, ui: UI | None = None) -> float:
    """Train the demo model and save it as a self-describing checkpoint; returns val accuracy."""
    ui = ui or UI()
    torch.manual_seed(seed)
    bundle = load_data("digits", 0.1, seed)
    model = models.build(DEMO_ARCH)
    device = torch.device("cpu")
    finetune.train(model, loader(bundle.train, 64, shuffle=True, seed=seed), epochs=epochs, lr=0.05,
                   device=device, ui=ui, desc="train dense")
    acc = finetune.evaluate(model, loader(bundle.val, 256), device)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save({"state_dict": model.state_dict(), "arch": DEMO_ARCH, "arch_kwargs": {}, "data": "digits"}, tmp)
    tmp.replace(path)
    ui.log(f"dense demo model: validation accuracy {acc:.4f}, saved to {path}")
    return acc
