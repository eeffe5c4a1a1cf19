import copy

import pytest
import torch

from ticketforge import structures
from ticketforge.masks import keep_count
from ticketforge.search.baselines import _linearize


def rounds(method: str, n: int) -> list[str]:
    """search.synflow_rounds, which only SynFlow reads (any other method refuses it)."""
    return [f"search.synflow_rounds={n}"] if method == "synflow" else []


@pytest.mark.parametrize("method", ["magnitude", "random", "snip", "grasp", "synflow"])
@pytest.mark.parametrize("sparsity", [0.5, 0.97])
def test_each_baseline_keeps_the_exact_count(make_ctx, method, sparsity):
    ctx = make_ctx([f"search.method={method}", f"search.sparsity={sparsity}", *rounds(method, 5)])
    res = structures.find_ticket(ctx)
    assert res.mask.kept == keep_count(res.mask.total, sparsity)
    assert res.info["method"] == method
    # the mask is what the scores say: every kept score >= every pruned score
    kept = torch.cat([res.scores[k][m].flatten() for k, m in res.mask.items()])
    pruned = torch.cat([res.scores[k][~m].flatten() for k, m in res.mask.items()])
    assert kept.min() >= pruned.max()


def test_scoring_leaves_the_weights_alone(make_ctx):
    for method in ("snip", "grasp", "synflow"):
        ctx = make_ctx([f"search.method={method}", *rounds(method, 3)])
        before = {k: v.clone() for k, v in ctx.model.state_dict().items()}
        structures.find_ticket(ctx)
        assert all(torch.equal(before[k], v) for k, v in ctx.model.state_dict().items()), method


def test_synflow_keeps_the_network_connected(make_ctx):
    """Iterative SynFlow never disconnects input from output, even at 99% (its point): the
    linearised masked network still carries flow. (Residual branches may go entirely: the
    identity shortcuts carry it.)"""
    ctx = make_ctx(["search.method=synflow", "search.sparsity=0.99", "search.synflow_rounds=20"])
    res = structures.find_ticket(ctx)
    net = copy.deepcopy(res.model).double().eval()
    _linearize(net)
    res.mask.apply(net)
    with torch.no_grad():
        assert float(net(torch.ones(1, 1, 8, 8, dtype=torch.float64)).sum()) > 0


def test_random_depends_on_the_seed(make_ctx):
    a = structures.find_ticket(make_ctx(["search.method=random"]))
    ctx = make_ctx(["search.method=random"])
    ctx.seed = 1
    b = structures.find_ticket(ctx)
    assert any(not torch.equal(a.mask[k], b.mask[k]) for k in a.mask)


@pytest.mark.parametrize("method", ["snip", "synflow"])
def test_baselines_search_at_init(make_ctx, method):
    ctx = make_ctx([f"search.method={method}", "search.start=init", *rounds(method, 3)])
    res = structures.find_ticket(ctx)
    assert res.model is not ctx.model and res.schedule.start_epoch == 0
