"""Peak memory of each step, as a multiple of the model's weight bytes, on BERT-base and GPT-2-small.

    python bench/memory.py                                  # both models x search, finetune, export
    python bench/memory.py --models bert-base --steps search --label after-cut --append

Models (random init, configs written out as the hub's bert-base-uncased and gpt2 are):
  bert-base   BertForSequenceClassification, 10 classes: 109.5M params (85.6M in prunable Linears)
  gpt2        GPT2ForSequenceClassification, 10 classes: 124.4M params. GPT-2's body is the same
              as GPT2LMHeadModel's; its Conv1D layers are swapped for the equivalent nn.Linear
              (ticketforge prunes Conv and Linear weights), so the search sees 84.9M prunable
              weights: the body without the vocabulary-sized output.
  gpt2-lm     GPT2LMHeadModel (gpt2 itself): 124.4M params, next-token logits (batch, seq, 50257) scored
              per token; the head is tied to the token embedding and not pruned (docs/language-models.md).
Data: random token ids, sequence length --seq with an attention mask (half to all of it real); a
class per sequence for the classifiers, none for gpt2-lm (its targets are the next tokens).

Each model x step runs in its own child process, through the library's own functions:
  search    ticketforge.search.cts.cts, recipe `cts` (90% unstructured), --search-steps steps at
            --batch (the stop rule's top-k checks run every step, so their cost is counted);
            --checkpoint sets search.checkpoint (each transformer layer recomputed in the backward)
  finetune  ticketforge.finetune.fit with a 90% magnitude mask and the `cts` recipe's finetune
            section (SGD with momentum, distilling from a copy of the dense model as the pipeline
            does), one epoch of --finetune-steps steps at --batch
  export    ticketforge.export.export_onnx of the dense and the masked model, then the masked
            model's sparse storage (what the pipeline's export step writes)
The child reads its resident set after imports, model and data (the baseline), resets the kernel's
high-water mark (/proc/self/clear_refs), runs the step, and reports getrusage's ru_maxrss: the
peak of the step. `x weights` = peak / weight bytes (fp32, tied weights once); `delta x` = (peak -
baseline) / weight bytes, what the step adds on top of the loaded model and the libraries.

Writes bench/results/memory.{csv,json,md,png}; rows carry a --label (default: the git revision) so
runs before and after a change sit in one table (--append keeps the other labels' rows).
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
MODELS = ("bert-base", "gpt2", "gpt2-lm")
STEPS = ("search", "finetune", "export")
GIB = 2 ** 30


def build(name: str):
    import torch
    import transformers as T

    from ticketforge import hf

    torch.manual_seed(0)
    if name == "bert-base":  # bert-base-uncased's config.json
        cfg = T.BertConfig(vocab_size=30522, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                           intermediate_size=3072, hidden_act="gelu", hidden_dropout_prob=0.1,
                           attention_probs_dropout_prob=0.1, max_position_embeddings=512, type_vocab_size=2,
                           initializer_range=0.02, layer_norm_eps=1e-12, pad_token_id=0, num_labels=10)
        return T.BertForSequenceClassification(cfg)
    if name in ("gpt2", "gpt2-lm"):  # gpt2's config.json; gpt2-lm is gpt2 itself, the causal LM (tied head)
        head = {"num_labels": 10, "pad_token_id": 50256} if name == "gpt2" else {"use_cache": False}
        cfg = T.GPT2Config(vocab_size=50257, n_positions=1024, n_embd=768, n_layer=12, n_head=12,
                           activation_function="gelu_new", resid_pdrop=0.1, embd_pdrop=0.1, attn_pdrop=0.1,
                           layer_norm_epsilon=1e-5, initializer_range=0.02, bos_token_id=50256,
                           eos_token_id=50256, **head)
        cls = T.GPT2ForSequenceClassification if name == "gpt2" else T.GPT2LMHeadModel
        return hf.linear_layers(cls(cfg))
    raise SystemExit(f"unknown model {name}")



def tokens(path: Path, n: int, n_val: int, length: int, vocab: int, labels: bool = True) -> Path:
    """Random token ids with an attention mask; with `labels`, a class per sequence (a language
    model's data has none: the next token is its target)."""
    import numpy as np

    rng = np.random.default_rng(0)

    def split(k):
        mask = np.ones((k, length), np.int64)
        for i, keep in enumerate(rng.integers(length // 2, length + 1, k)):
            mask[i, keep:] = 0
        return rng.integers(1000, vocab, (k, length)), np.arange(k) % 10, mask

    x, y, m = split(n)
    xv, yv, mv = split(n_val)
    arrays = dict(x=x, attention_mask=m, x_val=xv, attention_mask_val=mv)
    if labels:
        arrays.update(y=y, y_val=yv)
    np.savez(path, **arrays)
    return path


def rss_kib() -> dict:
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("VmRSS", "VmHWM")):
                out[line.split(":")[0]] = int(line.split()[1])
    return out


def child(a) -> dict:
    """One model x step, in this process; returns its row."""
    import torch

    torch.set_num_threads(a.threads)
    from ticketforge import adapt, device as device_mod, finetune, recipe as recipes

    device_mod.return_freed_memory()  # as ticketforge compress does
    from ticketforge.data import check_against_model, load_data
    from ticketforge.loading import LoadedModel
    from ticketforge.masks import global_topk, keep_count, prunable
    from ticketforge.search.base import SearchContext

    model = build(a.model).eval()
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    prunable_bytes = sum(w.numel() * w.element_size() for w in prunable(model).values())
    steps = a.search_steps if a.step == "search" else a.finetune_steps
    with tempfile.TemporaryDirectory(prefix="tf-mem-") as tmp:
        tmp = Path(tmp)
        lm = a.model.endswith("-lm")
        bundle = load_data(str(tokens(tmp / "tokens.npz", a.batch * steps, a.batch, a.seq, model.config.vocab_size,
                                      labels=not lm)))
        io = adapt.fit(model, bundle.inputs, bundle.example(2))
        check_against_model(bundle, model, model.config.architectures)  # the task, as the pipeline decides it
        recipe = recipes.resolve("cts", [f"search.steps={a.search_steps}", f"search.batch_size={a.batch}",
                                         f"finetune.batch_size={a.batch}", "finetune.epochs=1",
                                         f"search.checkpoint={str(a.checkpoint).lower()}"])
        device = torch.device("cpu")
        if a.step != "search":
            mask = global_topk({n: w.detach().abs() for n, w in prunable(model).items()},
                               keep_count(prunable_bytes // 4, recipe.search.sparsity))
        base = rss_kib()
        reset = True
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # the high-water mark restarts here: ru_maxrss is then the step's peak
        except OSError:
            reset = False
        t = time.perf_counter()
        if a.step == "search":
            from ticketforge.search.cts import cts

            ctx = SearchContext(model=model, loaded=LoadedModel(model=model, kind="hf", io=io), data=bundle,
                                recipe=recipe, device=device)
            found = cts(ctx)
            info = {"steps_run": found.info["steps"], "kept": found.mask.kept}
        elif a.step == "finetune":
            import copy

            teacher = copy.deepcopy(model).eval()  # the pipeline's dense copy, which it distills from
            schedule = finetune.Schedule.finetune(recipe)
            tuned = finetune.fit(model, mask, schedule, bundle, device, teacher=teacher)
            info = {"steps_run": len(bundle.train) // a.batch, "distill": schedule.distill,
                    "optimizer": schedule.optimizer, "accuracy": tuned.accuracy}
        else:
            import copy

            from ticketforge import sparse_storage, validate
            from ticketforge.export import export_onnx

            dense = copy.deepcopy(model)  # the pipeline keeps the loaded model as dense_copy
            mask.apply(model)
            export_onnx(dense, bundle.example(2), tmp / "dense.onnx", recipe.export, bundle.inputs)
            export_onnx(model, bundle.example(2), tmp / "model.onnx", recipe.export, bundle.inputs)
            storage = sparse_storage.store(tmp / "model.onnx", recipe.export.sparse_storage,
                                           validate.feed(tmp / "model.onnx", bundle.example(validate.CHECK_SAMPLES)))
            info = {"steps_run": 1, "sparse_tensors": storage["sparse_tensors"]}
        seconds = time.perf_counter() - t
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"model": a.model, "step": a.step, "label": a.label, "batch": a.batch, "seq": a.seq, "steps": steps,
            "checkpoint": a.checkpoint if a.step == "search" else None,
            "threads": a.threads, "params_m": round(weight_bytes / 4e6, 1), "weight_gib": round(weight_bytes / GIB, 3),
            "prunable_gib": round(prunable_bytes / GIB, 3), "baseline_gib": round(base["VmRSS"] * 1024 / GIB, 2),
            "peak_gib": round(peak / GIB, 2), "x_weights": round(peak / weight_bytes, 2),
            "delta_x_weights": round((peak - base["VmRSS"] * 1024) / weight_bytes, 2), "hwm_reset": reset,
            "seconds": round(seconds, 1), **info}


def markdown(rows: list[dict]) -> str:
    lines = ["| model | step | label | batch x seq, steps | baseline | peak | x weights | delta x weights |",
             "|---|---|---|---|---:|---:|---:|---:|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['model']} | {r['step']} | {r['label']} | {r['error']} | | | | |")
            continue
        lines.append(f"| {r['model']} ({r['weight_gib']:.2f} GiB) | {r['step']} | {r['label']} | "
                     f"{r['batch']} x {r['seq']}, {r['steps']} | {r['baseline_gib']:.2f} GiB | {r['peak_gib']:.2f} GiB | "
                     f"{r['x_weights']:.1f}x | {r['delta_x_weights']:.1f}x |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in rows if "error" not in r]
    labels = list(dict.fromkeys(r["label"] for r in rows))
    keys = list(dict.fromkeys((r["model"], r["step"]) for r in rows))
    fig, ax = plt.subplots(figsize=(7, 4))
    width = 0.8 / max(len(labels), 1)
    for j, label in enumerate(labels):
        by = {(r["model"], r["step"]): r["x_weights"] for r in rows if r["label"] == label}
        ax.bar([i + j * width for i in range(len(keys))], [by.get(k, 0) for k in keys], width, label=label)
    ax.axhline(6.0, color="grey", lw=0.8, ls="--")
    ax.set_xticks([i + width * (len(labels) - 1) / 2 for i in range(len(keys))])
    ax.set_xticklabels([f"{m}\n{s}" for m, s in keys], fontsize=8)
    ax.set_ylabel("peak RSS / weight bytes")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def git_label() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--steps", default=",".join(STEPS))
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--search-steps", type=int, default=4)
    ap.add_argument("--finetune-steps", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--checkpoint", action="store_true", help="search with search.checkpoint (layers recomputed)")
    ap.add_argument("--label", default=None, help="names this run's rows (default: the git revision)")
    ap.add_argument("--append", action="store_true", help="keep earlier rows of other labels")
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--child", nargs=2, metavar=("MODEL", "STEP"), help=argparse.SUPPRESS)
    a = ap.parse_args()
    a.label = a.label or git_label()
    if a.child:
        a.model, a.step = a.child
        print("ROW " + json.dumps(child(a)), flush=True)
        return 0
    a.out.mkdir(parents=True, exist_ok=True)
    rows = []
    if a.append and (a.out / "memory.json").exists():
        rows = json.loads((a.out / "memory.json").read_text())["rows"]
    common = ["--batch", str(a.batch), "--seq", str(a.seq), "--search-steps", str(a.search_steps),
              "--finetune-steps", str(a.finetune_steps), "--threads", str(a.threads), "--label", a.label,
              *(["--checkpoint"] if a.checkpoint else [])]
    for model in a.models.split(","):
        for step in a.steps.split(","):
            p = subprocess.run([sys.executable, __file__, "--child", model, step, *common], cwd=ROOT,
                               capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
            found = [line[4:] for line in p.stdout.splitlines() if line.startswith("ROW ")]
            if p.returncode == 0 and found:
                row = json.loads(found[-1])
            else:
                err = [line for line in (p.stderr or p.stdout).splitlines() if line.strip()]
                row = {"model": model, "step": step, "label": a.label, "error": err[-1][:160] if err else f"exit {p.returncode}"}
            rows = [r for r in rows if (r["model"], r["step"], r["label"]) != (model, step, a.label)] + [row]
            print(json.dumps(row), flush=True)
            (a.out / "memory.json").write_text(json.dumps({"rows": rows}, indent=1) + "\n")
    with open(a.out / "memory.csv", "w", newline="") as f:
        keys = list(dict.fromkeys(k for r in rows for k in r))
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)
    (a.out / "memory.md").write_text(markdown(rows))
    plot(rows, a.out / "memory.png")
    print(markdown(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
