"""`ticketforge bench`: the latency method standalone, for the target device. It must run where only
onnxruntime and numpy are installed, so it is tested in a fresh process that never imports torch."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

from tests.test_latency import _token_model

PROBE = """
import sys
from ticketforge.cli import cli
try:
    cli(sys.argv[1:], prog_name="ticketforge")
finally:
    print("torch imported" if "torch" in sys.modules else "no torch", file=sys.stderr)
"""


def bench(*args):
    return subprocess.run([sys.executable, "-c", PROBE, "bench", *map(str, args)], capture_output=True, text=True,
                          timeout=120)


def _mlp(path: Path, hidden: int) -> Path:
    rng = np.random.default_rng(0)
    w1 = helper.make_tensor("w1", TensorProto.FLOAT, [64, hidden], rng.standard_normal(64 * hidden).tolist())
    w2 = helper.make_tensor("w2", TensorProto.FLOAT, [hidden, 10], rng.standard_normal(hidden * 10).tolist())
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["input", "w1"], ["h"]), helper.make_node("Relu", ["h"], ["r"]),
         helper.make_node("MatMul", ["r", "w2"], ["logits"])], "mlp",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 64])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 10])], initializer=[w1, w2])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


def test_bench_compares_without_importing_torch(tmp_path):
    big, small = _mlp(tmp_path / "big.onnx", 512), _mlp(tmp_path / "small.onnx", 16)
    r = bench(small, "--compare", big, "--batch", "1", "--batch", "8", "--max-seconds", "0.5", "--json")
    assert r.returncode == 0, r.stderr
    assert r.stderr.strip().splitlines()[-1] == "no torch"
    result = json.loads(r.stdout)
    assert [row["batch"] for row in result["rows"]] == [1, 8]
    for row in result["rows"]:
        assert row["speedup_ci"][0] <= row["speedup"] <= row["speedup_ci"][1] and row["runs"] >= 3
    env = result["environment"]
    assert env["threads"] == 1 and env["provider"] == "CPUExecutionProvider" and env["cpu"] and env["onnxruntime"]


def test_bench_one_model_table_and_integer_inputs(tmp_path):
    tok = _token_model(tmp_path / "tok.onnx")
    r = bench(tok, "--batch", "4", "--dim", "sequence=16", "--max-seconds", "0.3")
    assert r.returncode == 0, r.stderr
    assert "no torch" in r.stderr
    assert "CPUExecutionProvider" in r.stdout and "tok.onnx ms" in r.stdout
    row = [line.split() for line in r.stdout.splitlines() if line.startswith("4 ")]
    assert row and float(row[0][1]) > 0


def test_bench_bad_input_is_one_line_and_exit_2(tmp_path):
    tok = _token_model(tmp_path / "tok.onnx")
    r = bench(tok, "--batch", "2")  # 'sequence' has no size
    assert r.returncode == 2 and "--dim sequence=" in r.stderr and "Traceback" not in r.stderr
    r = bench(tmp_path / "missing.onnx")
    assert r.returncode == 2 and "does not exist" in r.stderr
    (tmp_path / "junk.onnx").write_bytes(b"not a model")
    r = bench(tmp_path / "junk.onnx")
    assert r.returncode == 2 and "cannot load" in r.stderr
