"""report.html: one self-contained page (inline CSS, plots as inline PNG) that a CI artifact or an
e-mail can carry without any other file."""
from __future__ import annotations

import base64
import html
import io

from ticketforge import budget, gate
from ticketforge.latency import describe
from ticketforge.report_schema import Report, macs_text, pct as _pct, quality_rows

CSS = """
body{font:14px/1.45 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2em auto;max-width:1100px;color:#222}
h1{font-size:1.5em;margin-bottom:.2em} h2{font-size:1.15em;margin-top:1.6em;border-bottom:1px solid #ddd}
table{border-collapse:collapse;margin:.6em 0} th,td{padding:.3em .8em;border-bottom:1px solid #eee;text-align:right}
th:first-child,td:first-child{text-align:left} th{background:#f6f6f6}
.meta{color:#666} .banner{padding:.6em 1em;border-radius:6px;font-weight:600;margin:1em 0}
.pass{background:#e6f4ea;color:#1e6b34} .fail{background:#fce8e6;color:#a50e0e} .none{background:#f1f3f4;color:#555}
td.fail{background:none;font-weight:600} img{max-width:100%}
"""


def _table(head: list[str], rows: list[list], classes: list[str] | None = None) -> str:
    out = ["<table><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in head) + "</tr>"]
    for i, row in enumerate(rows):
        cls = f' class="{classes[i]}"' if classes and classes[i] else ""
        out.append(f"<tr{cls}>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>")
    return "".join(out) + "</table>"


def _png(fig) -> str:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return f'<img alt="plot" src="data:image/png;base64,{base64.b64encode(buf.getvalue()).decode()}">'


def _sparsity_plot(per_layer: dict[str, float]) -> str:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(per_layer)
    fig, ax = plt.subplots(figsize=(9, 0.28 * len(names) + 1.0))
    ax.barh(range(len(names)), [100 * per_layer[n] for n in names], color="#4c78a8")
    ax.set_yticks(range(len(names)), names, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlim(0, 100)
    ax.set_xlabel("sparsity (% of weights zero)")
    ax.grid(axis="x", alpha=.3)
    return _png(fig)


def _latency_plot(rows: list[dict]) -> str:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    batches = sorted({r["batch"] for r in rows})
    # one panel per batch size: batch 1 and batch 64 differ by orders of magnitude
    fig, axes = plt.subplots(1, len(batches), figsize=(4.5 * len(batches), 3.2), squeeze=False)
    for ax, b in zip(axes[0], batches):
        sel = [r for r in rows if r["batch"] == b]
        xs = range(len(sel))
        ax.bar([x - 0.2 for x in xs], [r["dense_ms"] for r in sel], 0.4, label="dense fp32", color="#9e9e9e")
        ax.bar([x + 0.2 for x in xs], [r["compressed_ms"] for r in sel], 0.4, label="compressed", color="#f58518")
        for x, r in zip(xs, sel):
            ax.text(x + 0.2, r["compressed_ms"], f"{r['speedup']:.2f}x", ha="center", va="bottom", fontsize=8)
        ax.set_xticks(list(xs), [r["backend"] for r in sel], fontsize=8, rotation=15)
        ax.set_title(f"batch {b}")
        ax.set_ylabel("median latency (ms)")
        ax.grid(axis="y", alpha=.3)
    axes[0][0].legend(fontsize=8)
    return _png(fig)


def render(r: Report) -> str:

    acc, sp = r.accuracy, r.sparsity
    g = r.gate
    if not g["checks"]:
        banner = '<div class="banner none">Gate: no thresholds set</div>'
    else:
        nfail = sum(not c["passed"] for c in g["checks"])
        banner = (f'<div class="banner {"pass" if g["passed"] else "fail"}">Gate: '
                  f'{"PASSED" if g["passed"] else "FAILED"} ({nfail} of {len(g["checks"])} checks failed)</div>')
    summary = [
        *quality_rows(r),
        ["non-zero parameters", f"{r.params['dense']:,}", f"{r.params['compressed']:,}"],
        ["MACs per sample", macs_text(r.macs['dense'], r.macs), macs_text(r.macs['compressed'], r.macs)],
        ["model.onnx size", f"{r.size_mb['dense']:.3f} MB", f"{r.size_mb['compressed']:.3f} MB"],
        *([["gzip size (download)", f"{r.size['dense']['gzip_bytes'] / 2 ** 20:.3f} MB",
            f"{r.size['compressed']['gzip_bytes'] / 2 ** 20:.3f} MB"]] if r.size else []),
        ["sparsity of prunable weights", "-", f"{_pct(sp['achieved'])} (target {_pct(sp['target'])})"],
    ]
    for key in ("int8", "fp16", "engine"):
        if acc is not None and acc.get(key) is not None:
            summary.append([f"accuracy ({gate.EXPORTED[key]})", "-", _pct(acc[key])])
        elif acc is None and (r.agreement or {}).get(key) is not None:
            summary.append([f"top-1 agreement with dense ({gate.EXPORTED[key]})", "-", _pct(r.agreement[key])])
    parts = [
        f"<!doctype html><html><head><meta charset='utf-8'><title>ticketforge report: "
        f"{html.escape(r.recipe['name'])}</title><style>{CSS}</style></head><body>",
        f"<h1>ticketforge report: {html.escape(r.recipe['name'])}</h1>",
        f"<div class='meta'>model <code>{html.escape(str(r.model['path']))}</code> ({html.escape(r.model['kind'])}), "
        f"data <code>{html.escape(r.data['spec'])}</code> ({r.data['train']} train / {r.data['val']} validation), "
        f"search <code>{html.escape(str(r.search.get('method')))}</code>, structure "
        f"<code>{html.escape(r.recipe['convert']['structure'])}</code>, device {html.escape(r.device)}, "
        f"seed {r.seed}, ticketforge {html.escape(r.ticketforge_version)}</div>",
        banner,
        *([f"<p>{html.escape(budget.markdown(r.budget).replace('**', '').replace('`', ''))}</p>"]
          if r.budget else []),
        "<h2>Summary</h2>", _table(["", "dense", "compressed"], summary),
    ]
    if g["checks"]:
        parts += ["<h2>Gate checks</h2>", _table(
            ["check", "threshold", "measured", "result"],
            [[c["name"], f"{c['threshold']:g}", f"{c['measured']:.4g}", "pass" if c["passed"] else "FAIL"]
             for c in g["checks"]],
            ["" if c["passed"] else "fail" for c in g["checks"]])]
    if r.latency:
        parts += ["<h2>Latency: dense vs compressed</h2>", _latency_plot(r.latency), _table(
            ["backend", "batch", "dense ms", "compressed ms", "speed-up (95% interval)", "runs"],
            [[x["backend"], x["batch"], f"{x['dense_ms']:.3f}", f"{x['compressed_ms']:.3f}", describe(x),
              x.get("runs", "-")] for x in r.latency])]
    if sp.get("per_layer"):
        parts += ["<h2>Per-layer sparsity</h2>", _sparsity_plot(sp["per_layer"])]
    if r.notes:
        parts += ["<h2>Notes</h2><ul>"] + [f"<li>{html.escape(n)}</li>" for n in r.notes] + ["</ul>"]
    parts.append("</body></html>")
    return "\n".join(parts)
