import math

import pytest
import torch

from ticketforge import sanity, structures
from ticketforge.finetune import Schedule
from ticketforge.errors import UserError
from ticketforge.masks import prunable
from ticketforge.search.start import starting_point


@pytest.mark.parametrize("start", ["trained", "rewind", "init"])
def test_each_start_mode_runs(make_ctx, start):
    ctx = make_ctx([f"search.start={start}", "train.rewind_epochs=1"])
    before = {k: w.clone() for k, w in prunable(ctx.model).items()}
    sp = starting_point(ctx)
    after = prunable(sp.model)
    if start == "trained":
        assert sp.model is ctx.model and sp.schedule is None
    else:
        assert sp.model is not ctx.model
        assert all(not torch.equal(before[k], after[k]) for k in before)  # a new init
        k = 1 if start == "rewind" else 0
        assert sp.schedule.start_epoch == k and sp.schedule.epochs == 2 - k
        assert sp.schedule.total_epochs == 2 and sp.schedule.lr == ctx.recipe.train.lr
    assert sp.info["start"] == start


def test_rewind_trains_from_the_same_init_as_init(make_ctx):
    init = starting_point(make_ctx(["search.start=init"])).model
    rewound = starting_point(make_ctx(["search.start=rewind", "train.rewind_epochs=1"])).model
    rewound0 = starting_point(make_ctx(["search.start=rewind", "train.rewind_epochs=0"])).model
    w = "0.0.weight"
    assert torch.equal(dict(init.named_parameters())[w], dict(rewound0.named_parameters())[w])
    assert not torch.equal(dict(init.named_parameters())[w], dict(rewound.named_parameters())[w])


def test_rewind_without_arch_is_a_user_error(make_ctx):
    ctx = make_ctx(["search.start=rewind"])
    ctx.loaded.arch = None
    with pytest.raises(UserError, match="--arch"):
        starting_point(ctx)


def test_rewind_must_leave_epochs_to_retrain(make_ctx):
    with pytest.raises(UserError, match="rewind_epochs"):
        starting_point(make_ctx(["search.start=rewind", "train.rewind_epochs=2", "train.epochs=2"]))


@pytest.mark.parametrize("start", ["rewind", "init"])
def test_cts_passes_the_retrain_schedule_on(make_ctx, start):
    ctx = make_ctx([f"search.start={start}", "search.steps=2", "search.sparsity=0.9"])
    res = structures.find_ticket(ctx)
    assert res.schedule.total_epochs == 2 and res.info["start"] == start
    assert res.model is not ctx.model
    assert res.mask.kept == round(0.1 * res.mask.total)


# ---------------------------------------------------------------- sanity checks

def _ticket(make_ctx):
    ctx = make_ctx(["search.method=magnitude", "search.sparsity=0.8", "finetune.epochs=1",
                    "finetune.batch_size=32"])
    return ctx, structures.find_ticket(ctx)


def test_shuffled_keeps_each_layers_density_and_moves_the_weights(make_ctx):
    _, res = _ticket(make_ctx)
    shuf = sanity.shuffled(res.mask, seed=0)
    assert {k: int(m.sum()) for k, m in shuf.items()} == {k: int(m.sum()) for k, m in res.mask.items()}
    assert any(not torch.equal(shuf[k], res.mask[k]) for k in res.mask)


def test_inverted_keeps_the_lowest_scores(make_ctx):
    _, res = _ticket(make_ctx)
    inv = sanity.inverted(res.scores, res.mask.kept)
    assert inv.kept == res.mask.kept
    # 20% kept: the lowest 20% never overlap the highest 20%
    assert all(not (inv[k] & res.mask[k]).any() for k in inv)
    kept = torch.cat([res.scores[k][m].flatten() for k, m in inv.items()])
    pruned = torch.cat([res.scores[k][~m].flatten() for k, m in inv.items()])
    assert kept.max() <= pruned.min()


