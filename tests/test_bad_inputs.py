"""The catalogue of what ticketforge guards against (issue 7): bad input, faults and hostile files.

Every case runs the real command line (click's runner in this process; a few as a subprocess, to
see exactly what reaches a terminal) and checks the contract: exit code 2 (1 for a failed
verification), one line on stderr that names the problem, no traceback without --debug, and no
output folder. The groups follow the issue's bullets. Inputs are tiny (a 4-channel digits-resnet,
48 random 8x8 images) and full runs use --epochs 0 or 1 and three timing repeats, so that the
whole catalogue stays fast; cases that fail at an input check never reach the pipeline anyway.
"""
from __future__ import annotations

import errno
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings, strategies as st

from ticketforge import cli, export as export_stage, finetune, recipe as recipes, report as report_stage, search, structures
from ticketforge.errors import UserError
from ticketforge.models import digits_resnet

MODEL = ["model.pt", "--arch", "digits-resnet", "--arch-kwargs", '{"width": 4}']
FAST = ["--recipe", "magnitude", "--sparsity", "0.5", "--epochs", "0", "--quiet", "--set", "validate.repeats=3",
        "--set", "validate.warmup=0", "--set", "validate.latency_batches=[1]"]


@pytest.fixture(autouse=True)
def files():
    """A tiny trained-shape model (state_dict) and tiny data in the test's own folder."""
    torch.save(digits_resnet(width=4).state_dict(), "model.pt")
    rng = np.random.default_rng(0)
    np.savez("data.npz", x=rng.integers(0, 256, (48, 1, 8, 8), dtype=np.uint8), y=np.arange(48) % 10)


def compress(*args, out="out", data="data.npz"):
    """`ticketforge compress` through click, exactly as the console script runs it."""
    argv = ["compress", *args, "--out", out] + (["--data", data] if data else [])
    if "--recipe" not in args:
        argv += FAST
    return CliRunner().invoke(cli.cli, argv, prog_name="ticketforge")


def refused(result, *words, code=2, out="out"):
    """The contract: exit code, one error line naming the problem, no traceback, no output."""
    assert result.exit_code == code, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for word in words:
        assert word.lower() in lines[0].lower(), f"{word!r} not in {lines[0]!r}"
    assert "Traceback" not in result.output
    assert not Path(out).exists() and not Path(f".{out}.tmp").exists()
    return lines[0]


def in_subprocess(*args, out="out"):
    """The console entry point in a fresh process: what a user's terminal really shows."""
    r = subprocess.run([sys.executable, "-m", "ticketforge", "compress", *args, "--out", out],
                       capture_output=True, text=True, timeout=120)
    assert "Traceback" not in r.stdout + r.stderr
    assert not Path(out).exists()
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    return r.returncode, lines


# ============================================================== the contract's switch: --debug

def test_debug_shows_the_traceback_the_contract_hides():
    result = compress("nope.pt", "--arch", "digits-resnet", "--debug")
    assert isinstance(result.exception, UserError) and "does not exist" in str(result.exception)
    assert "error: " not in result.stderr  # the exception itself propagates, with its traceback


# ============================================================== model files

def test_model_missing():
    refused(compress("nope.pt", "--arch", "digits-resnet"), "nope.pt", "does not exist")


def test_model_empty():
    Path("empty.pt").write_bytes(b"")
    refused(compress("empty.pt", "--arch", "digits-resnet"), "empty.pt", "is empty")


