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


def largest_new_tensor(fn):
    """Run fn(); the largest number of elements of any tensor an op made while it ran."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Watch(TorchDispatchMode):
        largest = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(t, torch.Tensor):
                    Watch.largest = max(Watch.largest, t.numel())
            return out

    with Watch():
        result = fn()
    return result, Watch.largest


def test_topk_masks_is_exact_breaks_ties_by_position_and_copies_no_more_than_a_layer():
    from ticketforge.masks import topk_masks

    g = torch.Generator().manual_seed(0)
    layers = [torch.randn(300, 400, generator=g), torch.randn(200000, generator=g).round(), torch.full((50000,), 0.0)]
    flat = torch.cat([s.reshape(-1) for s in layers])
    for keep in (0, 1, 1000, 45000, 60000, 250000, flat.numel()):
        masks, largest = largest_new_tensor(lambda: topk_masks(layers, keep))
        kept = torch.cat([m.reshape(-1) for m in masks])
        assert int(kept.sum()) == keep and [m.shape for m in masks] == [s.shape for s in layers]
        if 0 < keep < flat.numel():
            assert flat[kept].min() >= flat[~kept].max()
            tied = kept[flat == flat[kept].min()]
            assert not (tied[1:] & ~tied[:-1]).any()  # the ties kept are the first ones
            assert largest <= 200000  # per layer: never the concatenation of all of them
    distinct = [torch.randn(1000, generator=g), torch.randn(50, 20, generator=g)]
    both = torch.cat([s.reshape(-1) for s in distinct])
    expected = torch.zeros(2000, dtype=torch.bool)
    expected[torch.topk(both, 321).indices] = True
    assert torch.equal(torch.cat([m.reshape(-1) for m in topk_masks(distinct, 321)]), expected)
    with pytest.raises(ValueError, match="NaN"):
        topk_masks([torch.full((10,), float("nan"))], 3)
