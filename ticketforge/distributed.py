"""Data-parallel runs under torchrun: torch.distributed is the engine (gloo on CPU, nccl on CUDA).

Every rank runs the whole pipeline up to the exported files; training and search loaders give each
rank its own shard (DistributedSampler) of batch_size // world_size samples, so the global batch is
the recipe's batch size; gradients are averaged (DDP for training, an all-reduce in CTS). Only
rank 0 writes anything. In a single process every helper here is a no-op."""
from __future__ import annotations

import hashlib
import os
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import Dataset, DistributedSampler

from ticketforge.errors import UserError, VerificationError


def launched() -> bool:
    """Started by torchrun (or any launcher that sets the env:// variables) with more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    return rank() == 0


def init(device: torch.device) -> torch.device:
    """Join the process group when launched with WORLD_SIZE > 1; returns this rank's device
    (cuda:LOCAL_RANK on GPUs)."""
    if not launched() or active():
        return device
    if not dist.is_available():
        raise UserError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
    if device.type == "cuda":
        local = int(os.environ.get("LOCAL_RANK", "0"))
        if local >= torch.cuda.device_count():
            raise UserError(f"LOCAL_RANK {local} but only {torch.cuda.device_count()} CUDA device(s); "
                            "use --nproc-per-node <= the number of GPUs")
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, timeout=timedelta(minutes=30))
    return device


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def wait_for_all() -> None:
    """Every rank waits here for the others. The other ranks wait for rank 0 to finish exporting and
    measuring before they leave: a rank that tears its process group down while rank 0 still holds
    it aborts in gloo, and torchrun then kills rank 0 with it."""
    if active():
        dist.barrier()


def per_rank_batch(global_batch: int) -> int:
    """The recipe's batch size is the global batch: each rank takes its share."""
    world = world_size()
    if global_batch % world:
        raise UserError(f"batch size {global_batch} does not split evenly over {world} processes; "
                        f"choose a multiple of {world} (--set finetune.batch_size=... / search.batch_size=...)")
    return global_batch // world


class EpochSampler(DistributedSampler):
    """DistributedSampler that moves to the next epoch's shuffle on every pass, so training loops
    need not call set_epoch themselves."""

    def __iter__(self):
        order = super().__iter__()
        self.set_epoch(self.epoch + 1)
        return order


def sampler(ds: Dataset, shuffle: bool, seed: int) -> DistributedSampler | None:
    return EpochSampler(ds, num_replicas=world_size(), rank=rank(), shuffle=shuffle, seed=seed) if active() else None


def wrap(model: nn.Module, device: torch.device) -> nn.Module:
    """DistributedDataParallel around the model for training (the model itself when alone)."""
    if not active():
        return model
    return nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def sync_buffers(model: nn.Module) -> None:
    """Rank 0's buffers (BatchNorm statistics) everywhere: each rank estimated them on its own shard."""
    if active():
        for b in model.buffers():
            dist.broadcast(b.data, src=0)


def broadcast(obj: Any) -> Any:
    """Rank 0's Python object on every rank (a decision, or a finished stage's result)."""
    if not active():
        return obj
    box = [obj if is_main() else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def digest(tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for name in sorted(tensors):
        h.update(name.encode())
        h.update(tensors[name].detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def check_identical(tensors: dict[str, torch.Tensor], what: str) -> str:
    """Fail loudly unless every rank holds exactly the same tensors (e.g. the mask); returns their
    digest."""
    mine = digest(tensors)
    if not active():
        return mine
    everyone: list[str | None] = [None] * world_size()
    dist.all_gather_object(everyone, mine)
    if len(set(everyone)) != 1:
        bad = [r for r, d in enumerate(everyone) if d != everyone[0]]
        raise VerificationError(f"the {what} differs between ranks (ranks {bad} differ from rank 0): "
                                "data-parallel replicas diverged")
    return mine
