"""Progress in CI logs: without a terminal, plain lines (rate-limited, with step, epoch, loss and
ETA) instead of a bar that would only be drawn at the end; --quiet silences them; --json keeps
stdout for the report."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests._tiny import FAST, make_tiny
from ticketforge.ui import PlainProgress


class Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def test_plain_lines_at_most_every_ten_seconds_and_one_at_the_end():
    clock, lines = Clock(), []
    p = PlainProgress(lines.append, "fine-tune", total=100, per_epoch=20, every=10.0, clock=clock)
    for step in range(100):
        clock.t += 1.5  # an epoch takes 30 s here
        p.advance(loss=1.0 / (step + 1), lam=0.5)
    p.close()
    *ticks, last = lines
    assert len(ticks) == 100 * 1.5 // 10 - 1  # one per 10 s of the 150 s (the 150th second is the end)
    assert "step 7/100, epoch 1/5" in ticks[0] and "loss=" in ticks[0] and "lam=0.5" in ticks[0]
    assert "ETA 2m" in ticks[0]  # 10.5 s for 7 steps, 93 to go
    epochs = {t.split("epoch ")[1].split("/")[0] for t in ticks}
    assert epochs == {"1", "2", "3", "4", "5"}  # every 30-second epoch got a line
    assert last.startswith("fine-tune: done, 100 steps (5 epochs)") and "2m30s" in last


def test_short_loops_print_only_their_closing_line():
    clock, lines = Clock(), []
    p = PlainProgress(lines.append, "search (CTS)", total=50, per_epoch=10, clock=clock)
    for _ in range(50):
        clock.t += 0.005
        p.advance(loss=0.1)
    p.close()
    assert lines == ["search (CTS): done, 50 steps (5 epochs), loss=0.1, 0s"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny")
    make_tiny(folder)
    return folder


def _compress(tiny, *extra):
    args = [sys.executable, "-m", "ticketforge", "compress", "mlp.pt", "--recipe", "cts", "--epochs", "1",
            "--set", "search.steps=4", *FAST, "--out", "out", "--force", *extra]
    return subprocess.run(args, cwd=tiny, capture_output=True, text=True, timeout=300)


def test_without_a_terminal_progress_lines_go_to_stderr_and_json_to_stdout(tiny):
    r = _compress(tiny, "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["search"]["method"] == "cts"  # stdout is the report and nothing else
    lines = r.stderr.splitlines()
    assert any(line.startswith("search (CTS): done, 4 steps") and "loss=" in line and "lam=" in line
               for line in lines), r.stderr
    assert any(line.startswith("fine-tune: done") and "(1 epoch)" in line for line in lines), r.stderr
    assert not any("━" in line for line in lines)  # no bar drawn into a log


def test_quiet_silences_progress(tiny):
    r = _compress(tiny, "--quiet")
    assert r.returncode == 0, r.stderr
    assert r.stderr.strip() == "" and r.stdout.strip() == ""
    assert Path(tiny / "out" / "report.json").exists()
