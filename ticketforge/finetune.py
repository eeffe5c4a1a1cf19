"""Training loops: fine-tuning a ticket with its mask held fixed, evaluation, BatchNorm re-estimation."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn
from torch.utils.data import DataLoader

from ticketforge import device as device_mod, distributed, tasks
from ticketforge.data import loader
from ticketforge.errors import UserError
from ticketforge.masks import Mask
from ticketforge.ui import SILENT, UI


class NonFiniteLoss(UserError):
    """Training diverged (NaN/Inf loss)."""


@dataclass
class Schedule:
    """How a model is trained: `epochs` epochs of a cosine learning-rate schedule that spans
    `total_epochs` (default `epochs`), entered at `start_epoch` (a rewound ticket continues the
    schedule it was rewound in instead of starting a new one)."""

    epochs: int
    lr: float
    batch_size: int
    optimizer: str = "sgd"
    momentum: float = 0.9
    weight_decay: float = 5e-4
    grad_clip: float = 0.0
    start_epoch: int = 0
    start_step: int = 0          # steps of `start_epoch` already done (rewinding to an iteration)
    total_epochs: int | None = None
    distill: float = 0.0         # weight of the KL to a teacher's outputs, when train() is given a teacher
    distill_temperature: float = 1.0

    @classmethod
    def finetune(cls, recipe, labeled: bool = True) -> "Schedule":
        """The recipe's `finetune` section (pure distillation without labels: distill_weight)."""
        ft = recipe.finetune
        return cls(epochs=ft.epochs, lr=ft.lr, batch_size=ft.batch_size, optimizer=ft.optimizer,
                   momentum=ft.momentum, weight_decay=ft.weight_decay, grad_clip=ft.grad_clip,
                   distill=distill_weight(recipe, labeled), distill_temperature=ft.distill_temperature)

    @classmethod
    def rest_of_training(cls, recipe, start_epoch: int, start_step: int = 0, labeled: bool = True) -> "Schedule":
        """The recipe's `train` schedule from step `start_step` of epoch `start_epoch` to its end
        (SGD, as the papers train). Its distillation applies only where train() gets a teacher:
        the retraining of a ticket, not the dense training before a rewind point (labeled data)."""
        tr = recipe.train
        return cls(epochs=tr.epochs - start_epoch, lr=tr.lr, batch_size=tr.batch_size, optimizer="sgd",
                   momentum=tr.momentum, weight_decay=tr.weight_decay, grad_clip=recipe.finetune.grad_clip,
                   start_epoch=start_epoch, start_step=start_step, total_epochs=tr.epochs,
                   distill=distill_weight(recipe, labeled), distill_temperature=recipe.finetune.distill_temperature)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def teacher_kwargs(self, teacher: nn.Module | None) -> dict:
        """train()'s teacher arguments: none when distillation is off (no teacher forward wasted)."""
        return {"teacher": teacher, "distill": self.distill} if teacher is not None and self.distill > 0 else {}

    def train_kwargs(self) -> dict:
        """Keyword arguments of train() (everything but the batch size, which is the loader's)."""
        d = self.to_dict()
        d.pop("batch_size")
        d.pop("distill")  # train() distills only with a teacher: Schedule.teacher_kwargs
        return d


def distill_weight(recipe, labeled: bool = True) -> float:
    """finetune.distill; 1 (pure distillation) for data without labels, where the dense model's
    outputs are the only targets there are."""
    return recipe.finetune.distill if labeled else 1.0


def distill_loss(student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor | None, weight: float,
                 temperature: float) -> torch.Tensor:
    """(1 - weight) * CE(student, labels) + weight * T^2 * KL(softmax(teacher/T) || softmax(student/T)),
    as Hinton et al. 2015: T^2 keeps the soft term's gradients on the scale of the hard term's as T
    grows. `labels` may be None only at weight 1 (data without labels)."""
    t = temperature
    kl = nn.functional.kl_div(nn.functional.log_softmax(student / t, 1), nn.functional.log_softmax(teacher / t, 1),
                              reduction="batchmean", log_target=True) * (t * t)
    if weight >= 1:
        return kl
    return (1 - weight) * nn.functional.cross_entropy(student, labels) + weight * kl


