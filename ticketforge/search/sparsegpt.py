"""SparseGPT (Frantar & Alistarh 2023, "SparseGPT: Massive Language Models Can Be Accurately Pruned
in One-Shot"): each layer is pruned by optimal brain surgeon steps on its own reconstruction
problem min ||W X - W' X||^2, with the Hessian H = X^T X of its calibration inputs (plus 1% of its
mean diagonal, the paper's dampening), and the weights it keeps are updated to make up for the
ones it removes. It changes the weights: the search returns the updated model with its mask.

As the paper's code: the inverse Hessian by Cholesky, columns in blocks of 128 (the lazy batch
updates), within a block a weight's saliency w^2 / [H^-1]_jj^2; unstructured prunes the lowest
saliencies of each block (all rows together, so every layer ends at the target sparsity), N:M
(a structure's "weights" units) the M - N lowest of every M columns as the block reaches them.
Input features no calibration sample touches (a zero diagonal) have their weights removed first.

Layer by layer, sequentially, as the paper does: the layers are taken in the order the forward
reaches them, and each one's inputs come from the model whose earlier layers are already pruned
and updated (one pass over the calibration sample per step, stopped once the step's layers have
their inputs). Layers the forward calls on the same input tensor (a transformer's q, k and v) are
one step. A convolution is its im2col matrix, columns ordered (kernel position, input channel)
so that an N:M group is M input channels at one kernel position (ticketforge.structures.nm), one
problem per group of a grouped convolution. Transposed and 3-d convolutions, and layers the forward
never reaches (or calls by keyword), are pruned by magnitude within the same blocks, without an
update (the identity as their Hessian); the report lists them under `not_reconstructed`."""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from ticketforge import structures
from ticketforge.errors import UserError
from ticketforge.masks import Mask, prunable
from ticketforge.search.base import SearchContext, SearchResult, Units
from ticketforge.search.calibration import Calibration, Stop, calibration
from ticketforge.search.wanda import owner

DAMP = 0.01   # the paper's dampening, a fraction of the mean diagonal of H
BLOCK = 128   # columns per block of lazy updates (the paper's B)
RETRIES = 4   # a Hessian Cholesky cannot factor gets 10x the dampening, this many times


def reconstructs(module: nn.Module) -> bool:
    """Whether the layer's inputs can be turned into its reconstruction problem here."""
    if isinstance(module, nn.Linear):
        return True
    return isinstance(module, (nn.Conv1d, nn.Conv2d)) and not module.transposed


