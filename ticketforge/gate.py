"""The CI gate: thresholds from the recipe's `gate` section checked against a report's measured
numbers, with nothing recomputed, so `ticketforge gate report.json` can re-check any old report.

What each threshold measures (one check per row, so CI shows exactly what failed):
- max_accuracy_drop: dense accuracy (the loaded model in torch, on the validation split) minus
  the accuracy of each exported model in ONNX Runtime (model.onnx, and model.int8.onnx /
  model.fp16.onnx / model.engine when they were built). Absolute, e.g. 0.01 = one point. For data
  without labels (the report has no accuracy): 1 minus each exported model's top-1 agreement with
  the dense model, the fraction of validation samples whose top-1 class changed.
- min_speedup: every latency row (each backend and batch size, or only gate.batch): the LOW end of
  the speed-up's 95% interval, so a speed-up the measurement cannot tell from noise does not pass.
- max_latency_ms: every latency row (or only gate.batch): the HIGH end of the 95% interval of the
  compressed model's median time.
  Rows without an interval (TensorRT engines, reports of older versions) are checked on their point
  value, and the check says so.
- max_perplexity_ratio: a language model's validation perplexity, model.onnx over dense.onnx (both
  measured in ONNX Runtime on the same tokens). A report without perplexity has no such check.
- min_plain_speedup: a timed budget's pair measured again as a user's own code would (one default
  InferenceSession per file, medians of alternating runs: report.json budget.plain). The report's
  method (spinning off, interleaved sessions, bootstrap interval) and a plain session can differ
  by up to ~13% on a loaded machine (docs/plain-session-timing.md); this checks the plain one.
- max_size_mb: the size of model.onnx.
- min_sparsity: the sparsity of the prunable weights read back from model.onnx.
A run with a budget (search.target_speedup, target_latency_ms, max_size_mb: ticketforge.budget)
also gets one check for it, always: the budget is what the user asked for, so a run that misses it
fails the gate (exit 1), even where no threshold is set. So does what a structure promises of the
exported file (2:4: every eligible weight group holds the pattern), from its `gate_checks` hook."""
from __future__ import annotations

import dataclasses
import json
import os
import xml.etree.ElementTree as ET
from pathlib import Path

from ticketforge import structures
from ticketforge.errors import UserError
from ticketforge.recipe import GateConfig
from ticketforge.report_schema import Report

# accuracy key in Report.accuracy -> the exported file it was measured on
EXPORTED = {"onnx": "model.onnx", "int8": "model.int8.onnx", "fp16": "model.fp16.onnx", "engine": "model.engine"}


def _check(name: str, threshold: float, measured: float, passed: bool, measured_as: str | None = None) -> dict:
    check = {"name": name, "threshold": threshold, "measured": round(float(measured), 6), "passed": bool(passed)}
    if measured_as:
        check["measured_as"] = measured_as
    return check


def latency_rows(report: Report, batch: int | None) -> list[dict]:
    """The latency rows a speed or latency threshold applies to: all, or those of one batch size."""
    rows = report.latency
    if batch is None:
        return rows
    chosen = [r for r in rows if r["batch"] == batch]
    if not chosen:
        raise UserError(f"the report has no latency rows at batch {batch} (timed: "
                        f"{', '.join(str(b) for b in sorted({r['batch'] for r in rows})) or 'none'})")
    return chosen


