"""Calibration data for the one-shot methods (wanda, sparsegpt, similarity): a fixed sample of the
training set run through the model without gradients, and what a forward hook sees of it.

The sample is `search.calibration_samples` training samples drawn with the run's seed and read in
order, so every torchrun rank sees the same ones (a shuffled training loader would give each rank
its own shard, and each rank its own mask). Token ids packed with an attention mask (N, 2, L;
ticketforge.adapt) carry the mask of the batch being run: padded tokens (mask 0) are left out of
every statistic, so a batch's padding does not count as data."""
from __future__ import annotations

from dataclasses import dataclass
import torch
from torch import nn

from ticketforge.device import inputs_to
from ticketforge.errors import UserError
from ticketforge.search.base import SearchContext


class Stop(Exception):
    """Raised by a forward hook that has seen what it needs of a batch: the rest of the forward is skipped."""


@dataclass
class Calibration:
    batches: list[torch.Tensor]   # inputs only, on the CPU
    device: torch.device
    packed: bool                  # inputs are token ids packed with their attention mask
    mask: torch.Tensor | None = None  # the attention mask (N, L) of the batch being run, on `device`

    @property
    def samples(self) -> int:
        return sum(len(x) for x in self.batches)

    @torch.no_grad()
    def run(self, model: nn.Module) -> None:
        """Run `model` on every batch (no gradients, the model's mode as it is), with `mask` set to
        the batch's attention mask while its forward runs; a hook may end a forward early (`Stop`)."""
        for x in self.batches:
            x = inputs_to(x, self.device, model)
            self.mask = x[:, 1].bool() if self.packed else None
            try:
                model(x)
            except Stop:
                pass
            finally:
                self.mask = None

    def rows(self, t: torch.Tensor, feature_dim: int = -1) -> torch.Tensor:
        """(positions, features) view of a hidden tensor: one row per sample and position (token,
        pixel), `feature_dim` the features; positions the attention mask zeroes are left out."""
        t = t.movedim(feature_dim, -1)
        if self.mask is not None and t.dim() == 3 and t.shape[:2] == self.mask.shape:
            return t[self.mask]
        return t.reshape(-1, t.shape[-1])


def calibration(ctx: SearchContext, model: nn.Module) -> Calibration:
    """The calibration sample for `model` (whose layers' inputs the method hooks)."""
    if isinstance(model, torch.jit.ScriptModule):
        raise UserError(f"search.method {ctx.recipe.search.method} reads each layer's inputs with forward hooks, which "
                        "a TorchScript archive does not take: give a state_dict with --arch")
    data = ctx.data.train
    n = min(ctx.recipe.search.calibration_samples, len(data))
    picked = torch.randperm(len(data), generator=torch.Generator().manual_seed(ctx.seed))[:n].tolist()
    xs = torch.stack([data[i][0] for i in picked])
    return Calibration(batches=list(xs.split(ctx.recipe.search.batch_size)), device=ctx.device,
                       packed=len(ctx.data.inputs) == 2)


def feature_dim(module: nn.Module) -> int:
    """Where a layer's input features are: the channels (dim 1) of a convolution, else the last dim."""
    return 1 if isinstance(module, nn.modules.conv._ConvNd) else -1
