"""Diagnostic behind docs/cts-vs-ltr.md (rows in bench/results/cts_mask_diag.csv): masks from CTS variants,
IMP with few rounds, gradual magnitude and gates trained with the weights, each trained as LTR's final round
(the rewind weights + the rest of the schedule). One data set, seed and sparsity per call, e.g.
    python bench/cts_mask_diag.py --variants cts "it@n=3,rt=lrr,ep=2" ltr
A scratch tool (variants as name@key=value,...); the bench of record is bench/cts_vs_ltr.py."""
import copy, sys, time, math, dataclasses, argparse
sys.path.insert(0, str(__import__("pathlib").Path(__file__).parent))
import torch
from cts_vs_ltr import DATA, context
from ticketforge import finetune, models, recipe as recipes
from ticketforge.finetune import Schedule
from ticketforge.data import loader
from ticketforge.masks import Mask, global_topk, keep_count, prunable
from ticketforge.search import cts as C, imp as imp_mod
from ticketforge.search.magnitude import lamp_scores

p = argparse.ArgumentParser()
p.add_argument("--data", default="mnist1d"); p.add_argument("--seed", type=int, default=0)
p.add_argument("--sparsity", type=float, default=0.98); p.add_argument("--variants", nargs="+", default=["cts"])
p.add_argument("--steps", type=int, default=200)
p.add_argument("--set", dest="sets", action="append", default=[])
args = p.parse_args()
torch.set_num_threads(1)
DEV = torch.device("cpu")
make, arch, kw = DATA[args.data]
bundle = make(args.seed)
EPOCHS, REWIND = 8, 0.5
rec = recipes.resolve("cts", [f"search.sparsity={args.sparsity}", f"train.epochs={EPOCHS}", f"train.rewind_epochs={REWIND}",
                              "train.lr=0.1", "train.batch_size=128", "search.sanity=false", f"search.steps={args.steps}", *args.sets])
torch.manual_seed(args.seed)
model = models.build(arch, kw)
tl = loader(bundle.train, 128, shuffle=True, seed=args.seed)
spe = len(tl); rstep = int(round(REWIND * spe))
t = time.perf_counter()
finetune.train(model, tl, epochs=1, max_steps=rstep, lr=0.1, total_epochs=EPOCHS, device=DEV)
rewind_state = copy.deepcopy(model.state_dict())
rest = Schedule.rest_of_training(rec, 0, rstep)
finetune.train(model, tl, device=DEV, **rest.train_kwargs())
dense_s = time.perf_counter() - t
dense = model.eval()
dense_acc = finetune.evaluate(dense, loader(bundle.val, 256), DEV)
print(f"dense {dense_acc:.4f} {dense_s:.1f}s spe {spe}", flush=True)
total = sum(w.numel() for w in prunable(dense).values())
keep = keep_count(total, args.sparsity)

def final(mask, seed=args.seed):
    m = copy.deepcopy(dense); m.load_state_dict(rewind_state)
    return finetune.fit(m, mask, rest, bundle, DEV, seed=seed).accuracy

def ft3(mask, src):
    m = copy.deepcopy(src)
    return finetune.fit(m, mask, Schedule.finetune(rec), bundle, DEV, seed=args.seed).accuracy  # finetune.epochs

def search(weights_model, keep_n, prev_mask=None, init_logits=None, floor=0, recipe=rec):
    ctx = context(weights_model, arch, kw, bundle, recipe, args.seed)
    W = prunable(weights_model)
    live = sum(int(prev_mask[n].sum()) for n in W) if prev_mask is not None else total
    k = keep_n / live
    a0 = math.log(k / (1 - k))
    logits = {}
    for n, w in W.items():
        l = torch.full_like(w, a0)
        if init_logits is not None:
            l = init_logits[n].clone()
        if prev_mask is not None:
            l = torch.where(prev_mask[n], l, torch.full_like(l, -30.0))
        logits[n] = l
    costs = {n: torch.ones(()) for n in W}
    ov = lambda soft: {n: W[n] * soft[n] for n in soft}
    with torch.no_grad():
        if prev_mask is not None: prev_mask.apply(weights_model)
    trained, info = C.concrete_search(ctx, logits, costs, float(keep_n), ov, keep=keep_n)
    rowb = float(OPTS.get("rowb", 0))
    if rowb:
        trained = rowboost(trained, rowb)
    if floor:
        mask = floored_topk(trained, keep_n, floor)
    else:
        mask = global_topk(trained, keep_n)
    return mask, trained, info

