"""Does the report's speed-up match what a plain ONNX Runtime session measures? (issue 19 item 6)

A budget run reported 2.34x at batch 64 on 2 threads; a plain `onnxruntime.InferenceSession` with
only `intra_op_num_threads=2` set, median of 50 alternating runs, measured the same two files at
2.01-2.05x. This times one run's dense.onnx and model.onnx in several ways side by side, each
differing from the next in ONE setting, so the setting that explains a gap is the one whose row
moves:

  report      the report's sessions before the fix: spinning off (with > 1 thread), inter-op threads 1,
              graph optimisation ENABLE_ALL, 4 session instances per model used in turn
  +spinning   the same with intra-op spinning on (ONNX Runtime's default)
  +inter-op   the same with spinning off and inter-op threads left at the default
  one-session the report's options, one session per model
  plain       SessionOptions() with only intra_op_num_threads set, one session per model: what a
              user's session is (and, with ticketforge.latency now creating its sessions this way and
              4 per model, what the report times)

Every way runs `--pairs` interleaved dense/compressed pairs (order alternating) in a block; the
blocks of all ways are repeated `--repeats` times in rotating order, so that load changes over the
run reach every way alike. For each way the speed-up is given by three statistics: the ratio of the
two models' 10th percentiles (the report's statistic before the fix), the ratio of their medians
(the plain check's), and the median of the per-pair ratios; the dense model's median and 10th
percentile ms say how much the load stretched the runs.

    python bench/plain_session.py RUN_DIR [--batch 64] [--threads 2] [--pairs 50] [--repeats 4]
    python bench/plain_session.py RUN_DIR --check [--repeats 3]

RUN_DIR holds dense.onnx and model.onnx. Writes bench/results/plain_session.csv (every block) and
plain_session.json (the summary, the load average, the command).

--check is the acceptance test of the fix: the report's row (ticketforge.latency.compare, as the
budget step times it) and then an independent plain timing as the issue's reporter made it (one
plain session per model, median of `--pairs` alternating runs), `--repeats` times; each line says
whether the plain speed-up fell inside the report's 95% interval, and inside the interval the run's
own report.json gave its speed-up budget. Appends to plain_session_check.csv."""
from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ticketforge import latency  # noqa: E402

RESULTS = Path(__file__).parent / "results"


def options(threads: int, spinning: bool | None, inter_op_one: bool) -> ort.SessionOptions:
    """SessionOptions with the thread count and, where given, the settings the report used to add."""
    o = ort.SessionOptions()
    o.intra_op_num_threads = threads
    if inter_op_one:
        o.inter_op_num_threads = 1
    if spinning is not None:
        o.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    return o


# name: (spinning: None = not set, inter-op threads set to 1, session instances per model)
WAYS = {
    "report": (False, True, latency.SESSIONS),
    "+spinning": (True, True, latency.SESSIONS),
    "+inter-op": (False, False, latency.SESSIONS),
    "one-session": (False, True, 1),
    "plain": (None, False, 1),
}