@dataclass
class Tuned:
    accuracy_before: float   # validation accuracy of the ticket before training (after BN re-estimation)
    accuracy: float          # after training
    losses: list[float]


def fit(model: nn.Module, mask: Mask | None, schedule: Schedule, data, device: torch.device, *, seed: int = 0,
        bn_recalibrate: bool = True, mask_scale: Callable[[float], float] | None = None, ui: UI = SILENT,
        desc: str = "fine-tune", teacher: nn.Module | None = None) -> Tuned:
    """Fine-tune a ticket: the one training of a ticket that the pipeline, the sanity checks and the
    benchmarks share. Apply the mask, re-estimate BatchNorm statistics for the subnetwork, then train
    on `schedule` with the mask held (or decayed by the structure's `mask_scale`), distilling from
    `teacher` (the dense model, on `device`) by `schedule.distill`. `data` is a
    ticketforge.data.DataBundle."""
    train_loader = loader(data.train, schedule.batch_size, shuffle=True, seed=seed)
    val_loader = loader(data.val, 256)
    if mask is not None:
        mask.apply(model)
    if bn_recalibrate:
        recalibrate_bn(model, train_loader, device)
    before = evaluate(model, val_loader, device)
    losses = []
    if schedule.epochs:
        losses = train(model, train_loader, device=device, mask=mask, ui=ui, desc=desc, mask_scale=mask_scale,
                       **schedule.train_kwargs(), **schedule.teacher_kwargs(teacher))
    after = evaluate(model, val_loader, device) if schedule.epochs else before
    return Tuned(accuracy_before=before, accuracy=after, losses=losses)


def make_optimizer(model: nn.Module, name: str, lr: float, momentum: float, weight_decay: float):
    params = [p for p in model.parameters() if p.requires_grad]
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=momentum > 0)