def evaluate(report: Report, thresholds: dict) -> dict:
    """The gate section for `report` under `thresholds` (GateConfig fields; None = not checked)."""
    t = {f.name: thresholds.get(f.name) for f in dataclasses.fields(GateConfig)}
    checks = []
    if t["max_accuracy_drop"] is not None:
        acc, agree = report.accuracy, report.agreement or {}
        for key, file in EXPORTED.items():
            if acc is not None and acc.get(key) is not None:
                drop, how = acc["dense"] - acc[key], None
            elif acc is None and agree.get(key) is not None:
                drop, how = 1 - agree[key], "1 - top-1 agreement with the dense model, no labels"
            else:
                continue
            checks.append(_check(f"max_accuracy_drop[{file}]", t["max_accuracy_drop"], drop,
                                 drop <= t["max_accuracy_drop"], how))
    if t["max_perplexity_ratio"] is not None and report.perplexity:
        ppl = report.perplexity
        ratio = ppl["onnx"] / ppl["dense"]
        checks.append(_check("max_perplexity_ratio[model.onnx]", t["max_perplexity_ratio"], ratio,
                             ratio <= t["max_perplexity_ratio"], "perplexity of model.onnx / dense.onnx"))
    timed = t["min_speedup"] is not None or t["max_latency_ms"] is not None
    for row in latency_rows(report, t["batch"]) if timed else []:
        where = f"{row['backend']}, batch {row['batch']}"
        if t["min_speedup"] is not None:
            ci = row.get("speedup_ci")
            low, how = (ci[0], "low end of the 95% interval") if ci else (row["speedup"], "point value, no interval")
            checks.append(_check(f"min_speedup[{where}]", t["min_speedup"], low, low >= t["min_speedup"], how))
        if t["max_latency_ms"] is not None:
            ci = row.get("compressed_ms_ci")
            high, how = (ci[1], "high end of the 95% interval") if ci else (row["compressed_ms"], "point value, no interval")
            checks.append(_check(f"max_latency_ms[{where}]", t["max_latency_ms"], high, high <= t["max_latency_ms"], how))
    if t["max_size_mb"] is not None:
        size = report.size_mb["compressed"]
        checks.append(_check("max_size_mb[model.onnx]", t["max_size_mb"], size, size <= t["max_size_mb"]))
    if t["min_sparsity"] is not None:
        sp = report.sparsity["achieved"]
        checks.append(_check("min_sparsity[model.onnx]", t["min_sparsity"], sp, sp >= t["min_sparsity"]))
    b = report.budget
    if b:
        where = f"batch {b['batch']}" if b.get("batch") else b.get("file", "model.onnx")
        checks.append(_check(f"budget[{b['key']}, {where}]", b["target"], b["measured"], b["met"],
                             "point value of the verify step's measurement" if b.get("ci") else None))
    if t["min_plain_speedup"] is not None and b and b.get("plain"):
        plain = b["plain"]["speedup"]
        checks.append(_check(f"min_plain_speedup[batch {b['plain']['batch']}]", t["min_plain_speedup"], plain,
                             plain >= t["min_plain_speedup"], b["plain"]["how"]))
    for name, section in (report.structure or {}).items():
        if name in structures.STRUCTURES:
            checks += structures.get(name).gate_checks(section)
    return {"passed": all(c["passed"] for c in checks), "checks": checks}


def load_report(path: str | Path) -> Report:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"report {path} does not exist")
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UserError(f"cannot read report {path}: {exc}") from None
    return Report.from_dict(data, str(path))


def to_markdown(gate: dict) -> str:
    if not gate["checks"]:
        return "Gate: no thresholds set (recipe `gate` section), nothing checked.\n"
    lines = [f"Gate: **{'PASSED' if gate['passed'] else 'FAILED'}** "
             f"({sum(not c['passed'] for c in gate['checks'])} of {len(gate['checks'])} checks failed)", "",
             "| check | threshold | measured | result |", "|---|---:|---:|---|"]
    lines += [f"| {c['name']} | {c['threshold']:g} | {c['measured']:.4g}"
              f"{' (' + c['measured_as'] + ')' if c.get('measured_as') else ''} | {'pass' if c['passed'] else '**FAIL**'} |"
              for c in gate["checks"]]
    return "\n".join(lines) + "\n"


def write_junit(gate: dict, path: str | Path, suite: str = "ticketforge.gate") -> None:
    """JUnit XML, one test case per check, so any CI lists each check with its numbers."""
    failures = sum(not c["passed"] for c in gate["checks"])
    root = ET.Element("testsuites", tests=str(len(gate["checks"])), failures=str(failures))
    ts = ET.SubElement(root, "testsuite", name=suite, tests=str(len(gate["checks"])), failures=str(failures),
                       errors="0", skipped="0")
    for c in gate["checks"]:
        case = ET.SubElement(ts, "testcase", classname=suite, name=c["name"])
        text = (f"measured {c['measured']:.6g}{' (' + c['measured_as'] + ')' if c.get('measured_as') else ''}, "
                f"threshold {c['threshold']:g}")
        ET.SubElement(case, "system-out").text = text
        if not c["passed"]:
            ET.SubElement(case, "failure", message=text, type="GateCheckFailed").text = text
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    ET.ElementTree(root).write(path, encoding="utf-8", xml_declaration=True)


def check_junit_path(path: str | Path | None) -> None:
    """Refuse an unusable --junit path before any work starts."""
    if path is not None and Path(path).is_dir():
        raise UserError(f"--junit {path} is a folder; give a file path such as gate.xml")


def append_step_summary(markdown: str) -> None:
    """GitHub Actions shows $GITHUB_STEP_SUMMARY on the run's page; elsewhere this does nothing."""
    target = os.environ.get("GITHUB_STEP_SUMMARY")
    if target:
        with open(target, "a", encoding="utf-8") as f:
            f.write(markdown + "\n")
