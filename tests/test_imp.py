"""IMP: the round schedule, the per-round table, and resuming an interrupted run."""
import math

import pytest
import torch

from ticketforge import recipe as recipe_mod
from ticketforge.errors import UserError
from ticketforge.masks import keep_count
from ticketforge.pipeline import Job, compress
from ticketforge.search import imp as imp_mod
from ticketforge.ui import UI

from tests.tiny import FAST, TINY, saved, small_digits

ARCH = "digits-resnet"


@pytest.mark.parametrize("sparsity, rounds", [(0.2, 1), (0.36, 2), (0.5, 4), (0.8, 8), (0.9, 11), (0.993, 23)])
def test_round_count_is_the_predicted_one(sparsity, rounds):
    assert imp_mod.round_count(sparsity, 0.2) == rounds
    plan = imp_mod.schedule(10_000, sparsity, 0.2)
    assert len(plan) == rounds
    assert plan[-1] == keep_count(10_000, sparsity)
    assert all(a > b for a, b in zip([10_000] + plan, plan))
    # every round but the last removes 20% of what is left
    assert plan[0] == 8_000 or rounds == 1


class Recorder(UI):
    def __init__(self):
        super().__init__(quiet=True)
        self.lines = []

    def log(self, msg):
        self.lines.append(msg)


def job(tmp_path, out, sets=(), sparsity=0.5, ui=None):
    recipe = recipe_mod.resolve("imp", FAST + ["finetune.batch_size=128", *sets], sparsity=sparsity)
    model = tmp_path / "m.pt"
    if not model.exists():
        saved(ARCH, model)
    return Job(model_path=model, recipe=recipe, data=small_digits(tmp_path / "d.npz"), arch=ARCH,
               arch_kwargs=TINY[ARCH], out=tmp_path / out, ui=ui or UI(quiet=True), seed=3)


def final_mask(out):
    return torch.load(out / "ticket.pt", weights_only=True)["masks"]


def test_imp_reaches_the_target_in_the_predicted_rounds(tmp_path):
    report = compress(job(tmp_path, "out"))
    rounds = report["search"]["rounds"]
    assert [r["round"] for r in rounds] == [1, 2, 3, 4] == list(range(1, math.ceil(math.log(0.5) / math.log(0.8)) + 1))
    assert rounds[0]["sparsity"] == pytest.approx(0.2, abs=1e-3)
    assert rounds[-1]["sparsity"] == pytest.approx(0.5, abs=1e-5)
    assert report["sparsity"]["achieved"] == pytest.approx(0.5, abs=1e-3)
    md = (tmp_path / "out" / "report.md").read_text()
    assert "| round | sparsity | validation accuracy | seconds |" in md and "| 4 | 50.00% |" in md


def test_interrupted_run_resumes_and_ends_with_the_same_mask(tmp_path, monkeypatch):
    compress(job(tmp_path, "ref"))
    reference = final_mask(tmp_path / "ref")

    real = imp_mod._Trainer.__call__

    def dies_in_round_3(self, model, mask, r, desc):
        if r == 3:
            raise KeyboardInterrupt  # as if the run were killed in the middle of round 3
        return real(self, model, mask, r, desc)

    monkeypatch.setattr(imp_mod._Trainer, "__call__", dies_in_round_3)
    with pytest.raises(KeyboardInterrupt):
        compress(job(tmp_path, "out"))
    assert not (tmp_path / "out").exists()
    monkeypatch.setattr(imp_mod._Trainer, "__call__", real)

    ui = Recorder()
    report = compress(job(tmp_path, "out", ui=ui))
    assert "resuming: rounds 1-2 of 4 already done, skipped" in ui.lines
    assert not any(line.startswith("IMP round 1/") or line.startswith("IMP round 2/") for line in ui.lines)
    assert report["search"]["resumed_rounds"] == 2 and len(report["search"]["rounds"]) == 4
    got = final_mask(tmp_path / "out")
    assert got.keys() == reference.keys()
    assert all(torch.equal(got[k], reference[k]) for k in got)
    # a successful run leaves no run state behind
    assert not (tmp_path / ".ticketforge").exists() or not any((tmp_path / ".ticketforge").glob("out-*"))


def test_rewind_start_retrains_each_round_from_the_rewind_weights(tmp_path, monkeypatch):
    seen = {}
    real = imp_mod._Trainer.__call__

    def record(self, model, mask, r, desc):
        seen[r] = next(iter(model.parameters())).detach().clone()  # before this round trains
        return real(self, model, mask, r, desc)

    monkeypatch.setattr(imp_mod._Trainer, "__call__", record)
    sets = ["search.start=rewind", "train.epochs=2", "train.rewind_epochs=1", "train.batch_size=128"]
    report = compress(job(tmp_path, "out", sets, sparsity=0.36))
    info = report["search"]
    assert [r["round"] for r in info["rounds"]] == [0, 1, 2]   # dense training, then two rounds
    assert info["retrain"] == "weight rewinding" and info["start"] == "rewind"
    assert torch.equal(seen[1], seen[0]) and torch.equal(seen[2], seen[0])
    assert report["sparsity"]["achieved"] == pytest.approx(0.36, abs=1e-3)


