"""Write the report (a ticketforge.report_schema.Report): report.json for machines, report.md and
report.html for people (same numbers)."""
from __future__ import annotations

import json
from pathlib import Path

from ticketforge import budget, gate, report_html, sanity, structures
from ticketforge.latency import describe
from ticketforge.report_schema import Report, macs_text, pct as _pct, quality_rows


def _mb(n: int) -> str:
    return f"{n / 2 ** 20:.3f} MB"


def _stored(storage: dict | None) -> str:
    if not storage or not storage.get("sparse_tensors"):
        return ""
    return f", {storage['sparse_tensors']} weight tensors stored sparse"


def _size_rows(r: Report) -> list[str]:
    size = r.size
    if not size:  # a report of an older version
        return [f"| model.onnx size | {r.size_mb['dense']:.3f} MB | {r.size_mb['compressed']:.3f} MB |"]
    d, c = size["dense"], size["compressed"]
    return [f"| size on disk | {_mb(d['bytes'])} | {_mb(c['bytes'])} ({c['bytes'] / d['bytes']:.2f} of dense)"
            f"{_stored(size.get('storage'))} |",
            f"| gzip size (download) | {_mb(d['gzip_bytes'])} | {_mb(c['gzip_bytes'])} "
            f"({c['gzip_bytes'] / d['gzip_bytes']:.2f} of dense) |"]


def _parity(r: Report) -> str:
    if r.parity_mean is None:
        return f"max abs difference {r.parity:.2e}"
    return (f"max abs difference {r.parity:.2e}, mean {r.parity_mean:.2e} over {r.parity_samples} "
            "validation samples")


def _latency_lines(r: Report) -> list[str]:
    env = r.latency_env
    lines = []
    if env:
        lines += [f"Latency: ONNX Runtime {env['onnxruntime']}, {env['provider']}, {env['threads']} intra-op "
                  f"thread{'s' if env['threads'] != 1 else ''}, CPU {env['cpu']}; dense and compressed timed in "
                  f"interleaved pairs; times are the {env.get('statistic', 'median')}, the speed-up their ratio, "
                  f"with its 95% interval. Where the interval contains 1.0 the data cannot tell the speed from "
                  f"the dense model's.", ""]
    lines += ["| backend | batch | dense ms | compressed ms (95% high) | speed-up (95% interval) | runs |",
              "|---|---:|---:|---:|---|---:|"]
    for row in r.latency:
        high = f" ({row['compressed_ms_ci'][1]:.3f})" if row.get("compressed_ms_ci") else ""
        capped = "" if row.get("converged", True) else " (time cap)"
        lines.append(f"| {row['backend']} | {row['batch']} | {row['dense_ms']:.3f} | {row['compressed_ms']:.3f}{high} | "
                     f"{describe(row)} | {row.get('runs', '-')}{capped} |")
    return lines


def to_markdown(r: Report) -> str:
    sp = r.sparsity
    lines = [
        f"# ticketforge report: {r.recipe['name']}",
        "",
        f"Model `{r.model['path']}` ({r.model['kind']}), data `{r.data['spec']}` "
        f"({r.data['train']} train / {r.data['val']} validation samples), device `{r.device}`, "
        f"seed {r.seed}, ticketforge {r.ticketforge_version}.",
        "",
        f"Search `{r.search.get('method')}`, structure `{r.recipe['convert']['structure']}`."
        + (f" The search stopped at step {r.search['stop']['step']} of at most {r.search['max_steps']}: "
           + ("its top-k set had converged." if r.search['stop']['reason'] == "converged" else "the cap.")
           if r.search.get("stop") else ""),
        "",
        "| | dense | compressed |",
        "|---|---:|---:|",
        *(f"| {label} | {dense} | {compressed} |" for label, dense, compressed in quality_rows(r)),
        f"| non-zero parameters | {r.params['dense']:,} | {r.params['compressed']:,} |",
        f"| MACs per sample | {macs_text(r.macs['dense'], r.macs)} | {macs_text(r.macs['compressed'], r.macs)} |",
        *_size_rows(r),
        "",
        f"Sparsity of the prunable weights in `model.onnx`: {_pct(sp['achieved'])} (target {_pct(sp['target'])}). "
        f"Torch/ONNX logit parity: {_parity(r)}.",
        "",
        *_latency_lines(r),
    ]
    q = r.quantize
    if q:
        ops = ", ".join(f"{n} {k}" for k, n in q.get("quantized_ops", {}).items())
        size = (f"{_mb(q['size']['bytes'])} on disk, {_mb(q['size']['gzip_bytes'])} gzipped"
                f"{_stored(q.get('storage'))}" if q.get("size") else f"{q['size_mb']:.3f} MB")
        quality = (f"accuracy {_pct(q['accuracy'])}, " if q.get("accuracy") is not None else "") + (
            f"top-1 agreement with dense.onnx {_pct(q['agreement'])}" if q.get("agreement") is not None else "")
        lines += ["", f"Quantized `{q['file']}` ({q['format']}{', ' + ops if ops else ''}): "
                  f"{quality.rstrip(', ')} in ONNX Runtime, {size}."]
    trt = r.tensorrt
    if trt:
        lines += ["", f"TensorRT `{trt['file']}` ({', '.join(trt['precisions'])}): accuracy {_pct(trt['accuracy'])}; "
                  f"layers with sparse kernels: {', '.join(trt['sparse_layers']) or 'none'}."]
    for name, section in (r.structure or {}).items():
        if name in structures.STRUCTURES:  # a structure this installation lacks: in report.json only
            lines += [""] + structures.get(name).render(section)
    if r.budget:
        lines += ["", budget.markdown(r.budget)]
    lines += ["", gate.to_markdown(r.gate).rstrip()]
    rounds = r.search.get("rounds")
    if rounds:  # iterative searches (IMP): one row per round
        lines += ["", "| round | sparsity | validation accuracy | seconds |", "|---:|---:|---:|---:|"]
        lines += [f"| {x['round']} | {_pct(x['sparsity'])} | {_pct(x['accuracy'])} | {x['seconds']:.1f} |"
                  for x in rounds]
    if r.sanity:
        lines += sanity.to_markdown(r.sanity, r.sanity["ticket"])
    t = r.timings
    lines += ["", "Time (s): " + ", ".join(f"{k} {v:.1f}" for k, v in t.items()), ""]
    if r.notes:
        lines += ["Notes:", ""] + [f"- {n}" for n in r.notes] + [""]
    return "\n".join(lines)


def write(report: Report, folder: Path) -> None:
    (folder / "report.json").write_text(json.dumps(report.to_dict(), indent=2, default=float) + "\n")
    (folder / "report.md").write_text(to_markdown(report))
    (folder / "report.html").write_text(report_html.render(report))
