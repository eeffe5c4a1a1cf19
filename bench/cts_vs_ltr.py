"""CTS against lottery-ticket rewinding (LTR), learning-rate rewinding (LRR) and one-shot baselines,
on data where accuracy is not saturated (MNIST-1D) and on digits for continuity.

    python bench/cts_vs_ltr.py                                   # the whole grid (see docs/benchmarks.md)
    python bench/cts_vs_ltr.py --data mnist1d --seeds 0 --methods cts ltr

Per data set and seed: a dense model is trained with the `train` schedule (SGD, cosine, lr 0.1).
Then, for every target sparsity, one ticket per method, each through the library (ticketforge's
search registry, its fine-tune, BN re-estimated after the mask is applied):

- cts, cts:ce          the built-in `cts` recipe (reverse KL / cross-entropy) on the trained model,
                       then `--finetune` epochs
- cts-rewind           the same search at the rewind point (a fresh init trained `--rewind` epochs),
                       then the rest of the `train` schedule, as the paper does
- magnitude, synflow   one-shot global magnitude / iterative SynFlow on the trained model, then
                       `--finetune` epochs; with `+time` (magnitude+time, synflow+time) the fine-tune
                       is stretched to cts's wall time at the same point (equal wall time)
- ltr                  IMP with `search.start: rewind`: dense training to the end, then 20% of the
                       remaining weights per round by global magnitude, rewound to the rewind point
                       and retrained for the whole rest of the schedule every round
- lrr                  IMP with `search.start: trained`: every round replays the last `--finetune`
                       epochs of the train schedule on the trained weights (Renda et al. 2020)

The fair protocol (issue 19; docs/cts-vs-ltr.md), the headline rows:
- cts/full             the `cts` recipe's mask on the trained model, then LTR's final round: the rewind
                       weights of LTR's own dense run (the dense model here *is* that run) + the rest of
                       the train schedule; cts-staged/full, cts-staged3/full: with search.stages 4 / 3
                       (stage_epochs 1 / 2); cts-floor/full: search.min_per_output 1
- lamp/full            one-shot LAMP magnitude, the same retraining (control)
- cts-auto             CTS at the rewind point where the network reaches --rewind-accuracy x the dense
                       accuracy (train.rewind_accuracy), then the rest of the schedule
Times count alike: every method that needs the trained dense model includes its dense training
(column dense_s); cts-rewind needs none and includes none.

LTR and LRR run one trajectory per seed through all targets (each target sparsity is inserted as a
round; every other round removes 20% of the remaining weights): a ticket at 99.5% is the same
ticket whether the run stops there or continues. Their time to a ticket is the trajectory's time
up to that round (LTR's includes its own dense training, which is part of the procedure); the
trained-start methods' time excludes the dense training they start from.

MNIST-1D is generated locally with `mnist1d.data.make_dataset` (its `get_dataset` would download a
pickle; the bench makes any network call an error). Rows go to bench/results/cts_vs_ltr.csv
(finished points are skipped on a re-run), the plot to bench/results/cts_vs_ltr.png.
"""
from __future__ import annotations

import argparse
import copy
import csv
import dataclasses
import time
from collections import defaultdict
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import TensorDataset

from tables import density_axis, mean_sd

from ticketforge import finetune, models, recipe as recipes, structures
from ticketforge.finetune import Schedule
from ticketforge.search.base import SearchContext
from ticketforge.data import DataBundle, load_data, loader
from ticketforge.loading import LoadedModel
from ticketforge.masks import keep_count, prunable
from ticketforge.search import imp as imp_mod

OUT = Path(__file__).parent / "results"
FIELDS = ["data", "method", "seed", "sparsity", "accuracy", "before_finetune", "dense_accuracy", "time_s",
          "search_s", "finetune_epochs", "search_steps", "search_max_steps", "stop_reason", "achieved_sparsity",
          "dense_s", "cpu_s"]
# cpu_s: the process's CPU seconds for the same span as time_s (1 thread: the wall time on an idle core). On a
# shared machine whose load changes by the minute, the ratio of cpu_s is the one to compare.
DEVICE = torch.device("cpu")
METHODS = ["cts", "cts-rewind", "cts:ce", "ltr", "lrr", "magnitude", "synflow", "magnitude+time", "synflow+time",
           # The fair protocol (issue 19): the mask, then LTR's final round (the rewind weights + the rest of the
           # train schedule); time_s includes the dense training the mask needs (LTR's includes its own).
           "cts/full", "cts-staged/full", "cts-staged3/full", "cts-staged3-short/full", "cts-floor/full", "cts-auto",
           "lamp/full"]
