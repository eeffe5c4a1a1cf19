"""Concrete Ticket Search (Arora & Teuscher 2025, arXiv 2512.07142).

One logit per prunable weight; at every forward pass a soft mask is drawn from a Binary Concrete
distribution; the weights are frozen and only the logits learn, so that the masked network's
outputs stay close to the dense network's (reverse KL by default). GRADBALANCE steers the expected
number of kept weights to a budget. The final mask is the global top-k of the logits.

The loop (`concrete_search`) is written over generic gates with a cost each, so the same code
searches weights (cost 1 per weight) and coupled channel groups (cost = MACs per channel)."""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import math
import time
import weakref
from collections.abc import Mapping, Sequence
from typing import Callable

import torch
import torch.distributed as dist
from torch import nn
from torch.func import functional_call
from torch.nn.utils import parametrize
from torch.utils.checkpoint import checkpoint

from ticketforge import device as device_mod, tasks
from ticketforge.errors import UserError
from ticketforge.masks import Mask, global_topk, keep_count, prunable, topk_masks
from ticketforge.search.base import SearchContext, SearchResult, Units
from ticketforge.search.start import starting_point

# The paper scales each objective so its gradient is comparable to the sparsity gradient.
OBJECTIVE_SCALE = {"reverse_kl": 100.0, "forward_kl": 100.0, "ce": 100.0}
LR_DROP_AT = 0.88  # Adam lr x0.1 at 88% of the search, as in the authors' code


