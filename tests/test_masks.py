import pytest
import torch
from torch import nn

from ticketforge.masks import Mask, global_topk, keep_count, prunable


def test_prunable_is_every_conv_and_linear_weight_only():
    m = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Conv2d(4, 4, 3, groups=4), nn.Flatten(),
                      nn.Linear(4, 2))
    assert list(prunable(m)) == ["0.weight", "2.weight", "4.weight"]


def test_global_topk_keeps_exact_count_even_with_ties():
    scores = {"a": torch.ones(10, 10), "b": torch.ones(7)}
    for keep in (0, 1, 33, 107):
        assert global_topk(scores, keep).kept == keep


def test_global_topk_is_global_not_per_layer():
    scores = {"small": torch.full((4,), 1000.0), "big": torch.arange(100, dtype=torch.float)}
    mask = global_topk(scores, 10)
    assert mask["small"].all() and mask["big"].sum() == 6 and mask["big"][-6:].all()


def test_keep_count_rounds_to_nearest_weight():
    assert keep_count(1000, 0.95) == 50
    assert keep_count(3, 0.5) == 2


def test_mask_save_load_roundtrip(tmp_path):
    m = nn.Linear(8, 4)
    mask = global_topk({"weight": torch.rand(4, 8)}, 5)
    mask.save(tmp_path / "m.pt")
    back = Mask.load(tmp_path / "m.pt")
    assert back.kept == 5 and torch.equal(back["weight"], mask["weight"])
    back.apply(m)
    assert int((m.weight != 0).sum()) <= 5
    assert back.sparsity == pytest.approx(1 - 5 / 32)
