"""Sparse storage (export.sparse_storage): mostly-zero weights as ONNX sparse initializers. The file
is smaller where that pays, ONNX Runtime gives the same outputs, and every read-back (sparsity,
parameters, MACs, 2:4 groups, quantization) sees the same weights as in the dense-stored file."""
import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from ticketforge import models, quantize, sparse_storage, validate
from ticketforge.structures.nm import pattern as nm
from ticketforge.errors import VerificationError
from ticketforge.export import export_onnx
from ticketforge.masks import Mask, prunable
from ticketforge.recipe import ExportConfig

X = torch.rand(16, 1, 8, 8, generator=torch.Generator().manual_seed(0))


def _exported(mask_fn, path: Path) -> Path:
    torch.manual_seed(0)
    model = models.build("digits-resnet", {"width": 16}).eval()
    mask_fn(model).apply(model)
    return export_onnx(model, X[:2], path, ExportConfig())


def unstructured(model):
    """95% of every layer's weights zero (a global cut would empty whole layers of a random init)."""
    return Mask({n: w.abs() > w.abs().flatten().kthvalue(int(0.95 * w.numel())).values
                 for n, w in prunable(model).items()})


def two_four(model):
    return nm.nm_masks(model, {n: w.abs() for n, w in prunable(model).items()})


def _outputs(path: Path) -> np.ndarray:
    return validate.run(validate.session(path), X.numpy())


def _round_trip(mask_fn, mode, tmp_path):
    dense = _exported(mask_fn, tmp_path / "dense_stored.onnx")
    stored = tmp_path / "sparse_stored.onnx"
    shutil.copy(dense, stored)
    info = sparse_storage.store(stored, mode, validate.feed(stored, X))
    onnx.checker.check_model(str(stored))
    assert np.array_equal(_outputs(dense), _outputs(stored))  # ORT densifies at load: bit-identical
    a, b = validate.onnx_stats(dense), validate.onnx_stats(stored)
    assert {k: a[k] for k in ("weights", "zero_weights", "params_nonzero", "macs")} == \
           {k: b[k] for k in ("weights", "zero_weights", "params_nonzero", "macs")}
    return dense, stored, info


def test_unstructured_round_trip_same_outputs_file_a_third(tmp_path):
    dense, stored, info = _round_trip(unstructured, "auto", tmp_path)
    assert info["sparse_tensors"] > 0 and info["max_abs_diff"] == 0.0
    assert len(onnx.load(str(stored)).graph.sparse_initializer) == info["sparse_tensors"]
    assert stored.stat().st_size < dense.stat().st_size / 3


def test_two_four_round_trip_same_outputs_and_groups(tmp_path):
    # Half the weights kept: int64 positions (8 bytes) cost more than the zeros they drop, so `auto`
    # leaves 2:4 tensors dense, and `always` is larger; both give the same outputs and 2:4 groups.
    dense, stored, info = _round_trip(two_four, "auto", tmp_path)
    assert info["sparse_tensors"] == 0 and stored.read_bytes() == dense.read_bytes()
    dense, stored, info = _round_trip(two_four, "always", tmp_path)
    assert info["sparse_tensors"] > 0 and stored.stat().st_size > dense.stat().st_size
    back_d, back_s = nm.onnx_groups(dense), nm.onnx_groups(stored)
    assert back_s == back_d and back_s["groups"] > 0 and back_s["bad"] == 0


def test_never_leaves_the_file_alone(tmp_path):
    dense = _exported(unstructured, tmp_path / "m.onnx")
    before = dense.read_bytes()
    assert sparse_storage.store(dense, "never", validate.feed(dense, X))["sparse_tensors"] == 0
    assert dense.read_bytes() == before


def test_a_disagreeing_sparse_file_is_a_verification_error(tmp_path, monkeypatch):
    dense = _exported(unstructured, tmp_path / "m.onnx")
    before = dense.read_bytes()
    real = sparse_storage.sparsify

    def corrupt(model, mode):  # stored values off (the classifier's among them): the check must see it
        info = real(model, mode)
        for sp in model.graph.sparse_initializer:
            sp.values.CopyFrom(onnx.numpy_helper.from_array(onnx.numpy_helper.to_array(sp.values) + 1, sp.values.name))
        return info
    monkeypatch.setattr(sparse_storage, "sparsify", corrupt)
    with pytest.raises(VerificationError, match="disagrees with the dense-stored"):
        sparse_storage.store(dense, "auto", validate.feed(dense, X))
    assert dense.read_bytes() == before and not list(tmp_path.glob(".*sparse"))


def test_all_zero_tensor_round_trips():
    t = onnx.numpy_helper.from_array(np.zeros((4, 3), np.float32), "w")
    m = onnx.helper.make_model(onnx.helper.make_graph([], "g", [], [], initializer=[t]))
    assert sparse_storage.sparsify(m, "auto")["sparse_tensors"] == 1
    back = sparse_storage.densify(m).graph.initializer[0]
    assert back.name == "w" and np.array_equal(onnx.numpy_helper.to_array(back), np.zeros((4, 3), np.float32))


def test_int8_quantizes_from_a_sparse_file_and_stores_sparse(tmp_path):
    from torch.utils.data import TensorDataset

    src = _exported(unstructured, tmp_path / "m.onnx")
    sparse_storage.store(src, "auto", validate.feed(src, X))
    assert onnx.load(str(src)).graph.sparse_initializer
    q = tmp_path / "m.int8.onnx"
    quantize.quantize_int8(src, q, TensorDataset(X, torch.zeros(len(X), dtype=torch.long)), max_samples=16)
    before = q.stat().st_size
    info = sparse_storage.store(q, "auto", validate.feed(q, X))
    assert info["sparse_tensors"] > 0 and q.stat().st_size < before
    assert quantize.count_ops(q)["QuantizeLinear"] > 0


def test_compress_writes_a_smaller_model_and_reports_sizes(cli, user, tmp_path):
    from tests.conftest import FAST

    res = cli("compress", user / "user.pt", "--arch", "usermodels:UserNet", "--data", user / "train.npz",
              "--recipe", "magnitude", "--sparsity", "0.95", "--out", "out", *FAST)
    assert res.exit_code == 0, res.output
    out = tmp_path / "out"
    report = json.loads((out / "report.json").read_text())
    size = report["size"]
    assert size["compressed"]["bytes"] == (out / "model.onnx").stat().st_size
    assert size["compressed"]["bytes"] < size["dense"]["bytes"] / 2 and size["storage"]["sparse_tensors"] > 0
    assert 0 < size["compressed"]["gzip_bytes"] < size["compressed"]["bytes"]
    assert report["sparsity"]["achieved"] == pytest.approx(0.95, abs=0.01)  # read through the sparse storage
    assert report["parity_samples"] >= 64 and report["parity_mean"] <= report["parity"]
    md = (out / "report.md").read_text()
    assert "gzip size" in md and "stored sparse" in md
