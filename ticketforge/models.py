"""Built-in architectures, found by name (`ticketforge models`), and `--arch` resolution."""
from __future__ import annotations

import importlib
import sys
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from ticketforge.errors import UserError

MODELS: dict[str, Callable[..., nn.Module]] = {}


def register_model(name: str):
    def deco(fn):
        MODELS[name] = fn
        return fn
    return deco


def resolve_arch(arch: str) -> Callable[..., nn.Module]:
    """A built-in name, or `package.module:callable` importable from the current directory."""
    if arch in MODELS:
        return MODELS[arch]
    if ":" not in arch:
        raise UserError(f"--arch {arch!r}: not a built-in model ({', '.join(sorted(MODELS))}) "
                        "and not of the form package.module:callable")
    module_name, _, attr = arch.partition(":")
    if str(Path.cwd()) not in sys.path:
        sys.path.insert(0, str(Path.cwd()))
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # any import failure is the user's module, not ours
        raise UserError(f"--arch {arch!r}: cannot import {module_name!r}: {type(exc).__name__}: {exc}") from None
    fn = module
    for part in attr.split("."):
        fn = getattr(fn, part, None)
        if fn is None:
            raise UserError(f"--arch {arch!r}: {module_name!r} has no attribute {attr!r}")
    if not callable(fn):
        raise UserError(f"--arch {arch!r}: {attr!r} is not callable")
    return fn


def build(arch: str, kwargs: dict | None = None) -> nn.Module:
    fn = resolve_arch(arch)
    try:
        model = fn(**(kwargs or {}))
    except Exception as exc:
        raise UserError(f"--arch {arch!r}: calling it with {kwargs or {}} failed: {type(exc).__name__}: {exc}") from None
    if not isinstance(model, nn.Module):
        raise UserError(f"--arch {arch!r} returned {type(model).__name__}, not a torch.nn.Module")
    return model


# ---------------------------------------------------------------- built-ins

def conv_bn(cin: int, cout: int, k: int = 3, stride: int = 1, groups: int = 1, act: bool = True) -> nn.Sequential:
    layers = [nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout)]
    if act:
        layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


class BasicBlock(nn.Module):
    """ResNet basic block; `shortcut` is an identity unless the shape changes (then a 1x1 conv)."""

    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.body = nn.Sequential(conv_bn(cin, cout, 3, stride), conv_bn(cout, cout, 3, act=False))
        self.shortcut = nn.Identity() if stride == 1 and cin == cout else conv_bn(cin, cout, 1, stride, act=False)

    def forward(self, x):
        return torch.relu(self.body(x) + self.shortcut(x))


@register_model("digits-resnet")
def digits_resnet(num_classes: int = 10, in_channels: int = 1, width: int = 32) -> nn.Module:
    """The demo model: a small residual CNN with a depthwise-separable stage, for 8x8 digits."""
    w = width
    return nn.Sequential(
        conv_bn(in_channels, w),
        BasicBlock(w, w),
        BasicBlock(w, 2 * w, stride=2),
        BasicBlock(2 * w, 2 * w),
        conv_bn(2 * w, 2 * w, 3, groups=2 * w),  # depthwise
        conv_bn(2 * w, 4 * w, 1),                # pointwise
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4 * w, num_classes),
    )


@register_model("resnet20")
def resnet20(num_classes: int = 10, in_channels: int = 3, width: int = 16) -> nn.Module:
    """CIFAR ResNet-20 (He et al. 2016): 3 stages of 3 basic blocks, widths 16/32/64."""
    layers: list[nn.Module] = [conv_bn(in_channels, width)]
    cin = width
    for stage in range(3):
        cout = width * 2 ** stage
        for i in range(3):
            layers.append(BasicBlock(cin, cout, stride=2 if stage > 0 and i == 0 else 1))
            cin = cout
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, num_classes)]
    return nn.Sequential(*layers)