def test_reinit_keeps_the_mask_and_draws_new_weights(make_ctx):
    ctx, res = _ticket(make_ctx)
    built, skipped = sanity.variants(res.model, res.mask, res.scores, ctx.loaded.fresh, seed=0)
    assert set(built) == set(sanity.VARIANTS) and not skipped
    net, mask = built["reinit"]
    assert all(torch.equal(mask[k], res.mask[k]) for k in mask)
    assert all(not torch.equal(w, prunable(res.model)[k]) for k, w in prunable(net).items())


def test_sanity_run_trains_every_variant_without_touching_the_ticket(make_ctx):
    ctx, res = _ticket(make_ctx)
    ctx.loaded.arch = None  # reinit cannot be built: reported as skipped, the rest still runs
    before = {k: w.clone() for k, w in prunable(res.model).items()}
    out = sanity.run(res.model, res.mask, res.scores, ctx.loaded.fresh, ctx.recipe, Schedule.finetune(ctx.recipe),
                     structures.get("unstructured"), ctx.data, ctx.device)
    assert set(out["variants"]) == {"shuffled", "inverted"} and "reinit" in out["skipped"]
    # each variant is what it claims: the same count, and (shuffled) the same per-layer densities
    assert all(v["kept"] == res.mask.kept for v in out["variants"].values())
    assert out["variants"]["shuffled"]["per_layer_density"] == pytest.approx(
        {k: float(m.float().mean()) for k, m in res.mask.items()})
    assert all(torch.equal(before[k], w) for k, w in prunable(res.model).items())
    assert "| inverted |" in "\n".join(sanity.to_markdown(out, 0.5))


# ---------------------------------------------------------------- the CTS core

def _toy_task(n=2000, relevant=0.05, seed=0):
    """A task that needs a few gates on (weights w > 0 on 5% of them) and is indifferent to the rest."""
    g = torch.Generator().manual_seed(seed)
    w = torch.rand(n, generator=g) * (torch.rand(n, generator=g) < relevant)
    return w, lambda a: -(w * torch.sigmoid(a)).sum() * 100 / n


def _run_balance(balance, a, task, steps):
    opt = torch.optim.Adam([a], lr=0.1)
    for _ in range(steps):
        grads = list(torch.autograd.grad(task(a), [a]))
        a.grad = balance.combine([a], [torch.ones(())], grads)[0][0]
        opt.step()
    return balance.expected([a], [torch.ones(())])


def test_gradbalance_drives_expected_density_to_budget():
    """From nearly dense (88%) to a 10% budget: GRADBALANCE turns the gates the task does not need
    off until the expected count is within the budget, and keeps the ones it needs."""
    from ticketforge.search.cts import GradBalance

    w, task = _toy_task()
    budget = 1.1 * 0.1 * 2000
    a = torch.full((2000,), 2.0, requires_grad=True)
    balance = GradBalance(budget)
    expected = _run_balance(balance, a, task, 600)
    assert 0.3 * budget < expected <= 1.05 * budget
    needed = w > 0
    assert float((a[needed] > 0).float().mean()) > 0.9
    assert int((a[~needed] > 0).sum()) == 0


def test_gradbalance_is_off_below_budget():
    from ticketforge.search.cts import GradBalance

    balance = GradBalance(100.0)
    a = torch.full((1000,), -5.0)
    combined, s = balance.combine([a], [torch.ones(())], [torch.ones(1000)])
    assert s < 0 and balance.lam == 0.0 and torch.equal(combined[0], torch.ones(1000))


def test_lagrange_reaches_the_budget():
    from ticketforge.search.cts import GradBalance

    _, task = _toy_task()
    budget = 1.1 * 0.1 * 2000
    a = torch.full((2000,), math.log(0.1 / 0.9), requires_grad=True)
    expected = _run_balance(GradBalance(budget, "lagrange", lagrange_lr=0.01), a, task, 600)
    assert abs(expected / budget - 1) < 0.1