def concrete_sample(logits: torch.Tensor, temperature: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Binary Concrete relaxation, drawn afresh each call: m = sigmoid(a + L / t), L logistic noise.
    (Not hard-concrete: no stretching, no clamping, no straight-through estimator.)

    The authors' code (TLAB models/LotteryLayers.py) stores alpha = a t (initialised at t logit(k))
    and computes sigmoid((L + alpha) / t), which is this same m. Read as written here, 1 / t = 1.5
    enlarges the logistic noise by 1.5x against the logit, and P(m > 1/2) = P(L > -a t) = sigmoid(a t):
    the temperature neither sharpens the gate nor leaves its probability alone. The balance below
    counts sum sigmoid(a), the gate's value at zero noise; the authors count sum sigmoid(alpha) =
    sum sigmoid(a t), the probability that a gate is on (we keep sigmoid(a): measured, it is what
    our recipes were tuned with, and on MNIST-1D the authors' count searched worse: docs/benchmarks.md, "How long
    CTS searches"; the final global top-k makes the count exact either way)."""
    u = torch.rand(logits.shape, generator=generator, device=logits.device, dtype=logits.dtype).clamp_(1e-10, 1 - 1e-10)
    return torch.sigmoid(logits + (torch.log(u) - torch.log1p(-u)) / temperature)


class _SeededConcrete(torch.autograd.Function):
    """concrete_sample with the noise drawn from its own seed: the backward pass draws the same noise
    again and recomputes the mask instead of keeping it (autograd's sigmoid would keep every mask,
    the size of the weights, until the backward pass)."""

    @staticmethod
    def forward(ctx, logits, seed, temperature):
        ctx.save_for_backward(logits)
        ctx.seed, ctx.temperature = seed, temperature
        return _seeded(logits, seed, temperature)

    @staticmethod
    def backward(ctx, grad):
        logits, = ctx.saved_tensors
        with torch.no_grad():
            m = _seeded(logits, ctx.seed, ctx.temperature)
        return torch.ops.aten.sigmoid_backward(grad, m), None, None


def _seeded(logits: torch.Tensor, seed: int, temperature: float) -> torch.Tensor:
    return concrete_sample(logits, temperature, torch.Generator(device=logits.device).manual_seed(seed))


class Draw(Sequence):
    """One step's Binary Concrete masks of the gates `logits`, each computed where it is read (and
    again in the backward pass) from a seed of its own drawn from torch's global generator: a step
    never holds every mask at once."""

    def __init__(self, logits: list[torch.Tensor], temperature: float):
        self.logits, self.temperature = logits, temperature
        self.seeds = torch.randint(2 ** 62, (len(logits),)).tolist()

    def __len__(self) -> int:
        return len(self.logits)

    def __getitem__(self, i: int) -> torch.Tensor:
        return _SeededConcrete.apply(self.logits[i], self.seeds[i], self.temperature)


class _Named(Mapping):
    """A Draw read by gate name, as a structure's `overrides` reads its soft masks."""

    def __init__(self, names: list[str], draw: Draw):
        self.index, self.draw = {n: i for i, n in enumerate(names)}, draw

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.draw[self.index[name]]

    def __iter__(self):
        return iter(self.index)

    def __len__(self) -> int:
        return len(self.index)


class _WeightGates:
    """Unstructured CTS's gates inside the layers: every gated weight is parametrized as weight x
    mask, the mask read from the step's Draw when the layer reads its weight (the teacher's forward
    reads the plain weight). What autograd would keep of a masked weight for the backward pass (the
    masked weight, or a view of it such as Linear's transpose) is recomputed there instead
    (saved_tensors_hooks): the search holds no masked copy of the weights. Under autocast the masked
    weight is made in the autocast dtype, so that the layer's own cast is no copy to keep either.
    With `checkpoint` (search.checkpoint) every layer of the model's nn.ModuleLists runs under
    activation checkpointing: its forward, masked weights included, is redone in the backward pass."""

    def __init__(self, model: nn.Module, names: list[str], checkpoint: bool = False):
        self.model, self.names, self.checkpoint = model, names, checkpoint
        self.draw: Draw | None = None
        self.made: dict[int, tuple] = {}
        self.owners: list[tuple[nn.Module, list[str]]] = []
        self.layers: list[nn.Module] = []
        self.use_cache = None

    def __enter__(self):
        config = getattr(self.model, "config", None)
        if getattr(config, "use_cache", False):
            # A transformers model given through the Python API may keep its KV cache on (the loader
            # turns it off): each forward would then build a cache nothing reads, and a checkpointed
            # layer's recomputation would append its keys to it a second time.
            self.use_cache, config.use_cache = True, False
        modules = dict(self.model.named_modules())
        holders = {}  # a weight tied to others (an LM head and its embedding) is gated wherever it is used
        for mod in modules.values():
            w = mod._parameters.get("weight")
            if w is not None:
                holders.setdefault(id(w), []).append(mod)
        for i, name in enumerate(self.names):
            for owner in holders[id(modules[name.rpartition(".")[0]].weight)]:
                if parametrize.is_parametrized(owner, "weight"):  # two names for one shared weight: one gate
                    continue
                self.owners.append((owner, list(owner._parameters)))
                parametrize.register_parametrization(owner, "weight", _Gated(self, i))
        if self.checkpoint:
            # Each layer's forward is recomputed in the backward pass, its masked weights with it
            # (from the step's Draw, still set then): only the layers' inputs are kept.
            gated = {id(owner) for owner, _ in self.owners}
            for layers in [m for m in modules.values() if isinstance(m, nn.ModuleList)]:
                for layer in layers:
                    if any(id(m) in gated for m in layer.modules()) and "forward" not in vars(layer):
                        layer.forward = functools.partial(checkpoint, layer.forward, use_reentrant=False)
                        self.layers.append(layer)
        return self

    def __exit__(self, *exc):
        if self.use_cache:
            self.model.config.use_cache, self.use_cache = True, None
        for layer in self.layers:
            del layer.forward
        self.layers = []
        for owner, order in self.owners:  # the original Parameter objects go back, in their order
            parametrize.remove_parametrizations(owner, "weight", leave_parametrized=False)
            params = owner._parameters
            ordered = [(k, params[k]) for k in order]
            params.clear()
            params.update(ordered)
        self.owners, self.made, self.draw = [], {}, None
        return False

    def teacher(self, x: torch.Tensor):
        self.draw = None
        return self.model(x)

    def student(self, draw: Draw, x: torch.Tensor):
        # the draw stays set through the backward pass, where masked weights are recomputed from it
        self.draw = draw
        self.made.clear()
        with torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack):
            return self.model(x)

    def masked(self, i: int, w: torch.Tensor, draw: Draw) -> torch.Tensor:
        out = w * draw[i].to(w.dtype)
        if torch.is_autocast_enabled(w.device.type):
            out = out.to(torch.get_autocast_dtype(w.device.type))
        return out

    def _gate(self, i: int, w: torch.Tensor) -> torch.Tensor:
        if self.draw is None:
            return w
        out = self.masked(i, w, self.draw)
        self.made[id(out)] = (weakref.ref(out), i, w, self.draw)
        return out

    def _pack(self, t: torch.Tensor):
        for base in (t, t._base):
            entry = self.made.get(id(base)) if base is not None else None
            if entry is not None and entry[0]() is base:
                return _Recompute(entry[1:], base is t, t.size(), t.stride(), t.storage_offset())
        return t

    def _unpack(self, packed):
        if not isinstance(packed, _Recompute):
            return packed
        i, w, draw = packed.entry
        with torch.no_grad():
            base = self.masked(i, w, draw)
        return base if packed.whole else base.as_strided(packed.size, packed.stride, packed.offset)


@dataclasses.dataclass
class _Recompute:
    entry: tuple
    whole: bool
    size: torch.Size
    stride: tuple
    offset: int


class _Gated(nn.Module):
    """The parametrization of gated weight i."""

    def __init__(self, gates: _WeightGates, i: int):
        super().__init__()
        self.gates, self.i = [gates], i  # in a list: not a submodule

    def forward(self, w):
        return self.gates[0]._gate(self.i, w)


# A language model's objective over (tokens, vocabulary) logits is computed in chunks of rows of at
# most this many elements, each recomputed in the backward pass (torch.utils.checkpoint): the
# log-softmaxes, probabilities and differences of the whole vocabulary for every token are never held
# at once. GPT-2 at batch 8 x 128 has 51M logits; those temporaries were 5 copies of them (docs/memory.md).
OBJECTIVE_CHUNK = 1 << 22


def _row_losses(name: str, student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    student = student.float()
    if name == "ce":
        return nn.functional.cross_entropy(student, labels, reduction="none")
    ls, lt = torch.log_softmax(student, 1), torch.log_softmax(teacher.float(), 1)
    if name == "reverse_kl":  # KL(p_sparse || p_dense)
        return (ls.exp() * (ls - lt)).sum(1)
    return (lt.exp() * (lt - ls)).sum(1)  # forward: KL(p_dense || p_sparse)


def objective(name: str, student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    rows, classes = student.shape
    step = max(1, OBJECTIVE_CHUNK // max(classes, 1))
    if rows <= step:
        return OBJECTIVE_SCALE[name] * _row_losses(name, student, teacher, labels).mean()
    total = sum(checkpoint(lambda s, t, y: _row_losses(name, s, t, y).sum(), student[i:i + step], teacher[i:i + step],
                           labels[i:i + step], use_reentrant=False) for i in range(0, rows, step))
    return OBJECTIVE_SCALE[name] * total / rows


def _all_mean(t: torch.Tensor) -> torch.Tensor:
    """Average across data-parallel ranks (identity in a single process)."""
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        t /= dist.get_world_size()
    return t


class GradBalance:
    """Sparsity control. Budget D = slack x kept cost; error s = (E[cost] / D - 1) x 100 with
    E[cost] = sum_g c_g sigmoid(a_g); analytic gradient g_s = (100 / D) c_g sigmoid(a)(1 - sigmoid(a)).

    gradbalance: lam* = ||g_task|| / ||g_s|| when s > 0 else 0; lam <- 0.99 lam + 0.01 lam*.
    lagrange:    lam <- max(0, lam + lr_lam * s), gradient ascent on lam * s.

    GRADBALANCE is a balance, not a constraint: it makes the sparsity gradient as large as the task
    gradient. When the task gradient is concentrated on few gates (the usual case) the rest are
    driven off and the expected count falls to the budget; when the task wants nearly every gate on,
    the expectation settles above the budget (measured on toy problems, tests/test_cts.py). The
    final global top-k is what makes the count exact.

    Everything stays on the logits' device (s and lam are 0-dim tensors): a step makes no host
    sync, which on a GPU would stall the queue once per layer."""

    def __init__(self, budget: float, mode: str = "gradbalance", lagrange_lr: float = 1e-3):
        self.budget, self.mode, self.lagrange_lr = budget, mode, lagrange_lr
        self.lam: torch.Tensor | None = None

    @torch.no_grad()
    def expected(self, logits: list[torch.Tensor], costs: list[torch.Tensor]) -> float:
        return float(sum((torch.sigmoid(a.detach()) * c).sum() for a, c in zip(logits, costs)))

    def combine(self, logits: list[torch.Tensor], costs: list[torch.Tensor],
                task_grads: list[torch.Tensor]) -> tuple[list[torch.Tensor], torch.Tensor]:
        """task_grads + lam * the sparsity gradient, added into task_grads in place (and returned).
        The sparsity gradient is computed one gate tensor at a time, twice (for its norm, then to add
        it): never all at once, which would be three more copies of the logits' size."""
        with torch.no_grad():
            kept, norms = [], []
            for a, c in zip(logits, costs):
                p = torch.sigmoid(a)
                kept.append((p * c).sum())
                norms.append(torch.linalg.vector_norm((100.0 / self.budget) * c * p * (1 - p)))
            s = (torch.stack(kept).sum() / self.budget - 1.0) * 100.0
            if self.mode == "gradbalance":
                nt = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in task_grads]))
                ns = torch.linalg.vector_norm(torch.stack(norms))
                lam_star = torch.where(s > 0, nt / ns.clamp_min(1e-12), torch.zeros_like(nt))
                lam_star = _all_mean(lam_star.double()).to(nt.dtype)
                self.lam = lam_star if self.lam is None else 0.99 * self.lam + 0.01 * lam_star
            else:
                # The authors' code does not clamp lam at 0. Unclamped, lam turns negative below the
                # budget, pushes every gate up, and with Adam the two overshoot until the gates
                # saturate at 0 (measured on the toy in tests/test_cts.py: expected count 1 of 220).
                lam = torch.zeros_like(s) if self.lam is None else self.lam
                self.lam = (lam + self.lagrange_lr * s).clamp_min(0.0)
            for a, c, g in zip(logits, costs, task_grads):
                p = torch.sigmoid(a)
                g.add_(self.lam * ((100.0 / self.budget) * c * p * (1 - p)))
            return task_grads, s


def bn_batch_stats(model: nn.Module):
    """Context: BatchNorm layers normalise by batch statistics without touching the running ones.
    A trained model's running statistics are wrong for a very sparse subnetwork; with them the
    search optimises against a mis-normalised student (measured: 31-34% vs 93% final accuracy)."""
    class _Ctx:
        def __enter__(self):
            self.saved = []
            for m in model.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    tracked = None if m.num_batches_tracked is None else m.num_batches_tracked.clone()
                    self.saved.append((m, m.training, m.momentum, tracked))
                    m.train()
                    m.momentum = 0.0  # running = (1 - 0) * running + 0 * batch: unchanged
            return self

        def __exit__(self, *exc):
            for m, training, momentum, tracked in self.saved:
                m.train(training)
                m.momentum = momentum
                if tracked is not None:  # train mode counts batches; the model must come back as it was
                    m.num_batches_tracked.copy_(tracked)
            return False
    return _Ctx()


def search_steps(ctx: SearchContext, batches_per_epoch: int) -> int:
    """The search's length, and with a stop rule its cap: search.steps, else search.epochs but at
    least search.min_steps (a small data set's epochs are few steps, and the count of mask samples
    is what sorts the logits: 78 steps on digits lost 10-15 points at 98% against 200)."""
    cfg = ctx.recipe.search
    if cfg.steps > 0:
        return cfg.steps
    return max(1, cfg.min_steps, int(round(cfg.epochs * batches_per_epoch)))


def search_precision(device: torch.device) -> device_mod.Precision:
    """The training precision, except fp16: without loss scaling the gate-logit gradients (products
    of weights, masks and sigmoid slopes of ~1e-3) underflow to zero in fp16, and a GPU without
    bf16 searches in fp32 instead (the search has no weight gradients, so fp32 costs little)."""
    prec = device_mod.precision(device)
    return device_mod.Precision(enabled=False) if prec.scaled else prec


@dataclasses.dataclass
class StopRule:
    """Stop a search once its result has stopped changing: the set of the `keep` highest logits
    (the mask the search will return) is compared every `every` steps with the set at the check
    before; when the overlap |A & B| / keep stays above `overlap` for `window` checks in a row, the
    search is done."""
    keep: int
    overlap: float = 0.999
    window: int = 5
    every: int = 10

    @classmethod
    def from_recipe(cls, cfg, keep: int, batches_per_epoch: int) -> "StopRule | None":
        if cfg.stop_overlap >= 1.0 or keep <= 0:
            return None
        every = cfg.check_every or max(1, batches_per_epoch // 4)
        return cls(keep=keep, overlap=cfg.stop_overlap, window=cfg.stop_window, every=every)


class _TopK:
    """The top-k set of the logits, tracked across checks."""

    def __init__(self, rule: StopRule):
        self.rule, self.prev, self.run, self.last = rule, None, 0, None

    @torch.no_grad()
    def converged(self, params: list[torch.Tensor]) -> bool:
        k = min(self.rule.keep, sum(a.numel() for a in params))
        cur = topk_masks(params, k)
        if self.prev is not None:
            self.last = float(sum((c & p).sum() for c, p in zip(cur, self.prev))) / k
            self.run = self.run + 1 if self.last > self.rule.overlap else 0
        self.prev = cur
        return self.run >= self.rule.window


def optimise_gates(params: list[torch.Tensor], costs: list[torch.Tensor], kept_cost: float,
                   loss_fn: Callable[[Draw, torch.Tensor, torch.Tensor], torch.Tensor],
                   batches, total: int, *, lr: float, temperature: float, balance: str = "gradbalance",
                   budget_slack: float = 1.1, stop: StopRule | None = None, ui=None,
                   desc: str = "search (CTS)") -> dict:
    """The CTS loop over generic gates (leaf tensors `params`, trained in place): at every step a
    Binary Concrete sample of each gate goes through `loss_fn(soft_masks, x, y)` (a Draw: soft_masks[i]
    is gate i's mask, computed when read), GRADBALANCE adds
    the sparsity gradient, Adam steps. Runs `total` steps (lr x0.1 at 88% of them), or fewer when
    `stop` says the top-k set has converged. The loss is only read back to the host at checks."""
    # foreach=False: the multi-tensor Adam (CUDA's default) makes temporaries of every logit at once
    opt = torch.optim.Adam(params, lr=lr, foreach=False)
    gb = GradBalance(budget_slack * kept_cost, balance, lagrange_lr=0.01 * lr)
    every = stop.every if stop is not None else max(1, min(50, total // 20))
    topk = _TopK(stop) if stop is not None else None
    drop_at = int(LR_DROP_AT * total)
    step, t0, reason, pending = 0, time.perf_counter(), "cap", 0
    loss_sum, n_sum = None, 0
    last = {}
    per_epoch = len(batches) if hasattr(batches, "__len__") else 0
    progress = ui.progress(desc, total, per_epoch=per_epoch) if ui is not None else contextlib.nullcontext(lambda n=1, **kw: None)
    with progress as advance:
        while step < total:
            for x, y in batches:
                if step == drop_at:
                    for g in opt.param_groups:
                        g["lr"] = lr * 0.1
                loss = loss_fn(Draw(params, temperature), x, y)
                grads = torch.autograd.grad(loss, params, allow_unused=True)
                grads = [torch.zeros_like(a) if g is None else _all_mean(g) for a, g in zip(params, grads)]
                grads, s = gb.combine(params, costs, grads)
                for a, g in zip(params, grads):
                    a.grad = g
                del grads  # nothing of the size of the logits outlives the step but them and Adam's moments
                opt.step()
                opt.zero_grad(set_to_none=True)
                step += 1
                pending += 1
                loss_sum = loss.detach() if loss_sum is None else loss_sum + loss.detach()
                n_sum += 1
                if step % every == 0 or step >= total:
                    mean = float(loss_sum) / n_sum  # one sync per check, not per step
                    if not math.isfinite(mean):
                        raise UserError(f"CTS search: the objective became {mean} by step {step}; lower search.lr")
                    last = {"loss": mean, "density_err": float(s)}
                    loss_sum, n_sum = None, 0
                    fields = {"loss": mean, "lam": float(gb.lam)}
                    if topk is not None and topk.converged(params):
                        reason = "converged"
                    if topk is not None and topk.last is not None:
                        fields["overlap"] = topk.last
                    advance(pending, **fields)
                    pending = 0
                    if reason == "converged":
                        break
                if step >= total:
                    break
            if reason == "converged":
                break
    expected = gb.expected(params, costs)
    info = {"steps": step, "max_steps": total, "final_objective": last.get("loss"),
            "final_lambda": float(gb.lam) if gb.lam is not None else None, "expected_kept_cost": expected,
            "kept_budget": kept_cost, "seconds": time.perf_counter() - t0, "temperature": temperature,
            "balance": balance}
    if stop is not None:
        info["stop"] = {"reason": reason, "step": step, "topk_overlap": topk.last, "every": stop.every,
                        "window": stop.window, "overlap": stop.overlap}
    return info


def concrete_search(ctx: SearchContext, logits: dict[str, torch.Tensor], costs: dict[str, torch.Tensor],
                    kept_cost: float, overrides: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]] | None,
                    desc: str = "search (CTS)", keep: int | None = None) -> tuple[dict[str, torch.Tensor], dict]:
    """Train gate logits with frozen weights. `overrides(soft_masks)` returns the parameters to
    substitute in the model's forward (e.g. {name: weight * mask}); None: one gate per weight, the
    logits named as the weights they gate (unstructured CTS), applied inside the layers with no
    masked copy of the weights kept (_WeightGates). With `keep` (the number of
    gates the result keeps, by global top-k) the search stops once that set has converged
    (search.stop_overlap, search.stop_window) and search.epochs is only the cap. Returns the
    trained logits and a summary for the report."""
    cfg = ctx.recipe.search
    model, device = ctx.model, ctx.device
    model.eval()
    frozen = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in frozen:
        p.requires_grad_(False)
    names = list(logits)
    params = [logits[n].to(device).requires_grad_(True) for n in names]
    cost_list = [costs[n].to(device) for n in names]
    data = ctx.train_loader(cfg.batch_size)
    total = search_steps(ctx, len(data))
    stop = StopRule.from_recipe(cfg, keep, len(data)) if keep is not None else None
    prec = search_precision(device)
    task = tasks.of(model)

    gates = _WeightGates(model, names, cfg.checkpoint) if overrides is None else None

    def loss_fn(soft, x, y):
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with prec.autocast(device), bn_batch_stats(model):
            # Teacher and student normalise alike, by the batch's statistics: the authors' networks
            # have no running statistics, and a fresh or rewound model's running ones are not the
            # batch's, so with every gate on the objective would not be 0.
            with torch.no_grad():
                teacher = model(x) if gates is None else gates.teacher(x)
            if gates is not None:
                student = gates.student(soft, x)
            else:  # the masks are read from the Draw one by one, as `overrides` uses them
                student = functional_call(model, dict(overrides(_Named(names, soft))), (x,), strict=False)
        student, y, teacher = tasks.rows(task, student, x, y, teacher)  # per token for a language model
        return objective(cfg.objective, student, teacher, y)

    try:
        with gates if gates is not None else contextlib.nullcontext():
            info = optimise_gates(params, cost_list, kept_cost, loss_fn, data, total, lr=cfg.lr,
                                  temperature=cfg.temperature, balance=cfg.balance, budget_slack=cfg.budget_slack,
                                  stop=stop, ui=ctx.ui, desc=desc)
    finally:
        for p, wanted in frozen:  # give back exactly what the user had frozen or not
            p.requires_grad_(wanted)
    info["objective"] = cfg.objective
    if stop is not None:
        why = ("the top-k set stopped changing" if info["stop"]["reason"] == "converged"
               else "search.epochs (the cap) reached")
        ctx.ui.log(f"search stopped at step {info['steps']} of at most {total}: {why}")
    return {n: a.detach() for n, a in zip(names, params)}, info


def start_logits(density: float, shapes: dict[str, tuple], magnitude: dict[str, torch.Tensor] | None = None
                 ) -> dict[str, torch.Tensor]:
    """Where the gate logits start: a = logit(k) for every gate, k the target density (search.prior
    none, the paper's start); with `magnitude` (search.prior magnitude), logit(k) + logit(q), q the
    quantile of the unit's magnitude within its tensor ((rank + 0.5) / n), so the search refines a
    magnitude ticket. At k = 0.5 a unit's keep probability is then its quantile; GRADBALANCE brings
    the expected density to the budget. Ranks, not values: a layer's scale does not matter, and the
    prior is bounded (|logit(q)| <= log(2n))."""
    k = min(max(density, 1e-6), 1 - 1e-6)
    base = math.log(k / (1 - k))
    if magnitude is None:
        return {n: torch.full(tuple(shape), base) for n, shape in shapes.items()}
    out = {}
    for n, m in magnitude.items():
        flat = m.detach().float().reshape(-1)
        rank = torch.empty_like(flat)
        rank[flat.argsort()] = torch.arange(flat.numel(), dtype=torch.float32, device=flat.device)
        q = (rank + 0.5) / flat.numel()
        out[n] = (base + torch.log(q / (1 - q))).reshape(m.shape).cpu()
    return out


def weight_logits(model: nn.Module, density: float, prior: str = "none") -> dict[str, torch.Tensor]:
    """`start_logits` for one gate per prunable weight of `model` (search.prior: none or magnitude)."""
    weights = prunable(model)
    magnitude = {n: w.detach().abs() for n, w in weights.items()} if prior == "magnitude" else None
    return start_logits(density, {n: tuple(w.shape) for n, w in weights.items()}, magnitude)


def stage_plan(total: int, sparsity: float, stages: int) -> list[int]:
    """Weights kept after each stage: densities (1 - s)^(i / n) for i = 1..n, so each stage keeps the
    same fraction of the survivors; the last entry is exactly keep_count(total, sparsity)."""
    target = keep_count(total, sparsity)
    stages = max(1, int(stages))
    plan = [max(target, int(round(total * (1.0 - sparsity) ** (i / stages)))) for i in range(1, stages)]
    plan = [k for i, k in enumerate(plan) if k > target and (i == 0 or k < plan[i - 1])]
    return plan + [target]


def topk_with_floor(scores: dict[str, torch.Tensor], keep: int, per_output: int,
                    allowed: Mask | None = None) -> Mask:
    """Global top-k of `scores` that keeps at least `per_output` weights of every output unit (dim 0:
    a conv's output channel, a Linear's row), its highest-scored ones; exactly `keep` in all. With
    `allowed`, only its weights can be kept (and a unit's floor is bounded by what it has left).
    At 99% CTS's plain top-k left 1-4 of MNIST-1D's 10 classifier rows empty (dead classes)."""
    if per_output <= 0:
        return global_topk(scores, keep)
    forced, boosted = {}, {}
    for n, sc in scores.items():
        flat = sc.detach().float().reshape(sc.shape[0], -1).cpu()
        ok = torch.ones_like(flat, dtype=torch.bool) if allowed is None else allowed[n].reshape(flat.shape).cpu()
        ranked = torch.where(ok, flat, torch.full_like(flat, -math.inf))
        k = min(per_output, flat.shape[1])
        top = ranked.topk(k, dim=1).indices
        f = torch.zeros_like(flat, dtype=torch.bool).scatter_(1, top, True) & ok
        forced[n] = f.reshape(sc.shape)
        # forced entries first, then the rest by score (ranked: never-allowed ones last)
        boosted[n] = torch.where(f, torch.full_like(flat, math.inf), ranked).reshape(sc.shape)
    n_forced = sum(int(f.sum()) for f in forced.values())
    if n_forced > keep:
        raise UserError(f"search.min_per_output={per_output} needs {n_forced} weights, more than the {keep} the "
                        "sparsity keeps: lower search.min_per_output or the sparsity")
    return global_topk(boosted, keep)


def cts(ctx: SearchContext) -> SearchResult:
    if isinstance(ctx.model, torch.jit.ScriptModule):
        raise UserError("CTS needs an eager nn.Module (it substitutes masked weights in the forward); "
                        "give a state_dict with --arch instead of a TorchScript archive")
    start = starting_point(ctx)
    ctx = dataclasses.replace(ctx, model=start.model)
    cfg = ctx.recipe.search
    sparsity = cfg.sparsity
    weights = prunable(ctx.model)
    total = sum(w.numel() for w in weights.values())
    keep = keep_count(total, sparsity)
    costs = {n: torch.ones((), dtype=torch.float32) for n in weights}
    plan = stage_plan(total, sparsity, cfg.stages)
    if len(plan) == 1:
        logits = weight_logits(ctx.model, 1 - sparsity, cfg.prior)
        trained, info = concrete_search(ctx, logits, costs, float(keep), None, keep=keep)
        mask = topk_with_floor(trained, keep, cfg.min_per_output)
        info.update({"method": "cts", "kept": mask.kept, "total": total, **start.info})
        if cfg.min_per_output:
            info["min_per_output"] = cfg.min_per_output
        return SearchResult(model=ctx.model, mask=mask, info=info, scores=trained, schedule=start.schedule)
    return _staged(ctx, start, plan, weights, costs, total)


def _staged(ctx: SearchContext, start, plan: list[int], weights, costs, total: int) -> SearchResult:
    """search.stages > 1: each stage searches among the survivors of the last (the pruned weights are
    zero and their gates shut), keeping plan[i] weights; between stages the survivors are fine-tuned
    for search.stage_epochs (the `finetune` section's optimizer), and the next stage's teacher is that
    fine-tuned network, as each IMP round starts from the last. The search length (search.steps or
    epochs/min_steps) is split evenly between the stages. A rewind or init start hands back its own
    weights (the ticket is retrained from them); a trained start hands back the fine-tuned ones."""
    from ticketforge import finetune

    cfg = ctx.recipe.search
    from ticketforge.data import loader as make_loader
    total_steps = search_steps(ctx, len(make_loader(ctx.data.train, cfg.batch_size)))
    per_stage = max(1, total_steps // len(plan))
    stage_recipe = dataclasses.replace(ctx.recipe, search=dataclasses.replace(cfg, steps=per_stage))
    sctx = dataclasses.replace(ctx, recipe=stage_recipe)
    keep_state = None if cfg.start == "trained" else copy.deepcopy(ctx.model.state_dict())
    between = dataclasses.replace(finetune.Schedule.finetune(ctx.recipe, ctx.data.labeled), epochs=cfg.stage_epochs)
    mask, stages, t0 = None, [], time.perf_counter()
    for i, kept in enumerate(plan):
        live = total if mask is None else mask.kept
        logits = weight_logits(ctx.model, kept / live, cfg.prior)
        if mask is not None:  # the pruned weights' gates stay shut
            logits = {n: torch.where(mask[n].cpu(), a, torch.full_like(a, -30.0)) for n, a in logits.items()}
        trained, info = concrete_search(sctx, logits, costs, float(kept), None, keep=kept,
                                        desc=f"search (CTS stage {i + 1}/{len(plan)})")
        mask = topk_with_floor(trained, kept, cfg.min_per_output, allowed=mask)
        row = {"stage": i + 1, "kept": mask.kept, "sparsity": mask.sparsity, "steps": info["steps"]}
        if i < len(plan) - 1 and cfg.stage_epochs:
            tuned = finetune.fit(ctx.model, mask, between, ctx.data, ctx.device, seed=ctx.seed + i + 1,
                                 bn_recalibrate=ctx.recipe.finetune.bn_recalibrate, ui=ctx.ui,
                                 desc=f"CTS stage {i + 1}: fine-tune the survivors", teacher=ctx.teacher)
            row["accuracy"] = tuned.accuracy
        elif i < len(plan) - 1:
            mask.apply(ctx.model)
        stages.append(row)
        ctx.ui.log(f"CTS stage {i + 1}/{len(plan)}: kept {mask.kept} of {total} ({mask.sparsity:.4f} sparse)"
                   + (f", fine-tuned to {row['accuracy']:.4f}" if "accuracy" in row else ""))
    if keep_state is not None:
        ctx.model.load_state_dict(keep_state)
    info.update({"method": "cts", "kept": mask.kept, "total": total, "stages": stages,
                 "stage_epochs": cfg.stage_epochs, "steps": sum(r["steps"] for r in stages),
                 "max_steps": per_stage * len(plan), "seconds": time.perf_counter() - t0, **start.info})
    if cfg.min_per_output:
        info["min_per_output"] = cfg.min_per_output
    return SearchResult(model=ctx.model, mask=mask, info=info, scores=trained, schedule=start.schedule)


def score_units(ctx: SearchContext, units: Units) -> tuple[dict[str, torch.Tensor], dict]:
    """CTS on a structure's units (N:M weights, channels, blocks): one Binary Concrete gate per unit,
    all starting at the structure's density, trained against the dense outputs with GRADBALANCE on
    the structure's cost budget; the trained logits are the scores."""
    if isinstance(ctx.model, torch.jit.ScriptModule):
        raise UserError("CTS needs an eager nn.Module (it substitutes masked weights in the forward); "
                        "give a state_dict with --arch instead of a TorchScript archive")
    magnitude = None
    if ctx.recipe.search.prior == "magnitude":
        if units.magnitude is None:
            raise UserError(f"search.prior=magnitude: the {units.label or units.kind} units have no magnitude to start "
                            "from; use search.prior=none")
        magnitude = units.magnitude()
    logits = start_logits(units.density, units.shapes, magnitude)
    trained, info = concrete_search(dataclasses.replace(ctx, model=units.model), logits, units.costs, units.kept,
                                    units.apply, desc=f"search (CTS, {units.label or units.kind})")
    info["method"] = "cts"
    return trained, info
