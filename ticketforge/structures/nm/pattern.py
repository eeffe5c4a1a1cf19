"""N:M sparsity (2:4 for NVIDIA sparse tensor cores, 4:8, ...): which layers qualify, masks from any
per-weight scores, the pattern check, and the read-back from an exported ONNX file. Every function
takes the pattern (`Pattern`, 2:4 unless told).

The pattern runs along the reduction dimension: a Linear weight (out, in) in groups of M along
in; a Conv weight (K, C, R, S) in groups of M along C for each (k, r, s). A layer qualifies by
apex ASP's rule for 2:4, K % 8 == 0 and C % 16 == 0, with C the input channels per group (so a
depthwise conv, C = 1, never does); a wider pattern also needs C to be a multiple of its M.

A language model's head is no prunable weight (ticketforge.masks) and stays dense: the read-back
knows it by its values (`whole_layers`), as the exported file names layers its own way."""
from __future__ import annotations

import hashlib
import math
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import numpy_helper
from torch import nn

from ticketforge.errors import VerificationError
from ticketforge.masks import PRUNABLE_TYPES, Mask, prunable
from ticketforge.sparse_storage import load_dense
from ticketforge.structures.nm.layout import TWO_FOUR, Pattern


def ineligible_reason(shape: tuple[int, ...], pat: Pattern = TWO_FOUR) -> str | None:
    """None when a weight of this shape (out, in, *kernel) qualifies, else why not."""
    if len(shape) < 2:
        return "not a matrix"
    k, c = shape[0], shape[1]
    cin = max(pat.in_multiple, pat.m)
    why = ([f"out {k} is not a multiple of {pat.out_multiple}"] if k % pat.out_multiple else []) + \
          ([f"in {c} (per group) is not a multiple of {cin}"] if c % cin else [])
    return "; ".join(why) or None


def fingerprint(w: np.ndarray) -> str:
    """A weight's values (float32, (out, in, *kernel) layout) as a short digest."""
    return hashlib.sha256(np.ascontiguousarray(w, dtype=np.float32).tobytes()).hexdigest()[:16]


def whole_layers(model: nn.Module) -> dict[str, str]:
    """name -> fingerprint of every Conv/Linear weight no mask covers (a language model's head)."""
    weights = {id(w) for w in prunable(model).values()}
    return {f"{n}.weight": fingerprint(m.weight.detach().float().cpu().numpy()) for n, m in model.named_modules()
            if isinstance(m, PRUNABLE_TYPES) and m.weight.dim() >= 2 and id(m.weight) not in weights}


def split_layers(model: nn.Module, pat: Pattern = TWO_FOUR) -> tuple[list[str], dict[str, str]]:
    """(eligible weight names, {ineligible weight name: reason}) over the prunable weights."""
    eligible, ineligible = [], {}
    for name, w in prunable(model).items():
        reason = ineligible_reason(tuple(w.shape), pat)
        if reason is None:
            eligible.append(name)
        else:
            ineligible[name] = reason
    return eligible, ineligible


def _groups(t: torch.Tensor, pat: Pattern = TWO_FOUR) -> torch.Tensor:
    """(-1, M) view of a weight's groups along the reduction dimension (dim 1)."""
    return t.movedim(1, -1).reshape(-1, pat.m)


def nm_mask(scores: torch.Tensor, pat: Pattern = TWO_FOUR) -> torch.Tensor:
    """Keep the N highest scores in every group of M along dim 1 (ties: the earlier position)."""
    g = _groups(scores.detach().float().cpu(), pat)
    keep = torch.zeros_like(g, dtype=torch.bool)
    keep.scatter_(1, torch.topk(g, pat.n, dim=1, sorted=False).indices, True)
    moved = scores.movedim(1, -1).shape
    return keep.reshape(moved).movedim(-1, 1).contiguous()


def nm_masks(model: nn.Module, scores: dict[str, torch.Tensor], pat: Pattern = TWO_FOUR) -> Mask:
    """N:M on every eligible layer from `scores` (higher = keep); ineligible layers stay dense."""
    eligible, _ = split_layers(model, pat)
    mask = Mask.ones_like(model)
    for name in eligible:
        mask[name] = nm_mask(scores[name], pat)
    return mask


def bad_groups(w: torch.Tensor, pat: Pattern = TWO_FOUR) -> int:
    """Groups of M along the reduction dimension with more than N non-zeros."""
    return int(((_groups(w.detach(), pat) != 0).sum(1) > pat.n).sum())


