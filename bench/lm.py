"""Language models (issue 21, item 6): CTS against Wanda, magnitude and layer ranking on a small
causal LM trained here, by validation perplexity at equal structure and equal measured speed-up.

    python bench/lm.py --quick                   # 1 seed, 4 settings, GPT-2 only: a smoke run
    python bench/lm.py                           # every setting x method, seeds 0 1 2
    python bench/lm.py --families gpt2 llama --settings 2:4 --seeds 0
    python bench/lm.py --table                   # markdown table of --out, redraws the plot

The dense models are bench/lm_dense.py's (trained here on the Python standard library's sources,
bench/lm_corpus.py; cached under bench/results/lm-cache/): `gpt2` (GPT-2, 0.9M parameters) and
`llama` (Llama-style with grouped-query attention). One dense model per family; the seeds are the
compression's (`ticketforge compress --seed`).

Settings (each run is `ticketforge compress FOLDER --data lm.npz --recipe R --set ...` in a child
process, started from the CTS recipe of the structure with `search.method` replaced):
- unstructured-50  50% of the linear layers' weights            cts, wanda, sparsegpt, magnitude
- 2:4              2 of every 4                                  cts, wanda, sparsegpt, magnitude
- channels-1.5x / channels-2x   MLP width and attention heads removed to a measured ONNX Runtime
                   speed-up of 1.5x / 2x (search.target_speedup)  cts, wanda, magnitude
- blocks-1.5x / blocks-2x       whole decoder layers removed      cts, similarity
A method that does not apply to a structure is a row with status `n/a` and ticketforge's reason.

The same for every run: the calibration and fine-tune data (one .npz of train windows, `x`), the
validation windows (`x_val`), the fine-tune (FINETUNE: epochs, optimizer, lr, batch), the timing
settings. CTS's own search length is CTS_SEARCH; the one-shot methods (Wanda, SparseGPT, layer
ranking) calibrate on every train window (CALIBRATION), the windows CTS searches on.
Perplexity = exp(mean next-token cross-entropy over the validation tokens), as the report gives it
for the exported model (model.onnx in ONNX Runtime). Rows go to bench/results/lm.csv (finished rows
are skipped on a re-run), with lm.json (rows, dense models, settings) and lm.png.
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


sys.path.insert(0, str(Path(__file__).parent))
from lm_corpus import CorpusConfig, subset  # noqa: E402
from lm_dense import CACHE, DenseSpec, TrainConfig, corpus_dir, prepare  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "bench" / "results"

# setting -> (built-in recipe of the structure, its --set items, methods compared)
SETTINGS = {
    "unstructured-50": ("cts", ["search.sparsity=0.5"], ["cts", "wanda", "sparsegpt", "magnitude"]),
    "2:4": ("cts-2to4", [], ["cts", "wanda", "sparsegpt", "magnitude"]),
    "channels-1.5x": ("cts-channels", ["search.target_speedup=1.5"], ["cts", "wanda", "magnitude"]),
    "channels-2x": ("cts-channels", ["search.target_speedup=2.0"], ["cts", "wanda", "magnitude"]),
    "blocks-1.5x": ("cts-blocks", ["search.target_speedup=1.5"], ["cts", "similarity"]),
    "blocks-2x": ("cts-blocks", ["search.target_speedup=2.0"], ["cts", "similarity"]),
}
QUICK_SETTINGS = ["unstructured-50", "2:4", "channels-1.5x", "blocks-1.5x"]
METHODS = ["cts", "wanda", "sparsegpt", "magnitude", "similarity"]
CALIBRATED = {"wanda", "sparsegpt", "similarity"}  # one-shot from calibration data
FAMILIES = ["gpt2", "llama"]

# Calibration / fine-tune windows and validation windows of the .npz every run reads.
N_TRAIN, N_VAL = 256, 256
# The same fine-tune for every method (AdamW, as the dense model was trained; distillation from the
# dense model is the pipeline's default).
FINETUNE = ["finetune.epochs=2", "finetune.optimizer=adamw", "finetune.lr=0.001", "finetune.batch_size=16",
            "finetune.weight_decay=0.0"]
# CTS's search length: the `cts` recipe's step floor (200) at a small batch (every train window 12.5
# times), whatever its recipe's epochs; the structure's recipe's other keys. On the Llama at 2:4, 60
# steps at the recipe's lr 0.1 gave perplexity 61.2, 200 steps at lr 0.5 48.5 (magnitude: 43.0).
CTS_SEARCH = ["search.steps=200", "search.min_steps=0", "search.batch_size=16"]
# The one-shot methods calibrate on every train window: the same data CTS searches on.
CALIBRATION = [f"search.calibration_samples={N_TRAIN}"]
# Latency: one batch size, timed briefly; the speed-up budgets are taken at it.
TIMING = ["validate.latency_batches=[8]", "validate.max_seconds=2", "validate.warmup=2"]

FIELDS = ["family", "setting", "method", "seed", "status", "exit", "dense_ppl", "ppl", "ppl_before_finetune",
          "dense_top1", "top1", "top1_before_finetune", "agreement", "speedup", "budget_met", "macs_kept",
          "params_kept", "sparsity", "search_s", "seconds", "reason"]


# ----------------------------------------------------------------------------- the report, read

def quality(report: dict) -> dict:
    """Perplexity (dense, exported, before fine-tune), next-token top-1 accuracy (dense, exported) and
    top-1 agreement with the dense model, from a report.json.

    THE ONE PLACE TO ADAPT to the report's causal-LM format (issue 21, items 1-2). As being built on
    main: `perplexity` = {dense (dense.onnx), onnx (model.onnx), tokens}; `accuracy` = next-token
    top-1 {dense, dense_onnx, compressed, onnx, before_finetune}. Read defensively: other spellings
    inside `perplexity`, or `*_perplexity` fields inside `accuracy`, are taken too."""
    ppl = report.get("perplexity")
    acc = report.get("accuracy") if isinstance(report.get("accuracy"), dict) else {}
    if not isinstance(ppl, dict):
        ppl = acc.get("perplexity") if isinstance(acc.get("perplexity"), dict) else {
            k[:-len("_perplexity")]: v for k, v in acc.items() if k.endswith("_perplexity")}

    def first(d, *keys):
        for k in keys:
            if isinstance(d.get(k), (int, float)) and not isinstance(d.get(k), bool):
                return float(d[k])
        return None

    return {"dense_ppl": first(ppl, "dense_onnx", "dense"), "ppl": first(ppl, "onnx", "compressed"),
            "ppl_before_finetune": first(ppl, "before_finetune"),
            "dense_top1": first(acc, "dense_onnx", "dense"), "top1": first(acc, "onnx", "compressed"),
            "top1_before_finetune": first(acc, "before_finetune"),
            "agreement": first(report.get("agreement") or {}, "onnx")}


def summary(report: dict) -> dict:
    """Size and speed of the exported model, from the report's sections that every structure has."""
    macs, params, budget = report.get("macs") or {}, report.get("params") or {}, report.get("budget") or {}
    speed = budget.get("measured") if budget.get("key") == "target_speedup" else None
    if speed is None:
        rows = [r for r in report.get("latency") or [] if r.get("backend") == "onnxruntime-cpu"]
        speed = rows[-1]["speedup"] if rows else None
    return {"speedup": speed, "budget_met": budget.get("met", ""),
            "macs_kept": macs["compressed"] / macs["dense"] if macs.get("dense") and macs.get("compressed") else None,
            "params_kept": params["compressed"] / params["dense"] if params.get("dense") else None,
            "sparsity": (report.get("sparsity") or {}).get("achieved"),
            "search_s": (report.get("timings") or {}).get("search")}


