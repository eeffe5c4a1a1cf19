"""Channel structure, step 4 of 4: the spec. Plain data that turns the original architecture into
the shrunk one, so that a ticket.pt loads with torch.load(weights_only=True), without pickles."""
from __future__ import annotations

import torch
from torch import nn

from ticketforge.errors import UserError
from ticketforge.structures.channels import heads

SPEC_ATTRS = {nn.modules.conv._ConvNd: ("in_channels", "out_channels", "groups"),
              nn.modules.batchnorm._BatchNorm: ("num_features",),
              nn.Linear: ("in_features", "out_features"),
              nn.LayerNorm: ("normalized_shape",)}


def arch_spec(model: nn.Module) -> dict:
    """Plain data that turns the original architecture into the shrunk one: the width attributes of
    every Conv/Linear/norm and the shape of every state_dict entry (as timm's pruned models do)."""
    modules = {}
    for name, mod in model.named_modules():
        for cls, attrs in SPEC_ATTRS.items():
            if isinstance(mod, cls):
                modules[name] = {a: (list(getattr(mod, a)) if isinstance(getattr(mod, a), tuple) else getattr(mod, a))
                                 for a in attrs}
    for name, attrs in heads.spec_attrs(model).items():  # attention layers: how many heads are left
        modules.setdefault(name, {}).update(attrs)
    shapes = {k: list(v.shape) for k, v in model.state_dict().items()}
    return {"format": "ticketforge.spec/1", "modules": modules, "shapes": shapes}


def apply_spec(model: nn.Module, spec: dict) -> nn.Module:
    """Resize a freshly built model to `spec` in place (weights still to be loaded)."""
    mods = dict(model.named_modules())
    for name, attrs in spec["modules"].items():
        if name not in mods:
            raise UserError(f"the architecture spec names a layer {name!r} that this architecture does not have")
        for a, v in attrs.items():
            setattr(mods[name], a, tuple(v) if isinstance(v, list) else v)
    for key, shape in spec["shapes"].items():
        owner_name, _, attr = key.rpartition(".")
        owner = mods.get(owner_name)
        if owner is None:
            raise UserError(f"the architecture spec names {key!r} that this architecture does not have")
        current = getattr(owner, attr, None)
        if isinstance(current, torch.Tensor) and list(current.shape) == shape:
            continue
        blank = torch.zeros(shape, dtype=current.dtype if isinstance(current, torch.Tensor) else torch.float32)
        if attr in owner._buffers:
            owner._buffers[attr] = blank
        else:
            setattr(owner, attr, nn.Parameter(blank))
    return model