def as_problem(module: nn.Module, w: torch.Tensor) -> torch.Tensor:
    """A weight (dim 0 its rows, dim 1 the reduction dim, then the kernel) as (groups, rows per
    group, columns), a convolution's columns ordered (kernel position, dim 1)."""
    if w.dim() == 2:
        return w.reshape(1, *w.shape)
    g = module.groups
    k, c = w.shape[:2]
    return w.reshape(g, k // g, c, -1).transpose(2, 3).reshape(g, k // g, -1)


def from_problem(module: nn.Module, p: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """as_problem's inverse."""
    if len(shape) == 2:
        return p.reshape(shape)
    g = module.groups
    k, c = shape[:2]
    return p.reshape(g, k // g, -1, c).transpose(2, 3).reshape(shape)


def input_rows(module: nn.Module, x: torch.Tensor, calib: Calibration) -> torch.Tensor:
    """The layer's input as the rows of its reconstruction problem: (rows, groups, columns)."""
    if isinstance(module, nn.Linear):
        rows = calib.rows(x)
        return rows.reshape(rows.shape[0], 1, -1)
    conv1d = x.dim() == 3
    if conv1d:  # as a 2-d convolution of height 1
        x = x.unsqueeze(2)
    pad = module.padding
    if isinstance(pad, str) or module.padding_mode != "zeros":
        mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
        x, pad = F.pad(x, module._reversed_padding_repeated_twice, mode=mode), 0

    def two(v, fill=1):  # a 2-d convolution's pair; a 1-d one's height is 1 (padding 0)
        v = (v, v) if isinstance(v, int) else tuple(v)
        return (fill, v[-1]) if conv1d else v

    kernel = two(module.kernel_size)
    cols = F.unfold(x, kernel, dilation=two(module.dilation), padding=two(pad, fill=0),
                    stride=two(module.stride))  # (N, C x kernel positions, positions)
    n, _, positions = cols.shape
    g = module.groups
    cols = cols.reshape(n, g, -1, kernel[0] * kernel[1], positions).permute(0, 4, 1, 3, 2)
    cols = cols.reshape(n, positions, g, -1)  # (N, positions, groups, kernel position x channel)
    if calib.mask is not None and conv1d and calib.mask.shape == (n, positions):
        return cols[calib.mask]
    return cols.reshape(-1, g, cols.shape[-1])


def _inverse_cholesky(h: torch.Tensor) -> torch.Tensor:
    """The upper Cholesky factor of the inverse of the dampened H, per group."""
    diag = torch.diagonal(h, dim1=-2, dim2=-1)
    damp = DAMP * diag.mean(-1)
    eye = torch.eye(h.shape[-1], device=h.device, dtype=h.dtype)
    for _ in range(RETRIES + 1):
        try:
            lower = torch.linalg.cholesky(h + damp[:, None, None] * eye)
            return torch.linalg.cholesky(torch.cholesky_inverse(lower), upper=True)
        except torch.linalg.LinAlgError:
            damp = damp * 10
    raise UserError("sparsegpt: a layer's Hessian of its calibration inputs is not positive definite even with "
                    f"{DAMP * 10 ** RETRIES:g} x its mean diagonal added; raise search.calibration_samples")


@torch.no_grad()
def obs_prune(w: torch.Tensor, h: torch.Tensor, sparsity: float | None = None,
              pattern: tuple[int, int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """SparseGPT on one layer: `w` (groups, rows, columns), `h` (groups, columns, columns) its
    inputs' X^T X. Prunes `sparsity` of every block of columns, or with `pattern` (N, M) keeps N of
    every M columns in each row. Returns the updated weight (pruned entries 0) and the kept mask."""
    w, h = w.clone().float(), h.clone().float()
    dead = torch.diagonal(h, dim1=-2, dim2=-1) == 0  # (groups, columns): inputs never seen
    torch.diagonal(h, dim1=-2, dim2=-1)[dead] = 1
    w.masked_fill_(dead[:, None, :], 0)
    hinv = _inverse_cholesky(h)
    g, rows, columns = w.shape
    pruned = torch.zeros_like(w, dtype=torch.bool)
    for i1 in range(0, columns, BLOCK):
        i2 = min(i1 + BLOCK, columns)
        w1, hinv1 = w[:, :, i1:i2].clone(), hinv[:, i1:i2, i1:i2]
        q1, err1 = torch.zeros_like(w1), torch.zeros_like(w1)
        d = torch.diagonal(hinv1, dim1=-2, dim2=-1)[:, None, :]  # (groups, 1, block)
        mask1 = torch.zeros_like(w1, dtype=torch.bool)
        if pattern is None:
            saliency = (w1 ** 2 / d ** 2).reshape(g, -1)
            drop = int(round(saliency.shape[1] * sparsity))
            if drop:
                mask1.view(g, -1).scatter_(1, torch.topk(saliency, drop, dim=1, largest=False).indices, True)
        for i in range(i2 - i1):
            if pattern is not None and i % pattern[1] == 0:
                n, m = pattern
                saliency = w1[:, :, i:i + m] ** 2 / d[:, :, i:i + m] ** 2
                mask1[:, :, i:i + m].scatter_(2, torch.topk(saliency, m - n, dim=2, largest=False).indices, True)
            col = w1[:, :, i]
            q = col.masked_fill(mask1[:, :, i], 0)
            err = (col - q) / hinv1[:, i, i][:, None]
            w1[:, :, i:] -= err[:, :, None] * hinv1[:, i, i:][:, None, :]
            q1[:, :, i], err1[:, :, i] = q, err
        w[:, :, i1:i2] = q1
        w[:, :, i2:] -= err1 @ hinv[:, i1:i2, i2:]
        pruned[:, :, i1:i2] = mask1
    return w, ~pruned


def reconstruction_error(w: torch.Tensor, new: torch.Tensor, h: torch.Tensor) -> float:
    """||W X - W' X||^2 / ||W X||^2 on the calibration inputs, from H = X^T X."""
    delta = (w - new).float()
    lost = torch.einsum("gri,gij,grj->", delta, h, delta)
    kept = torch.einsum("gri,gij,grj->", w.float(), h, w.float())
    return float(lost / kept.clamp_min(torch.finfo(kept.dtype).tiny))


def forward_steps(model: nn.Module, names: list[str], calib: Calibration) -> tuple[list[list[str]], bool]:
    """`names` in the order one forward reaches their layers, layers called one after the other on
    the same input tensor together; and whether every layer is called once (a step's pass may then
    stop at its last layer). Layers the forward never reaches, or calls by keyword, are left out."""
    layers = {id(owner(model, n)): n for n in names}
    order, calls, last = [], {}, {}

    def hook(module, args):
        n = layers[id(module)]
        calls[n] = calls.get(n, 0) + 1
        if calls[n] > 1 or not args:  # called by keyword: left to the magnitude fallback
            return
        if order and args[0] is last.get("input"):
            order[-1].append(n)
        else:
            order.append([n])
        last["input"] = args[0]  # held, so that its memory is not reused by another tensor

    handles = [owner(model, n).register_forward_pre_hook(hook) for n in names]
    probe = Calibration(batches=[calib.batches[0][:2]], device=calib.device, packed=calib.packed)
    try:
        probe.run(model)
    finally:
        for h in handles:
            h.remove()
    return order, all(c == 1 for c in calls.values())


def hessians(model: nn.Module, step: list[str], calib: Calibration, stop: bool) -> dict[str, torch.Tensor]:
    """X^T X of each layer's inputs over the calibration sample, per group, as the model is now."""
    out, seen = {}, set()

    def hook(name, module, args):
        if name in seen:  # every layer is called once per forward: a new batch
            seen.clear()
        x = input_rows(module, args[0].detach(), calib).float()
        xtx = torch.einsum("pgi,pgj->gij", x, x)
        out[name] = out[name] + xtx if name in out else xtx
        seen.add(name)
        if stop and len(seen) == len(step):
            raise Stop

    handles = [owner(model, n).register_forward_pre_hook(lambda mod, args, n=n: hook(n, mod, args)) for n in step]
    try:
        calib.run(model)
    finally:
        for h in handles:
            h.remove()
    return out


@torch.no_grad()
def prune_layers(model: nn.Module, names: list[str], calib: Calibration, sparsity: float | None = None,
                 pattern: tuple[int, int] | None = None) -> tuple[Mask, dict]:
    """SparseGPT on the named layers of `model`, in place, one forward step after the other."""
    weights = prunable(model)
    steps, once = forward_steps(model, [n for n in names if reconstructs(owner(model, n))], calib)
    mask, errors = Mask(), {}
    for step in steps:
        for n, h in hessians(model, step, calib, stop=once).items():
            module, w = owner(model, n), weights[n]
            problem = as_problem(module, w.detach().float())
            new, kept = obs_prune(problem, h, sparsity, pattern)
            errors[n] = round(reconstruction_error(problem, new, h), 6)
            w.copy_(from_problem(module, new, w.shape).to(w.dtype))
            mask[n] = from_problem(module, kept, w.shape).cpu()
    missing = [n for n in names if n not in mask]
    for n in missing:  # magnitude within the same blocks: the identity for H
        module, w = owner(model, n), weights[n]
        problem = as_problem(module, w.detach().float())
        eye = torch.eye(problem.shape[2], device=w.device).expand(problem.shape[0], -1, -1)
        new, kept = obs_prune(problem, eye, sparsity, pattern)
        w.copy_(from_problem(module, new, w.shape).to(w.dtype))
        mask[n] = from_problem(module, kept, w.shape).cpu()
    info = {"reconstruction_error": errors, "calibration_samples": calib.samples, "steps": len(steps)}
    if missing:
        info["not_reconstructed"] = missing
    return Mask({n: mask[n] for n in names}), info


def sparsegpt(ctx: SearchContext) -> SearchResult:
    """Unstructured: `search.sparsity` of every prunable layer, the kept weights updated."""
    model = ctx.model
    mask, info = prune_layers(model, list(prunable(model)), calibration(ctx, model),
                              sparsity=ctx.recipe.search.sparsity)
    return SearchResult(model=model, mask=mask, info={"method": "sparsegpt", "start": "trained", **info})


def score_units(ctx: SearchContext, units: Units) -> tuple[dict[str, torch.Tensor], dict]:
    """N:M: the structure's layers pruned and updated in place (units.model is the model the structure
    keeps); the scores are the kept mask (1 kept, 0 removed), exactly N of every M, which the
    structure's N-of-M choice then reproduces."""
    pattern = getattr(structures.get(ctx.recipe.convert.structure), "pattern", None)
    if units.kind != "weights" or pattern is None:
        raise UserError(f"search method 'sparsegpt' chooses N:M masks itself; structure "
                        f"'{ctx.recipe.convert.structure}' has no N:M pattern")
    mask, info = prune_layers(units.model, list(units.shapes), calibration(ctx, units.model),
                              pattern=(pattern.n, pattern.m))
    return {n: m.float() for n, m in mask.items()}, {"method": "sparsegpt", **info}
