"""4:8 sparsity: one module (ticketforge/structures/nm48.py), found by the registry."""
from __future__ import annotations

import json

import pytest

from tests._tiny import FAST, cli_subprocess as _cli
from ticketforge import recipe as recipes, structures
from ticketforge.errors import UserError


def test_four_eight_is_registered_and_checked_by_the_schema():
    assert "4:8" in structures.STRUCTURES.names()
    assert recipes.resolve("magnitude-2to4", ["convert.structure=4:8"]).convert.structure == "4:8"
    with pytest.raises(UserError, match="4:8 keeps 4 of every 8 weights .* must be 0.5"):
        recipes.resolve("magnitude", ["convert.structure=4:8"])  # the recipe's sparsity 0.9


def test_four_eight_end_to_end_from_the_cli(tiny):
    from ticketforge.structures.nm.layout import Pattern
    from ticketforge.structures.nm.pattern import onnx_groups

    out = tiny / "out-48"
    r = _cli(tiny, "compress", "mlp.pt", *FAST, "--recipe", "magnitude", "--set", "convert.structure=4:8",
             "--sparsity", "0.5", "--epochs", "1", "--quiet", "--out", str(out))
    assert r.returncode == 0, r.stderr
    report = json.loads((out / "report.json").read_text())
    section = report["structure"]["4:8"]
    assert section["pattern"] == "4:8" and section["onnx"]["bad"] == 0 and section["onnx"]["groups"] > 0
    assert onnx_groups(out / "model.onnx", Pattern(4, 8)) == section["onnx"]
    # 4 of 8 is not 2 of 4: the file holds groups of 4 with 3 or 4 non-zeros
    assert onnx_groups(out / "model.onnx")["bad"] > 0
    assert any(c["name"] == "pattern[4:8, model.onnx]" and c["passed"] for c in report["gate"]["checks"])
    assert "4:8: " in (out / "report.md").read_text()