def test_kl_objectives_are_zero_when_outputs_agree_and_positive_otherwise():
    from ticketforge.search.cts import objective

    t = torch.randn(8, 10)
    y = torch.randint(0, 10, (8,))
    for name in ("reverse_kl", "forward_kl"):
        assert objective(name, t.clone(), t, y).abs() < 1e-5
        assert objective(name, t + torch.randn(8, 10), t, y) > 0
    s = torch.randn(8, 10)
    # reverse KL is KL(p_sparse || p_dense), scaled x100
    ls, lt = s.log_softmax(1), t.log_softmax(1)
    assert torch.allclose(objective("reverse_kl", s, t, y), 100 * (ls.exp() * (ls - lt)).sum(1).mean())


def test_concrete_sample_follows_the_authors_parametrisation():
    from ticketforge.search.cts import concrete_sample

    torch.manual_seed(0)
    a = torch.full((200000,), 1.5)
    m = concrete_sample(a, 2 / 3)
    assert ((m >= 0) & (m <= 1)).all()
    # sigmoid(a + L/t) > 1/2  <=>  L > -a t : probability sigmoid(a t)
    assert abs(float((m > 0.5).float().mean()) - torch.sigmoid(torch.tensor(1.5 * 2 / 3)).item()) < 0.01


def test_cts_trains_the_logits_only_and_keeps_the_exact_count(make_ctx):
    ctx = make_ctx(["search.steps=3", "search.sparsity=0.95"])
    before = {k: v.clone() for k, v in ctx.model.state_dict().items()}
    res = structures.find_ticket(ctx)
    assert all(torch.equal(before[k], v) for k, v in ctx.model.state_dict().items())  # weights frozen
    assert all(p.requires_grad for p in ctx.model.parameters())                      # and given back
    init = math.log(0.05 / 0.95)
    assert any((s - init).abs().max() > 1e-4 for s in res.scores.values())            # logits moved
    assert res.mask.kept == round(0.05 * res.mask.total)
    assert res.info["steps"] == 3 and res.schedule is None


# ---------------------------------------------------------------- issue 11 defects 3, 8, 10; stopping (issue 15)

@pytest.mark.parametrize("start", ["trained", "rewind", "init"])
def test_every_gate_on_gives_an_objective_of_zero(make_ctx, start):
    """Teacher and student normalise alike: with every gate saturated on, the student is the
    teacher, whatever the start (a fresh or rewound model's running statistics are not the batch's)."""
    import dataclasses

    from ticketforge.search.cts import concrete_search

    ctx = make_ctx([f"search.start={start}", "train.rewind_epochs=1", "search.steps=2", "search.lr=1e-9"])
    ctx = dataclasses.replace(ctx, model=starting_point(ctx).model)
    weights = prunable(ctx.model)
    logits = {n: torch.full_like(w, 100.0) for n, w in weights.items()}  # sigmoid(100 + L / t) == 1
    _, info = concrete_search(ctx, logits, {n: torch.ones(()) for n in logits}, 1.0,
                              lambda soft: {n: weights[n] * soft[n] for n in soft})
    assert abs(info["final_objective"]) < 1e-3


def test_cts_gives_frozen_parameters_back_frozen(make_ctx):
    ctx = make_ctx(["search.steps=2"])
    params = list(ctx.model.parameters())
    params[0].requires_grad_(False)
    params[-1].requires_grad_(False)
    before = [p.requires_grad for p in ctx.model.parameters()]
    structures.find_ticket(ctx)
    assert [p.requires_grad for p in ctx.model.parameters()] == before


def test_search_never_runs_in_unscaled_fp16(monkeypatch):
    from ticketforge.search.cts import search_precision

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    prec = search_precision(torch.device("cuda"))
    assert not (prec.enabled and prec.dtype == torch.float16)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert search_precision(torch.device("cuda")).dtype == torch.bfloat16
    assert not search_precision(torch.device("cpu")).enabled


