"""The end-to-end contract of `ticketforge compress`: formats in, files and report out."""
import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from tests.conftest import FAST
from ticketforge import sparse_storage
from ticketforge.masks import Mask


def run_compress(cli, user, *extra, out="out", recipe="magnitude", model="user.pt", arch=True):
    args = ["compress", user / model, "--recipe", recipe, "--out", out, *FAST, *extra]
    if arch:
        args += ["--arch", "usermodels:UserNet"]
    return cli(*args)


def test_state_dict_with_arch_and_npz(cli, user, tmp_path):
    res = run_compress(cli, user, "--data", user / "train.npz", "--sparsity", "0.8")
    assert res.exit_code == 0, res.output
    out = tmp_path / "out"
    assert sorted(p.name for p in out.iterdir()) == ["dense.onnx", "model.onnx", "report.html", "report.json", "report.md", "ticket.pt"]
    report = json.loads((out / "report.json").read_text())
    for key in ("recipe", "ticketforge_version", "seed", "device", "sparsity", "params", "macs", "accuracy",
                "parity", "latency", "timings"):
        assert key in report
    # The report's sparsity is what model.onnx holds.
    m = onnx.load(str(out / "model.onnx"))
    onnx.checker.check_model(m)
    ws = [onnx.numpy_helper.to_array(i) for i in sparse_storage.densify(m).graph.initializer]
    ws = [w for w in ws if w.ndim >= 2]
    exported = sum(int((w == 0).sum()) for w in ws) / sum(w.size for w in ws)
    assert report["sparsity"]["achieved"] == pytest.approx(exported, abs=1e-6)
    assert report["sparsity"]["achieved"] == pytest.approx(0.8, abs=0.01)
    assert report["params"]["compressed"] < report["params"]["dense"]
    assert report["parity"] < 1e-3
    assert {r["batch"] for r in report["latency"]} == {1, 64}
    # Dynamic batch, one file, and the ONNX accuracy the report claims.
    assert not list(out.glob("*.data"))
    sess = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    d = np.load(user / "train.npz")
    for b in (1, 7):
        assert sess.run(None, {"input": d["x"][:b].astype(np.float32) / 255})[0].shape == (b, 10)
    # the exported model classifies like the torch ticket (within one validation sample), and well
    assert abs(report["accuracy"]["onnx"] - report["accuracy"]["compressed"]) <= 1 / report["data"]["val"] + 1e-9
    assert report["accuracy"]["onnx"] > 0.5
    # ticket.pt loads without pickles and holds the masks the export kept.
    ticket = torch.load(out / "ticket.pt", weights_only=True)
    assert ticket["format"] == "ticketforge.ticket/2"
    mask = Mask(ticket["masks"])
    assert mask.sparsity == pytest.approx(0.8, abs=0.002)
    for name, m_ in mask.items():
        assert torch.all(ticket["state_dict"][name][~m_] == 0), f"{name}: pruned weights revived by fine-tuning"


def test_masks_stay_zero_through_finetuning(user):
    from ticketforge import finetune
    from ticketforge.data import load_data, loader
    from ticketforge.masks import global_topk, prunable
    import usermodels

    model = usermodels.UserNet()
    scores = {k: torch.rand_like(w) for k, w in prunable(model).items()}
    mask = global_topk(scores, 1000)
    bundle = load_data(str(user / "train.npz"))
    finetune.train(model, loader(bundle.train, 64, shuffle=True), epochs=1, lr=0.1, device=torch.device("cpu"),
                   weight_decay=1e-3, mask=mask)
    for name, w in prunable(model).items():
        assert torch.all(w[~mask[name]] == 0)
    assert mask.kept == 1000


def test_checkpoint_describes_itself(cli, user, tmp_path):
    """A checkpoint with arch and data needs nothing else (the README's command on the demo)."""
    res = run_compress(cli, user, model="checkpoint.pt", arch=False)
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "out" / "report.json").read_text())["data"]["spec"].endswith("train.npz")


def test_npz_with_validation_split(cli, user, tmp_path):
    res = run_compress(cli, user, "--data", user / "split.npz")
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "out" / "report.json").read_text())["data"]["val"] == 300


