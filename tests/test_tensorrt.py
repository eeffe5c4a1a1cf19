"""The engine path up to where TensorRT itself is needed: its absence is a clear exit-2 error, before any work."""
import sys
import types
from pathlib import Path

import pytest
from click.testing import CliRunner

import torch

from ticketforge import models, tensorrt
from ticketforge.cli import cli
from ticketforge.demo import DEMO_ARCH
from ticketforge.errors import UserError


def test_engine_without_tensorrt_exits_2_and_writes_nothing(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # import fails even where TensorRT is installed
    # an untrained checkpoint is enough: the check must come before the model is even used
    torch.save({"state_dict": models.build(DEMO_ARCH).state_dict(), "arch": DEMO_ARCH, "arch_kwargs": {},
                "data": "digits"}, "demo.pt")
    result = CliRunner().invoke(cli, ["compress", "demo.pt", "--recipe", "magnitude", "--out", "out",
                                      "--set", "export.targets=[onnx, tensorrt]"])
    assert result.exit_code == 2
    assert "pip install ticketforge[tensorrt]" in " ".join(result.output.split())
    assert "Traceback" not in result.output
    assert not Path("out").exists()
    assert not list(Path(".").glob(".out*"))


def test_tensorrt_without_cuda_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", types.ModuleType("tensorrt"))
    monkeypatch.setattr(tensorrt.torch.cuda, "is_available", lambda: False)
    with pytest.raises(UserError, match="no CUDA device"):
        tensorrt.require()


def test_sparse_layers_read_from_build_log():
    lines = ["Layers eligible for sparse math: conv1, conv2, fc",
             "TRT inference plan picked sparse implementation for layers: conv1, conv2"]
    assert tensorrt._sparse_layers(lines) == ["conv1", "conv2"]
    assert tensorrt._sparse_layers(["no sparsity here"]) == []