# ---------------------------------------------------------------------------------------- runs

def command(folder: Path, data: Path, setting: str, method: str, seed: int, out: Path) -> list[str]:
    recipe, sets, _ = SETTINGS[setting]
    items = [f"search.method={method}", *sets, *FINETUNE, *TIMING]
    items += CTS_SEARCH if method == "cts" else CALIBRATION if method in CALIBRATED else []
    return [sys.executable, "-m", "ticketforge", "compress", str(folder), "--data", str(data), "--recipe", recipe,
            "--seed", str(seed), "--out", str(out), "--force", "--device", "cpu",
            *[a for item in items for a in ("--set", item)]]


def run_one(folder: Path, data: Path, family: str, setting: str, method: str, seed: int, work: Path,
            threads: int, timeout: float) -> dict:
    out, log = work / "out", work / "run.log"
    row = {"family": family, "setting": setting, "method": method, "seed": seed}
    t = time.perf_counter()
    with open(log, "w") as f:
        env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": str(threads)}
        try:
            code = subprocess.run(command(folder, data, setting, method, seed, out), stdout=f,
                                  stderr=subprocess.STDOUT, cwd=ROOT, env=env, timeout=timeout).returncode
        except subprocess.TimeoutExpired:  # the child is killed; a hang is a finding too
            code = None
    row["seconds"] = round(time.perf_counter() - t, 1)
    lines = [x.strip() for x in log.read_text(errors="replace").splitlines() if x.strip()]
    row["exit"] = "" if code is None else code
    # 0: done; 1: ran, a check or budget failed (the report is still written); 2: refused (n/a)
    row["status"] = "timeout" if code is None else {0: "ok", 1: "failed", 2: "n/a"}.get(code, "error")
    last = lines[-1][:300] if lines else "(no output)"
    row["reason"] = (f"no result in {timeout:.0f} s; last output: {last}" if code is None
                     else "" if code == 0 else last)
    report = out / "report.json"
    if code in (0, 1) and report.exists():
        r = json.loads(report.read_text())
        row.update(quality(r))
        row.update(summary(r))
    return row


