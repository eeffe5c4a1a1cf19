"""Binary masks over the prunable weights (every Conv and Linear weight; biases and norms never).

A language model's head is left whole: a Linear whose weight is an nn.Embedding's (GPT-2 ties its
head to the input embedding: pruning one prunes the other), and the model's output embedding (an
HF model's `get_output_embeddings()`, an untied LM head), unless the recipe includes the head
(convert.prune_lm_head, which `include_lm_head` records on the model)."""
from __future__ import annotations

import math
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn
from torch.nn.utils import parametrize

PRUNABLE_TYPES = (nn.modules.conv._ConvNd, nn.Linear)
_SCRIPTED_PRUNABLE = {"Conv1d", "Conv2d", "Conv3d", "Linear"}


PRUNE_LM_HEAD = "ticketforge_prune_lm_head"  # the model attribute include_lm_head sets


def prunable(model: nn.Module) -> dict[str, nn.Parameter]:
    """name -> weight of every Conv/Linear layer (TorchScript modules too, by their original class),
    but a language model's head (`kept_whole`)."""
    out, whole = {}, kept_whole(model)
    for name, mod in model.named_modules():
        is_prunable = isinstance(mod, PRUNABLE_TYPES) or getattr(mod, "original_name", None) in _SCRIPTED_PRUNABLE
        w = getattr(mod, "weight", None)
        if is_prunable and isinstance(w, torch.Tensor) and w.dim() >= 2 and id(w) not in whole:
            out[f"{name}.weight" if name else "weight"] = w
    return out


def kept_whole(model: nn.Module) -> set[int]:
    """ids of the weights no mask covers: every nn.Embedding's (a layer sharing it, a tied LM head,
    would prune the embedding), and the output embedding's unless `include_lm_head` said otherwise."""
    whole = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    get = getattr(model, "get_output_embeddings", None)
    if callable(get) and not getattr(model, PRUNE_LM_HEAD, False):
        try:
            head = get()
        except Exception:  # a model class that does not implement it has no head to keep
            head = None
        if isinstance(getattr(head, "weight", None), torch.Tensor):
            whole.add(id(head.weight))
    return whole


def include_lm_head(model: nn.Module, include: bool) -> None:
    """Make an untied LM head prunable (convert.prune_lm_head) on this model and its copies."""
    setattr(model, PRUNE_LM_HEAD, bool(include))


class Mask(dict):
    """name -> bool tensor shaped like the weight; True = kept."""

    @classmethod
    def ones_like(cls, model: nn.Module) -> "Mask":
        return cls({k: torch.ones_like(w, dtype=torch.bool) for k, w in prunable(model).items()})

    @property
    def total(self) -> int:
        return sum(m.numel() for m in self.values())

    @property
    def kept(self) -> int:
        return sum(int(m.sum()) for m in self.values())

    @property
    def sparsity(self) -> float:
        return 1.0 - self.kept / max(self.total, 1)

    def per_layer(self) -> dict[str, float]:
        return {k: 1.0 - float(m.float().mean()) for k, m in self.items()}

    def bind(self, model: nn.Module) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """The masked weights, and the mask as float tensors on their device and dtype. The float
        masks are cached across training steps (rebuilt when an entry, or a weight's device or
        dtype, changes): a step then costs one fused multiply, not a conversion per layer."""
        params = prunable(model)
        weights = [params[k] for k in self]
        key = [(m, w.device, w.dtype) for m, w in zip(self.values(), weights)]
        cached = getattr(self, "_float_cache", None)
        if cached is None or len(cached[0]) != len(key) or any(
                a[0] is not b[0] or a[1:] != b[1:] for a, b in zip(cached[0], key)):
            cached = self._float_cache = (key, [m.to(w.device, w.dtype) for m, w in zip(self.values(), weights)])
        return weights, cached[1]

    @torch.no_grad()
    def apply(self, model: nn.Module) -> None:
        """Zero the pruned weights in place."""
        weights, floats = self.bind(model)
        if weights:
            torch._foreach_mul_(weights, floats)

    @contextmanager
    def scaled(self, model: nn.Module):
        """Inside this block the pruned weights enter the forward multiplied by a scale (and get
        gradients scaled alike) instead of being zero; yields `set_scale(value)`. The weights are
        left as trained on exit: call apply() to make the mask hard."""
        modules = dict(model.named_modules())
        scale = torch.ones(())
        parts = []
        for k, m in self.items():
            owner = modules[k.rsplit(".", 1)[0] if "." in k else ""]
            part = _Scaled(m.to(owner.weight.device), scale)
            parametrize.register_parametrization(owner, "weight", part)
            parts.append(owner)

        def set_scale(value: float) -> None:
            scale.fill_(value)

        try:
            yield set_scale
        finally:
            for owner in parts:
                parametrize.remove_parametrizations(owner, "weight", leave_parametrized=False)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v.cpu() for k, v in self.items()}

    def save(self, path: str | Path) -> None:
        torch.save(self.state_dict(), path)

    @classmethod
    def load(cls, path: str | Path) -> "Mask":
        return cls(torch.load(path, map_location="cpu", weights_only=True))


