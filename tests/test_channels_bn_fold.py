"""Peer complaint 6: a removed channel's BatchNorm beta still reaches the next layer in the masked
model. fold_shifts adds that constant to the consumer's bias, so the shrunk model equals the
model whose producers alone were zeroed."""
import copy

import torch
from torch import nn

from tests.channel_nets import cbr, randomize_bn
from ticketforge.structures.channels import graph, surgery


class PointwiseNet(nn.Module):
    """Consumers where a folded constant is exact: a 1x1 conv and a Linear after pooling."""

    def __init__(self):
        super().__init__()
        self.a = cbr(3, 16)
        self.b = cbr(16, 16, 1)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 5))

    def forward(self, x):
        return self.head(self.b(self.a(x)))


def producer_only_masked(model, plan, keep):
    """Zero just the removed channels' producer rows: the channel then carries relu(BN(0))."""
    masked = copy.deepcopy(model)
    mask = surgery.channel_mask(model, plan, keep)
    with torch.no_grad():
        for g, k in zip(plan.groups, keep):
            gone = torch.ones(g.size, dtype=torch.bool)
            gone[k] = False
            for m in g.of("out"):
                w = dict(masked.named_modules())[m.module].weight
                w[[i for i, r in zip(m.idx, m.root) if gone[r]]] = 0
    return masked, mask


def test_shift_is_nonzero_without_folding():
    model = randomize_bn(PointwiseNet())
    x = torch.randn(8, 3, 8, 8)
    plan = graph.discover(model, x)
    keep = [torch.arange(0, g.size, 2) for g in plan.groups]
    masked, mask = producer_only_masked(model, plan, keep)
    naive = copy.deepcopy(masked)
    mask.apply(naive)
    with torch.no_grad():
        assert (masked(x) - surgery.shrink(naive, plan, keep, x)(x)).abs().max() > 1e-2


def test_folded_shrunk_equals_masked():
    model = randomize_bn(PointwiseNet())
    x = torch.randn(8, 3, 8, 8)
    plan = graph.discover(model, x)
    keep = [torch.arange(0, g.size, 2) for g in plan.groups]
    masked, mask = producer_only_masked(model, plan, keep)
    folded = copy.deepcopy(model)
    spread = surgery.fold_shifts(folded, plan, keep, x)
    mask.apply(folded)
    shrunk = surgery.shrink(folded, plan, keep, x)
    assert spread < 1e-5, "a removed channel's input must be a constant"
    assert shrunk.b[0].bias is not None and shrunk.head[2].bias is not None
    with torch.no_grad():
        x2 = torch.randn(16, 3, 8, 8)
        assert torch.allclose(masked(x2), shrunk(x2), atol=1e-4)