# ------------------------------------------------------------------------------------- reading

def _ok(rows, **match):
    return [r for r in rows if all(str(r[k]) == str(v) for k, v in match.items()) and r["status"] in ("ok", "failed")
            and r.get("ppl") not in ("", None)]


def table(rows: list[dict]) -> str:
    """Markdown: per family, setting and method, the exported model's validation perplexity, mean ±
    sd (n seeds), with the measured speed-up (ONNX Runtime CPU; channels, blocks) or the sparsity
    read from model.onnx (unstructured); n/a, failures and timeouts by their status."""
    out = []
    for family in [f for f in FAMILIES if any(r["family"] == f for r in rows)]:
        dense = [float(r["dense_ppl"]) for r in rows if r["family"] == family and r.get("dense_ppl") not in ("", None)]
        out += [f"**{family}** (dense perplexity {statistics.mean(dense):.2f})" if dense else f"**{family}**", "",
                "| setting | " + " | ".join(METHODS) + " |", "|---|" + "---:|" * len(METHODS)]
        for setting in [s for s in SETTINGS if any(r["family"] == family and r["setting"] == s for r in rows)]:
            cells = []
            for method in METHODS:
                mine = [r for r in rows if r["family"] == family and r["setting"] == setting and r["method"] == method]
                ok = _ok(mine)
                if ok:
                    cell = _ppl_cell([float(r["ppl"]) for r in ok])
                    speed = [float(r["speedup"]) for r in ok if r.get("speedup") not in ("", None)]
                    if speed and not setting.startswith(("unstructured", "2:4")):
                        cell += f", {statistics.mean(speed):.2f}x"
                    sparsity = [float(r["sparsity"]) for r in ok if r.get("sparsity") not in ("", None)]
                    if sparsity and setting.startswith("unstructured"):  # as model.onnx holds it
                        cell += f", sparsity {statistics.mean(sparsity):.2f}"
                    if any(r["status"] == "failed" for r in ok):
                        cell += " (budget or check failed)"
                    cells.append(cell)
                else:
                    cells.append("/".join(sorted({r["status"] for r in mine})) or "-")
            out.append(f"| {setting} | " + " | ".join(cells) + " |")
        out.append("")
    return "\n".join(out)


def _ppl_cell(values: list[float]) -> str:
    """Perplexity to two decimals: 'mean ± sd (n)'."""
    sd = f" ± {statistics.stdev(values):.2f}" if len(values) > 1 else ""
    return f"{statistics.mean(values):.2f}{sd} ({len(values)})"


def reasons(rows: list[dict]) -> str:
    seen = {}
    for r in rows:
        if r["status"] not in ("ok",):
            seen.setdefault((r["family"], r["setting"], r["method"], r["status"]), r["reason"])
    return "\n".join(f"- {f} / {s} / `{m}` ({st}): {why}" for (f, s, m, st), why in sorted(seen.items()))


