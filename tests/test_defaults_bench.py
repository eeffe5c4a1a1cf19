"""bench/defaults.py's reading of its own CSV: the table, the reasons and the epoch cap (no training)."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent.parent / "bench"))
import defaults  # noqa: E402


def _row(family, recipe, seed, status, drop="", macs="", reason="", cap=5):
    return {"family": family, "recipe": recipe, "seed": str(seed), "status": status, "cap": str(cap),
            "dense_accuracy": "0.99" if status == "ok" else "", "drop": str(drop), "macs_ratio": str(macs),
            "reason": reason}


def test_table_means_drops_and_marks_rows_that_did_not_run():
    rows = [_row("resnet-cnn", "cts", 0, "ok", 0.01, 1.0), _row("resnet-cnn", "cts", 1, "ok", 0.03, 1.0),
            _row("resnet-cnn", "cts-channels", 0, "ok", 0.05, 0.5),
            _row("1d-cnn", "cts", 0, "ok", 0.02, 1.0),
            _row("1d-cnn", "cts-channels", 0, "n/a", reason="no channel group"),
            _row("resnet-cnn", "cts-blocks", 0, "error", reason="boom"),
            _row("resnet-cnn", "cts", 0, "ok", 0.04, 1.0, cap=0)]
    lines = defaults.table(rows).splitlines()
    assert lines[0] == "| recipe | resnet-cnn (99.0 ± 0.0%) | 1d-cnn (99.0%) |"  # dense: one value per seed
    # families and recipes in the bench's order, whatever the CSV's; drop in points, mean ± sd (n)
    assert lines[2] == "| `cts` | 2.0 ± 1.4 (2) | 2.0 (1) |"
    assert lines[3] == "| `cts` (no cap) | 4.0 (1) | - |"  # rows run with --cap 0: their own line
    assert lines[4] == "| `cts-channels` | 5.0 (1), MACs 0.50 | n/a |"
    assert lines[5] == "| `cts-blocks` | error | - |"
    assert defaults.reasons(rows).splitlines() == ["- 1d-cnn / `cts-channels` (n/a): no channel group",
                                                   "- resnet-cnn / `cts-blocks` (error): boom"]


def test_cap_is_the_same_for_every_recipe_and_scales_the_rewind_point():
    assert defaults.capped("cts-paper", 5) == ["search.epochs=5", "train.epochs=5", "train.rewind_epochs=0.281"]
    assert defaults.capped("cts-channels", 5) == ["search.epochs=5"]
    assert defaults.capped("magnitude", 5) == []
    assert defaults.capped("cts-paper", 0) == []
