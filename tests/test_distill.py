"""Distillation from the dense model (finetune.distill) and compression of data without labels:
the loss, what training with a teacher does, and `ticketforge compress` on an .npz of inputs only
and on an image folder without class folders."""
from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from torch.utils.data import TensorDataset

from conftest import FAST
from ticketforge import recipe as recipes
from ticketforge.data import DataBundle, loader
from ticketforge.finetune import Schedule, distill_loss, fit, train
from ticketforge.models import digits_resnet


def test_weight_zero_is_cross_entropy():
    g = torch.Generator().manual_seed(0)
    s, t, y = torch.randn(16, 10, generator=g), torch.randn(16, 10, generator=g), torch.randint(0, 10, (16,), generator=g)
    assert torch.allclose(distill_loss(s, t, y, 0.0, 4.0), torch.nn.functional.cross_entropy(s, y))


def test_kl_term_is_hintons_t_squared_kl():
    g = torch.Generator().manual_seed(1)
    s, t, y = torch.randn(8, 5, generator=g), torch.randn(8, 5, generator=g), torch.randint(0, 5, (8,), generator=g)
    T = 3.0
    p_t, log_p_s = torch.softmax(t / T, 1), torch.log_softmax(s / T, 1)
    kl = (p_t * (p_t.log() - log_p_s)).sum(1).mean() * T * T
    assert torch.allclose(distill_loss(s, t, None, 1.0, T), kl, atol=1e-6)
    ce = torch.nn.functional.cross_entropy(s, y)
    assert torch.allclose(distill_loss(s, t, y, 0.25, T), 0.75 * ce + 0.25 * kl, atol=1e-6)


def test_student_equal_to_teacher_has_no_kl_gradient():
    t = torch.randn(8, 10)
    s = t.clone().requires_grad_(True)
    loss = distill_loss(s, t, None, 1.0, 4.0)
    loss.backward()
    assert abs(loss.item()) < 1e-6 and s.grad.abs().max() < 1e-6
    # ... and a different student gets one, pulling it toward the teacher
    s2 = (t + torch.randn(8, 10)).requires_grad_(True)
    distill_loss(s2, t, None, 1.0, 4.0).backward()
    assert s2.grad.abs().max() > 1e-3


def _digits(n=600):
    from sklearn.datasets import load_digits

    d = load_digits()
    return torch.tensor(d.images[:n, None] / 16.0, dtype=torch.float32), torch.tensor(d.target[:n])


def _teacher(x, y):
    torch.manual_seed(0)
    teacher = digits_resnet(width=8)
    train(teacher, loader(TensorDataset(x, y), 64, shuffle=True), epochs=6, lr=0.05, device=torch.device("cpu"))
    teacher.zero_grad(set_to_none=True)  # its own training's last gradients: a student's must not appear
    return teacher.eval()


def test_training_with_a_teacher_follows_the_teacher_not_the_labels():
    """With labels that carry no information (shuffled), cross-entropy learns nothing about the task;
    pure distillation (weight 1) learns the teacher's function from the same batches, and the
    teacher itself is only read: no gradients, no change to its weights or BatchNorm statistics."""
    x, y = _digits()
    teacher = _teacher(x, y)
    before = copy.deepcopy(teacher.state_dict())
    noise = y[torch.randperm(len(y), generator=torch.Generator().manual_seed(1))]
    data = DataBundle(train=TensorDataset(x[:500], noise[:500]), val=TensorDataset(x[500:], noise[500:]), spec="t")
    with torch.no_grad():
        top1 = teacher(x[500:]).argmax(1)

    def agreement(weight):
        torch.manual_seed(0)
        student = digits_resnet(width=8)
        sched = Schedule(epochs=6, lr=0.05, batch_size=64, distill=weight, distill_temperature=4.0)
        fit(student, None, sched, data, torch.device("cpu"), teacher=teacher)
        with torch.no_grad():
            return (student.eval()(x[500:]).argmax(1) == top1).float().mean().item()

    plain, distilled = agreement(0.0), agreement(1.0)
    assert distilled > 0.6 and distilled > plain + 0.3, (plain, distilled)
    assert all(p.grad is None for p in teacher.parameters())
    assert all(torch.equal(v, teacher.state_dict()[k]) for k, v in before.items())


def test_recipe_default_and_label_free_weight():
    r = recipes.resolve("cts")
    assert Schedule.finetune(r).distill == r.finetune.distill
    assert Schedule.finetune(r, labeled=False).distill == 1.0
    assert Schedule.finetune(recipes.resolve("cts", ["finetune.distill=0"]), labeled=False).distill == 1.0


# ---------------------------------------------------------------- data without labels, end to end

def _onnx_top1(path, x):
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x})[0].argmax(1)