def plot(rows: list[dict], path: Path) -> None:
    """Per family: perplexity by setting and method (mean over seeds, sd as error bar; points, since
    the differences are small against the perplexity itself), the dense model's as a dashed line; a
    setting with no result is labelled with what its runs did (n/a, failed)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fams = [f for f in FAMILIES if any(r["family"] == f for r in rows)]
    if not fams:
        return
    fig, axes = plt.subplots(len(fams), 1, figsize=(8, 3.4 * len(fams)), squeeze=False)
    width = 0.8 / len(METHODS)
    for ax, family in zip(axes[:, 0], fams):
        settings = [s for s in SETTINGS if any(r["family"] == family and r["setting"] == s for r in rows)]
        for j, method in enumerate(METHODS):
            xs, ys, es = [], [], []
            for i, s in enumerate(settings):
                v = [float(r["ppl"]) for r in _ok(rows, family=family, setting=s, method=method)]
                if v:
                    xs.append(i + (j - (len(METHODS) - 1) / 2) * width)
                    ys.append(statistics.mean(v))
                    es.append(statistics.stdev(v) if len(v) > 1 else 0)
            if xs:
                ax.errorbar(xs, ys, yerr=es, fmt="o", label=method, capsize=2, color=f"C{j}")
        dense = [float(r["dense_ppl"]) for r in rows if r["family"] == family and r.get("dense_ppl") not in ("", None)]
        if dense:
            ax.axhline(statistics.mean(dense), color="black", ls="--", lw=1, label="dense")
        for i, s in enumerate(settings):
            if not _ok(rows, family=family, setting=s):
                status = "/".join(sorted({r["status"] for r in rows if r["family"] == family and r["setting"] == s}))
                ax.text(i, 0.5, status, transform=ax.get_xaxis_transform(), ha="center", color="grey")
        ax.set_xticks(range(len(settings)), settings)
        ax.set_xlim(-0.6, len(settings) - 0.4)
        ax.set_ylabel("validation perplexity (ONNX)")
        ax.set_title(f"{family}: compressed by each method, same fine-tune (lower is better)")
        ax.grid(axis="y", alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def write(rows: list[dict], dense: dict, out: Path) -> None:
    json_path = out.with_suffix(".json")
    payload = {"rows": rows, "dense": dense, "settings": {k: {"recipe": v[0], "sets": v[1], "methods": v[2]}
                                                          for k, v in SETTINGS.items()},
               "finetune": FINETUNE, "cts_search": CTS_SEARCH, "calibration": CALIBRATION,
               "timing": TIMING, "n_train": N_TRAIN, "n_val": N_VAL}
    if json_path.exists():  # keep the dense models of other families
        payload["dense"] = {**json.loads(json_path.read_text()).get("dense", {}), **dense}
    json_path.write_text(json.dumps(payload, indent=1) + "\n")
    plot(rows, out.with_suffix(".png"))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--families", nargs="+", default=["gpt2"], choices=FAMILIES)
    p.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    p.add_argument("--methods", nargs="+", default=METHODS, choices=METHODS)
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--quick", action="store_true", help=f"seed 0, settings {' '.join(QUICK_SETTINGS)}")
    p.add_argument("--threads", type=int, default=1, help="1: on a shared 2-core machine more threads thrash")
    p.add_argument("--timeout", type=float, default=1800, help="seconds a run may take before it is killed "
                   "(status timeout)")
    p.add_argument("--cache", type=Path, default=CACHE, help="where the corpus and the dense models are kept")
    p.add_argument("--out", type=Path, default=OUT / "lm.csv")
    p.add_argument("--table", action="store_true", help="print the markdown table of --out and redraw its plot")
    a = p.parse_args(argv)
    if a.table:
        rows = list(csv.DictReader(open(a.out)))
        plot(rows, a.out.with_suffix(".png"))
        print(table(rows))
        print(reasons(rows))
        return
    if a.quick:
        a.seeds, a.settings = [0], [s for s in a.settings if s in QUICK_SETTINGS]
    a.out.parent.mkdir(parents=True, exist_ok=True)
    done = list(csv.DictReader(open(a.out))) if a.out.exists() else []
    seen = {(r["family"], r["setting"], r["method"], r["seed"]) for r in done}
    corpus = CorpusConfig()
    dense = {}
    with tempfile.TemporaryDirectory(prefix="tf-lm-") as tmp:
        tmp = Path(tmp)
        data = subset(corpus_dir(corpus, a.cache) / "tokens.npz", tmp / "lm.npz", N_TRAIN, N_VAL)
        new = not a.out.exists()
        with open(a.out, "a", newline="") as f:
            w = csv.DictWriter(f, fieldnames=FIELDS)
            if new:
                w.writeheader()
            for family in a.families:
                folder = prepare(DenseSpec(family, corpus, TrainConfig(threads=a.threads)), a.cache)
                dense[family] = {"folder": folder.name, **json.loads((folder / "dense.json").read_text())}
                for seed in a.seeds:
                    for setting in a.settings:
                        for method in [m for m in SETTINGS[setting][2] if m in a.methods]:
                            if (family, setting, method, str(seed)) in seen:
                                continue
                            work = tmp / f"{family}-{setting.replace(':', 'to')}-{method}-{seed}"
                            work.mkdir()
                            row = run_one(folder, data, family, setting, method, seed, work, a.threads, a.timeout)
                            w.writerow(row)
                            f.flush()
                            done.append({k: "" if row.get(k) is None else str(row.get(k, "")) for k in FIELDS})
                            ppl = row.get("ppl")
                            print(f"{family} {setting:15s} {method:10s} seed {seed} {row['status']:6s} "
                                  + (f"ppl {ppl:.2f} (dense {row.get('dense_ppl') or math.nan:.2f}) "
                                     if isinstance(ppl, float) else f"{row['reason'][:140]} ")
                                  + f"({row['seconds']}s)", flush=True)
                            write(done, dense, a.out)
    write(done, dense, a.out)
    print(table(done))


if __name__ == "__main__":
    main()
