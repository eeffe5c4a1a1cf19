"""Where the work runs and how fast: device choice, mixed precision, memory format, loader settings.

The CPU path is the default wherever there is no GPU; on CUDA, training runs under autocast
(bf16 where the GPU supports it, else fp16 with a gradient scaler), conv nets use channels_last
(tensor cores want NHWC), and loaders pin memory and use worker processes."""
from __future__ import annotations

import ctypes
import os
from contextlib import nullcontext
from dataclasses import dataclass

import torch
from torch import nn

from ticketforge.errors import UserError


def pick(name: str) -> torch.device:
    """`auto` is CUDA when present, else CPU; `cuda` without a GPU is an error, not a fallback."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cpu":
        return torch.device("cpu")
    if name == "cuda" or name.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise UserError(f"--device {name}: no CUDA device is available (use --device auto or cpu)")
        return torch.device(name)
    raise UserError(f"--device {name!r}: expected auto, cpu or cuda")


@dataclass(frozen=True)
class Precision:
    enabled: bool
    dtype: torch.dtype = torch.float32
    scaled: bool = False  # fp16 needs loss scaling; bf16 has fp32's range and does not

    def autocast(self, device: torch.device):
        return torch.autocast(device.type, dtype=self.dtype) if self.enabled else nullcontext()

    def scaler(self, device: torch.device) -> torch.amp.GradScaler:
        return torch.amp.GradScaler(device.type, enabled=self.scaled)


def precision(device: torch.device) -> Precision:
    """Mixed precision for training on CUDA; full fp32 on CPU (where autocast buys little and
    bf16 matmuls would change the results users compare against)."""
    if device.type != "cuda":
        return Precision(enabled=False)
    if torch.cuda.is_bf16_supported():
        return Precision(enabled=True, dtype=torch.bfloat16)
    return Precision(enabled=True, dtype=torch.float16, scaled=True)


def wants_channels_last(model: nn.Module, device: torch.device) -> bool:
    return device.type == "cuda" and any(isinstance(m, nn.Conv2d) for m in model.modules())


def to_device(model: nn.Module, device: torch.device) -> nn.Module:
    """Move the model; conv nets on CUDA also switch to channels_last."""
    model = model.to(device)
    if wants_channels_last(model, device):
        model = model.to(memory_format=torch.channels_last)
    return model


def inputs_to(x: torch.Tensor, device: torch.device, model: nn.Module | None = None) -> torch.Tensor:
    x = x.to(device, non_blocking=True)
    if x.dim() == 4 and device.type == "cuda" and model is not None and wants_channels_last(model, device):
        x = x.contiguous(memory_format=torch.channels_last)
    return x


def loader_options(device: torch.device, world_size: int = 1) -> dict:
    """DataLoader settings: pinned memory and a few workers feeding a GPU; none on CPU, where
    worker processes would compete with the training threads for the same cores."""
    if device.type != "cuda":
        return {}
    workers = max(1, min(4, (os.cpu_count() or 2) // max(1, world_size) - 1))
    return {"pin_memory": True, "num_workers": workers, "persistent_workers": True}


def return_freed_memory() -> None:
    """Have glibc hand every freed block of 1 MiB or more back to the system at once. Its default
    threshold for that climbs to the largest block freed so far (up to 32 MiB), after which every
    layer-sized tensor comes from the heap, and the heap's free holes stay resident: the BERT-base
    search peaked 1.0 GiB (2.5x its weights) higher that way (docs/memory.md). Called once per
    run; other C libraries are left as they are."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD; setting it also stops glibc from moving it
    except (OSError, AttributeError):
        pass
