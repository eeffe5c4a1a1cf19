"""Pruning baselines CTS is compared with and sanity-checked against: random, SNIP, GraSP, SynFlow.

Each scores every prunable weight and keeps the global top-k (exactly the target count), starting
from `search.start` like every method. Magnitude is in magnitude.py."""
from __future__ import annotations

import copy

import torch
from torch import nn

from ticketforge import tasks
from ticketforge.masks import global_topk, keep_count, prunable
from ticketforge.search.base import SearchContext, SearchResult
from ticketforge.search.cts import bn_batch_stats
from ticketforge.search.start import starting_point

# SNIP and GraSP score on one mini-batch in their papers; a few batches average out its noise at
# no real cost (each is one backward pass, or two for GraSP).
SCORE_BATCHES = 8
# GraSP divides the logits by this temperature before the loss (Wang et al. 2020, their code: T = 200),
# so the Hessian-gradient product is not dominated by saturated softmax outputs.
GRASP_TEMPERATURE = 200.0


def _batches(ctx: SearchContext):
    for i, (x, y) in enumerate(ctx.train_loader()):
        if i >= SCORE_BATCHES:
            return
        yield x.to(ctx.device), y.to(ctx.device)


def _finish(ctx: SearchContext, start, scores: dict[str, torch.Tensor], name: str, **info) -> SearchResult:
    total = sum(s.numel() for s in scores.values())
    mask = global_topk(scores, keep_count(total, ctx.recipe.search.sparsity))
    return SearchResult(model=start.model, mask=mask, info={"method": name, **info, **start.info},
                        scores=scores, schedule=start.schedule)


def random_pruning(ctx: SearchContext) -> SearchResult:
    """Uniformly random weights kept: every layer ends at (about) the same density."""
    start = starting_point(ctx)
    g = torch.Generator().manual_seed(ctx.seed)
    scores = {k: torch.rand(w.shape, generator=g) for k, w in prunable(start.model).items()}
    return _finish(ctx, start, scores, "random")


def _cross_entropy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """The task's loss (per counted token for a language model: ticketforge.tasks)."""
    out, targets, _ = tasks.rows(tasks.of(model), model(x) / temperature, x, y)
    return nn.functional.cross_entropy(out, targets)


def snip(ctx: SearchContext) -> SearchResult:
    """SNIP (Lee et al. 2019): connection sensitivity |w * dL/dw|, summed over a few mini-batches."""
    start = starting_point(ctx)
    model = start.model
    weights = prunable(model)
    grads = {k: torch.zeros_like(w) for k, w in weights.items()}
    # Batch statistics, as in training: running statistics of a model at init are meaningless.
    with bn_batch_stats(model):
        for x, y in _batches(ctx):
            loss = _cross_entropy(model, x, y)
            for k, g in zip(weights, torch.autograd.grad(loss, list(weights.values()))):
                grads[k] += g
    scores = {k: (w.detach() * grads[k]).abs() for k, w in weights.items()}
    return _finish(ctx, start, scores, "snip", batches=SCORE_BATCHES)


def grasp(ctx: SearchContext) -> SearchResult:
    """GraSP (Wang et al. 2020): score = -w * (H g); the highest scores are removed, i.e. we keep
    the top-k of w * (H g), which preserves (or increases) the gradient flow g^T g."""
    start = starting_point(ctx)
    model = start.model
    weights = prunable(model)
    params = list(weights.values())
    with bn_batch_stats(model):
        g = [torch.zeros_like(w) for w in params]
        for x, y in _batches(ctx):
            loss = _cross_entropy(model, x, y, GRASP_TEMPERATURE)
            for acc, gi in zip(g, torch.autograd.grad(loss, params)):
                acc += gi
        hg = [torch.zeros_like(w) for w in params]
        for x, y in _batches(ctx):
            loss = _cross_entropy(model, x, y, GRASP_TEMPERATURE)
            gf = torch.autograd.grad(loss, params, create_graph=True)
            z = sum((gi * gfi).sum() for gi, gfi in zip(g, gf))  # g^T (dL/dw), its gradient is H g
            for acc, h in zip(hg, torch.autograd.grad(z, params)):
                acc += h
    scores = {k: w.detach() * h for (k, w), h in zip(weights.items(), hg)}
    return _finish(ctx, start, scores, "grasp", batches=SCORE_BATCHES, temperature=GRASP_TEMPERATURE)


@torch.no_grad()
def _linearize(model: nn.Module) -> dict[str, torch.Tensor]:
    """|.| of every floating parameter and buffer (SynFlow's linearisation); returns the signs."""
    signs = {}
    for k, t in model.state_dict().items():
        if t.is_floating_point():
            signs[k] = torch.sign(t)
            t.abs_()
    return signs


def synflow(ctx: SearchContext) -> SearchResult:
    """SynFlow (Tanaka et al. 2020): data-free. On |W| (every parameter and buffer made positive,
    as the authors' code does, BatchNorm in eval mode) and an all-ones input, R = 1^T f(1);
    score = |w * dR/dw|. Pruned iteratively over `search.synflow_rounds` rounds with the
    exponential schedule density_r = density^(r / rounds), so no layer collapses."""
    start = starting_point(ctx)
    rounds = ctx.recipe.search.synflow_rounds
    # Scored on a float64 copy: R is a product over all layers and over/underflows in float32.
    net = copy.deepcopy(start.model).double().eval()
    _linearize(net)
    weights = prunable(net)
    originals = {k: w.detach().clone() for k, w in weights.items()}
    total = sum(w.numel() for w in weights.values())
    density = 1.0 - ctx.recipe.search.sparsity
    shape = (1, *ctx.data.input_shape)
    mask = {k: torch.ones_like(w, dtype=torch.bool) for k, w in weights.items()}
    for r in range(1, rounds + 1):
        with torch.no_grad():
            for k, w in weights.items():
                w.copy_(originals[k] * mask[k])
        out = net(torch.ones(shape, dtype=torch.float64, device=ctx.device))
        grads = torch.autograd.grad(out.sum(), list(weights.values()))
        # Pruned weights stay pruned: they score below anything kept.
        scores = {k: torch.where(mask[k], (w.detach() * g).abs(), torch.full_like(w, -1.0)).float().cpu()
                  for (k, w), g in zip(weights.items(), grads)}
        if r < rounds:  # the last round's pruning is _finish's exact global top-k
            kept = global_topk(scores, keep_count(total, 1.0 - density ** (r / rounds)))
            mask = {k: m.to(ctx.device) for k, m in kept.items()}
    return _finish(ctx, start, scores, "synflow", rounds=rounds)
