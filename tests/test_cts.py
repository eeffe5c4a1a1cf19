import math

import pytest
import torch

from ticketforge import search
from ticketforge.errors import UserError
from ticketforge.masks import prunable
from ticketforge.search.start import starting_point


@pytest.mark.parametrize("start", ["trained", "rewind", "init"])
def test_each_start_mode_runs(make_ctx, start):
    ctx = make_ctx([f"search.start={start}", "train.rewind_epochs=1"])
    before = {k: w.clone() for k, w in prunable(ctx.model).items()}
    sp = starting_point(ctx)
    after = prunable(sp.model)
    if start == "trained":
        assert sp.model is ctx.model and sp.finetune == {}
    else:
        assert sp.model is not ctx.model
        assert all(not torch.equal(before[k], after[k]) for k in before)  # a new init
        k = 1 if start == "rewind" else 0
        assert sp.finetune["start_epoch"] == k and sp.finetune["epochs"] == 2 - k
        assert sp.finetune["total_epochs"] == 2 and sp.finetune["lr"] == ctx.recipe.train.lr
    assert sp.info["start"] == start


def test_rewind_trains_from_the_same_init_as_init(make_ctx):
    init = starting_point(make_ctx(["search.start=init"])).model
    rewound = starting_point(make_ctx(["search.start=rewind", "train.rewind_epochs=1"])).model
    rewound0 = starting_point(make_ctx(["search.start=rewind", "train.rewind_epochs=0"])).model
    w = "0.0.weight"
    assert torch.equal(dict(init.named_parameters())[w], dict(rewound0.named_parameters())[w])
    assert not torch.equal(dict(init.named_parameters())[w], dict(rewound.named_parameters())[w])


def test_rewind_without_arch_is_a_user_error(make_ctx):
    ctx = make_ctx(["search.start=rewind"])
    ctx.loaded.arch = None
    with pytest.raises(UserError, match="--arch"):
        starting_point(ctx)


def test_rewind_must_leave_epochs_to_retrain(make_ctx):
    with pytest.raises(UserError, match="rewind_epochs"):
        starting_point(make_ctx(["search.start=rewind", "train.rewind_epochs=2", "train.epochs=2"]))


@pytest.mark.parametrize("start", ["rewind", "init"])
def test_cts_passes_the_retrain_schedule_on(make_ctx, start):
    ctx = make_ctx([f"search.start={start}", "search.steps=2", "search.sparsity=0.9"])
    res = search.run(ctx)
    assert res.finetune["total_epochs"] == 2 and res.info["start"] == start
    assert res.model is not ctx.model
    assert res.mask.kept == round(0.1 * res.mask.total)
