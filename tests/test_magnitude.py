"""Magnitude pruning's two scopes: LAMP (the default) and raw global |w|."""
import pytest
import torch

from ticketforge import recipe as recipes, structures
from ticketforge.errors import UserError
from ticketforge.masks import global_topk
from ticketforge.search.magnitude import lamp_scores


def test_lamp_score_is_a_weights_share_of_the_energy_at_or_above_it():
    w = torch.tensor([[3.0, -1.0], [2.0, 0.5]])
    s = lamp_scores({"w": w.abs()})["w"]
    # ascending |w|: 0.5, 1, 2, 3; squares 0.25, 1, 4, 9
    expect = torch.tensor([[9 / 9, 1 / 14], [4 / 13, 0.25 / 14.25]])
    assert torch.allclose(s, expect)


def test_lamp_keeps_each_layers_order_and_its_largest_weight_scores_one():
    g = torch.Generator().manual_seed(0)
    mags = {"a": torch.rand(8, 9, generator=g), "b": 0.01 * torch.rand(64, 72, generator=g)}
    scores = lamp_scores(mags)
    for k, m in mags.items():
        assert torch.equal(torch.argsort(scores[k].flatten()), torch.argsort(m.flatten()))
        assert scores[k].max() == 1.0


def test_global_empties_a_small_scale_layer_where_lamp_keeps_it():
    """The defect LAMP fixes: a wide layer of small weights (as weight decay and BatchNorm leave it)
    loses every weight under global |w| at high sparsity, and keeps some under LAMP."""
    g = torch.Generator().manual_seed(0)
    mags = {"small_wide": 0.01 * torch.rand(64, 576, generator=g), "stem": torch.rand(16, 9, generator=g)}
    keep = 100
    assert global_topk(mags, keep)["small_wide"].sum() == 0
    lamp = global_topk(lamp_scores(mags), keep)
    assert lamp["small_wide"].sum() > 0 and lamp["stem"].sum() > 0
    assert sum(int(m.sum()) for m in lamp.values()) == keep


@pytest.mark.parametrize("scope", ["lamp", "global"])
def test_the_method_reports_its_scope_and_ranks_by_it(make_ctx, scope):
    res = structures.find_ticket(make_ctx(["search.method=magnitude", f"search.scope={scope}", "search.sparsity=0.95"]))
    assert res.info["scope"] == scope
    kept = torch.cat([res.scores[k][m].flatten() for k, m in res.mask.items()])
    pruned = torch.cat([res.scores[k][~m].flatten() for k, m in res.mask.items()])
    assert kept.min() >= pruned.max()
    if scope == "lamp":
        assert all(m.any() for m in res.mask.values())  # no layer emptied


def test_default_scope_is_lamp_and_only_magnitude_reads_it():
    assert recipes.resolve("magnitude", []).search.scope == "lamp"
    with pytest.raises(UserError, match="scope"):
        recipes.resolve("cts", ["search.scope=global"])
    with pytest.raises(UserError, match="scope"):
        recipes.resolve("magnitude", ["search.scope=layer"])