def test_npz_without_labels_compresses_on_agreement(user, cli):
    d = np.load(user / "split.npz")
    np.savez("inputs.npz", x=d["x"], x_val=d["x_val"])
    r = cli("compress", user / "user.pt", "--arch", "usermodels:UserNet", "--data", "inputs.npz", "--recipe",
            "magnitude", "--sparsity", "0.8", "--out", "out", "--set", "gate.max_accuracy_drop=0.5", *FAST)
    assert r.exit_code == 0, r.output
    rep = json.loads(Path("out/report.json").read_text())
    assert "accuracy" not in rep and rep["data"]["labels"] is False
    # measured on the exported files: model.onnx's top-1 against dense.onnx's on x_val
    x_val = d["x_val"].astype(np.float32) / 255
    want = float((_onnx_top1("out/model.onnx", x_val) == _onnx_top1("out/dense.onnx", x_val)).mean())
    assert rep["agreement"]["onnx"] == pytest.approx(want)
    assert 0.5 < want < 1.0  # an 80% sparse ticket after one epoch: close to the dense model, not identical
    check = next(c for c in rep["gate"]["checks"] if c["name"] == "max_accuracy_drop[model.onnx]")
    assert check["measured"] == pytest.approx(1 - want, abs=1e-6) and "agreement" in check["measured_as"]
    md = Path("out/report.md").read_text()
    assert "top-1 agreement with dense.onnx" in md and "accuracy (ONNX" not in md
    assert any("pure distillation" in n for n in rep["notes"])
    assert "agreement" in Path("out/report.html").read_text()


def test_npz_with_labels_reports_accuracy_and_agreement(user, cli):
    r = cli("compress", user / "user.pt", "--arch", "usermodels:UserNet", "--data", user / "split.npz", "--recipe",
            "magnitude", "--sparsity", "0.8", "--out", "out", *FAST)
    assert r.exit_code == 0, r.output
    rep = json.loads(Path("out/report.json").read_text())
    assert rep["data"]["labels"] is True and rep["recipe"]["finetune"]["distill"] > 0
    assert 0 < rep["accuracy"]["onnx"] <= 1 and 0 < rep["agreement"]["onnx"] <= 1
    assert not any("pure distillation" in n for n in rep["notes"])


def test_image_folder_without_classes_compresses(cli):
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, n in (("train", 24), ("val", 8)):
        Path("imgs", split).mkdir(parents=True)
        for i in range(n):
            Image.fromarray(rng.integers(0, 255, (10, 12, 3), dtype=np.uint8)).save(Path("imgs", split, f"{i}.png"))
    torch.manual_seed(0)
    torch.save(digits_resnet(in_channels=3, width=4).state_dict(), "model.pt")
    r = cli("compress", "model.pt", "--arch", "digits-resnet", "--arch-kwargs", '{"in_channels": 3, "width": 4}',
            "--data", "imgs", "--recipe", "magnitude", "--sparsity", "0.5", "--out", "out", "--set", "data.resize=8",
            "--set", "data.crop=8", *FAST)
    assert r.exit_code == 0, r.output
    rep = json.loads(Path("out/report.json").read_text())
    assert "accuracy" not in rep and rep["data"]["labels"] is False
    assert rep["data"]["val"] == 8 and rep["data"]["image_folder"]["images"] == 32
    assert 0 <= rep["agreement"]["onnx"] <= 1


# ---------------------------------------------------------------- retraining inside a search

@pytest.mark.parametrize("labeled", [True, False])
def test_ltr_rounds_distill_and_the_dense_run_only_without_labels(make_ctx, monkeypatch, labeled):
    """LTR's rounds retrain a ticket: they distill from the dense model. Its round 0 (the dense run
    from the rewind point) learns from the labels, as the papers train; without labels there is
    nothing to learn from but the dense model."""
    from ticketforge import finetune
    from ticketforge.search import imp as imp_mod

    ctx = make_ctx(["search.method=imp", "search.start=rewind", "train.rewind_steps=3", "search.sparsity=0.36"])
    ctx.teacher = copy.deepcopy(ctx.model).eval()
    ctx.data.labeled = labeled
    calls, real = [], finetune.train

    def record(model, loader, **kw):
        calls.append((kw.get("desc"), kw.get("teacher") is ctx.teacher, kw.get("distill", 0.0)))
        return real(model, loader, **kw)

    monkeypatch.setattr(finetune, "train", record)
    imp_mod.imp(ctx)
    by = {desc: (taught, w) for desc, taught, w in calls}
    w = ctx.recipe.finetune.distill if labeled else 1.0
    assert by["IMP round 1/2"] == by["IMP round 2/2"] == (True, w)
    assert by["IMP dense training"] == ((False, 0.0) if labeled else (True, 1.0))
    assert by["rewind: train 3 of 8 steps"] == by["IMP dense training"]


def test_flat_image_folder_is_data_without_labels():
    """DIR/*.png (no train/, no class folders): every image, a held-out validation split, no labels."""
    from PIL import Image

    from ticketforge.data import UNLABELED, labels_of, load_data
    from ticketforge.recipe import DataConfig

    Path("flat").mkdir()
    for i in range(10):
        Image.fromarray(np.full((9, 9, 3), 20 * i, np.uint8)).save(Path("flat", f"{i}.png"))
    b = load_data("flat", 0.2, 0, DataConfig(resize=8, crop=8))
    assert not b.labeled and b.info["images"] == 10 and b.info["classes"] == []
    assert (len(b.train), len(b.val)) == (8, 2) and b.input_shape == (3, 8, 8)
    assert (labels_of(b.train) == UNLABELED).all()
