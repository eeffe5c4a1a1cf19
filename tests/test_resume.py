"""Resumable runs: kill -9 during fine-tuning, run the same command again."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

from _tiny import FAST, make_tiny

BIN = Path(sys.executable).parent
# Long enough a fine-tune (many small batches) to be killed in the middle of it.
ARGS = ["--recipe", "cts", "--sparsity", "0.5", "--set", "search.steps=20", "--epochs", "3",
        "--set", "finetune.batch_size=16", *FAST]


def _compress(out, **kw):
    return subprocess.Popen([str(BIN / "ticketforge"), "compress", "mlp.pt", *ARGS, "--out", out],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": os.getcwd()}, **kw)


def _state(out):
    return [d for d in Path(".ticketforge").glob(f"{out}-*") if d.is_dir()]


def test_sigkill_during_finetune_then_resume_equals_uninterrupted(tmp_path):
    make_tiny(tmp_path)
    victim = _compress("killed")
    deadline = time.time() + 120
    while time.time() < deadline and not any((d / "search.pt").exists() for d in _state("killed")):
        time.sleep(0.05)
    finished_search = any((d / "search.pt").exists() for d in _state("killed"))
    os.kill(victim.pid, signal.SIGKILL)
    victim.communicate()
    assert finished_search, "the search never finished"
    assert not any((d / "finetune.pt").exists() for d in _state("killed")), "killed too late"
    assert not Path("killed").exists()  # the output folder appears complete or not at all

    resumed = _compress("killed")
    _, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err[-2000:]
    assert "skipped search (finished in an earlier run)" in err
    assert "skipped dense (finished in an earlier run)" in err
    assert not _state("killed")  # the run state goes once the run succeeded

    fresh = _compress("fresh")
    _, err = fresh.communicate(timeout=300)
    assert fresh.returncode == 0, err[-2000:]
    assert "skipped" not in err

    a = torch.load("killed/ticket.pt", weights_only=True)
    b = torch.load("fresh/ticket.pt", weights_only=True)
    assert all(torch.equal(a["masks"][k], b["masks"][k]) for k in b["masks"])
    assert all(torch.equal(a["state_dict"][k], b["state_dict"][k]) for k in b["state_dict"])
    ra, rb = (json.loads(Path(d, "report.json").read_text()) for d in ("killed", "fresh"))
    assert ra["accuracy"]["onnx"] == rb["accuracy"]["onnx"]
    assert ra["run"]["resumed_stages"] == ["dense", "search"] and rb["run"]["resumed_stages"] == []


def test_stage_results_load_with_weights_only(tmp_path):
    """What a killed run leaves behind is plain tensors and dicts (no pickled code), and the runner
    restores a saved step instead of running it again."""
    from ticketforge.runner import Runner, Step
    from ticketforge.runstate import Store
    from ticketforge.ui import SILENT

    ran, restored = [], []
    step = Step("search", lambda run: ran.append(1) or {"mask": {"w": torch.ones(3, dtype=torch.bool)},
                                                        "info": {"steps": 3}},
                lambda run, saved: restored.append(saved))
    Runner(Store(tmp_path / "state"), None, 0, SILENT)(step, None)
    got = torch.load(tmp_path / "state" / "search.pt", weights_only=True)
    assert got["info"] == {"steps": 3} and ran == [1]
    again = Runner(Store(tmp_path / "state"), None, 0, SILENT)
    again(step, None)
    assert ran == [1] and restored[0]["info"] == {"steps": 3} and again.skipped == ["search"]


def test_sigterm_exits_cleanly_with_a_message(tmp_path):
    make_tiny(tmp_path)
    proc = _compress("term")
    deadline = time.time() + 120
    while time.time() < deadline and not any((d / "dense.pt").exists() or (d / "shared" / "dense.pt").exists()
                                             for d in _state("term")):
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err[-2000:]
    assert "interrupted" in err and "Traceback" not in err
    assert not Path("term").exists() and not Path(".term.tmp").exists()


def test_a_stop_request_whose_exception_was_lost_still_stops_before_the_output(tmp_path, monkeypatch):
    """A SIGTERM's exception can be dropped (raised inside a finalizer or a library callback).
    The flag the handler sets stops the run at the next step, and nothing is committed."""
    import dataclasses

    import pytest

    from ticketforge import errors, recipe as recipes, steps
    from ticketforge.pipeline import Job, compress
    from ticketforge.ui import SILENT

    make_tiny(tmp_path)
    monkeypatch.setattr(errors, "_terminated", False)
    ran = []

    def swallowed(run):  # the handler ran, its exception did not get out
        ran.append(run)
        try:
            errors.terminate()
        except errors.Terminated:
            pass
        return original(run)

    i = next(k for k, s in enumerate(steps.STEPS) if s.name == "finetune")
    original = steps.STEPS[i].run
    patched = list(steps.STEPS)
    patched[i] = dataclasses.replace(steps.STEPS[i], run=swallowed)
    monkeypatch.setattr(steps, "STEPS", tuple(patched))
    job = Job(model_path="mlp.pt", arch="tinynet:Net", data="digits", out="stopped", ui=SILENT,
              recipe=recipes.resolve("magnitude", ["finetune.epochs=1", "validate.repeats=3", "validate.warmup=0",
                                                   "validate.latency_batches=[1]"]))
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(errors.Terminated):
        compress(job)
    assert ran and not Path("stopped").exists() and not Path(".stopped.tmp").exists()


def test_a_lost_stop_request_prints_no_traceback(monkeypatch, capsys):
    """CI once caught SIGTERM landing in an import lock's weakref callback: Python printed
    "Exception ignored ... Traceback" for the dropped Terminated. The hook keeps that quiet (the
    flag stops the run) and still reports any other lost exception."""
    import gc
    import sys
    import weakref

    from ticketforge import errors

    monkeypatch.setattr(sys, "unraisablehook", errors.quiet_lost_terminations)

    class Thing:
        pass

    def lose(exc):
        obj = Thing()
        def callback(_ref, exc=exc):
            raise exc
        ref = weakref.ref(obj, callback)
        del obj
        gc.collect()
        return ref

    lose(errors.Terminated())
    assert capsys.readouterr().err == ""
    lose(ValueError("a real bug"))
    err = capsys.readouterr().err
    assert "ValueError: a real bug" in err and "Traceback" in err
