"""`ticketforge sweep`: one compress per value of the structure's budget key (search.sparsity for
unstructured tickets, search.target_macs for channels and blocks), then a table and a plot of
accuracy against latency and size with the Pareto front marked. Every point's recipe goes through
the schema, like any recipe.

The points share one run state: the dense baseline is computed once, and a re-run skips finished
points."""
from __future__ import annotations

import csv
import dataclasses
import json
import shutil
from contextlib import nullcontext
from pathlib import Path

from ticketforge import device as device_mod, distributed, recipe as recipes, structures
from ticketforge.errors import UserError
from ticketforge.pipeline import Job, atomic_folder, compress, default_out, refuse_existing
from ticketforge.recipe import Recipe
from ticketforge.report_schema import Report
from ticketforge.runstate import RunState, run_key
from ticketforge.ui import UI


def parse_points(text: str) -> list[float]:
    """Comma-separated numbers; their range is the budget key's, checked by the schema per point."""
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise UserError(f"--points {text!r}: expected numbers separated by commas, e.g. 0.5,0.8,0.9") from None
    if not values:
        raise UserError("--points: give at least one value, e.g. 0.5,0.8,0.9")
    if len(set(values)) != len(values):
        raise UserError(f"--points {text!r}: a value is repeated")
    return sorted(values)


def sweep_key(recipe: Recipe) -> str:
    structure = structures.get(recipe.convert.structure)
    if structure.sweep_key is None:
        raise UserError(f"sweep: structure '{structure.name}' has a fixed budget ({structure.budget(recipe)}); "
                        "there is nothing to sweep")
    return f"search.{structure.sweep_key}"


def point_recipes(recipe: Recipe, values: list[float]) -> list[Recipe]:
    """One recipe per point, each checked by the schema (a bad value is exit 2 before any work)."""
    key = sweep_key(recipe)
    return [recipes.with_value(recipe, key, v) for v in values]


def pareto(points: list[tuple[float, float]]) -> list[bool]:
    """(cost, accuracy) pairs -> on the front: no other point is at most as costly and at least as
    accurate, and strictly better in one of the two."""
    return [not any(c2 <= c and a2 >= a and (c2 < c or a2 > a) for c2, a2 in points) for c, a in points]


def _accuracy(report: Report) -> tuple[float, float]:
    """(model.onnx, dense.onnx) accuracy; without labels, top-1 agreement with dense.onnx (dense: 1)."""
    if report.accuracy is None:
        return report.agreement["onnx"], 1.0
    return report.accuracy["onnx"], report.accuracy["dense_onnx"]


def row(report: Report) -> dict:
    lat = min(report.latency, key=lambda r: r["batch"])  # the smallest batch: interactive latency
    acc, dense = _accuracy(report)
    return {
        "sparsity": round(report.sparsity["achieved"], 4),
        "accuracy": round(acc, 4),
        "accuracy_drop": round(dense - acc, 4),
        "latency_ms": lat["compressed_ms"],
        "latency_batch": lat["batch"],
        "speedup": lat["speedup"],
        "size_mb": round(report.size_mb["compressed"], 4),
        "params_nonzero": report.params["compressed"],
    }


def dense_row(report: Report) -> dict:
    lat = min(report.latency, key=lambda r: r["batch"])
    return {"target": None, "sparsity": 0.0, "accuracy": round(_accuracy(report)[1], 4),
            "accuracy_drop": 0.0, "latency_ms": lat["dense_ms"], "latency_batch": lat["batch"], "speedup": 1.0,
            "size_mb": round(report.size_mb["dense"], 4), "params_nonzero": report.params["dense"]}


