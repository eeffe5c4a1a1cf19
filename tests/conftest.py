import os

import pytest
import torch

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path, monkeypatch):
    """Every test runs in its own folder, so default output paths never collide."""
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)


@pytest.fixture
def make_ctx():
    """A SearchContext over a tiny residual CNN and 64 random 8x8 images: fast search-method tests."""
    from torch.utils.data import TensorDataset

    from ticketforge import models, recipe as recipes, search
    from ticketforge.data import DataBundle
    from ticketforge.loading import LoadedModel

    def make(sets=(), start_weights_seed=123, n=64):
        g = torch.Generator().manual_seed(0)
        x, y = torch.rand(n, 1, 8, 8, generator=g), torch.randint(0, 10, (n,), generator=g)
        bundle = DataBundle(train=TensorDataset(x, y), val=TensorDataset(x[:16], y[:16]), spec="test")
        torch.manual_seed(start_weights_seed)
        loaded = LoadedModel(model=models.build("digits-resnet", {"width": 4}), arch="digits-resnet",
                             arch_kwargs={"width": 4})
        recipe = recipes.resolve("cts", ["search.epochs=1", "search.batch_size=16", "train.epochs=2",
                                         "train.batch_size=16", *sets])
        return search.SearchContext(model=loaded.model.eval(), loaded=loaded, data=bundle, recipe=recipe,
                                    device=torch.device("cpu"))
    return make