def rowboost(scores, beta):
    out = {}
    for n, s in scores.items():
        f = s.reshape(s.shape[0], -1)
        rs = torch.sigmoid(f).sum(1, keepdim=True)
        out[n] = (f + beta * torch.log(rs + 1e-6)).reshape(s.shape)
    return out

def floored_topk(scores, keep_n, floor):
    # per output row at least `floor` kept (the row's top-floor), the rest by global top-k
    forced = {}
    for n, s in scores.items():
        f = s.reshape(s.shape[0], -1)
        kk = min(floor, f.shape[1])
        idx = f.topk(kk, 1).indices
        fm = torch.zeros_like(f, dtype=torch.bool); fm.scatter_(1, idx, True)
        forced[n] = fm.reshape(s.shape)
    nf = sum(int(v.sum()) for v in forced.values())
    boosted = {n: torch.where(forced[n], torch.full_like(s, 1e9), s) for n, s in scores.items()}
    return global_topk(boosted, max(keep_n, nf))

def stats(mask):
    out = []
    for n, m in mask.items():
        rows = m.reshape(m.shape[0], -1).any(1).sum().item()
        out.append(f"{n}:{m.float().mean():.3f}/{rows}r")
    return " ".join(out)

def effective(mask):
    """fraction of kept weights on a connected input->output path (chain models: conv stack + linear)."""
    names = list(mask)
    ms = [mask[n].reshape(mask[n].shape[0], mask[n].shape[1], -1).any(2) if mask[n].dim() > 2 else mask[n] for n in names]
    # linear: in features = channels x positions -> fold to channels
    last = ms[-1]
    prev_c = ms[-2].shape[0]
    ms[-1] = last.reshape(last.shape[0], prev_c, -1).any(2)
    fwd = [None] * len(ms)
    alive = torch.ones(ms[0].shape[1], dtype=torch.bool)
    for i, m in enumerate(ms):
        m2 = m & alive[None, :]
        fwd[i] = m2
        alive = m2.any(1)
    used = torch.ones(ms[-1].shape[0], dtype=torch.bool)
    eff = 0
    for i in range(len(ms) - 1, -1, -1):
        m2 = fwd[i] & used[:, None]
        used = m2.any(0)
        full = mask[names[i]]
        if i == len(ms) - 1:
            fm = full.reshape(full.shape[0], m2.shape[1], -1) & m2[:, :, None]
        else:
            fm = full.reshape(full.shape[0], full.shape[1], -1) & m2[:, :, None]
        eff += int(fm.sum())
    return eff / max(mask.kept, 1)

def stage_plan(s_final, n):
    d = 1 - s_final
    return [d ** ((i + 1) / n) for i in range(n)]

from torch.func import functional_call
def joint(opts):
    ep = float(opts.get("ep", 3)); wlr = float(opts.get("wlr", 0.01)); obj = opts.get("obj", "reverse_kl")
    src = opts.get("src", "trained"); end = float(opts.get("end", 0.75)); mag = opts.get("mag", "0") == "1"
    alr = float(opts.get("alr", 0.5)); temp = float(opts.get("t", 1.0)); a_init = float(opts.get("a0", 3.0))
    m = copy.deepcopy(dense)
    if src == "rewind": m.load_state_dict(rewind_state)
    teacher = copy.deepcopy(dense).eval()
    W = prunable(m)
    names = list(W)
    T = max(int(ep * spe), 1)
    kfin = keep / total
    logits = [torch.full_like(W[n], a_init).requires_grad_(True) for n in names]
    aopt = torch.optim.Adam(logits, lr=alr)
    wopt = torch.optim.SGD(m.parameters(), lr=wlr, momentum=0.9, weight_decay=5e-4)
    hard = Mask.ones_like(m)
    gb = C.GradBalance(1.1 * total)
    step = 0
    m.train()
    while step < T:
        for x, y in tl:
            frac = min(1.0, step / max(1, end * T))
            k_t = kfin + (1 - kfin) * (1 - frac) ** 3
            lr_t = wlr * 0.5 * (1 + math.cos(math.pi * step / T))
            for g in wopt.param_groups: g["lr"] = lr_t
            if mag:
                kk = keep_count(total, 1 - k_t)
                hard = global_topk({n: W[n].detach().abs() for n in names}, kk)
                hard.apply(m)
                out = m(x)
                loss = torch.nn.functional.cross_entropy(out, y) if obj == "ce" else C.objective(obj, out, teacher(x).detach(), y) / 100
                wopt.zero_grad(); loss.backward()
                for n in names: W[n].grad.mul_(hard[n])
                wopt.step(); hard.apply(m)
            else:
                gb.budget = 1.1 * k_t * total
                soft = [C.concrete_sample(a, temp) for a in logits]
                with torch.no_grad():
                    tout = teacher(x)
                out = functional_call(m, {n: W[n] * s_ for n, s_ in zip(names, soft)}, (x,), strict=False)
                loss = C.objective(obj, out, tout, y)
                wopt.zero_grad()
                ga = torch.autograd.grad(loss, logits + [p for p in m.parameters()], allow_unused=True)
                gl, gw = ga[:len(logits)], ga[len(logits):]
                for p, g in zip(m.parameters(), gw):
                    p.grad = None if g is None else g / 100
                comb, s = gb.combine(logits, [torch.ones(())]*len(logits), [torch.zeros_like(a) if g is None else g for a, g in zip(logits, gl)])
                for a, g in zip(logits, comb): a.grad = g
                aopt.step(); wopt.step()
            step += 1
            if step >= T: break
    if mag:
        return global_topk({n: W[n].detach().abs() for n in names}, keep)
    return global_topk({n: a.detach() for n, a in zip(names, logits)}, keep)

