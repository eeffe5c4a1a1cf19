"""Tiny built-in model configurations and a small digits file, shared by the model and 2:4 tests
so that whole-pipeline runs stay within a few seconds."""
from pathlib import Path

import numpy as np
import torch
from sklearn.datasets import load_digits

from ticketforge.models import build

# For 1 x 8 x 8 digits.
TINY = {
    "digits-resnet": {"width": 16},
    "resnet20": {"in_channels": 1, "width": 16},
    "resnet20-tlab": {"in_channels": 1, "width": 8, "running_stats": True},
    "mobilenetv2": {"in_channels": 1, "width": 0.25, "last_channels": 32},
    "vit": {"in_channels": 1, "image_size": 8, "patch_size": 2, "dim": 32, "depth": 2, "heads": 2, "mlp_dim": 64},
}

FAST = ["validate.repeats=3", "validate.warmup=0", "validate.latency_batches=[1]", "finetune.batch_size=64"]


def small_digits(path: Path, n: int = 256) -> str:
    """The first n digits as a .npz (uint8 images, like a user's file)."""
    d = load_digits()
    np.savez(path, x=np.clip(d.images[:n] * 16, 0, 255).astype(np.uint8)[:, None], y=d.target[:n])
    return str(path)


def saved(arch: str, path: Path) -> Path:
    torch.save(build(arch, TINY[arch]).state_dict(), path)
    return path
