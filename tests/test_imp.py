"""IMP: the round schedule, the per-round table, and resuming an interrupted run."""
import math

import pytest
import torch

from ticketforge import recipe as recipe_mod
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