def write_table(rows: list[dict], folder: Path) -> None:
    with open(folder / "sweep.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    head = ["point", "target", "sparsity", "accuracy (ONNX)", "drop", "latency ms", "speed-up", "size MB",
            "non-zero params", "Pareto (latency)", "Pareto (size)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        target = "-" if r["target"] is None else format(r["target"], "g")
        lines.append(f"| {r['point']} | {target} | {r['sparsity']:.4f} | {100 * r['accuracy']:.2f}% | "
                     f"{100 * r['accuracy_drop']:+.2f} pt | {r['latency_ms']:.4f} (batch {r['latency_batch']}) | "
                     f"{r['speedup']:.2f}x | {r['size_mb']:.3f} | {r['params_nonzero']:,} | "
                     f"{'yes' if r['pareto_latency'] else ''} | {'yes' if r['pareto_size'] else ''} |")
    (folder / "sweep.md").write_text("# ticketforge sweep\n\nLatency and accuracy are measured on the exported "
                                     "ONNX models with ONNX Runtime; the dense row is the reference.\n\n"
                                     + "\n".join(lines) + "\n")


def write_plot(rows: list[dict], folder: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, cost, label, front in ((axes[0], "latency_ms", "latency (ms)", "pareto_latency"),
                                   (axes[1], "size_mb", "model.onnx size (MB)", "pareto_size")):
        on = sorted((r for r in rows if r[front]), key=lambda r: r[cost])
        ax.plot([r[cost] for r in on], [r["accuracy"] for r in on], "-", color="tab:red", lw=1.5, label="Pareto front")
        for r in rows:
            dense = r["point"] == "dense"
            ax.scatter(r[cost], r["accuracy"], marker="s" if dense else "o", s=45, zorder=3,
                       color="black" if dense else ("tab:red" if r[front] else "tab:blue"))
            ax.annotate("dense" if dense else f"{r['target']:g}", (r[cost], r["accuracy"]),
                        textcoords="offset points", xytext=(5, 4), fontsize=8)
        ax.set_xlabel(label + (f", batch {rows[0]['latency_batch']}" if cost == "latency_ms" else ""))
        ax.set_ylabel("accuracy (ONNX Runtime)")
        ax.grid(alpha=0.3)
        ax.legend(loc="lower right", fontsize=8)
    fig.suptitle(f"accuracy vs latency and size (labels: {rows[-1]['key']})")
    fig.tight_layout()
    fig.savefig(folder / "sweep.png", dpi=120)
    plt.close(fig)


def sweep(job: Job, values: list[float], out: Path | None = None) -> list[dict]:
    """Compress at every value of the structure's budget key; writes points/<value>/ (each a full
    compress output), sweep.csv, sweep.md and sweep.png into `out`, which appears complete or not at all."""
    out = Path(out or Path(str(default_out(job.model_path, job.recipe)) + "-sweep"))
    points = point_recipes(job.recipe, values)
    if out.exists() and not job.force:
        refuse_existing(out)
    key = run_key({"recipe": [r.to_dict() for r in points], "seed": job.seed, "model": Path(job.model_path),
                   "arch": job.arch, "arch_kwargs": job.arch_kwargs, "data": job.data, "val_fraction": job.val_fraction})
    joined = distributed.launched() and not distributed.active()
    distributed.init(device_mod.pick(job.device))  # once for all points
    try:
        return _sweep(job, values, points, out, key)
    finally:
        if joined:
            distributed.shutdown()


def _sweep(job: Job, values: list[float], points: list[Recipe], out: Path, key: str) -> list[dict]:
    ui = job.ui if distributed.is_main() else UI(quiet=True)
    main = distributed.is_main()
    name = sweep_key(job.recipe)
    reports = []
    state = RunState(out, key)
    with (state if main else nullcontext()), (atomic_folder(out, job.force) if main else nullcontext()) as tmp:
        for v, recipe in zip(values, points):
            point = state.dir / "points" / f"{v:g}"
            if distributed.broadcast((point / "report.json").exists()):
                ui.log(f"skipped {name}={v:g} (finished in an earlier run)")
                report = Report.from_dict(json.loads((point / "report.json").read_text())) if main else None
            else:
                ui.log(f"sweep: {name}={v:g}")
                done = compress(dataclasses.replace(job, recipe=recipe, out=point, force=True,
                                                    shared=state.dir / "shared"))
                report = Report.from_dict(done) if main else None
            reports.append(report)
        if not main:
            return []
        rows = [{"point": "dense", "key": name, **dense_row(reports[0])}]
        rows += [{"point": f"{v:g}", "key": name, **row(r), "target": v} for v, r in zip(values, reports)]
        for cost, flag in (("latency_ms", "pareto_latency"), ("size_mb", "pareto_size")):
            for r, on in zip(rows, pareto([(r[cost], r["accuracy"]) for r in rows])):
                r[flag] = on
        shutil.copytree(state.dir / "points", tmp / "points", ignore=shutil.ignore_patterns(".ticketforge"))
        write_table(rows, tmp)
        write_plot(rows, tmp)
        state.finish()
    best = [r["point"] for r in rows if r["pareto_latency"]]
    ui.log(f"wrote {out}/: {len(values)} points, sweep.csv, sweep.md, sweep.png; Pareto front (latency): "
           + ", ".join(best))
    return rows
