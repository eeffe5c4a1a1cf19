"""Device, precision and loader choices (on the CPU, with CUDA availability monkeypatched: these
check the decisions, they do not pretend to run on a GPU)."""
import pytest
import torch
from torch import nn

from ticketforge import device
from ticketforge.errors import UserError

CUDA = torch.device("cuda")
CPU = torch.device("cpu")


def test_auto_picks_cuda_only_when_present(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert device.pick("auto") == CPU
    with pytest.raises(UserError, match="no CUDA device"):
        device.pick("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert device.pick("auto") == CUDA
    assert device.pick("cuda:1") == torch.device("cuda", 1)
    assert device.pick("cpu") == CPU
    with pytest.raises(UserError, match="expected auto, cpu or cuda"):
        device.pick("tpu")


def test_precision_bf16_where_supported_else_fp16_with_scaler(monkeypatch):
    assert device.precision(CPU) == device.Precision(enabled=False)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    p = device.precision(CUDA)
    assert p.enabled and p.dtype == torch.bfloat16 and not p.scaled
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    p = device.precision(CUDA)
    assert p.enabled and p.dtype == torch.float16 and p.scaled


def test_fp32_path_on_cpu_is_a_no_op():
    p = device.precision(CPU)
    scaler = p.scaler(CPU)
    assert not scaler.is_enabled()
    with p.autocast(CPU):
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.float32


def test_channels_last_only_for_conv_nets_on_cuda():
    conv = nn.Sequential(nn.Conv2d(1, 4, 3), nn.Flatten())
    mlp = nn.Sequential(nn.Linear(4, 2))
    assert device.wants_channels_last(conv, CUDA)
    assert not device.wants_channels_last(mlp, CUDA)
    assert not device.wants_channels_last(conv, CPU)
    assert device.to_device(conv, CPU)[0].weight.is_contiguous()  # unchanged on the CPU


def test_loaders_pin_memory_and_use_workers_only_for_cuda(monkeypatch):
    assert device.loader_options(CPU) == {}
    monkeypatch.setattr("os.cpu_count", lambda: 16)
    opts = device.loader_options(CUDA)
    assert opts["pin_memory"] and opts["num_workers"] == 4 and opts["persistent_workers"]
    assert device.loader_options(CUDA, world_size=8)["num_workers"] == 1  # 16 cores shared by 8 ranks
