"""Tiny nets for the channel tests: each has one coupling a channel pruner can get wrong."""
import copy

import torch
from torch import nn

from ticketforge.structures.channels import graph, surgery


def randomize_bn(model: nn.Module) -> nn.Module:
    """Non-trivial BatchNorm statistics and affine, so a removed channel's shift is not zero."""
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.rand(m.num_features, generator=g) - 0.5)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.data.copy_(torch.rand(m.num_features, generator=g) - 0.5)
    return model.eval()


def cbr(cin, cout, k=3, groups=1, act=True):
    layers = [nn.Conv2d(cin, cout, k, padding=k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout)]
    return nn.Sequential(*layers, nn.ReLU()) if act else nn.Sequential(*layers)


class Residual(nn.Module):
    def __init__(self, c=16):
        super().__init__()
        self.stem = cbr(3, c)
        self.f = nn.Sequential(cbr(c, c), cbr(c, c, act=False))
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, 5))

    def forward(self, x):
        x = self.stem(x)
        return self.head(torch.relu(x + self.f(x)))


class Concat(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = cbr(3, 8), cbr(3, 12)
        self.mix = cbr(20, 16, 1)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 5))

    def forward(self, x):
        return self.head(self.mix(torch.cat([self.a(x), self.b(x)], 1)))


class Depthwise(nn.Module):
    """MobileNet-style: expand 1x1, depthwise 3x3, project 1x1 without activation, residual."""

    def __init__(self, c=16, e=32):
        super().__init__()
        self.stem = cbr(3, c)
        self.expand, self.dw, self.project = cbr(c, e, 1), cbr(e, e, 3, groups=e), cbr(e, c, 1, act=False)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, 5))

    def forward(self, x):
        x = self.stem(x)
        return self.head(x + self.project(self.dw(self.expand(x))))


class Grouped(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = cbr(3, 16)
        self.g = cbr(16, 16, 3, groups=4)
        self.tail = cbr(16, 24)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(24, 5))

    def forward(self, x):
        return self.head(self.tail(self.g(self.stem(x))))


class SingleChannel(nn.Module):
    """A grey-scale stem (weight 8 x 1 x 3 x 3, shaped like a depthwise weight but groups=1) and a
    1-channel bottleneck: neither may be handled as depthwise."""

    def __init__(self):
        super().__init__()
        self.stem = cbr(1, 8)
        self.squeeze = cbr(8, 1, 1)
        self.expand = cbr(1, 8)
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(8 * 6 * 6, 5))

    def forward(self, x):
        return self.head(self.expand(self.squeeze(self.stem(x))))


def half(plan):
    """Keep the first half of every group (round_to 1)."""
    return [torch.arange(0, g.size, 2) for g in plan.groups]


def masked_and_shrunk(model, example, keep_fn=half):
    plan = graph.discover(model, example)
    keep = keep_fn(plan)
    mask = surgery.channel_mask(model, plan, keep)
    masked = copy.deepcopy(model)
    mask.apply(masked)
    return plan, keep, masked.eval(), surgery.shrink(masked, plan, keep, example).eval()
