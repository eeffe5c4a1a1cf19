"""ticketforge sweep: one compress per sparsity, a table and a plot, the dense baseline computed once."""
import csv
import json
from pathlib import Path

import pytest

from _tiny import make_tiny
from ticketforge import recipe as recipes
from ticketforge.errors import UserError
from ticketforge.pipeline import Job
from ticketforge.sweep import parse_points, pareto, sweep
from ticketforge.ui import UI

SETS = ["search.steps=10", "validate.repeats=3", "validate.warmup=0", "validate.latency_batches=[1]"]


def test_sweep_writes_table_and_plot(tmp_path, capfd):
    make_tiny(tmp_path)
    job = Job(model_path=Path("mlp.pt"), recipe=recipes.resolve("cts", SETS, epochs=1), data="digits",
              arch="tinynet:Net", device="cpu", ui=UI())
    rows = sweep(job, [0.5, 0.9], Path("sw"))
    err = capfd.readouterr().err
    assert err.count("skipped dense (finished in an earlier run)") == 1  # the second point reuses the baseline
    assert {p.name for p in Path("sw").iterdir()} == {"points", "sweep.csv", "sweep.md", "sweep.png"}
    assert sorted(p.name for p in Path("sw/points").iterdir()) == ["0.5", "0.9"]
    assert (Path("sw/points/0.9/model.onnx")).exists()
    table = list(csv.DictReader(open("sw/sweep.csv")))
    assert [r["point"] for r in table] == ["dense", "0.5", "0.9"]
    report = json.loads(Path("sw/points/0.9/report.json").read_text())
    assert float(table[2]["accuracy"]) == round(report["accuracy"]["onnx"], 4)
    assert any(r["pareto_latency"] for r in rows) and any(r["pareto_size"] for r in rows)
    assert Path("sw/sweep.png").read_bytes()[:4] == b"\x89PNG"
    assert "| dense |" in Path("sw/sweep.md").read_text()
    assert not list(Path(".ticketforge").glob("sw-*"))  # the run state goes once the sweep succeeded


def test_pareto_front():
    # (cost, accuracy): the second is dominated by the first (costlier and less accurate)
    assert pareto([(1.0, 0.9), (2.0, 0.8), (3.0, 0.95), (1.0, 0.9)]) == [True, False, True, True]


@pytest.mark.parametrize("text", ["", "0.5,x", "1.0", "0.5,0.5", "-0.1"])
def test_bad_points_are_one_line_errors(text):
    """Malformed lists fail in parsing; values out of the budget key's range fail in the schema."""
    from ticketforge.recipe import resolve
    from ticketforge.sweep import point_recipes

    with pytest.raises(UserError):
        point_recipes(resolve("magnitude"), parse_points(text))
