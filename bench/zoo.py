"""The model zoo at real sizes: HF transformers models at their default configs, every structure,
through the command line a user runs, on this project's 2-core CPU machine.

Models (random weights, built from the default config, saved with save_pretrained, so the run
starts from a folder as a user's would):
  resnet50    ResNetForImageClassification()           23.5M params (with a 10-class head)
  vit-base    ViTForImageClassification(image_size=64)  86M, the ViT-Base/16 encoder on 64x64 images
  bert-base   BertForSequenceClassification()           110M (109M with a 10-class head)
  and, with --models, distilbert, mobilenetv2, convnext-tiny, regnet, swin-tiny, efficientnet-b0.
Data: the vision models read an image folder (scikit-learn's 8x8 digits upsampled to 64x64 RGB
PNGs, real images and no download, through ticketforge's image-folder loader with data.resize and
data.crop 64); the text models read random token ids, sequence length 128, with an attention mask.
Budgets are small on purpose (`BUDGET`): the table measures what each structure does to size and
speed, and that it runs in memory, not accuracy (random weights fine-tuned for one epoch).

Each run is `ticketforge compress` in a child process; its peak resident memory comes from the
kernel (os.wait4), the rest from its report.json: params and MACs kept (read back from model.onnx
against dense.onnx), ONNX Runtime CPU speed-ups at batch 1 and 64 with their 95% intervals (as
every report times them: ticketforge.latency, one intra-op thread), parity (max |logit
difference| torch vs ONNX) and seconds per step.

    python bench/zoo.py                                   # the three default-config models
    python bench/zoo.py --models resnet50 --recipes cts-channels
writes bench/results/zoo.csv, zoo.json, zoo.md (the table in docs/benchmarks.md) and zoo.png.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
RECIPES = ["cts", "cts-2to4", "cts-channels", "layers"]
TEXT = {"bert-base", "distilbert"}
STEPS = ("dense", "search", "finetune", "convert", "export", "measure")

# Small budgets: a few search steps, one fine-tune epoch on a few hundred samples. Latency as every
# report times it (ticketforge.latency: interleaved pairs, one ONNX Runtime thread), with up to a
# minute per row, since one batch-64 run of these models takes seconds.
BUDGET = ["--epochs", "1", "--set", "finetune.batch_size=16", "--set", "validate.latency_batches=[1, 64]",
          "--set", "validate.max_seconds=60"]
CTS_BUDGET = ["--set", "search.steps=8", "--set", "search.batch_size=16"]
TIMING = {"vision": ["--set", "validate.warmup=2"], "text": ["--set", "validate.warmup=1"]}


def build(name: str):
    import torch
    import transformers as T

    torch.manual_seed(0)
    n = 10
    return {
        "resnet50": lambda: T.ResNetForImageClassification(T.ResNetConfig(num_labels=n)),
        "vit-base": lambda: T.ViTForImageClassification(T.ViTConfig(num_labels=n, image_size=64)),
        "bert-base": lambda: T.BertForSequenceClassification(T.BertConfig(num_labels=n)),
        "distilbert": lambda: T.DistilBertForSequenceClassification(T.DistilBertConfig(num_labels=n)),
        "mobilenetv2": lambda: T.MobileNetV2ForImageClassification(T.MobileNetV2Config(num_labels=n, image_size=64)),
        "convnext-tiny": lambda: T.ConvNextForImageClassification(T.ConvNextConfig(num_labels=n, image_size=64)),
        "regnet": lambda: T.RegNetForImageClassification(T.RegNetConfig(num_labels=n)),
        "swin-tiny": lambda: T.SwinForImageClassification(T.SwinConfig(num_labels=n, image_size=64, window_size=4)),
        "efficientnet-b0": lambda: T.EfficientNetForImageClassification(T.EfficientNetConfig(num_labels=n, image_size=64)),
    }[name]()


def digits_folder(root: Path, per_class: int) -> Path:
    """scikit-learn's digits as 64x64 RGB PNGs in root/<class>/ (real images, no download)."""
    from PIL import Image
    from sklearn.datasets import load_digits

    d = load_digits()
    counts = {}
    for img, label in zip(d.images, d.target):
        if counts.get(label, 0) >= per_class:
            continue
        counts[label] = counts.get(label, 0) + 1
        folder = root / str(label)
        folder.mkdir(parents=True, exist_ok=True)
        arr = np.repeat((img * 255 / 16).astype(np.uint8)[:, :, None], 3, axis=2)
        Image.fromarray(arr).resize((64, 64), Image.Resampling.BILINEAR).save(folder / f"{counts[label]}.png")
    return root