def _gates(n=2000, k=100, seed=0):
    g = torch.Generator().manual_seed(seed)
    best = torch.randperm(n, generator=g)[:k]
    value = torch.zeros(n)
    value[best] = 1.0
    return best, value, torch.full((n,), math.log(k / n / (1 - k / n)), requires_grad=True)


def test_search_stops_once_the_top_k_set_is_the_known_optimum():
    """A synthetic objective whose optimum is known: it rewards exactly k gates and sends the others
    zero-mean noise. The search must stop on its own, well before the cap, holding those k gates."""
    from ticketforge.search.cts import StopRule, optimise_gates

    n, k = 2000, 100
    best, value, a = _gates(n, k)
    g = torch.Generator().manual_seed(1)

    def loss_fn(soft, x, y):
        noise = 0.3 * torch.randn(n, generator=g)
        return -((value + noise) * soft[0]).sum() * 100 / k

    info = optimise_gates([a], [torch.ones(())], float(k), loss_fn, [(None, None)] * 10, 3000, lr=0.1,
                          temperature=2 / 3, stop=StopRule(keep=k, overlap=0.999, window=5, every=5))
    assert info["stop"]["reason"] == "converged" and info["steps"] < 1000
    assert info["steps"] == info["stop"]["step"] and info["stop"]["topk_overlap"] > 0.999
    assert set(torch.topk(a.detach(), k).indices.tolist()) == set(best.tolist())


def test_search_without_convergence_runs_to_the_cap():
    from ticketforge.search.cts import StopRule, optimise_gates

    n, k = 2000, 100
    _, _, a = _gates(n, k)
    g = torch.Generator().manual_seed(1)
    info = optimise_gates([a], [torch.ones(())], float(k),
                          lambda soft, x, y: (torch.randn(n, generator=g) * soft[0]).sum(), [(None, None)] * 10,
                          200, lr=0.1, temperature=2 / 3, stop=StopRule(keep=k, overlap=0.999, window=5, every=5))
    assert info["stop"]["reason"] == "cap" and info["steps"] == 200


def test_cts_reports_where_and_why_it_stopped(make_ctx):
    res = structures.find_ticket(make_ctx(["search.epochs=3", "search.min_steps=0", "search.check_every=1", "search.stop_window=2"]))
    stop = res.info["stop"]
    assert stop["reason"] in ("converged", "cap") and stop["step"] == res.info["steps"] <= res.info["max_steps"]
    assert res.info["max_steps"] == 3 * 4  # 64 samples, batch 16: the cap is search.epochs
    off = structures.find_ticket(make_ctx(["search.epochs=3", "search.min_steps=0", "search.stop_overlap=1"]))
    assert "stop" not in off.info and off.info["steps"] == 12
    # a small data set's few epochs are lengthened to search.min_steps (the recipe's 400)
    floor = structures.find_ticket(make_ctx(["search.epochs=3", "search.stop_overlap=1", "search.min_steps=20"]))
    assert floor.info["steps"] == floor.info["max_steps"] == 20


def test_report_says_where_the_search_stopped():
    from ticketforge import report
    from ticketforge.report_schema import Report

    data = {"recipe": {"name": "cts", "convert": {"structure": "unstructured"}}, "model": {"path": "m.pt", "kind": "x"},
         "data": {"spec": "d", "train": 1, "val": 1}, "device": "cpu", "seed": 0, "ticketforge_version": "0",
         "search": {"method": "cts", "max_steps": 66, "stop": {"step": 40, "reason": "converged"}},
         "accuracy": {"dense": 1.0, "compressed": 0.9, "onnx": 0.9}, "params": {"dense": 10, "compressed": 1},
         "macs": {"dense": 10, "compressed": 10}, "size_mb": {"dense": 1.0, "compressed": 1.0},
         "sparsity": {"achieved": 0.9, "target": 0.9}, "parity": 0.0, "latency": [], "timings": {"search": 1.0},
         "convert": {}}
    r = Report.from_dict(data)
    assert "stopped at step 40 of at most 66: its top-k set had converged" in report.to_markdown(r)
    r.search["stop"]["reason"] = "cap"
    assert "stopped at step 40 of at most 66: the cap" in report.to_markdown(r)