# ---------------------------------------------------------------- faithful LTR and LRR (issue 15)

def _record_lrs(monkeypatch):
    """Every SGD step's learning rate, in order."""
    seen = []
    real = torch.optim.SGD.step

    def step(self, *a, **k):
        seen.append(self.param_groups[0]["lr"])
        return real(self, *a, **k)

    monkeypatch.setattr(torch.optim.SGD, "step", step)
    return seen


def _cosine(lr, total):
    return [lr * 0.5 * (1 + math.cos(math.pi * s / total)) for s in range(total)]


def test_training_rewound_to_an_iteration_runs_the_rest_of_the_schedule(monkeypatch):
    from torch.utils.data import TensorDataset

    from ticketforge import finetune
    from ticketforge.data import loader

    data = loader(TensorDataset(torch.rand(40, 4), torch.randint(0, 3, (40,))), 8, shuffle=True)  # 5 steps/epoch
    lrs = _record_lrs(monkeypatch)
    model = torch.nn.Linear(4, 3)
    finetune.train(model, data, epochs=2, start_epoch=1, start_step=2, total_epochs=3, lr=0.1,
                   device=torch.device("cpu"))
    assert lrs == pytest.approx(_cosine(0.1, 15)[7:])       # steps 7..14 of 15, no more, no less
    lrs.clear()
    finetune.train(model, data, epochs=1, max_steps=3, total_epochs=3, lr=0.1, device=torch.device("cpu"))
    assert lrs == pytest.approx(_cosine(0.1, 15)[:3])       # up to a rewind point at step 3


def test_rewind_point_is_an_iteration_not_an_epoch(make_ctx):
    from ticketforge.search.start import starting_point

    sp = starting_point(make_ctx(["search.start=rewind", "train.rewind_steps=3"]))  # 64 samples / 16: 4 steps/epoch
    assert sp.info["rewind_step"] == 3
    assert (sp.schedule.start_epoch, sp.schedule.start_step, sp.schedule.epochs) == (0, 3, 2)
    one_epoch = starting_point(make_ctx(["search.start=rewind", "train.rewind_epochs=1"]))
    three = starting_point(make_ctx(["search.start=rewind", "train.rewind_steps=3"]))
    w = "0.0.weight"
    assert torch.equal(dict(sp.model.named_parameters())[w], dict(three.model.named_parameters())[w])
    assert not torch.equal(dict(sp.model.named_parameters())[w], dict(one_epoch.model.named_parameters())[w])


def test_ltr_retrains_the_whole_rest_of_the_schedule_every_round(make_ctx, monkeypatch):
    """LTR: dense training (round 0) and every round run steps 3..7 of the 8-step schedule, each from
    the rewind weights; the plan removes 20% of the remaining weights per round."""
    ctx = make_ctx(["search.method=imp", "search.start=rewind", "train.rewind_steps=3", "search.sparsity=0.36"])
    per_round, real = {}, imp_mod._Trainer.__call__

    def record(self, model, mask, r, desc):
        lrs = _record_lrs(monkeypatch)
        out = real(self, model, mask, r, desc)
        per_round[r] = list(lrs)
        monkeypatch.undo()
        monkeypatch.setattr(imp_mod._Trainer, "__call__", record)
        return out

    monkeypatch.setattr(imp_mod._Trainer, "__call__", record)
    res = imp_mod.imp(ctx)
    tail = _cosine(ctx.recipe.train.lr, 8)[3:]
    assert sorted(per_round) == [0, 1, 2]
    assert all(lrs == pytest.approx(tail) for lrs in per_round.values())
    total = res.mask.total
    assert [r["sparsity"] for r in res.info["rounds"][1:]] == pytest.approx(
        [1 - round(0.8 * total) / total, 0.36], abs=1e-3)


def test_lrr_replays_the_tail_of_the_train_schedule(make_ctx, monkeypatch):
    """LRR (Renda et al.): each round on the trained weights replays the last search.epochs of the
    train schedule, learning rates included; not a fresh cosine."""
    ctx = make_ctx(["search.method=imp", "search.start=trained", "search.epochs=1", "train.epochs=3",
                    "train.lr=0.2", "search.sparsity=0.2"])
    lrs = _record_lrs(monkeypatch)
    res = imp_mod.imp(ctx)
    assert lrs == pytest.approx(_cosine(0.2, 12)[8:])        # epoch 3 of 3, 4 steps each
    assert "learning-rate rewinding" in res.info["retrain"]
    with pytest.raises(UserError, match="train.epochs"):
        imp_mod.imp(make_ctx(["search.method=imp", "search.epochs=4", "train.epochs=3", "search.sparsity=0.2"]))