def tokens(path: Path, n: int, length: int = 128, vocab: int = 30522) -> Path:
    rng = np.random.default_rng(0)
    mask = np.ones((n, length), np.int64)
    for i, keep in enumerate(rng.integers(length // 2, length + 1, n)):
        mask[i, keep:] = 0  # padded sequences, as a tokenizer makes them
    np.savez(path, x=rng.integers(1000, vocab, (n, length)), y=np.arange(n) % 10, attention_mask=mask)
    return path


def run(model_dir: Path, data: str, recipe: str, out: Path, text: bool, log: Path) -> dict:
    args = [sys.executable, "-m", "ticketforge", "compress", str(model_dir), "--data", data, "--recipe", recipe,
            "--out", str(out), "--force", *BUDGET, *TIMING["text" if text else "vision"]]
    if recipe.startswith("cts") or recipe == "layers":
        args += CTS_BUDGET
    if not text:
        args += ["--set", "data.resize=64", "--set", "data.crop=64"]
    t = time.perf_counter()
    with open(log, "w") as f:
        p = subprocess.Popen(args, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT,
                             env={**os.environ, "PYTHONPATH": str(ROOT)})
        _, status, usage = os.wait4(p.pid, 0)
    row = {"exit": os.waitstatus_to_exitcode(status), "wall_s": round(time.perf_counter() - t, 1),
           "peak_rss_gib": round(usage.ru_maxrss / 2 ** 20, 2)}  # ru_maxrss is in KiB on Linux
    report = out / "report.json"
    if row["exit"] not in (0, 1) or not report.exists():
        lines = [line for line in log.read_text(errors="replace").splitlines() if line.strip()]
        row["error"] = lines[-1][:160] if lines else "(no output)"
        return row
    r = json.loads(report.read_text())
    rows = {x["batch"]: x for x in r["latency"] if x["backend"] == "onnxruntime-cpu"}
    lat = {b: x["speedup"] for b, x in rows.items()}
    ci = {b: x.get("speedup_ci") for b, x in rows.items()}
    macs = r["macs"]
    row.update({
        "params_dense_m": round(r["params"]["dense"] / 1e6, 2),
        "params_kept": round(r["params"]["compressed"] / r["params"]["dense"], 3),
        "macs_dense_g": round(macs["dense"] / 1e9, 3) if macs["dense"] else None,
        "macs_kept": round(macs["compressed"] / macs["dense"], 3) if macs["dense"] and macs["compressed"] else None,
        "macs_unknown": macs.get("unknown"),
        "sparsity": round(r["sparsity"]["achieved"], 3),
        "speedup_b1": lat.get(1), "speedup_b64": lat.get(64), "speedup_b1_ci": ci.get(1), "speedup_b64_ci": ci.get(64),
        "parity": r["parity"],
        "accuracy_dense_onnx": r["accuracy"].get("dense_onnx"), "accuracy_onnx": r["accuracy"]["onnx"],
        **{f"{s}_s": r["timings"].get(s) for s in STEPS},
        "structure": r["convert"].get("structure"),
    })
    return row


def markdown(rows: list[dict]) -> str:
    head = ("| model | recipe | exit | params kept | MACs kept | ORT bs1 | ORT bs64 | parity | peak mem | "
            "search | fine-tune | export | measure | total |")
    lines = [head, "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]

    def f(v, fmt):
        return "-" if v is None else format(v, fmt)

    def speed(r, b):
        ci = r.get(f"speedup_{b}_ci")
        return "-" if r[f"speedup_{b}"] is None else f"{r[f'speedup_{b}']:.2f}x" + (
            f" [{ci[0]:.2f}, {ci[1]:.2f}]" if ci else "")

    for r in rows:
        if "error" in r:
            lines.append(f"| {r['model']} | {r['recipe']} | {r['exit']} | {r['error']} |" + " |" * 10)
            continue
        macs = f(r["macs_kept"], ".3f") if r["macs_kept"] is not None else f"unknown ({r['macs_unknown']})"
        lines.append(
            f"| {r['model']} ({r['params_dense_m']:.1f}M) | {r['recipe']} | {r['exit']} | {r['params_kept']:.3f} | {macs} | "
            f"{speed(r, 'b1')} | {speed(r, 'b64')} | {r['parity']:.1e} | {r['peak_rss_gib']:.1f} GiB | "
            f"{f(r['search_s'], '.0f')} s | {f(r['finetune_s'], '.0f')} s | {f(r['export_s'], '.0f')} s | "
            f"{f(r['measure_s'], '.0f')} s | {r['wall_s']:.0f} s |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for r in rows:
        if r.get("macs_kept") and r.get("speedup_b64"):
            ax.scatter(r["macs_kept"], r["speedup_b64"])
            ax.annotate(f"{r['model']} {r['recipe']}", (r["macs_kept"], r["speedup_b64"]), fontsize=6)
    ax.axhline(1.0, color="grey", lw=0.5)
    ax.set_xlabel("MACs kept (model.onnx / dense.onnx)")
    ax.set_ylabel("ONNX Runtime CPU speed-up, batch 64")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="resnet50,vit-base,bert-base")
    ap.add_argument("--recipes", default=",".join(RECIPES))
    ap.add_argument("--images-per-class", type=int, default=40)
    ap.add_argument("--text-samples", type=int, default=128)
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--append", action="store_true", help="keep the rows of earlier runs (other models or recipes)")
    a = ap.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    rows = []
    if a.append and (a.out / "zoo.json").exists():
        rows = json.loads((a.out / "zoo.json").read_text())["rows"]
    with tempfile.TemporaryDirectory(prefix="tf-zoo-") as tmp:
        tmp = Path(tmp)
        images = digits_folder(tmp / "digits64", a.images_per_class)
        text = tokens(tmp / "tokens.npz", a.text_samples)
        for name in a.models.split(","):
            folder = tmp / name
            build(name).save_pretrained(folder)
            for recipe in a.recipes.split(","):
                is_text = name in TEXT
                row = {"model": name, "recipe": recipe,
                       **run(folder, str(text if is_text else images), recipe, tmp / f"out-{name}-{recipe}", is_text,
                             tmp / f"{name}-{recipe}.log")}
                rows = [r for r in rows if (r["model"], r["recipe"]) != (name, recipe)] + [row]
                print(json.dumps(row), flush=True)
                (a.out / "zoo.json").write_text(json.dumps({"rows": rows, "budget": BUDGET + CTS_BUDGET,
                                                            "timing": TIMING}, indent=1))
    with open(a.out / "zoo.csv", "w", newline="") as f:
        keys = sorted({k for r in rows for k in r}, key=lambda k: (k not in ("model", "recipe"), k))
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)
    (a.out / "zoo.md").write_text(markdown(rows))
    plot(rows, a.out / "zoo.png")
    print(markdown(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