# ---------------------------------------------------------------- rewind point by accuracy
def _scripted_accuracy(monkeypatch, reference, curve):
    """finetune.evaluate as start.py sees it: the trained model's accuracy first, then `curve` (the
    fresh network at step 0, then at every check)."""
    from ticketforge.search import start as start_mod
    seq = iter([reference, *curve])
    monkeypatch.setattr(start_mod.finetune, "evaluate", lambda *a, **k: next(seq))


def test_rewind_by_accuracy_stops_where_the_teacher_reaches_the_threshold(make_ctx, monkeypatch):
    # 64 samples / batch 16: 4 steps an epoch, 8 in the schedule; a check every step
    _scripted_accuracy(monkeypatch, 0.8, [0.1, 0.2, 0.3, 0.45, 0.5, 0.7, 0.9, 0.9, 0.9])
    sp = starting_point(make_ctx(["search.start=rewind", "train.rewind_accuracy=0.6", "train.rewind_check=1"]))
    # 0.6 x 0.8 = 0.48: first reached at the 4th check (0.5), step 4
    assert sp.info["rewind_step"] == 4 and sp.info["rewind_accuracy"] == 0.5
    assert sp.info["rewind_accuracy_target"] == pytest.approx(0.48)
    assert (sp.schedule.start_epoch, sp.schedule.start_step, sp.schedule.epochs) == (1, 0, 1)
    monkeypatch.undo()
    fixed = starting_point(make_ctx(["search.start=rewind", "train.rewind_steps=4"]))
    for (n, a), b in zip(sp.model.state_dict().items(), fixed.model.state_dict().values()):
        assert torch.equal(a, b), n  # the same weights as rewinding to that step directly


def test_rewind_by_accuracy_checks_every_rewind_check_steps(make_ctx, monkeypatch):
    _scripted_accuracy(monkeypatch, 1.0, [0.0, 0.2, 0.9])
    sp = starting_point(make_ctx(["search.start=rewind", "train.rewind_accuracy=0.5", "train.rewind_check=3"]))
    assert sp.info["rewind_step"] == 6


def test_rewind_by_accuracy_never_reached_stops_before_the_end(make_ctx, monkeypatch):
    _scripted_accuracy(monkeypatch, 1.0, [0.0] * 20)
    sp = starting_point(make_ctx(["search.start=rewind", "train.rewind_accuracy=0.99", "train.rewind_check=1"]))
    assert sp.info["rewind_step"] == 7 and sp.schedule.start_step == 3 and sp.schedule.epochs == 1


def test_rewind_by_accuracy_already_met_at_init_trains_nothing(make_ctx, monkeypatch):
    _scripted_accuracy(monkeypatch, 0.5, [0.5])
    ctx = make_ctx(["search.start=rewind", "train.rewind_accuracy=0.5"])
    sp = starting_point(ctx)
    init = starting_point(make_ctx(["search.start=init"]))
    assert sp.info["rewind_step"] == 0
    assert all(torch.equal(a, b) for a, b in zip(sp.model.state_dict().values(), init.model.state_dict().values()))


# ---------------------------------------------------------------- stages and per-output floors
@pytest.mark.parametrize("total,sparsity,stages", [(28000, 0.98, 4), (28000, 0.99, 3), (1000, 0.995, 6),
                                                    (37, 0.9, 5), (28000, 0.98, 1)])
