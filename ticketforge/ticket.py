"""ticket.pt: a compressed model as plain data (tensors, numbers, strings), so it loads with
torch.load(weights_only=True), and so it can be the MODEL of a later run (compressions chain).

It holds the architecture's name, the masks and weights, and the list of structure conversions
that turn a freshly built architecture into the compressed one: each `{"structure", "spec"}`
entry is replayed by that structure's `rebuild` (ticketforge.structures), in order."""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ticketforge import models, structures
from ticketforge.errors import UserError
from ticketforge.masks import Mask, prunable

FORMAT = "ticketforge.ticket/2"


def save(path: Path, model: nn.Module, mask: Mask | None, *, arch: str | None, arch_kwargs: dict | None,
         conversions: list[dict], recipe: dict, hf_config: dict | None = None) -> None:
    """`hf_config`: an HF transformers model's config (ticketforge.hf), which rebuilds it without --arch."""
    torch.save({
        "format": FORMAT,
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "masks": mask.state_dict() if mask is not None else {},
        "arch": arch,
        "arch_kwargs": arch_kwargs or {},
        "hf_config": hf_config,
        "structures": conversions,
        "prunable": list(prunable(model)),
        "recipe": recipe,
    }, path)


def conversions_of(obj: dict) -> list[dict]:
    """The conversions a checkpoint or ticket asks for, including tickets of format 1, which held a
    single `spec` (a channel spec, or the removed blocks)."""
    if obj.get("structures"):
        return list(obj["structures"])
    spec = obj.get("spec")
    if not spec:
        return []
    owner = next((name for name, s in structures.STRUCTURES.items() if s.reads_spec(spec)), None)
    if owner is None:
        raise UserError("the ticket's spec (format 1) belongs to no known structure")
    return [{"structure": owner, "spec": spec}]


def rebuild(model: nn.Module, conversions: list[dict]) -> nn.Module:
    """Replay the conversions on a freshly built model, in place (weights still to be loaded)."""
    for c in conversions:
        structures.get(c["structure"]).rebuild(model, c["spec"])
    return model


def load(path) -> nn.Module:
    """The compressed model of a ticket.pt, rebuilt without unpickling anything."""
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise UserError(f"{path} is not a readable ticket: {str(exc).splitlines()[0] if str(exc) else exc}") from None
    if not isinstance(obj, dict) or "state_dict" not in obj:
        raise UserError(f"{path} is not a ticketforge ticket (no state_dict)")
    if not obj.get("arch") and not obj.get("hf_config"):
        raise UserError(f"{path} does not name its architecture (it was compressed from a pickled or "
                        "TorchScript model), so the compressed model cannot be rebuilt from plain data")
    if obj.get("arch"):
        model = models.build(obj["arch"], obj.get("arch_kwargs") or {})
    else:
        from ticketforge import hf

        model = hf.build(obj["hf_config"])
    model = rebuild(model, conversions_of(obj))
    model.load_state_dict(obj["state_dict"])
    return model.eval()
