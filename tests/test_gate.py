"""The CI gate: exit codes, the report's gate section, JUnit, the `gate` re-check command."""
import json
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from click.testing import CliRunner

from ticketforge import gate
from ticketforge.cli import cli
from ticketforge.demo import train_demo_model
from ticketforge.errors import UserError

FAST = ["--recipe", "magnitude", "--sparsity", "0.5", "--epochs", "1", "--set", "validate.repeats=3",
        "--set", "validate.warmup=1", "--set", "validate.max_seconds=0.5"]


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    path = tmp_path_factory.mktemp("model") / "demo.pt"
    train_demo_model(path, epochs=1)
    return path


@pytest.fixture(scope="module")
def failed_run(demo, tmp_path_factory):
    """One compress run with an impossible accuracy threshold, shared by the re-check tests."""
    where = tmp_path_factory.mktemp("run")
    result = CliRunner().invoke(cli, ["compress", str(demo), *FAST, "--quiet", "--out", str(where / "out"),
                                      "--set", "gate.max_accuracy_drop=-1", "--set", "gate.min_sparsity=0.1",
                                      "--junit", str(where / "gate.xml")])
    return result, where


def test_impossible_threshold_exits_1_after_writing_everything(failed_run):
    result, where = failed_run
    assert result.exit_code == 1, result.output
    assert "gate failed: max_accuracy_drop[model.onnx]" in " ".join(result.output.split())
    out = where / "out"
    for name in ("model.onnx", "dense.onnx", "report.json", "report.md", "report.html", "ticket.pt"):
        assert (out / name).exists(), name
    report = json.loads((out / "report.json").read_text())
    checks = {c["name"]: c for c in report["gate"]["checks"]}
    assert report["gate"]["passed"] is False
    assert checks["max_accuracy_drop[model.onnx]"]["passed"] is False
    assert checks["max_accuracy_drop[model.onnx]"]["threshold"] == -1
    assert checks["min_sparsity[model.onnx]"]["passed"] is True
    assert "max_accuracy_drop[model.onnx] | -1 |" in (out / "report.md").read_text()
    assert "Gate: FAILED" in (out / "report.html").read_text()


def test_junit_has_one_case_per_check(failed_run):
    _, where = failed_run
    report = json.loads((where / "out" / "report.json").read_text())
    cases = list(ET.parse(where / "gate.xml").getroot().iter("testcase"))
    assert [c.get("name") for c in cases] == [c["name"] for c in report["gate"]["checks"]]
    failed = [c.get("name") for c in cases if c.find("failure") is not None]
    assert failed == ["max_accuracy_drop[model.onnx]"]


def test_loose_thresholds_exit_0(demo, monkeypatch):
    summary = Path("summary.md")
    monkeypatch.setenv("GITHUB_STEP_SUMMARY", str(summary.resolve()))
    result = CliRunner().invoke(cli, ["compress", str(demo), *FAST, "--quiet", "--out", "out",
                                      "--set", "gate.max_accuracy_drop=1", "--set", "gate.min_speedup=0",
                                      "--junit", "j.xml"])
    assert result.exit_code == 0, result.output
    report = json.loads(Path("out/report.json").read_text())
    assert report["gate"]["passed"] is True
    # one min_speedup check per latency row (backend and batch)
    assert sum(c["name"].startswith("min_speedup[") for c in report["gate"]["checks"]) == len(report["latency"])
    assert summary.read_text().startswith("# ticketforge report")
    assert not [c for c in ET.parse("j.xml").getroot().iter("testcase") if c.find("failure") is not None]


def test_gate_command_rechecks_without_recomputing(failed_run):
    _, where = failed_run
    report = where / "out" / "report.json"
    before = report.read_text()
    run = CliRunner().invoke
    loose = run(cli, ["gate", str(report), "--max-accuracy-drop", "1", "--min-speedup", "0"])
    assert loose.exit_code == 0, loose.output
    assert "PASSED" in loose.output
    strict = run(cli, ["gate", str(report), "--max-accuracy-drop", "-1", "--junit", "again.xml"])
    assert strict.exit_code == 1
    assert "max_accuracy_drop[model.onnx]" in strict.output
    assert len(list(ET.parse("again.xml").getroot().iter("testcase"))) >= 2  # recipe's min_sparsity too
    # the recipe's own thresholds apply when no flag overrides them
    assert run(cli, ["gate", str(report)]).exit_code == 1
    assert report.read_text() == before


def test_gate_command_bad_input_exit_2(tmp_path):
    assert CliRunner().invoke(cli, ["gate", "missing.json"]).exit_code == 2
    Path("x.json").write_text("{\"not\": \"a report\"}")
    result = CliRunner().invoke(cli, ["gate", "x.json"])
    assert result.exit_code == 2 and "not a ticketforge report" in result.output