def test_stage_plan_falls_geometrically_and_ends_exactly_on_the_target(total, sparsity, stages):
    from ticketforge.masks import keep_count
    from ticketforge.search.cts import stage_plan
    plan = stage_plan(total, sparsity, stages)
    assert plan[-1] == keep_count(total, sparsity)
    assert all(a > b for a, b in zip(plan, plan[1:])) and len(plan) <= stages
    if total > 1000:
        assert len(plan) == stages
        assert plan[0] == round(total * (1 - sparsity) ** (1 / stages))


def test_floor_leaves_no_output_row_empty_at_extreme_sparsity():
    from ticketforge.search.cts import topk_with_floor
    g = torch.Generator().manual_seed(0)
    # a classifier whose rows 0-2 score far above the rest: plain top-k empties rows 3-9
    cls = torch.randn(10, 640, generator=g) - 10 * (torch.arange(10) >= 3).float()[:, None]
    conv = torch.randn(64, 64, 3, generator=g) + 2.0
    scores = {"conv.weight": conv, "fc.weight": cls}
    keep = round(0.01 * (conv.numel() + cls.numel()))  # 99%: 187 weights for 74 rows
    from ticketforge.masks import global_topk
    plain = global_topk(scores, keep)
    assert (plain["fc.weight"].sum(1) == 0).any()  # the failure the floor prevents
    for floor in (1, 2):
        m = topk_with_floor(scores, keep, floor)
        assert m.kept == keep
        assert (m["fc.weight"].sum(1) >= floor).all() and (m["conv.weight"].reshape(64, -1).sum(1) >= floor).all()
        # each row's floor is its own best weights
        best = cls.topk(floor, 1).indices
        assert m["fc.weight"].gather(1, best).all()


def test_floor_respects_the_survivors_and_refuses_an_impossible_budget():
    from ticketforge.masks import Mask
    from ticketforge.search.cts import topk_with_floor
    scores = {"a.weight": torch.arange(24.0).reshape(4, 6)}
    allowed = Mask({"a.weight": torch.zeros(4, 6, dtype=torch.bool)})
    allowed["a.weight"][:, :2] = True
    allowed["a.weight"][3] = False  # a row already dead stays dead
    m = topk_with_floor(scores, 5, 1, allowed=allowed)
    assert m.kept == 5 and not (m["a.weight"] & ~allowed["a.weight"]).any()
    assert (m["a.weight"][:3].sum(1) >= 1).all()
    with pytest.raises(UserError, match="min_per_output"):
        topk_with_floor(scores, 3, 1)


@pytest.mark.parametrize("start", ["trained", "rewind"])
def test_staged_cts_hits_the_sparsity_exactly_and_only_narrows(make_ctx, start, monkeypatch):
    from ticketforge.search import cts as cts_mod
    masks = []
    real = cts_mod.topk_with_floor

    def spy(scores, keep, per_output, allowed=None):
        m = real(scores, keep, per_output, allowed)
        masks.append((m, allowed))
        return m
    monkeypatch.setattr(cts_mod, "topk_with_floor", spy)
    ctx = make_ctx([f"search.start={start}", "train.rewind_epochs=1", "search.steps=6", "search.sparsity=0.9",
                    "search.stages=3", "search.stage_epochs=1", "search.min_per_output=1"])
    res = structures.find_ticket(ctx)
    total = res.mask.total
    assert res.mask.kept == round(0.1 * total) and len(masks) == 3
    assert [m.kept for m, _ in masks] == cts_mod.stage_plan(total, 0.9, 3)
    for (m, allowed) in masks[1:]:
        assert not any((m[n] & ~allowed[n]).any() for n in m)  # a pruned weight never comes back
    assert [r["steps"] for r in res.info["stages"]] == [2, 2, 2]  # the search length split between stages
    assert all((m.reshape(m.shape[0], -1).sum(1) >= 1).all() for m in res.mask.values())
    if start == "rewind":
        assert res.schedule.start_epoch == 1  # retrained from the rewind weights, not the stage-tuned ones