def test_model_truncated():
    blob = Path("model.pt").read_bytes()
    Path("cut.pt").write_bytes(blob[: len(blob) // 2])
    refused(compress("cut.pt", "--arch", "digits-resnet"), "cut.pt", "truncated or corrupt", "no end")


def test_model_corrupt():
    Path("noise.pt").write_bytes(np.random.default_rng(1).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    refused(compress("noise.pt", "--arch", "digits-resnet"), "noise.pt", "not a readable PyTorch file")


def test_model_file_that_is_not_a_model():
    torch.save([1, 2, 3], "list.pt")
    refused(compress("list.pt", "--arch", "digits-resnet"), "list.pt", "holds a list, not a model")
    torch.save({"epoch": 3, "lr": 0.1}, "meta.pt")
    refused(compress("meta.pt", "--arch", "digits-resnet"), "meta.pt", "not a state_dict")


def test_state_dict_that_does_not_fit_the_arch():
    state = digits_resnet(width=8).state_dict()
    torch.save(state, "wide.pt")
    line = refused(compress("wide.pt", "--arch", "digits-resnet", "--arch-kwargs", '{"width": 4}'),
                   "does not fit", "shape mismatch")
    assert "0.0.weight: file (8, 1, 3, 3) vs model (4, 1, 3, 3)" in line
    state = digits_resnet(width=4).state_dict()
    state["extra.weight"] = state.pop("8.weight")
    torch.save(state, "renamed.pt")
    refused(compress("renamed.pt", "--arch", "digits-resnet", "--arch-kwargs", '{"width": 4}'),
            "missing keys ['8.weight']", "unexpected keys ['extra.weight']")


def test_arch_that_does_not_import():
    refused(compress("model.pt", "--arch", "no_such_module_tf:Net"), "--arch", "cannot import 'no_such_module_tf'")
    refused(compress("model.pt", "--arch", "not-a-model"), "not a built-in model", "digits-resnet")


def test_arch_that_is_not_callable():
    Path("tf_user_arch.py").write_text("WIDTH = 4\n")
    refused(compress("model.pt", "--arch", "tf_user_arch:WIDTH"), "'WIDTH' is not callable")
    refused(compress("model.pt", "--arch", "tf_user_arch:Net"), "has no attribute 'Net'")


class _Payload:
    """Unpickling this creates a file: the stand-in for code an attacker ships in a checkpoint."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def test_pickle_carrying_code_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "payload-ran"
    torch.save({"model": _Payload(marker), "arch": "digits-resnet"}, "evil.pt")
    refused(compress("evil.pt", "--arch", "digits-resnet"), "evil.pt", "would run code", "--trust-pickle")
    assert not marker.exists()
    # The whole-module pickle a user would make with torch.save(model) is refused the same way.
    torch.save(digits_resnet(width=4), "module.pt")
    refused(compress("module.pt"), "module.pt", "--trust-pickle")
    # The payload is real: an unguarded torch.load would have run it.
    torch.load("evil.pt", weights_only=False)
    assert marker.exists()


def test_pickle_carrying_code_end_to_end(tmp_path):
    marker = tmp_path / "payload-ran"
    torch.save({"model": _Payload(marker)}, "evil.pt")
    code, lines = in_subprocess("evil.pt", "--arch", "digits-resnet", "--data", "data.npz", "--recipe", "magnitude")
    assert code == 2 and len(lines) == 1 and "--trust-pickle" in lines[0]
    assert not marker.exists()


def test_torchscript_archive_that_does_not_load():
    torch.jit.script(digits_resnet(width=4)).save("scripted.pt")
    with zipfile.ZipFile("scripted.pt") as src, zipfile.ZipFile("broken.pt", "w") as dst:
        for item in src.infolist():
            blob = src.read(item)
            if "/code/" in item.filename and item.filename.endswith(".py"):
                blob = b"def forward(self, x:\n"  # a syntax error in the archive's code
            dst.writestr(item, blob)
    refused(compress("broken.pt"), "broken.pt", "TorchScript archive", "does not load")


# ============================================================== data

def test_data_missing():
    refused(compress(*MODEL, data="nope.npz"), "nope.npz", "does not exist")


def test_data_unreadable():
    Path("garbage.npz").write_bytes(b"this is not a zip archive")
    refused(compress(*MODEL, data="garbage.npz"), "garbage.npz", "not a readable .npz")


def test_data_missing_arrays():
    # x alone is data without labels (tests/test_distill.py); without x there is nothing to run
    np.savez("onlyy.npz", y=np.zeros(8, np.int64))
    refused(compress(*MODEL, data="onlyy.npz"), "onlyy.npz", "lacks array x", "has: y")


def test_data_with_labels_for_one_split_only():
    x = np.zeros((16, 1, 8, 8), np.float32)
    np.savez("noyval.npz", x=x, y=np.arange(16) % 10, x_val=x[:4])
    refused(compress(*MODEL, data="noyval.npz"), "noyval.npz", "has labels y", "x_val and y_val")
    np.savez("noy.npz", x=x, x_val=x[:4], y_val=np.arange(4))
    refused(compress(*MODEL, data="noy.npz"), "noy.npz", "y_val but no y")


def test_data_length_mismatch():
    np.savez("mismatch.npz", x=np.zeros((10, 1, 8, 8), np.float32), y=np.zeros(5, np.int64))
    refused(compress(*MODEL, data="mismatch.npz"), "x has 10 samples but y has 5")


def test_data_labels_outside_the_models_classes():
    np.savez("labels.npz", x=np.zeros((20, 1, 8, 8), np.float32), y=np.arange(20) % 13)
    refused(compress(*MODEL, data="labels.npz"), "labels go up to 12", "10 outputs", "0..9")
    np.savez("negative.npz", x=np.zeros((20, 1, 8, 8), np.float32), y=np.arange(20) - 1)
    refused(compress(*MODEL, data="negative.npz"), "negative labels")


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_data_nan_or_inf(bad):
    x = np.zeros((20, 1, 8, 8), np.float32)
    x[3, 0, 2, 2] = bad
    np.savez("nonfinite.npz", x=x, y=np.arange(20) % 10)
    refused(compress(*MODEL, data="nonfinite.npz"), "NaN or Inf")


def test_data_empty_split():
    np.savez("empty.npz", x=np.zeros((0, 1, 8, 8), np.float32), y=np.zeros(0, np.int64))
    refused(compress(*MODEL, data="empty.npz"), "empty.npz", "split is empty")
    np.savez("emptyval.npz", x=np.zeros((8, 1, 8, 8), np.float32), y=np.arange(8),
             x_val=np.zeros((0, 1, 8, 8), np.float32), y_val=np.zeros(0, np.int64))
    refused(compress(*MODEL, data="emptyval.npz"), "(x_val, y_val)", "split is empty")


def test_data_input_shape_the_model_rejects():
    np.savez("rgb.npz", x=np.zeros((20, 3, 8, 8), np.float32), y=np.arange(20) % 10)
    refused(compress(*MODEL, data="rgb.npz"), "rejects inputs of shape (2, 3, 8, 8)", "expects (batch, 1, H, W)")
    np.savez("flat.npz", x=np.zeros((20, 64), np.float32), y=np.arange(20) % 10)
    refused(compress(*MODEL, data="flat.npz"), "rejects inputs of shape (2, 64)", "expects (batch, 1, H, W)")


def test_data_errors_end_to_end():
    np.savez("labels.npz", x=np.zeros((20, 1, 8, 8), np.float32), y=np.arange(20) % 13)
    code, lines = in_subprocess(*MODEL, "--data", "labels.npz", "--recipe", "magnitude")
    assert code == 2 and len(lines) == 1 and "labels go up to 12" in lines[0]


# ============================================================== recipes and --set

def test_recipe_unknown_keys():
    Path("typo.yaml").write_text("search:\n  sparsty: 0.5\n")
    refused(compress(*MODEL, "--recipe", "typo.yaml"), "'search.sparsty'", "allowed:", "sparsity")
    Path("section.yaml").write_text("no_such_section: 1\n")
    refused(compress(*MODEL, "--recipe", "section.yaml"), "'no_such_section'", "allowed:", "finetune")
    refused(compress(*MODEL, "--set", "finetune.epoch=3"), "'finetune.epoch'", "allowed:", "epochs")
    refused(compress(*MODEL, "--recipe", "no-such-recipe"), "unknown recipe 'no-such-recipe'", "magnitude")


def test_recipe_wrong_types():
    refused(compress(*MODEL, "--recipe", "magnitude", "--set", "finetune.epochs=many"), "'finetune.epochs'", "expected an integer")
    refused(compress(*MODEL, "--recipe", "magnitude", "--set", "search.sparsity=[0.5]"), "'search.sparsity'", "expected a number")
    refused(compress(*MODEL, "--set", "finetune.bn_recalibrate=maybe"), "'finetune.bn_recalibrate'", "true or false")
    refused(compress(*MODEL, "--set", "search.sparsity.x=1"), "'sparsity' is not a section")
    Path("notmap.yaml").write_text("- a\n- b\n")
    refused(compress(*MODEL, "--recipe", "notmap.yaml"), "must be a mapping")


@pytest.mark.parametrize("args, words", [
    (["--sparsity", "1.0"], ["'search.sparsity'", "[0.0, 1.0)"]),
    (["--sparsity", "-0.1"], ["'search.sparsity'", "[0.0, 1.0)"]),
    (["--epochs", "-1"], ["'finetune.epochs'", ">= 0"]),
    (["--set", "finetune.lr=0"], ["'finetune.lr'", "> 0"]),
])
def test_recipe_out_of_range(args, words):
    refused(compress(*MODEL, "--recipe", "magnitude", "--quiet", *args), *words)


def test_recipe_unknown_method_names():
    refused(compress(*MODEL, "--set", "search.method=lottery"), "'search.method'", "'lottery'", "magnitude", "cts")
    refused(compress(*MODEL, "--set", "convert.structure=3:4"), "'convert.structure'", "channels", "2:4")
    refused(compress(*MODEL, "--set", "finetune.optimizer=adam"), "'finetune.optimizer'", "sgd, adamw")


def _fields():
    """(dotted key, type, metadata) of every leaf of the schema."""
    import dataclasses
    import typing

    def walk(cls, prefix):
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            path = f"{prefix}.{f.name}" if prefix else f.name
            if dataclasses.is_dataclass(hints[f.name]):
                yield from walk(hints[f.name], path)
            else:
                yield path, hints[f.name], dict(f.metadata)
    return list(walk(recipes.Recipe, ""))


FIELDS = _fields()
LIST_VALUES = {"export.targets": st.lists(st.sampled_from(["onnx", "tensorrt"]), min_size=1, max_size=2),
               "export.trt_batch": st.lists(st.integers(1, 4096), min_size=3, max_size=3).map(sorted),
               "validate.latency_batches": st.lists(st.integers(1, 4096), min_size=1, max_size=4),
               "data.mean": st.lists(st.floats(-10, 10), min_size=3, max_size=3),
               "data.std": st.lists(st.floats(1e-3, 10), min_size=3, max_size=3)}


def _valid(key, tp, meta):
    """A strategy of values the schema says are valid for this key."""
    import typing
    if key == "search.method":
        return st.sampled_from(sorted(search.METHODS))
    if key in LIST_VALUES:
        return LIST_VALUES[key]
    if recipes.choices_of(meta):
        return st.sampled_from(recipes.choices_of(meta))
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if args:  # Optional[x]
        return st.none() | _valid(key, args[0], meta)
    lo, hi = meta.get("lo"), meta.get("hi")
    if tp is bool:
        return st.booleans()
    if tp is int:
        return st.integers(min_value=lo if lo is not None else -10 ** 6, max_value=hi if hi is not None else 10 ** 6)
    if tp is float:
        return st.floats(min_value=lo, max_value=hi, exclude_min=bool(meta.get("lo_open")) and lo is not None,
                         exclude_max=bool(meta.get("hi_open")) and hi is not None, allow_nan=False, allow_infinity=False)
    return st.text(st.characters(exclude_categories=("Cs", "Cc", "Cf", "Co", "Cn", "Zl", "Zp")), max_size=20)


def _as_set_text(value) -> str:
    """How a user would type the value after `--set key=` (floats in Python's repr, e.g. 1e-05)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)  # a JSON string is a YAML string
    if isinstance(value, list):
        return "[" + ", ".join(_as_set_text(v) for v in value) + "]"
    return repr(value)


# A recipe whose search method and structure read the key (any other key is refused by name).
_CTS = ("cts", [])
BASE = {**{f"search.{k}": _CTS for k in ("epochs", "steps", "min_steps", "lr", "batch_size", "objective", "temperature",
                                         "balance", "budget_slack")},
        "search.prune_fraction": ("imp", []), "search.synflow_rounds": ("magnitude", ["search.method=synflow"]),
        "search.calibration_samples": ("wanda", []),
        "search.target_macs": ("cts-blocks", []), "search.blocks": ("cts-blocks", []),
        "convert.round_to": ("magnitude-channels", []), "convert.nm_decay": ("magnitude-2to4", [])}


@st.composite
def valid_override(draw):
    key, tp, meta = draw(st.sampled_from(FIELDS))
    return key, draw(_valid(key, tp, meta))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(valid_override())
def test_property_any_valid_value_round_trips_through_set(override):
    key, value = override
    base, sets = BASE.get(key, ("magnitude", []))
    try:
        recipe = recipes.resolve(base, sets + [f"{key}={_as_set_text(value)}"])
    except UserError as exc:  # a rule across keys may still refuse it, but then it names the key
        assert key in str(exc)
        return
    got = recipe.to_dict()
    for part in key.split("."):
        got = got[part]
    assert got == value and type(got) is type(value)


@settings(max_examples=200, deadline=None)
@given(st.sampled_from([k for k, _, _ in FIELDS]) | st.text(max_size=15),
       st.text(max_size=25) | st.integers().map(str) | st.floats().map(repr))
def test_property_any_set_item_is_a_recipe_or_a_user_error(key, text):
    try:
        recipe = recipes.resolve("magnitude", [f"{key}={text}"])
    except UserError as exc:
        assert str(exc)
    else:
        assert isinstance(recipe, recipes.Recipe)


YAML_LEAF = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=10)
YAML_TREE = st.recursive(YAML_LEAF, lambda inner: st.lists(inner, max_size=3)
                         | st.dictionaries(st.text(max_size=10), inner, max_size=3), max_leaves=8)


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(st.sampled_from(["name", "search", "finetune", "convert", "export", "validate", "gate"])
                       | st.text(max_size=8), YAML_TREE | st.dictionaries(
                           st.sampled_from([k.split(".")[-1] for k, _, _ in FIELDS]), YAML_LEAF, max_size=3),
                       max_size=4))
def test_property_any_recipe_mapping_is_a_recipe_or_a_user_error(data):
    try:
        recipes.validate(data)
    except UserError:
        pass


# ============================================================== training faults

def test_nan_loss_stops_the_run_and_keeps_the_run_state():
    result = compress(*MODEL, "--recipe", "magnitude", "--quiet", "--epochs", "1", "--set", "finetune.lr=1e30",
                      "--set", "finetune.grad_clip=0", "--set", "finetune.batch_size=8")
    refused(result, "fine-tune: the loss became", "lower the learning rate")
    # The run's folder of finished steps is kept for a resumed run; only the output is absent.
    assert [p.name for p in Path(".ticketforge").iterdir() if p.is_dir()], "run state was removed"


def test_cuda_out_of_memory_suggests_a_smaller_batch(monkeypatch):
    def oom(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    monkeypatch.setattr(finetune, "train", oom)
    refused(compress(*MODEL, "--recipe", "magnitude", "--quiet", "--epochs", "1"),
            "out of GPU memory", "smaller batch", "finetune.batch_size")


# ============================================================== outputs

def test_existing_output_is_never_overwritten_without_force():
    Path("out").mkdir()
    Path("out/keep.txt").write_text("mine")
    result = compress(*MODEL)
    assert result.exit_code == 2 and "already exists; pass --force" in result.stderr
    assert Path("out/keep.txt").read_text() == "mine"
    # The control: the same inputs are fine, and --force replaces the folder.
    result = compress(*MODEL, "--force")
    assert result.exit_code == 0, result.output
    assert not Path("out/keep.txt").exists() and Path("out/model.onnx").exists()


def test_second_run_on_the_same_output_refuses_while_the_first_runs(monkeypatch):
    real_run, second = structures.find_ticket, {}

    def run_and_start_another(ctx):
        # In the middle of the first run, a second one (even with --force) on the same folder.
        second["result"] = compress(*MODEL, "--force")
        return real_run(ctx)

    monkeypatch.setattr(structures, "find_ticket", run_and_start_another)
    first = compress(*MODEL)
    monkeypatch.setattr(structures, "find_ticket", real_run)
    r2 = second["result"]
    assert r2.exit_code == 2 and "another ticketforge run is writing this output folder" in r2.stderr
    assert "Traceback" not in r2.output
    # The first was not disturbed: its output is complete and valid.
    assert first.exit_code == 0, first.output
    onnx.checker.check_model("out/model.onnx")
    assert json.loads(Path("out/report.json").read_text())["parity"] < 1e-3
    assert not Path(".out.tmp").exists()


def test_disk_full_while_writing_leaves_no_partial_output(monkeypatch):
    def full(report, folder):
        (Path(folder) / "report.json").write_text("{")  # half written when the disk filled up
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(Path(folder) / "report.json"))
    monkeypatch.setattr(report_stage, "write", full)
    refused(compress(*MODEL), "No space left on device", "nothing was written")
    # With --force over an earlier output, that output survives untouched.
    Path("out").mkdir()
    Path("out/keep.txt").write_text("mine")
    result = compress(*MODEL, "--force")
    assert result.exit_code == 2 and "No space left on device" in result.stderr
    assert [p.name for p in Path("out").iterdir()] == ["keep.txt"]
    assert not Path(".out.tmp").exists()


# ============================================================== verification before success

def _patch_exporter(monkeypatch, spoil):
    """Export for real, then spoil model.onnx (never dense.onnx) the way a broken exporter would."""
    real = export_stage.export_onnx

    def export_onnx(model, example, path, cfg, *rest):
        real(model, example, path, cfg, *rest)
        if Path(path).name == "model.onnx":
            m = onnx.load(str(path))
            spoil(m)
            onnx.save(m, str(path))
        return path
    monkeypatch.setattr(export_stage, "export_onnx", export_onnx)


def test_verification_onnx_checker(monkeypatch):
    real_export = torch.onnx.export

    def buggy_export(model, args, path, **kwargs):  # an exporter bug: a node reads a tensor nothing makes
        real_export(model, args, path, **kwargs)
        m = onnx.load(str(path))
        m.graph.node[0].input[0] = "nowhere"
        onnx.save(m, str(path))
    monkeypatch.setattr(torch.onnx, "export", buggy_export)
    refused(compress(*MODEL), "onnx.checker rejects the exported", "nowhere", code=1)


def test_verification_onnx_runtime_session(monkeypatch):
    def unknown_op(m):  # passes onnx.checker (custom domains are not checked) but no runtime has it
        node = m.graph.node[-1]
        node.op_type, node.domain = "Mystery", "ai.ticketforge.test"
        m.opset_import.append(onnx.helper.make_opsetid("ai.ticketforge.test", 1))
    _patch_exporter(monkeypatch, unknown_op)
    refused(compress(*MODEL), "ONNX Runtime", "cannot load model.onnx", code=1)


def test_verification_logit_parity(monkeypatch):
    def shifted_bias(m):  # a wrong weight: the graph is valid and runs, the logits are off
        last = m.graph.node[-1]
        init = next(i for i in m.graph.initializer if i.name == last.input[-1])
        arr = onnx.numpy_helper.to_array(init) + 0.5
        init.CopyFrom(onnx.numpy_helper.from_array(arr, init.name))
    _patch_exporter(monkeypatch, shifted_bias)
    line = refused(compress(*MODEL), "disagrees with the torch model", "max abs logit difference",
                   "validate.parity_tol 0.001", code=1)
    measured = float(re.search(r"difference ([0-9.e+-]+)", line).group(1))
    assert abs(measured - 0.5) < 1e-3


def test_verification_parity_tolerance_end_to_end():
    # A tolerance below float32 rounding: the measured difference is reported, exit 1.
    code, lines = in_subprocess(*MODEL, "--data", "data.npz", *FAST, "--set", "validate.parity_tol=1e-30")
    assert code == 1 and len(lines) == 1 and "max abs logit difference" in lines[0] and "1e-30" in lines[0]


# ============================================================== HF folders, .safetensors, token ids, image folders,
# ============================================================== what a model returns (issue 12)

def _tiny_bert(folder="bert-hf"):
    """A 2-layer DistilBERT with a 50-token vocabulary, saved with save_pretrained, and token-id data."""
    T = pytest.importorskip("transformers")
    torch.manual_seed(0)
    model = T.DistilBertForSequenceClassification(T.DistilBertConfig(
        vocab_size=50, dim=16, n_layers=1, n_heads=2, hidden_dim=32, num_labels=10, max_position_embeddings=16))
    model.save_pretrained(folder)
    rng = np.random.default_rng(0)
    np.savez("tok.npz", x=rng.integers(1, 50, (48, 12)), y=np.arange(48) % 10)
    return model


def test_hf_folder_without_config_or_weights():
    Path("plain").mkdir()
    refused(compress("plain"), "plain", "not a Hugging Face save_pretrained folder", "no config.json")
    _tiny_bert()
    os.remove("bert-hf/model.safetensors")
    refused(compress("bert-hf", data="tok.npz"), "bert-hf", "no weights", "model.safetensors")


def test_hf_folder_config_that_names_no_usable_class():
    _tiny_bert()
    cfg = json.loads(Path("bert-hf/config.json").read_text())
    Path("bert-hf/config.json").write_text(json.dumps({**cfg, "architectures": ["NoSuchModelForThings"]}))
    refused(compress("bert-hf", data="tok.npz"), "NoSuchModelForThings", "does not have")
    Path("bert-hf/config.json").write_text(json.dumps({k: v for k, v in cfg.items() if k != "architectures"}))
    refused(compress("bert-hf", data="tok.npz"), "names no architectures")
    Path("bert-hf/config.json").write_text("{not json")
    refused(compress("bert-hf", data="tok.npz"), "config.json does not load")


def test_hf_folder_weights_that_do_not_fit_the_config():
    _tiny_bert()
    cfg = json.loads(Path("bert-hf/config.json").read_text())
    Path("bert-hf/config.json").write_text(json.dumps({**cfg, "hidden_dim": 64}))
    refused(compress("bert-hf", data="tok.npz"), "bert-hf", "do not", "DistilBertForSequenceClassification")


def test_hf_folder_with_pickled_weights_needs_trust_pickle():
    model = _tiny_bert()
    os.remove("bert-hf/model.safetensors")  # the older format, as transformers 4 wrote it by default
    torch.save(model.state_dict(), "bert-hf/pytorch_model.bin")
    refused(compress("bert-hf", data="tok.npz"), "pytorch_model.bin", "a pickle", "--trust-pickle")


def test_hf_folder_without_transformers_names_the_extra(monkeypatch):
    _tiny_bert()
    monkeypatch.setitem(sys.modules, "transformers", None)  # what `import transformers` sees when it is absent
    refused(compress("bert-hf", data="tok.npz"), "transformers", "pip install 'ticketforge[hf]'")


def test_safetensors_state_dict():
    from safetensors.torch import save_file
    save_file(digits_resnet(width=4).state_dict(), "model.safetensors")
    refused(compress("model.safetensors"), "model.safetensors", "--arch")
    refused(compress("model.safetensors", "--arch", "digits-resnet", "--arch-kwargs", '{"width": 8}'),
            "does not fit", "shape mismatch")
    Path("cut.safetensors").write_bytes(Path("model.safetensors").read_bytes()[:100])
    refused(compress("cut.safetensors", "--arch", "digits-resnet"), "cut.safetensors", "not a readable .safetensors")


def test_token_ids_that_are_not_valid():
    rng = np.random.default_rng(0)
    ids = rng.integers(1, 50, (48, 12))
    np.savez("neg.npz", x=ids - 60, y=np.arange(48) % 10)
    refused(compress(*MODEL, data="neg.npz"), "token ids", "negative")
    np.savez("mask.npz", x=ids, y=np.arange(48) % 10, attention_mask=np.ones((48, 11), np.int64))
    refused(compress(*MODEL, data="mask.npz"), "attention_mask", "same shape as x (48, 12)")
    np.savez("mask2.npz", x=np.zeros((48, 1, 8, 8), np.float32), y=np.arange(48) % 10,
             attention_mask=np.ones((48, 12), np.int64))
    refused(compress(*MODEL, data="mask2.npz"), "attention_mask goes with token ids")
    np.savez("mask3.npz", x=ids, y=np.arange(48) % 10, attention_mask=np.ones((48, 12), np.int64),
             x_val=ids[:8], y_val=np.arange(8))
    refused(compress(*MODEL, data="mask3.npz"), "attention_mask_val")


def _images(root, classes=("a", "b"), n=3, size=(10, 12)):
    from PIL import Image
    for c in classes:
        Path(root, c).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            Image.fromarray(np.full((*size, 3), 40 * i, np.uint8)).save(Path(root, c, f"{i}.png"))


def test_image_folder_layouts_that_are_refused():
    Path("imgs").mkdir()
    refused(compress(*MODEL, data="imgs"), "imgs", "no class folders", "imgs/train/<class>")
    _images("imgs/val")  # labels for the validation split only
    Path("imgs/train").mkdir()
    for i in range(3):
        shutil.copy("imgs/val/a/0.png", f"imgs/train/{i}.png")
    refused(compress(*MODEL, data="imgs"), "has class folders", "imgs/train has none")
    shutil.rmtree("imgs")
    Path("imgs").mkdir()
    _images("imgs/train")
    Path("imgs/train/empty").mkdir()
    refused(compress(*MODEL, data="imgs"), "class folder", "empty", "has no images")
    Path("imgs/train/empty").rmdir()
    _images("imgs/val", classes=("a", "zebra"))
    refused(compress(*MODEL, data="imgs"), "validation classes ['zebra']", "no training folder")


def test_image_folder_with_a_file_that_is_not_an_image():
    _images("imgs")
    Path("imgs/a/notes.png").write_text("not a png")
    refused(compress(*MODEL, data="imgs"), "notes.png", "not a readable image")
    os.remove("imgs/a/notes.png")
    from PIL import Image
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save("big.png")
    png = Path("big.png").read_bytes()
    Path("imgs/a/cut.png").write_bytes(png[: len(png) // 2])  # the header reads, the pixels do not
    refused(compress(*MODEL, data="imgs", *["--set", "data.resize=8", "--set", "data.crop=8"]),
            "cut.png", "does not decode")


def test_image_folder_bad_recipe_values():
    _images("imgs")
    refused(compress(*MODEL, "--set", "data.crop=300", data="imgs"), "'data.crop'", "'data.resize'")
    refused(compress(*MODEL, "--set", "data.std=[0.2, 0, 0.2]", data="imgs"), "'data.std'", "each > 0")


def test_model_output_without_logits():
    Path("tf_out_models.py").write_text(textwrap.dedent("""
        import torch
        class Dict(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.fc = torch.nn.Linear(64, 10)
            def forward(self, x):
                return {"scores": self.fc(x.flatten(1))}
        class Nested(Dict):
            def forward(self, x):
                return ([self.fc(x.flatten(1))],)
    """))
    torch.save({"fc.weight": torch.zeros(10, 64), "fc.bias": torch.zeros(10)}, "fc.pt")
    refused(compress("fc.pt", "--arch", "tf_out_models:Dict"), "must return logits", "dict without 'logits'",
            "keys: scores")
    refused(compress("fc.pt", "--arch", "tf_out_models:Nested"), "must return logits", "tuple whose first element")
