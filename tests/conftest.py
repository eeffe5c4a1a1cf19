"""Shared fixtures: a small user model (residual block, depthwise conv, BatchNorm) trained briefly
on real data (scikit-learn's digits), saved the ways users save models."""
import os
import sys
import textwrap

import numpy as np
import pytest
import torch

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

USER_MODEL_SRC = textwrap.dedent('''
    import torch
    from torch import nn

    class Block(nn.Module):
        def __init__(self, c):
            super().__init__()
            self.f = nn.Sequential(nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c), nn.ReLU(),
                                   nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c))
        def forward(self, x):
            return torch.relu(x + self.f(x))

    class UserNet(nn.Module):
        def __init__(self, num_classes=10):
            super().__init__()
            self.stem = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
            self.block = Block(16)
            self.dw = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1, groups=16, bias=False), nn.BatchNorm2d(16),
                                    nn.ReLU(), nn.Conv2d(16, 32, 1), nn.ReLU())
            self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, num_classes))
        def forward(self, x):
            return self.head(self.dw(self.block(self.stem(x))))

    def make():
        return UserNet()

    def dataset():
        from sklearn.datasets import load_digits
        from torch.utils.data import TensorDataset
        d = load_digits()
        x = torch.tensor(d.images[:, None] / 16.0, dtype=torch.float32)
        y = torch.tensor(d.target)
        return TensorDataset(x[:1500], y[:1500]), TensorDataset(x[1500:], y[1500:])
''')


@pytest.fixture(scope="session")
def user(tmp_path_factory):
    """Paths of a trained user model: state_dict, module file, .npz data, TorchScript, pickle."""
    from sklearn.datasets import load_digits

    root = tmp_path_factory.mktemp("user")
    (root / "usermodels.py").write_text(USER_MODEL_SRC)
    sys.path.insert(0, str(root))
    import usermodels

    d = load_digits()
    x = (d.images[:, None] * 16).clip(0, 255).astype(np.uint8)
    y = d.target.astype(np.int64)
    np.savez(root / "train.npz", x=x[:1200], y=y[:1200])
    np.savez(root / "split.npz", x=x[:1200], y=y[:1200], x_val=x[1200:1500], y_val=y[1200:1500])
    torch.manual_seed(0)
    model = usermodels.UserNet()
    xt, yt = torch.tensor(x[:1200], dtype=torch.float32) / 255, torch.tensor(y[:1200])
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    for _ in range(4):
        perm = torch.randperm(len(yt))
        for i in range(0, len(yt), 64):
            b = perm[i:i + 64]
            loss = torch.nn.functional.cross_entropy(model(xt[b]), yt[b])
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    torch.save(model.state_dict(), root / "user.pt")
    torch.save({"state_dict": model.state_dict(), "arch": "usermodels:UserNet", "data": str(root / "train.npz")},
               root / "checkpoint.pt")
    torch.save(model, root / "whole.pt")
    torch.jit.script(model).save(str(root / "scripted.pt"))
    return root


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path, monkeypatch):
    """Every test runs in its own folder, so default output paths never collide."""
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)


@pytest.fixture
def make_ctx():
    """A SearchContext over a tiny residual CNN and 64 random 8x8 images: fast search-method tests."""
    from torch.utils.data import TensorDataset

    from ticketforge import models, recipe as recipes
    from ticketforge.search.base import SearchContext
    from ticketforge.data import DataBundle
    from ticketforge.loading import LoadedModel

    def make(sets=(), start_weights_seed=123, n=64):
        g = torch.Generator().manual_seed(0)
        x, y = torch.rand(n, 1, 8, 8, generator=g), torch.randint(0, 10, (n,), generator=g)
        bundle = DataBundle(train=TensorDataset(x, y), val=TensorDataset(x[:16], y[:16]), spec="test")
        torch.manual_seed(start_weights_seed)
        loaded = LoadedModel(model=models.build("digits-resnet", {"width": 4}), arch="digits-resnet",
                             arch_kwargs={"width": 4})
        # search.epochs / batch_size where the chosen method reads them (CTS-style methods)
        method = next((s.split("=", 1)[1] for s in sets if s.startswith("search.method=")), "cts")
        from ticketforge.search import METHODS

        keys = METHODS.get(method).keys
        cts_like = [f"search.{k}" for k in ("epochs=1", "batch_size=16") if k.split("=")[0] in keys]
        recipe = recipes.resolve("cts", [*cts_like, "train.epochs=2", "train.batch_size=16", *sets])
        return SearchContext(model=loaded.model.eval(), loaded=loaded, data=bundle, recipe=recipe,
                             device=torch.device("cpu"))
    return make


FAST = ["--epochs", "1", "--set", "validate.repeats=3", "--set", "validate.warmup=1", "--set", "validate.max_seconds=0.5",
        "--quiet"]


@pytest.fixture
def cli():
    """Run the CLI in-process; returns the click Result (exit_code, output)."""
    from click.testing import CliRunner

    from ticketforge.cli import cli as app

    def run(*args):
        return CliRunner().invoke(app, [str(a) for a in args], catch_exceptions=False)
    return run


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A folder holding the tiny trained MLP of tests/_tiny.py (mlp.pt, --arch tinynet:Net)."""
    from tests._tiny import make_tiny

    folder = tmp_path_factory.mktemp("tiny")
    make_tiny(folder)
    return folder