class _Scaled(nn.Module):
    """weight -> weight * (mask + scale * (1 - mask)); `scale` is shared and set from outside."""

    def __init__(self, mask: torch.Tensor, scale: torch.Tensor):
        super().__init__()
        self.mask, self.scale = mask, scale

    def forward(self, w):
        keep = self.mask.to(w.dtype)
        return w * (keep + self.scale.to(w.device, w.dtype) * (1 - keep))


def global_topk(scores: dict[str, torch.Tensor], keep: int) -> Mask:
    """Keep exactly `keep` entries with the highest scores over all layers (ties broken by position)."""
    names = list(scores)
    kept = topk_masks([scores[n].detach() for n in names], keep)
    return Mask({n: k.cpu() for n, k in zip(names, kept)})


@torch.no_grad()
def topk_masks(scores: list[torch.Tensor], keep: int) -> list[torch.Tensor]:
    """Bool masks of the `keep` highest entries over all the tensors (ties broken by position; NaN
    counts as lowest), on their devices, without a concatenated copy of the scores or an index
    tensor of their size: torch.topk over BERT-base's 86M logits held 1.8 GiB more while it ran.

    Selection by sampling (Floyd and Rivest): the quantiles of a sample bracket the keep-th value,
    one pass counts what lies above and gathers what lies inside the bracket (under 1% of the
    entries), and the exact threshold is found among those. A bracket that misses is widened."""
    total = sum(s.numel() for s in scores)
    keep = max(0, min(int(keep), total))
    if keep in (0, total):
        return [torch.full(s.shape, keep > 0, dtype=torch.bool, device=s.device) for s in scores]
    flats = [s.detach().reshape(-1) for s in scores]
    gen = torch.Generator().manual_seed(0)
    sample = torch.cat([f[torch.randint(f.numel(), (max(1, (f.numel() * 65536) // total),), generator=gen)
                          .to(f.device)].float().cpu() for f in flats])
    sample = sample.nan_to_num(nan=-math.inf).sort(descending=True).values
    at = keep / total * len(sample)
    width = 4.0 * math.sqrt(len(sample) * (keep / total) * (1 - keep / total)) + 16
    while True:
        hi = float(sample[max(0, int(at - width))]) if at - width > 0 else math.inf
        lo = float(sample[min(len(sample) - 1, int(at + width))]) if at + width < len(sample) - 1 else -math.inf
        above, inside = 0, []
        for f in flats:
            top = f > hi
            above += int(torch.count_nonzero(top))
            # a bracket of one value (ties: a layer of zeros, logits shut at one value) is counted, not gathered
            inside.append(torch.count_nonzero(f == lo).cpu().reshape(1) if lo == hi else f[(f >= lo) & ~top].float().cpu())
        inside = torch.cat(inside)
        n_inside = int(inside.sum()) if lo == hi else len(inside)
        if above < keep <= above + n_inside:
            break
        if lo == -math.inf and hi == math.inf:
            raise ValueError("top-k of scores that hold NaN")
        width *= 4  # a miss, rare: widen the bracket until it holds the keep-th value
    if lo == hi:
        t, ties_left = lo, keep - above
    else:  # the keep-th value overall is the (keep - above)-th highest inside the bracket
        t = float(inside.kthvalue(len(inside) - (keep - above) + 1).values)
        ties_left = keep - above - int(torch.count_nonzero(inside > t))
    out = []
    for s, f in zip(scores, flats):
        eq = f == t
        n_eq = int(torch.count_nonzero(eq))
        if n_eq > ties_left:  # only the first ties_left of them, in order
            eq &= eq.cumsum(0) <= ties_left
        out.append(((f > t) | eq).reshape(s.shape))
        ties_left -= min(n_eq, ties_left)
    return out


def keep_count(total: int, sparsity: float) -> int:
    """Number of weights kept at a target sparsity (rounded to the nearest weight)."""
    return int(round(total * (1.0 - sparsity)))