def block(dense: list, model: list, x: dict, pairs: int) -> tuple[np.ndarray, np.ndarray]:
    """`pairs` interleaved runs of dense and model (order alternating, sessions used in turn)."""
    k = len(dense)
    td, tm = [], []
    for i in range(pairs):
        d, m = dense[i % k], model[i % k]
        first, second = ((d, td), (m, tm)) if (i // k) % 2 == 0 else ((m, tm), (d, td))
        for sess, out in (first, second):
            t = time.perf_counter()
            sess.run(None, x)
            out.append(time.perf_counter() - t)
    return np.array(td), np.array(tm)


def stats(td: np.ndarray, tm: np.ndarray) -> dict:
    q = latency.QUANTILE
    return {"speedup_p10": float(np.quantile(td, q) / np.quantile(tm, q)),
            "speedup_median": float(np.median(td) / np.median(tm)),
            "speedup_pair_median": float(np.median(td / tm)),
            "dense_ms_p10": 1e3 * float(np.quantile(td, q)), "dense_ms_median": 1e3 * float(np.median(td)),
            "model_ms_median": 1e3 * float(np.median(tm))}


def check(a) -> int:
    """The report's interval against an independent plain timing, `a.repeats` times."""
    settings = latency.Settings(threads=a.threads)  # the report's defaults, the budget's threads
    report = a.run / "report.json"
    # the interval the run itself reported for its budget, where it had a timed one
    budget = json.loads(report.read_text()).get("budget") or {} if report.exists() else {}
    run_ci = budget.get("ci") if budget.get("unit") == "x" else None
    rows = []
    for r in range(a.repeats):
        load = os.getloadavg()[0]
        row = latency.compare(a.run / "dense.onnx", a.run / "model.onnx", [a.batch], settings)[0]
        dense, model = ([ort.InferenceSession(str(a.run / f), options(a.threads, None, False),
                                              providers=["CPUExecutionProvider"])] for f in ("dense.onnx", "model.onnx"))
        x = latency.feeds(dense[0], a.batch)
        for s in dense + model:
            for _ in range(a.warmup):
                s.run(None, x)
        plain = stats(*block(dense, model, x, a.pairs))["speedup_median"]
        lo, hi = row["speedup_ci"]
        rows.append({"label": a.label, "repeat": r, "load": round(load, 1), "report_speedup": row["speedup"],
                     "report_lo": lo, "report_hi": hi, "report_runs": row["runs"], "report_dense_ms": row["dense_ms"],
                     "plain_speedup_median": round(plain, 4), "inside": lo <= plain <= hi,
                     "run_budget_ci": run_ci, "inside_run_budget_ci": run_ci is not None and run_ci[0] <= plain <= run_ci[1]})
        print(rows[-1], flush=True)
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / "plain_session_check.csv"
    old = list(csv.DictReader(path.open())) if path.exists() else []
    fields = list(dict.fromkeys([k for r in old for k in r] + list(rows[0])))  # rows of older versions too
    with path.open("w", newline="") as f:
        wr = csv.DictWriter(f, fieldnames=fields, restval="")
        wr.writeheader()
        wr.writerows(old + rows)
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", type=Path, help="a run's output folder (dense.onnx, model.onnx)")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--pairs", type=int, default=50)
    ap.add_argument("--repeats", type=int, default=4)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--ways", default=",".join(WAYS))
    ap.add_argument("--label", default="")
    ap.add_argument("--check", action="store_true", help="the report's interval against a plain timing")
    a = ap.parse_args()
    if a.check:
        return check(a)
    ways = a.ways.split(",")
    sessions = {}
    for w in ways:
        spin, inter, k = WAYS[w]
        sessions[w] = tuple([ort.InferenceSession(str(a.run / f), options(a.threads, spin, inter),
                                                  providers=["CPUExecutionProvider"]) for _ in range(k)]
                            for f in ("dense.onnx", "model.onnx"))
    x = latency.feeds(sessions[ways[0]][0][0], a.batch)
    for dense, model in sessions.values():
        for s in dense + model:
            for _ in range(a.warmup):
                s.run(None, x)
    rows, times = [], {w: ([], []) for w in ways}
    load = [os.getloadavg()[0]]
    for r in range(a.repeats):
        for w in ways[r % len(ways):] + ways[:r % len(ways)]:  # rotate: no way always runs first
            td, tm = block(*sessions[w], x, a.pairs)
            times[w][0].append(td)
            times[w][1].append(tm)
            rows.append({"label": a.label, "way": w, "repeat": r, **{k: round(v, 4) for k, v in stats(td, tm).items()}})
            print(f"repeat {r} {w:12s} " + " ".join(f"{k}={v}" for k, v in rows[-1].items()
                                                   if k.startswith(("speedup", "dense"))), flush=True)
        load.append(os.getloadavg()[0])
    summary = {w: {k: round(v, 4) for k, v in stats(np.concatenate(times[w][0]), np.concatenate(times[w][1])).items()}
               for w in ways}
    for w in ways:  # the spread between blocks: how far one block of `pairs` pairs can be off
        per = [row["speedup_median"] for row in rows if row["way"] == w]
        summary[w]["speedup_median_blocks"] = [min(per), max(per)]
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / "plain_session.csv"
    new = not path.exists()
    with path.open("a", newline="") as f:
        wr = csv.DictWriter(f, fieldnames=list(rows[0]))
        if new:
            wr.writeheader()
        wr.writerows(rows)
    out = {"run": str(a.run), "batch": a.batch, "threads": a.threads, "pairs": a.pairs, "repeats": a.repeats,
           "label": a.label, "cores": latency.cores(), "cpu": latency.cpu_model(), "onnxruntime": ort.__version__,
           "load_average": [round(v, 1) for v in load], "summary": summary}
    jpath = RESULTS / "plain_session.json"
    done = json.loads(jpath.read_text()) if jpath.exists() else []
    jpath.write_text(json.dumps(done + [out], indent=1) + "\n")
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