FULL = {  # method -> (registry recipe name, extra overrides); the search runs on the trained dense model
    "cts/full": ("cts", []),
    "cts-staged/full": ("cts", ["search.stages=4", "search.stage_epochs=1"]),
    "cts-staged3/full": ("cts", ["search.stages=3", "search.stage_epochs=2"]),
    # half the search (100 steps in all): what keeps digits' ticket within 1/4 of LTR's time
    "cts-staged3-short/full": ("cts", ["search.stages=3", "search.stage_epochs=2", "search.min_steps=100",
                                       "search.epochs=3"]),
    "cts-floor/full": ("cts", ["search.min_per_output=1"]),
    "lamp/full": ("magnitude", ["search.scope=lamp"]),
}


@models.register_model("mnist1d-cnn")
def mnist1d_cnn(num_classes: int = 10, width: int = 32) -> nn.Module:
    """A small 1-D CNN for MNIST-1D's 40-sample signals (about 28k prunable weights at width 32)."""
    w = width

    def block(cin, cout, k, stride):
        return [nn.Conv1d(cin, cout, k, stride, k // 2, bias=False), nn.BatchNorm1d(cout), nn.ReLU(inplace=True)]

    return nn.Sequential(*block(1, w, 5, 1), *block(w, w, 3, 2), *block(w, 2 * w, 3, 2), *block(2 * w, 2 * w, 3, 1),
                         nn.Flatten(), nn.Linear(2 * w * 10, num_classes))


def mnist1d_bundle() -> DataBundle:
    """MNIST-1D (4000 train / 1000 test signals of length 40), generated here from its templates."""
    import requests

    def offline(*args, **kwargs):
        raise RuntimeError("the benchmark must not download anything")

    get, requests.get = requests.get, offline
    try:
        from mnist1d.data import get_dataset_args, make_dataset
        d = make_dataset(get_dataset_args())  # seeded (args.seed = 42): the same data every run
    finally:
        requests.get = get

    def ds(x, y):
        return TensorDataset(torch.tensor(x, dtype=torch.float32)[:, None], torch.tensor(y, dtype=torch.long))
    return DataBundle(train=ds(d["x"], d["y"]), val=ds(d["x_test"], d["y_test"]), spec="mnist1d")


DATA = {  # name -> (bundle, architecture, kwargs)
    "mnist1d": (lambda seed: mnist1d_bundle(), "mnist1d-cnn", {}),
    "digits": (lambda seed: load_data("digits", 0.1, seed), "digits-resnet", {"width": 16}),
}


def recipe_for(method: str, sparsity: float, args) -> recipes.Recipe:
    name, _, objective = method.partition(":")
    name = name.split("+")[0]
    start = "rewind" if name in ("cts-rewind", "cts-auto", "ltr") else "trained"
    registry = {"cts-rewind": "cts", "cts-auto": "cts", "ltr": "imp", "lrr": "imp"}.get(name, name)
    base = "cts" if registry == "cts" else "magnitude" if registry != "imp" else "imp"
    items = [f"search.method={registry}", f"search.sparsity={sparsity}", f"search.start={start}",
             f"train.epochs={args.epochs}", f"train.rewind_epochs={args.rewind}", "train.lr=0.1",
             "train.batch_size=128", f"finetune.epochs={args.finetune}", f"search.epochs={args.finetune}"
             if registry == "imp" else "search.sanity=false", *args.sets]
    if objective:
        items.append(f"search.objective={objective}")
    if name == "cts-auto":  # rewind where the network reaches args.rewind_accuracy x the dense accuracy
        items.append(f"train.rewind_accuracy={args.rewind_accuracy}")
    if registry == "magnitude":
        items.append("search.scope=global")  # the baseline these rows measured (LAMP: bench/magnitude_scope.py)
    return recipes.resolve(base, items)


def context(model, arch, kwargs, bundle, recipe, seed) -> SearchContext:
    return SearchContext(model=model, loaded=LoadedModel(model=model, arch=arch, arch_kwargs=kwargs),
                         data=bundle, recipe=recipe, device=DEVICE, seed=seed)


def dense_model(arch, kwargs, bundle, seed, args):
    """The dense network, trained exactly as LTR's round 0 trains it (the same init, data order and
    schedule, through search.start=rewind): its weights at the rewind point are what the `/full`
    rows retrain their tickets from, as LTR's rounds do."""
    from ticketforge.search import start as start_mod
    recipe = recipe_for("ltr", 0.9, args)
    ctx = context(models.build(arch, kwargs), arch, kwargs, bundle, recipe, seed)
    t, c = time.perf_counter(), time.process_time()
    sp = start_mod.starting_point(ctx)
    rewind_state = copy.deepcopy(sp.model.state_dict())
    kw = sp.schedule.train_kwargs()
    finetune.train(sp.model, loader(bundle.train, sp.schedule.batch_size, shuffle=True, seed=round_seed(seed)),
                   device=DEVICE, **kw)
    model = sp.model.eval()
    DENSE_CPU[seed] = time.process_time() - c
    return model, finetune.evaluate(model, loader(bundle.val, 256), DEVICE), time.perf_counter() - t, \
        (rewind_state, sp.schedule)


DENSE_CPU: dict[int, float] = {}


def round_seed(seed):
    return imp_mod.round_seed(seed, 0)  # LTR's round 0 (its dense training) draws from this stream


def full_protocol(method, sparsity, dense, rewind, arch, kwargs, bundle, seed, args, dense_s) -> dict:
    """The mask of `method` found on the trained dense model, then LTR's final round: the rewind
    weights, the mask, the rest of the train schedule (BN re-estimated first)."""
    registry, extra = FULL[method]
    base = recipe_for(registry, sparsity, args)
    recipe = recipes.resolve("cts" if registry == "cts" else "magnitude",
                             [f"search.method={registry}", f"search.sparsity={sparsity}", "search.start=trained",
                              "search.sanity=false", *args.sets, *extra])
    model = copy.deepcopy(dense)
    ctx = context(model, arch, kwargs, bundle, recipe, seed)
    torch.manual_seed(seed)
    t0, c0 = time.perf_counter(), time.process_time()
    found = structures.find_ticket(ctx)
    t1 = time.perf_counter()
    state, schedule = rewind
    ticket = copy.deepcopy(dense)
    ticket.load_state_dict(state)
    acc = finetune.fit(ticket, found.mask, schedule, bundle, DEVICE, seed=seed,
                       bn_recalibrate=base.finetune.bn_recalibrate).accuracy
    t2 = time.perf_counter()
    stop = found.info.get("stop") or {}
    return {"accuracy": acc, "before_finetune": None, "time_s": dense_s + (t2 - t0), "search_s": t1 - t0,
            "finetune_epochs": schedule.epochs, "search_steps": found.info.get("steps"),
            "search_max_steps": found.info.get("max_steps"), "stop_reason": stop.get("reason", ""),
            "achieved_sparsity": found.mask.sparsity, "dense_s": dense_s,
            "cpu_s": DENSE_CPU.get(seed, 0.0) + time.process_time() - c0}


def one_shot(method, sparsity, dense, arch, kwargs, bundle, seed, args, extra_epochs=0) -> dict:
    recipe = recipe_for(method, sparsity, args)
    model = copy.deepcopy(dense)
    ctx = context(model, arch, kwargs, bundle, recipe, seed)
    torch.manual_seed(seed)
    t0 = time.perf_counter()
    found = structures.find_ticket(ctx)
    t1 = time.perf_counter()
    probe = copy.deepcopy(found.model)
    found.mask.apply(probe)
    finetune.recalibrate_bn(probe, loader(bundle.train, 128, shuffle=True, seed=seed), DEVICE)
    before = finetune.evaluate(probe, loader(bundle.val, 256), DEVICE)
    schedule = found.schedule or Schedule.finetune(recipe)
    if extra_epochs:
        schedule = dataclasses.replace(schedule, epochs=recipe.finetune.epochs + extra_epochs)
    acc = finetune.fit(found.model, found.mask, schedule, bundle, DEVICE, seed=seed,
                       bn_recalibrate=recipe.finetune.bn_recalibrate).accuracy
    t2 = time.perf_counter()
    stop = found.info.get("stop") or {}
    return {"accuracy": acc, "before_finetune": before, "time_s": t2 - t0, "search_s": t1 - t0,
            "finetune_epochs": schedule.epochs,
            "search_steps": found.info.get("steps"), "search_max_steps": found.info.get("max_steps"),
            "stop_reason": stop.get("reason", ""), "achieved_sparsity": found.mask.sparsity}


def trajectory(method, targets, dense, arch, kwargs, bundle, seed, args) -> dict[float, dict]:
    """One IMP run through every target; target -> row."""
    recipe = recipe_for(method, max(targets), args)
    model = copy.deepcopy(dense)
    ctx = context(model, arch, kwargs, bundle, recipe, seed)
    total = sum(w.numel() for w in prunable(model).values())
    plan = imp_mod.schedule(total, max(targets), recipe.search.prune_fraction)
    stops = {keep_count(total, s): s for s in targets}
    plan = sorted(set(plan) | set(stops), reverse=True)
    torch.manual_seed(seed)
    c0 = time.process_time()
    found = imp_mod.lottery(ctx, plan)
    cpu = time.process_time() - c0
    wall = sum(r["seconds"] for r in found.info["rounds"]) or 1.0
    rows, elapsed = {}, 0.0
    by_round = {r["round"]: r for r in found.info["rounds"]}
    for r in sorted(by_round):
        elapsed += by_round[r]["seconds"]
        if r == 0:
            continue
        kept = plan[r - 1]
        if kept in stops:
            rows[stops[kept]] = {"accuracy": by_round[r]["accuracy"], "before_finetune": None, "time_s": elapsed,
                                 "search_s": elapsed, "finetune_epochs": found.info["epochs_per_round"],
                                 "search_steps": r, "search_max_steps": len(plan), "stop_reason": "",
                                 "achieved_sparsity": by_round[r]["sparsity"],
                                 # the trajectory's CPU seconds, shared out by its rounds' wall times
                                 "cpu_s": cpu * elapsed / wall}
    return rows


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sets = sorted({r["data"] for r in rows})
    fig, axes = plt.subplots(2, len(sets), figsize=(6.5 * len(sets), 8), squeeze=False)
    for col, name in enumerate(sets):
        acc, tim = defaultdict(lambda: defaultdict(list)), defaultdict(lambda: defaultdict(list))
        for r in rows:
            if r["data"] == name:
                acc[r["method"]][float(r["sparsity"])].append(float(r["accuracy"]))
                tim[r["method"]][float(r["sparsity"])].append(float(r["time_s"]))
        dense = [float(r["dense_accuracy"]) for r in rows if r["data"] == name]
        for method in sorted(acc):
            xs = sorted(acc[method])
            labels = [100 * (1 - x) for x in xs]
            axes[0][col].plot(labels, [100 * sum(acc[method][x]) / len(acc[method][x]) for x in xs], "o-",
                              label=method)
            axes[1][col].plot(labels, [sum(tim[method][x]) / len(tim[method][x]) for x in xs], "o-", label=method)
        if dense:
            axes[0][col].axhline(100 * sum(dense) / len(dense), color="gray", ls="--", lw=1, label="dense")
        for ax, ylabel in ((axes[0][col], "validation accuracy % (mean of seeds)"),
                           (axes[1][col], "time to ticket, s (mean of seeds)")):
            density_axis(ax, ylabel)
        axes[1][col].set_yscale("log")
        axes[0][col].set_title(name)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def table(rows: list[dict]) -> str:
    """Markdown: accuracy mean +- std (n) and median time per data set, method and sparsity."""
    import statistics

    out = []
    for name in sorted({r["data"] for r in rows}):
        sps = sorted({float(r["sparsity"]) for r in rows if r["data"] == name})
        out += [f"**{name}** (dense {100 * statistics.mean(float(r['dense_accuracy']) for r in rows if r['data'] == name):.1f}%)",
                "", "| method | " + " | ".join(f"{100 * s:g}%" for s in sps) + " | median time to ticket |",
                "|---|" + "---:|" * (len(sps) + 1)]
        for method in [m for m in METHODS if any(r["method"] == m and r["data"] == name for r in rows)]:
            cells, times = [], []
            for s in sps:
                acc = [100 * float(r["accuracy"]) for r in rows if r["data"] == name and r["method"] == method
                       and float(r["sparsity"]) == s]
                times += [float(r["time_s"]) for r in rows if r["data"] == name and r["method"] == method
                          and float(r["sparsity"]) == s]
                cells.append(mean_sd(acc))
            out.append(f"| {method} | " + " | ".join(cells) + f" | {statistics.median(times):.1f} s |")
        out.append("")
    return "\n".join(out)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--data", nargs="+", default=["mnist1d", "digits"], choices=sorted(DATA))
    p.add_argument("--sparsities", nargs="+", type=float, default=[0.9, 0.95, 0.98, 0.99, 0.995])
    p.add_argument("--methods", nargs="+", default=METHODS, choices=METHODS)
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--epochs", type=int, default=8, help="the train schedule (dense model, LTR's retraining)")
    p.add_argument("--rewind", type=float, default=0.5, help="rewind point, epochs of the train schedule")
    p.add_argument("--rewind-accuracy", type=float, default=0.8,
                   help="cts-auto: rewind where the network reaches this fraction of the dense accuracy")
    p.add_argument("--finetune", type=int, default=3, help="fine-tune epochs of a trained-start ticket (LRR: per round)")
    p.add_argument("--set", dest="sets", action="append", default=[], help="extra recipe override, KEY=VALUE")
    p.add_argument("--threads", type=int, default=1, help="1: on a shared 2-core machine more threads thrash")
    p.add_argument("--out", type=Path, default=OUT / "cts_vs_ltr_fair.csv",
                   help="rows (cts_vs_ltr.csv holds the earlier protocol's rows, whose times leave out the dense "
                        "training of the trained-start methods)")
    p.add_argument("--table", action="store_true", help="print the markdown table of --out and redraw its plot")
    args = p.parse_args()
    if args.table:
        rows = list(csv.DictReader(open(args.out)))
        plot(rows, args.out.with_suffix(".png"))
        print(table(rows))
        return
    torch.set_num_threads(args.threads)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    done = list(csv.DictReader(open(args.out))) if args.out.exists() else []
    seen = {(r["data"], r["method"], r["seed"], r["sparsity"]) for r in done}
    new = not args.out.exists()
    with open(args.out, "a", newline="") as f:
        # a file written before a column was added keeps its header (the new column is left out)
        w = csv.DictWriter(f, fieldnames=FIELDS if new else next(csv.reader(open(args.out))), extrasaction="ignore")
        if new:
            w.writeheader()

        def emit(name, method, seed, sparsity, dense_acc, res):
            row = {"data": name, "method": method, "seed": seed, "sparsity": sparsity, "dense_accuracy": dense_acc,
                   **res}
            w.writerow(row)
            f.flush()
            done.append({k: str(v) for k, v in row.items()})
            print(f"{name:8s} {method:15s} seed {seed} sparsity {sparsity:.3f} acc {res['accuracy']:.4f} "
                  f"time {res['time_s']:.1f}s", flush=True)

        for name in args.data:
            make, arch, kwargs = DATA[name]
            for seed in args.seeds:
                todo = [(m, s) for m in args.methods for s in args.sparsities
                        if (name, m, str(seed), str(s)) not in seen]
                if not todo:
                    continue
                bundle = make(seed)
                dense, dense_acc, dense_s, rewind = dense_model(arch, kwargs, bundle, seed, args)
                print(f"{name} seed {seed}: dense accuracy {dense_acc:.4f} ({dense_s:.1f}s)", flush=True)
                cts_time = {}
                for method in args.methods:
                    targets = [s for m, s in todo if m == method]
                    if not targets:
                        continue
                    if method in ("ltr", "lrr"):
                        for s, res in trajectory(method, targets, dense, arch, kwargs, bundle, seed, args).items():
                            if method == "lrr":  # its rounds start from the trained dense model
                                res.update(time_s=res["time_s"] + dense_s, dense_s=dense_s)
                            emit(name, method, seed, s, dense_acc, res)
                        continue
                    if method in FULL:
                        for s in targets:
                            emit(name, method, seed, s, dense_acc,
                                 full_protocol(method, s, dense, rewind, arch, kwargs, bundle, seed, args, dense_s))
                        continue
                    for s in targets:
                        extra = 0
                        if method.endswith("+time"):  # stretch the fine-tune to cts's wall time at this point
                            ref = cts_time.get(s) or next((float(r["time_s"]) for r in done if r["data"] == name
                                                           and r["method"] == "cts" and r["seed"] == str(seed)
                                                           and r["sparsity"] == str(s)), None)
                            if ref is None:
                                continue
                            t = time.perf_counter()
                            probe = copy.deepcopy(dense)
                            finetune.train(probe, loader(bundle.train, 128, shuffle=True, seed=seed), epochs=1,
                                           lr=0.01, device=DEVICE)
                            per_epoch = time.perf_counter() - t
                            extra = max(0, round(ref / per_epoch) - args.finetune)
                        res = one_shot(method.split("+")[0], s, dense, arch, kwargs, bundle, seed, args, extra)
                        if method != "cts-rewind":  # counted alike: the dense training this method starts from
                            res.update(time_s=res["time_s"] + dense_s, dense_s=dense_s)
                        if method == "cts":
                            cts_time[s] = res["time_s"]
                        emit(name, method, seed, s, dense_acc, res)
    plot(done, args.out.with_suffix(".png"))


if __name__ == "__main__":
    main()
