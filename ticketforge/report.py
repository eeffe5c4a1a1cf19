"""Write the report: report.json for machines, report.md for people (same numbers)."""
from __future__ import annotations

import json
from pathlib import Path

from ticketforge import gate, report_html, sanity


def _pct(x) -> str:
    return "-" if x is None else f"{100 * x:.2f}%"


def macs_text(value, section: dict) -> str:
    """A MAC count, or "unknown (why)": a count that could not be made is never shown as 0."""
    return f"{value:,}" if value is not None else f"unknown ({section.get('unknown', 'not counted')})"


def to_markdown(r: dict) -> str:
    acc, sp = r["accuracy"], r["sparsity"]
    lines = [
        f"# ticketforge report: {r['recipe']['name']}",
        "",
        f"Model `{r['model']['path']}` ({r['model']['kind']}), data `{r['data']['spec']}` "
        f"({r['data']['train']} train / {r['data']['val']} validation samples), device `{r['device']}`, "
        f"seed {r['seed']}, ticketforge {r['ticketforge_version']}.",
        "",
        f"Search `{r['search'].get('method')}`, structure `{r['recipe']['convert']['structure']}`.",
        "",
        "| | dense | compressed |",
        "|---|---:|---:|",
        f"| accuracy (torch) | {_pct(acc['dense'])} | {_pct(acc['compressed'])} |",
        f"| accuracy (ONNX Runtime, exported) | {_pct(acc.get('dense_onnx'))} | {_pct(acc['onnx'])} |",
        f"| non-zero parameters | {r['params']['dense']:,} | {r['params']['compressed']:,} |",
        f"| MACs per sample | {macs_text(r['macs']['dense'], r['macs'])} | {macs_text(r['macs']['compressed'], r['macs'])} |",
        f"| model.onnx size | {r['size_mb']['dense']:.3f} MB | {r['size_mb']['compressed']:.3f} MB |",
        "",
        f"Sparsity of the prunable weights in `model.onnx`: {_pct(sp['achieved'])} (target {_pct(sp['target'])}). "
        f"Torch/ONNX logit parity: max abs difference {r['parity']:.2e}.",
        "",
        "| backend | batch | dense ms | compressed ms | speed-up |",
        "|---|---:|---:|---:|---:|",
    ]
    for row in r["latency"]:
        lines.append(f"| {row['backend']} | {row['batch']} | {row['dense_ms']:.3f} | {row['compressed_ms']:.3f} | "
                     f"{row['speedup']:.2f}x |")
    q = r.get("quantize")
    if q:
        ops = ", ".join(f"{n} {k}" for k, n in q.get("quantized_ops", {}).items())
        lines += ["", f"Quantized `{q['file']}` ({q['format']}{', ' + ops if ops else ''}): accuracy "
                  f"{_pct(q['accuracy'])} in ONNX Runtime, {q['size_mb']:.3f} MB."]
    trt = r.get("tensorrt")
    if trt:
        lines += ["", f"TensorRT `{trt['file']}` ({', '.join(trt['precisions'])}): accuracy {_pct(trt['accuracy'])}; "
                  f"layers with sparse kernels: {', '.join(trt['sparse_layers']) or 'none'}."]
    nm = r.get("nm")
    if nm:
        back = nm["onnx"]
        lines += ["", f"2:4: {back['valid']:,} of {back['groups']:,} weight groups in {back['layers']} eligible layers of "
                  f"`model.onnx` satisfy {nm['pattern']} ({_pct(back['fraction_valid'])}); "
                  f"{len(nm['ineligible_layers'])} layer(s) left dense (not eligible); mask decay `{nm['decay']}`."]
    if "gate" in r:
        lines += ["", gate.to_markdown(r["gate"]).rstrip()]
    rounds = r["search"].get("rounds")
    if rounds:  # iterative searches (IMP): one row per round
        lines += ["", "| round | sparsity | validation accuracy | seconds |", "|---:|---:|---:|---:|"]
        lines += [f"| {x['round']} | {_pct(x['sparsity'])} | {_pct(x['accuracy'])} | {x['seconds']:.1f} |"
                  for x in rounds]
    if r.get("sanity"):
        lines += sanity.to_markdown(r["sanity"], r["sanity"]["ticket"])
    t = r["timings"]
    lines += ["", "Time (s): " + ", ".join(f"{k} {v:.1f}" for k, v in t.items()), ""]
    if r.get("notes"):
        lines += ["Notes:", ""] + [f"- {n}" for n in r["notes"]] + [""]
    return "\n".join(lines)


def write(report: dict, folder: Path) -> None:
    (folder / "report.json").write_text(json.dumps(report, indent=2, default=float) + "\n")
    (folder / "report.md").write_text(to_markdown(report))
    (folder / "report.html").write_text(report_html.render(report))