OPTS = {}
res = {}
for v in args.variants:
    torch.manual_seed(args.seed)
    t0 = time.perf_counter()
    name, _, opt_ = v.partition("@")
    opts = dict(kv.split("=") for kv in opt_.split(",") if kv) if opt_ else {}
    OPTS = opts
    floor = int(opts.get("floor", 0))
    if name == "cts":
        mask, _, info = search(copy.deepcopy(dense), keep, floor=floor)
    elif name == "lamp":
        mask = global_topk(lamp_scores({n: w.detach().abs() for n, w in prunable(dense).items()}), keep)
    elif name == "ltr":
        plan = imp_mod.schedule(total, args.sparsity, 0.2)
        m = copy.deepcopy(dense); mask = Mask.ones_like(m)
        for kk in plan:
            mask = imp_mod.prune_step(m, mask, kk)
            m.load_state_dict(rewind_state)
            finetune.train(m, tl, device=DEV, mask=mask, **rest.train_kwargs())
    elif name == "it":  # iterative CTS: n stages, retrain 'rt' epochs between stages
        n = int(opts.get("n", 3)); rt = opts.get("rt", "rewind"); warm = opts.get("warm", "0") == "1"
        ep = int(opts.get("ep", 0))
        dens = [float(x) for x in opts["d"].split("/")] if "d" in opts else stage_plan(args.sparsity, n)
        m = copy.deepcopy(dense); mask = None; logits = None
        for i, d in enumerate(dens):
            kk = keep if i == len(dens) - 1 else keep_count(total, 1 - d)
            sc = opts.get("sc", "cts")
            if sc == "cts":
                mask, logits, info = search(m, kk, prev_mask=mask, init_logits=logits if warm else None, floor=floor)
            else:
                mm = mask if mask is not None else Mask.ones_like(m)
                mags = {n: torch.where(mm[n], w.detach().abs(), torch.zeros_like(w)) for n, w in prunable(m).items()}
                sco = lamp_scores(mags) if sc == "lamp" else mags
                sco = {n: torch.where(mm[n], sco[n], torch.full_like(sco[n], -1.0)) for n in sco}
                mask = global_topk(sco, kk)
            if i == len(dens) - 1: break
            if rt == "rewind":
                m.load_state_dict(rewind_state)
                if ep:
                    sch = dataclasses.replace(rest, epochs=ep, start_epoch=EPOCHS-ep, start_step=0)
                    finetune.fit(m, mask, sch, bundle, DEV, seed=args.seed + i)
                else:
                    finetune.fit(m, mask, rest, bundle, DEV, seed=args.seed + i)
            else:  # lrr: replay the last ep epochs on current weights
                sch = dataclasses.replace(rest, epochs=ep or 2, start_epoch=EPOCHS - (ep or 2), start_step=0)
                finetune.fit(m, mask, sch, bundle, DEV, seed=args.seed + i)
            print(f"  stage {i} density {d:.4f} kept {mask.kept} acc-now {finetune.evaluate(m, loader(bundle.val,256), DEV):.3f}", flush=True)
    elif name == "joint":  # gates + weights trained together, budget annealed from dense to target
        mask = joint(opts)
    elif name == "gmp":
        mask = joint(dict(opts, mag="1"))
    ts = time.perf_counter() - t0
    a = final(mask)
    tt = time.perf_counter() - t0
    print(f"{args.data} s{args.seed} {args.sparsity} {v:40s} final {a:.4f} mask_s {ts:.1f} total_s {tt:.1f} (+dense {dense_s:.1f}) | eff {effective(mask):.3f} | {stats(mask)}", flush=True)