def train(model: nn.Module, loader: DataLoader, *, epochs: int, lr: float, device: torch.device,
          optimizer: str = "sgd", momentum: float = 0.9, weight_decay: float = 5e-4, grad_clip: float = 0.0,
          mask: Mask | None = None, ui: UI = SILENT, desc: str = "fine-tune", start_epoch: int = 0,
          total_epochs: int | None = None, mask_scale: Callable[[float], float] | None = None,
          start_step: int = 0, max_steps: int | None = None, until: Callable[[int], bool] | None = None,
          teacher: nn.Module | None = None, distill: float = 0.0, distill_temperature: float = 1.0) -> list[float]:
    """Train with a cosine learning-rate schedule over `total_epochs` (default `epochs`), starting at
    `start_epoch` of it (rewinding = starting the schedule again). Returns the mean loss per epoch.

    Rewinding to an iteration: `start_step` more steps of the schedule are already done, so the
    first epoch is that much shorter and the schedule ends where it would have. `max_steps` stops
    earlier (training up to a rewind point); `until(steps done)`, called after every step, stops it when
    it returns True (training up to an accuracy).

    With `mask` the pruned weights stay zero; with `mask_scale` as well, they instead enter the forward
    scaled by mask_scale(fraction of this training done) and keep training, and are zeroed at the end.

    With `teacher` and `distill` > 0 the loss is distill_loss against the teacher's logits on the same
    batch (computed without a graph, the teacher in eval mode)."""
    decaying = mask is not None and mask_scale is not None
    if decaying and isinstance(model, torch.jit.ScriptModule):
        raise UserError("a decaying mask needs an eager nn.Module, not a TorchScript archive: give a state_dict "
                        "with --arch, or use a hard mask")
    total_epochs = total_epochs or epochs
    steps_per_epoch = len(loader)
    total_steps = max(1, total_epochs * steps_per_epoch)
    opt = make_optimizer(model, optimizer, lr, momentum, weight_decay)
    offset = start_epoch * steps_per_epoch + start_step  # rewinding to the middle of a schedule starts there
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s + offset, total_steps) / total_steps)))
    if mask is not None and not decaying:
        mask.apply(model)
    prec = device_mod.precision(device)
    scaler = prec.scaler(device)
    net = distributed.wrap(model, device)  # under torchrun: gradients averaged over the ranks
    losses = []
    model.train()
    distilling = teacher is not None and distill > 0
    task = tasks.of(model)
    if distilling:
        teacher.eval()
    steps = epochs * steps_per_epoch - start_step
    if max_steps is not None:
        steps = min(steps, max_steps)
    done = 0
    hold = mask.scaled(model) if decaying else _nothing()
    # A hard mask costs two fused multiplies per step (gradients, then weights), bound once here.
    weights, keep = mask.bind(model) if mask is not None and not decaying else ([], [])
    with hold as set_scale, ui.progress(desc, steps, per_epoch=steps_per_epoch) as advance:
        for epoch in range(epochs):
            if done >= steps:
                break
            total, count = 0.0, 0
            for i, (x, y) in enumerate(loader):
                if done >= steps:
                    break
                if decaying:
                    set_scale(mask_scale((epoch * steps_per_epoch + i) / max(steps - 1, 1)))
                x, y = device_mod.inputs_to(x, device, model), y.to(device, non_blocking=True)
                with prec.autocast(device):
                    logits = net(x)
                    if distilling:
                        with torch.no_grad():
                            target = teacher(x)
                # A sequence task's logits become one row per counted token (ticketforge.tasks)
                out, labels, soft = tasks.rows(task, logits.float(), x, y, target.float() if distilling else None)
                if distilling:
                    loss = distill_loss(out, soft, labels, distill, distill_temperature)
                else:
                    loss = nn.functional.cross_entropy(out, labels)
                if not torch.isfinite(loss):
                    raise NonFiniteLoss(f"{desc}: the loss became {loss.item()} at epoch {start_epoch + epoch + 1}; "
                                        "lower the learning rate (--set finetune.lr=...)")
                opt.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                if weights:  # pruned weights get no gradient (before clipping, so it sees the true norm)
                    pairs = [(w.grad, k) for w, k in zip(weights, keep) if w.grad is not None]
                    if pairs:
                        torch._foreach_mul_([g for g, _ in pairs], [k for _, k in pairs])
                if grad_clip:
                    scaler.unscale_(opt)  # clip the true gradient, not the fp16-scaled one
                    nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
                scaler.step(opt)
                scaler.update()
                sched.step()
                if weights:  # weight decay and momentum would otherwise revive them
                    with torch.no_grad():
                        torch._foreach_mul_(weights, keep)
                total += loss.item() * len(y)
                count += len(y)
                done += 1
                advance(loss=total / count)
                if until is not None:
                    if until(done):
                        steps = done  # the loops end here
                    model.train()  # `until` may have evaluated (eval mode)
            if count:
                losses.append(total / count)
    if mask is not None:
        mask.apply(model)
    # DDP keeps the weights identical but each rank's BatchNorm statistics saw its own last batch.
    distributed.sync_buffers(model)
    model.eval()
    return losses


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader, device: torch.device) -> float:
    """Top-1 accuracy over the loader: per sample, or per counted token for a sequence task (a
    language model's next-token accuracy)."""
    model.eval()
    task = tasks.of(model)
    correct = total = 0
    for x, y in loader:
        right, n = tasks.correct(task, model(x.to(device)).cpu(), x, y)
        correct += right
        total += n
    return correct / max(total, 1)


@torch.no_grad()
def recalibrate_bn(model: nn.Module, loader: DataLoader, device: torch.device, batches: int = 50) -> None:
    """Re-estimate BatchNorm running statistics on training batches: after pruning, the dense
    statistics are wrong for the subnetwork (the biggest single factor at high sparsity)."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    if not bns:
        return
    saved = {m: m.momentum for m in bns}
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over the batches seen
    model.train()
    for i, (x, _) in enumerate(loader):
        if i >= batches:
            break
        model(x.to(device))
    for m, mom in saved.items():
        m.momentum = mom
    distributed.sync_buffers(model)  # every rank estimated them on its own shard
    model.eval()