def summary(model: nn.Module, pat: Pattern = TWO_FOUR) -> dict:
    """The N:M state of a torch model: eligible and ineligible layers, groups, violations."""
    eligible, ineligible = split_layers(model, pat)
    weights = prunable(model)
    groups = sum(weights[n].numel() // pat.m for n in eligible)
    total = sum(w.numel() for w in weights.values())
    eligible_weights = sum(weights[n].numel() for n in eligible)
    return {"eligible": eligible, "ineligible": ineligible, "groups": groups,
            "bad_groups": sum(bad_groups(weights[n], pat) for n in eligible),
            "eligible_weights": eligible_weights, "prunable_weights": total,
            # what N:M removes, as a fraction of all prunable weights (1 - N/M only if every layer qualifies)
            "sparsity": (1 - pat.n / pat.m) * eligible_weights / max(total, 1)}


# ---------------------------------------------------------------- read-back from ONNX

def _weight(name: str, inits: dict[str, np.ndarray], producers: dict[str, onnx.NodeProto]) -> np.ndarray | None:
    """The constant behind a node input: an initializer, possibly through Transpose nodes (the
    dynamo exporter may leave a Linear weight's transpose in the graph)."""
    if name in inits:
        return inits[name]
    node = producers.get(name)
    if node is not None and node.op_type == "Transpose":
        w = _weight(node.input[0], inits, producers)
        if w is not None:
            perm = next((list(a.ints) for a in node.attribute if a.name == "perm"), None)
            return np.transpose(w, perm)
    return None


def onnx_weights(path: str | Path) -> list[tuple[str, np.ndarray]]:
    """(node name, weight in (out, in, *kernel) layout) for every Conv, Gemm and MatMul with a
    constant weight. The legacy exporter folds BatchNorm into conv weights (a per-output-channel
    scale: zeros stay zeros) and stores a Linear as MatMul with the weight as (in, out), or as
    Gemm with or without transB."""
    model = load_dense(path)  # a weight stored as a sparse initializer is read as the tensor it stands for
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    producers = {o: n for n in model.graph.node for o in n.output}
    out = []
    for node in model.graph.node:
        if node.op_type not in ("Conv", "Gemm", "MatMul") or len(node.input) < 2:
            continue
        w = _weight(node.input[1], inits, producers)
        if w is None:
            continue
        if node.op_type != "Conv":
            if w.ndim != 2:
                continue
            attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
            if node.op_type == "MatMul" or not attrs.get("transB", 0):
                w = w.T
        out.append((node.name or node.output[0], w))
    return out


def onnx_groups(path: str | Path, pat: Pattern = TWO_FOUR, whole: set[str] = frozenset()) -> dict:
    """How many weight groups of eligible layers in an ONNX file satisfy the pattern; the weights
    whose fingerprint is in `whole` (`whole_layers`: left dense on purpose) are not counted."""
    groups = bad = layers = 0
    for _, w in onnx_weights(path):
        if ineligible_reason(w.shape, pat) is not None or (whole and fingerprint(w) in whole):
            continue
        g = np.moveaxis(w, 1, -1).reshape(-1, pat.m)
        layers += 1
        groups += len(g)
        bad += int(((g != 0).sum(1) > pat.n).sum())
    return {"layers": layers, "groups": groups, "valid": groups - bad, "bad": bad,
            "fraction_valid": (groups - bad) / groups if groups else 0.0}


# ---------------------------------------------------------------- Progressive Gradient Flow

PGF_RATE = 5.0  # the pruned weights are at about 1/e of full strength after 20% of fine-tuning


def pgf_scale(progress: float) -> float:
    """Exponential mask decay (Bambhaniya et al., Progressive Gradient Flow): the value the pruned
    weights' mask takes at `progress` in [0, 1] of fine-tuning; 1 at the start, exactly 0 at the end."""
    p = min(max(progress, 0.0), 1.0)
    return (math.exp(-PGF_RATE * p) - math.exp(-PGF_RATE)) / (1 - math.exp(-PGF_RATE))


def read_back(onnx_path: str | Path, converted: dict, decay: str, pat: Pattern = TWO_FOUR) -> dict:
    """The report's section for the pattern: the converter's view of the torch model next to what
    the exported file holds. The export must keep every eligible group N:M."""
    back = onnx_groups(onnx_path, pat, set(converted.get("whole_layers", {}).values()))
    if back["bad"] or not back["groups"]:
        raise VerificationError(f"{Path(onnx_path).name}: {back['bad']} of {back['groups']} weight groups in "
                                f"eligible layers are not {pat}")
    return {"pattern": str(pat), "decay": decay, "eligible_layers": converted["eligible"],
            "ineligible_layers": converted["ineligible"], "onnx": back}