def test_magnitude_prior_starts_each_gate_at_its_magnitude_quantile():
    from ticketforge.search.cts import start_logits

    def magnitude_prior(density, w):
        return start_logits(density, {n: t.shape for n, t in w.items()}, w)

    w = {"a": torch.tensor([[0.1, 3.0], [0.5, 2.0]]), "b": torch.tensor([1e-4, 2e-4, 5e-5, 3e-4])}
    logits = magnitude_prior(0.5, w)
    # at density 0.5 the keep probability is the quantile (rank + 0.5) / n, whatever the layer's scale
    assert torch.allclose(torch.sigmoid(logits["a"]), torch.tensor([[0.125, 0.875], [0.375, 0.625]]))
    assert torch.allclose(torch.sigmoid(logits["b"]), torch.tensor([0.375, 0.625, 0.125, 0.875]))
    # a lower density shifts every logit by the same amount
    low = magnitude_prior(0.1, w)
    assert torch.allclose(low["a"] - logits["a"], torch.full((2, 2), math.log(0.1 / 0.9)))


def test_cts_with_a_magnitude_prior_and_no_search_keeps_each_layers_largest_weights(make_ctx):
    """search.prior=magnitude with a search too short to move the logits: the ticket is layer-wise
    magnitude pruning (each layer's top weights, every layer at about the target density)."""
    ctx = make_ctx(["search.prior=magnitude", "search.steps=1", "search.min_steps=0", "search.lr=1e-6",
                    "search.sparsity=0.8"])
    weights = {n: w.detach().abs().clone() for n, w in prunable(ctx.model).items()}
    res = structures.find_ticket(ctx)
    for n, w in weights.items():
        kept = res.mask[n]
        if 0 < int(kept.sum()) < w.numel():
            assert float(w[kept].min()) >= float(w[~kept].max()) - 1e-12, n
        assert abs(float(kept.float().mean()) - 0.2) < 0.05, n
    plain = structures.find_ticket(make_ctx(["search.steps=1", "search.min_steps=0", "search.lr=1e-6",
                                             "search.sparsity=0.8"]))
    assert any(not torch.equal(plain.mask[n], res.mask[n]) for n in weights)


def test_prior_is_a_cts_key():
    from ticketforge import recipe as recipes

    assert recipes.resolve("cts-2to4", ["search.prior=magnitude"]).search.prior == "magnitude"
    with pytest.raises(UserError, match="prior"):
        recipes.resolve("magnitude", ["search.prior=magnitude"])


def test_a_magnitude_prior_on_units_without_a_magnitude_is_refused(make_ctx):
    import dataclasses

    from ticketforge import recipe as recipes

    ctx = make_ctx()
    ctx = dataclasses.replace(ctx, recipe=recipes.resolve("cts-blocks", ["search.prior=magnitude", "search.steps=2"]))
    with pytest.raises(UserError, match="prior"):
        structures.find_ticket(ctx)


def test_staged_cts_starts_each_stage_from_the_prior(make_ctx):
    """With a search too short to move the logits, every stage keeps each layer's largest weights."""
    ctx = make_ctx(["search.stages=2", "search.stage_epochs=0", "search.prior=magnitude", "search.steps=2",
                    "search.min_steps=0", "search.lr=1e-6", "search.sparsity=0.8"])
    weights = {n: w.detach().abs().clone() for n, w in prunable(ctx.model).items()}
    res = structures.find_ticket(ctx)
    assert res.mask.kept == round(0.2 * sum(w.numel() for w in weights.values()))
    for n, w in weights.items():
        kept = res.mask[n]
        if 0 < int(kept.sum()) < w.numel():
            assert float(w[kept].min()) >= float(w[~kept].max()) - 1e-12, n