def test_callable_data_and_digits(cli, user, tmp_path):
    assert run_compress(cli, user, "--data", "usermodels:dataset").exit_code == 0
    res = run_compress(cli, user, "--data", "digits", out="out2")
    assert res.exit_code == 0, res.output
    report = json.loads((tmp_path / "out2" / "report.json").read_text())
    assert report["data"]["train"] + report["data"]["val"] == 1797


def test_torchscript_archive(cli, user, tmp_path):
    res = run_compress(cli, user, "--data", user / "train.npz", model="scripted.pt", arch=False)
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "out" / "report.json").read_text())["model"]["kind"] == "torchscript"


def test_untrusted_pickle_refused_trusted_accepted(cli, user, tmp_path):
    res = run_compress(cli, user, "--data", user / "train.npz", model="whole.pt", arch=False)
    assert res.exit_code == 2
    assert "--trust-pickle" in res.output and "run code" in res.output
    assert not (tmp_path / "out").exists()
    res = run_compress(cli, user, "--data", user / "train.npz", "--trust-pickle", model="whole.pt", arch=False)
    assert res.exit_code == 0, res.output


def test_builtin_model_with_residual_blocks(cli, tmp_path):
    """A built-in ResNet (identity and 1x1-conv shortcuts) through every stage."""
    torch.save({"state_dict": __import__("ticketforge.models", fromlist=["x"]).build("digits-resnet", {"width": 8})
                .state_dict(), "arch": "digits-resnet", "arch_kwargs": {"width": 8}, "data": "digits"}, "r.pt")
    res = cli("compress", "r.pt", "--recipe", "magnitude", "--out", "out", *FAST)
    assert res.exit_code == 0, res.output
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["sparsity"]["achieved"] == pytest.approx(0.9, abs=0.005)


def test_existing_output_needs_force(cli, user, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "mine.txt").write_text("user data")
    res = run_compress(cli, user, "--data", user / "train.npz")
    assert res.exit_code == 2 and "--force" in res.output
    assert (tmp_path / "out" / "mine.txt").read_text() == "user data"
    res = run_compress(cli, user, "--data", user / "train.npz", "--force")
    assert res.exit_code == 0
    assert not (tmp_path / "out" / "mine.txt").exists()


def test_error_mid_run_leaves_no_output(cli, user, tmp_path, monkeypatch):
    from ticketforge import validate

    def boom(*a, **k):
        raise RuntimeError("simulated failure during validation")
    monkeypatch.setattr(validate, "latency", boom)
    res = run_compress(cli, user, "--data", user / "train.npz")
    assert res.exit_code == 2 and "simulated failure" in res.output
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.tmp")]


def test_parity_failure_is_exit_1(cli, user, tmp_path):
    res = run_compress(cli, user, "--data", user / "train.npz", "--set", "validate.parity_tol=1e-30")
    assert res.exit_code == 1 and "parity" in res.output, res.output
    assert not (tmp_path / "out").exists()


def test_bad_usage_is_exit_2(cli, user):
    assert cli("compress", user / "user.pt", "--recipe", "nope", "--arch", "usermodels:UserNet").exit_code == 2
    assert cli("compress").exit_code == 2


def test_recipes_and_models_listed(cli):
    res = cli("recipes")
    assert res.exit_code == 0 and "magnitude" in res.output and "cts" in res.output
    assert "method: cts" in cli("recipes", "cts").output
    assert "digits-resnet" in cli("models").output


def test_rerunning_a_finished_run_is_a_no_op(cli, user, tmp_path):
    """The same command twice: the second finds its own finished result and skips every stage;
    any other run into that folder still needs --force."""
    assert run_compress(cli, user, "--data", user / "train.npz").exit_code == 0
    before = (tmp_path / "out" / "model.onnx").stat().st_mtime_ns
    res = run_compress(cli, user, "--data", user / "train.npz")
    assert res.exit_code == 0
    assert (tmp_path / "out" / "model.onnx").stat().st_mtime_ns == before
    res = run_compress(cli, user, "--data", user / "train.npz", "--sparsity", "0.5")
    assert res.exit_code == 2 and "--force" in res.output
