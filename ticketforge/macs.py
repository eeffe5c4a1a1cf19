"""Multiply-accumulates per Conv / Linear layer of a torch model, from one forward pass with
hooks: the cost model the channel and block searches meet a budget on. The report's MACs are
counted on the exported ONNX graph instead (ticketforge.validate), so that they describe the file
that ships."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

CONV_LINEAR = (nn.modules.conv._ConvNd, nn.Linear)


@dataclass
class LayerMacs:
    macs: dict[str, float]   # MACs per sample of every Conv/Linear, by module name
    widths: dict[str, int]   # input width of every Conv/Linear (channels or features)
    outputs: set[str]        # layers whose output is the model's output

    @property
    def total(self) -> float:
        return sum(self.macs.values())

    def within(self, prefix: str) -> float:
        """MACs of the layers inside submodule `prefix`."""
        return sum(v for k, v in self.macs.items() if k.startswith(prefix + "."))


@torch.no_grad()
def layer_macs(model: nn.Module, example: torch.Tensor) -> LayerMacs:
    macs, widths, outputs, hooks = {}, {}, {}, []
    names = {m: n for n, m in model.named_modules()}

    def hook(mod, inp, out):
        n = names[mod]
        per_sample = out.numel() / example.shape[0]
        # weight[0] of a conv is (in_channels / groups) x kernel: the MACs of one output value
        k = mod.in_features if isinstance(mod, nn.Linear) else mod.weight[0].numel()
        macs[n] = macs.get(n, 0.0) + per_sample * k  # a module called twice costs twice
        widths[n] = mod.in_features if isinstance(mod, nn.Linear) else mod.in_channels
        outputs[n] = out

    for m in model.modules():
        if isinstance(m, CONV_LINEAR):
            hooks.append(m.register_forward_hook(hook))
    was_training = model.training
    model.eval()
    try:
        y = model(example)
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    final = {n for n, o in outputs.items() if o is y or (o.data_ptr() == y.data_ptr() and o.shape == y.shape)}
    return LayerMacs(macs, widths, final)