def test_evaluate_checks_every_backend_and_batch():
    report = {"accuracy": {"dense": 0.9, "onnx": 0.88, "int8": 0.85},
              "latency": [{"backend": "a", "batch": 1, "speedup": 1.5, "compressed_ms": 1.0},
                          {"backend": "b", "batch": 64, "speedup": 0.9, "compressed_ms": 20.0}],
              "size_mb": {"compressed": 2.0}, "sparsity": {"achieved": 0.5}}
    result = gate.evaluate(report, {"max_accuracy_drop": 0.03, "min_speedup": 1.0, "max_latency_ms": 10.0})
    verdict = {c["name"]: c["passed"] for c in result["checks"]}
    assert verdict == {"max_accuracy_drop[model.onnx]": True, "max_accuracy_drop[model.int8.onnx]": False,
                       "min_speedup[a, batch 1]": True, "max_latency_ms[a, batch 1]": True,
                       "min_speedup[b, batch 64]": False, "max_latency_ms[b, batch 64]": False}
    assert gate.evaluate(report, {}) == {"passed": True, "checks": []}


# ---------------------------------------------------------------- speed and latency on their intervals

ROWS = [{"backend": "onnxruntime-cpu", "batch": 1, "speedup": 1.02, "speedup_ci": [0.97, 1.08],
         "compressed_ms": 0.10, "compressed_ms_ci": [0.09, 0.13]},
        {"backend": "onnxruntime-cpu", "batch": 64, "speedup": 1.6, "speedup_ci": [1.5, 1.7],
         "compressed_ms": 4.0, "compressed_ms_ci": [3.9, 4.6]}]


def _synthetic(rows=ROWS) -> dict:
    return {"recipe": {"gate": {}}, "accuracy": {"dense": 0.9, "onnx": 0.9}, "latency": rows,
            "size_mb": {"compressed": 1.0}, "sparsity": {"achieved": 0.9}}


def test_min_speedup_is_checked_on_the_interval_low_end():
    # batch 1's point value 1.02 clears 1.0, but its interval reaches 0.97: not a measured speed-up
    result = gate.evaluate(_synthetic(), {"min_speedup": 1.0})
    checks = {c["name"]: c for c in result["checks"]}
    low = checks["min_speedup[onnxruntime-cpu, batch 1]"]
    assert not low["passed"] and low["measured"] == 0.97 and "low end" in low["measured_as"]
    assert checks["min_speedup[onnxruntime-cpu, batch 64]"]["passed"]


def test_max_latency_is_checked_on_the_interval_high_end():
    result = gate.evaluate(_synthetic(), {"max_latency_ms": 4.2})
    checks = {c["name"]: c for c in result["checks"]}
    assert not checks["max_latency_ms[onnxruntime-cpu, batch 64]"]["passed"]  # median 4.0, high end 4.6
    assert checks["max_latency_ms[onnxruntime-cpu, batch 64]"]["measured"] == 4.6


def test_rows_without_interval_use_their_point_value():
    rows = [{"backend": "tensorrt", "batch": 1, "speedup": 1.2, "compressed_ms": 1.0}]
    (check,) = gate.evaluate(_synthetic(rows), {"min_speedup": 1.1})["checks"]
    assert check["passed"] and check["measured"] == 1.2 and "no interval" in check["measured_as"]


def test_thresholds_limited_to_one_batch():
    result = gate.evaluate(_synthetic(), {"min_speedup": 1.1, "max_latency_ms": 5.0, "batch": 64})
    assert result["passed"] and {c["name"] for c in result["checks"]} == {
        "min_speedup[onnxruntime-cpu, batch 64]", "max_latency_ms[onnxruntime-cpu, batch 64]"}
    with pytest.raises(UserError, match="no latency rows at batch 8"):
        gate.evaluate(_synthetic(), {"min_speedup": 1.1, "batch": 8})


def test_gate_command_batch_option():
    Path("r.json").write_text(json.dumps(_synthetic()))
    run = CliRunner().invoke
    assert run(cli, ["gate", "r.json", "--min-speedup", "1.1"]).exit_code == 1  # batch 1 cannot show 1.1x
    ok = run(cli, ["gate", "r.json", "--min-speedup", "1.1", "--batch", "64"])
    assert ok.exit_code == 0, ok.output
    bad = run(cli, ["gate", "r.json", "--min-speedup", "1.1", "--batch", "32"])
    assert bad.exit_code == 2 and "no latency rows at batch 32" in bad.output


def test_recipe_gate_batch_must_be_timed():
    from ticketforge import recipe

    assert recipe.resolve("magnitude", ["gate.batch=64"]).gate.batch == 64
    with pytest.raises(UserError, match="gate.batch"):
        recipe.resolve("magnitude", ["gate.batch=32"])
