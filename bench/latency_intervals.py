"""Are the latency intervals stable? The same pair of ONNX files timed again and again, each time
in a fresh process (`ticketforge bench --json`), so that whatever differs between sessions (memory
placement, thread start-up, the load of the moment) shows up between the repeats.

    python bench/latency_intervals.py DENSE.onnx MODEL.onnx [--repeats 5] [--batch 1 64] [--label NAME]

Appends one row per (repeat, batch) to bench/results/latency_intervals.csv and draws every label's
intervals side by side in bench/results/latency_intervals.png."""
from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
ROOT = Path(__file__).resolve().parents[1]
FIELDS = ["label", "repeat", "batch", "speedup", "lo", "hi", "runs", "seconds", "converged", "threads", "cpu"]


def once(dense: str, model: str, batches: list[int], extra: list[str]) -> dict:
    args = [sys.executable, "-m", "ticketforge", "bench", model, "--compare", dense, "--json", *extra]
    for b in batches:
        args += ["--batch", str(b)]
    out = subprocess.run(args, capture_output=True, text=True, check=True, cwd=ROOT)
    return json.loads(out.stdout)


def plot(path: Path, csv_path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = list(csv.DictReader(csv_path.open()))
    groups = sorted({(r["label"], int(r["batch"])) for r in rows})
    fig, ax = plt.subplots(figsize=(8, 0.45 * len(rows) + 1.2))
    y = 0
    ticks, names = [], []
    for label, batch in groups:
        for r in (r for r in rows if r["label"] == label and int(r["batch"]) == batch):
            s, lo, hi = float(r["speedup"]), float(r["lo"]), float(r["hi"])
            ax.errorbar(s, y, xerr=[[s - lo], [hi - s]], fmt="o", color="#4c78a8", capsize=3)
            ticks.append(y)
            names.append(f"{label}, batch {batch}, #{r['repeat']}")
            y += 1
        y += 0.6
    ax.axvline(1.0, color="#999", lw=1, ls="--")
    ax.set_yticks(ticks, names, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("speed-up over dense (median of paired ratios, 95% interval)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("dense")
    p.add_argument("model")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--batch", type=int, nargs="+", default=[1, 64])
    p.add_argument("--label", default=None, help="name of this pair in the CSV (default: the model's folder)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--max-seconds", type=float, default=5.0)
    args = p.parse_args()
    label = args.label or Path(args.model).resolve().parent.name
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / "latency_intervals.csv"
    new = not path.exists()
    with path.open("a", newline="") as f:
        w = csv.DictWriter(f, FIELDS)
        if new:
            w.writeheader()
        for i in range(args.repeats):
            r = once(args.dense, args.model, args.batch,
                     ["--threads", str(args.threads), "--max-seconds", str(args.max_seconds)])
            for row in r["rows"]:
                w.writerow({"label": label, "repeat": i + 1, "batch": row["batch"], "speedup": row["speedup"],
                            "lo": row["speedup_ci"][0], "hi": row["speedup_ci"][1], "runs": row["runs"],
                            "seconds": row["seconds"], "converged": row["converged"],
                            "threads": r["environment"]["threads"], "cpu": r["environment"]["cpu"]})
                print(f"{label} #{i + 1} batch {row['batch']}: {row['speedup']:.3f} "
                      f"[{row['speedup_ci'][0]:.3f}, {row['speedup_ci'][1]:.3f}] ({row['runs']} pairs)", flush=True)
            f.flush()
    plot(RESULTS / "latency_intervals.png", path)


if __name__ == "__main__":
    main()
