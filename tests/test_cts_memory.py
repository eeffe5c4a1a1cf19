"""What the CTS search holds in memory (issue 21, docs/memory.md): live bytes counted by torch's
profiler and by weak references, not by the process's resident set; and that the memory-lean
forward computes exactly what substituting the masked weights computed."""

import pytest
import torch
from torch import nn
from torch.func import functional_call
from torch.profiler import ProfilerActivity, profile
from torch.utils.data import TensorDataset

from ticketforge import recipe as recipes
from ticketforge.data import DataBundle
from ticketforge.loading import LoadedModel
from ticketforge.masks import prunable
from ticketforge.search.base import SearchContext
from ticketforge.search.cts import Draw, GradBalance, _WeightGates, concrete_sample, concrete_search, cts, weight_logits


def peak_live_bytes(fn):
    """fn()'s result, and the most CPU bytes its ops held at once beyond what existed before
    (each op's own allocations net of its frees, summed in time order)."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        result = fn()
    now = peak = 0
    for e in sorted(prof.events(), key=lambda e: e.time_range.start):
        now += e.self_cpu_memory_usage
        peak = max(peak, now)
    return result, peak


def _mlp_ctx(sets=()):
    """Weights large against the activations (batch 4), in ten layers: what the search holds per
    weight shows, apart from one layer's temporaries."""
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(32, 64, generator=g), torch.randint(0, 10, (32,), generator=g)
    torch.manual_seed(0)
    layers = [nn.Linear(64, 256), nn.ReLU()] + [m for _ in range(8) for m in (nn.Linear(256, 256), nn.ReLU())]
    model = nn.Sequential(*layers, nn.Linear(256, 10)).eval()
    recipe = recipes.resolve("cts", ["search.batch_size=4", "search.steps=3", "search.check_every=1", *sets])
    bundle = DataBundle(train=TensorDataset(x, y), val=TensorDataset(x[:8], y[:8]), spec="test")
    return SearchContext(model=model, loaded=LoadedModel(model=model), data=bundle, recipe=recipe,
                         device=torch.device("cpu"))


def test_search_holds_the_logits_adams_moments_and_one_gradient_and_no_more():
    """Logits (1x the gated weights, made before), Adam's two moments (2x) and the gradient (1x): a
    step may add 3x the gated weights' bytes, the stop rule's two top-k sets (bools, 0.5x) and a
    layer's worth of temporaries. Holding the masks, the masked weights, GRADBALANCE's lists and a
    concatenated top-k as well, the search before issue 21 peaked at 8.4x here."""
    ctx = _mlp_ctx()
    gated = sum(w.numel() * 4 for w in prunable(ctx.model).values())
    largest = max(w.numel() * 4 for w in prunable(ctx.model).values())
    logits = weight_logits(ctx.model, 0.1)
    costs = {n: torch.ones(()) for n in logits}
    keep = round(0.1 * gated / 4)
    _, peak = peak_live_bytes(lambda: concrete_search(ctx, logits, costs, float(keep), None, keep=keep))
    assert peak <= 3.5 * gated + 3 * largest, (peak / gated, largest / gated)


def test_logits_and_adam_state_stay_fp32():
    """The gates' logits and Adam's moments are fp32 (bf16 moments lose Adam's second-moment
    increments of 0.1% to rounding), and are trained in place."""
    ctx = _mlp_ctx()
    logits = weight_logits(ctx.model, 0.1)
    trained, _ = concrete_search(ctx, logits, {n: torch.ones(()) for n in logits}, 100.0, None)
    assert all(t.dtype == torch.float32 and t.data_ptr() == logits[n].data_ptr() for n, t in trained.items())


def _models():
    import transformers as T

    torch.manual_seed(0)
    bert = T.BertForSequenceClassification(T.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2,
                                                        num_attention_heads=4, intermediate_size=64, num_labels=3))
    from ticketforge import models
    return [("bert", bert, torch.randint(1, 100, (2, 7))),
            ("cnn", models.build("digits-resnet", {"width": 4}), torch.rand(3, 1, 8, 8))]


@pytest.mark.parametrize("checkpoint", [False, True])
def test_weight_gates_compute_what_substituted_masked_weights_do_and_keep_none(checkpoint):
    pytest.importorskip("transformers")
    for name, model, x in _models():
        model.eval()
        for p in model.parameters():
            p.requires_grad_(False)
        weights = prunable(model)
        names = list(weights)
        order = [n for n, _ in model.named_parameters()]
        logits = [torch.randn_like(weights[n]).requires_grad_() for n in names]
        draw = Draw(logits, 1.0)

        def out(o):
            return o.logits if hasattr(o, "logits") else o

        ref = out(functional_call(model, {n: weights[n] * draw[i] for i, n in enumerate(names)}, (x,)))
        ref_grads = torch.autograd.grad(ref.square().sum(), logits)
        with _WeightGates(model, names, checkpoint) as gates:
            with torch.no_grad():
                teacher = out(gates.teacher(x))
            student = out(gates.student(draw, x))
            # nothing holds a masked weight between the forward and the backward pass
            assert gates.made and all(ref() is None for ref, *_ in gates.made.values()), name
            grads = torch.autograd.grad(student.square().sum(), logits)
        assert torch.equal(student, ref), name
        assert all(torch.equal(a, b) for a, b in zip(grads, ref_grads)), name
        assert torch.equal(teacher, out(model(x))), name
        # the model comes back as it was: the same Parameter objects, in the same order
        assert [n for n, _ in model.named_parameters()] == order and all(
            type(w) is nn.Parameter and prunable(model)[n] is w for n, w in weights.items())


def test_a_weight_shared_by_two_layers_is_gated_in_both():
    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(6, 6), nn.Linear(6, 6)
            self.b.weight = self.a.weight

        def forward(self, x):
            return self.b(torch.relu(self.a(x)))

    torch.manual_seed(0)
    model, x = Shared().eval(), torch.randn(4, 6)
    for p in model.parameters():
        p.requires_grad_(False)
    a = torch.randn(6, 6, requires_grad=True)
    draw = Draw([a], 1.0)
    masked = model.a.weight * draw[0]
    expected = nn.functional.linear(torch.relu(nn.functional.linear(x, masked, model.a.bias)), masked, model.b.bias)
    with _WeightGates(model, ["a.weight"]) as gates:
        assert torch.equal(gates.student(draw, x), expected)
    assert model.b.weight is model.a.weight and type(model.a.weight) is nn.Parameter


def test_a_draw_is_the_same_sample_each_time_it_is_read_and_differentiates_as_the_sigmoid():
    torch.manual_seed(0)
    a = torch.randn(1000, requires_grad=True)
    draw = Draw([a], 2 / 3)
    m1, m2 = draw[0], draw[0]
    assert torch.equal(m1, m2)
    expected = concrete_sample(a.detach(), 2 / 3, torch.Generator().manual_seed(draw.seeds[0]))
    assert torch.equal(m1, expected)
    c = torch.randn(1000)
    (g,) = torch.autograd.grad((m1 * c).sum(), a)
    assert torch.allclose(g, c * expected * (1 - expected))
    assert not torch.equal(Draw([a], 2 / 3)[0], m1)  # the next step draws afresh


def test_gradbalance_in_place_is_the_list_formula():
    """combine() adds lam x the sparsity gradient into the task gradient one tensor at a time; the
    numbers are those of computing every list first."""
    g = torch.Generator().manual_seed(0)
    logits = [torch.randn(50, 20, generator=g), torch.randn(300, generator=g)]
    costs = [torch.ones(()), torch.full((300,), 0.5)]
    task = [torch.randn(50, 20, generator=g) * 1e-3, torch.randn(300, generator=g) * 1e-3]
    budget = 100.0
    sig = [torch.sigmoid(a) for a in logits]
    s = (torch.stack([(p * c).sum() for p, c in zip(sig, costs)]).sum() / budget - 1.0) * 100.0
    g_s = [(100.0 / budget) * c * p * (1 - p) for p, c in zip(sig, costs)]
    nt = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(t) for t in task]))
    ns = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(t) for t in g_s]))
    lam = nt / ns
    expected = [t + lam * gs for t, gs in zip(task, g_s)]
    combined, s_got = GradBalance(budget).combine(logits, costs, [t.clone() for t in task])
    assert s > 0 and torch.equal(s_got, s)
    assert all(torch.equal(a, b) for a, b in zip(combined, expected))


def test_checkpointed_search_finds_the_same_ticket():
    """search.checkpoint recomputes layers in the backward pass: the same gradients, the same mask."""
    pytest.importorskip("transformers")
    import transformers as T

    def ctx(sets):
        torch.manual_seed(0)
        model = T.BertForSequenceClassification(T.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2,
                                                             num_attention_heads=4, intermediate_size=64,
                                                             num_labels=3)).eval()
        model.register_forward_hook(lambda m, a, o: o.logits)
        g = torch.Generator().manual_seed(0)
        x, y = torch.randint(1, 100, (32, 9), generator=g), torch.randint(0, 3, (32,), generator=g)
        recipe = recipes.resolve("cts", ["search.batch_size=8", "search.steps=6", "search.sparsity=0.8", *sets])
        bundle = DataBundle(train=TensorDataset(x, y), val=TensorDataset(x[:8], y[:8]), spec="test")
        return SearchContext(model=model, loaded=LoadedModel(model=model), data=bundle, recipe=recipe,
                             device=torch.device("cpu"))

    torch.manual_seed(1)
    plain = cts(ctx([]))
    torch.manual_seed(1)
    kept = cts(ctx(["search.checkpoint=true"]))
    assert all(torch.equal(plain.scores[n], kept.scores[n]) for n in plain.scores)
    assert all(torch.equal(plain.mask[n], kept.mask[n]) for n in plain.mask)


def test_checkpointed_search_runs_a_transformers_model_whose_kv_cache_is_on(tmp_path):
    """A GPT-2 handed over through the Python API with use_cache on (the loader turns it off): a
    checkpointed layer's recomputation would append its keys to the cache a second time, and the
    attention mask would no longer fit them. The search turns the cache off while it runs and gives
    the setting back."""
    pytest.importorskip("transformers")
    import numpy as np
    import transformers as T

    from ticketforge import adapt, hf
    from ticketforge.data import check_against_model, load_data

    torch.manual_seed(0)
    model = hf.linear_layers(T.GPT2LMHeadModel(T.GPT2Config(vocab_size=50, n_positions=16, n_embd=16, n_layer=2,
                                                               n_head=2, bos_token_id=0, eos_token_id=0,
                                                               use_cache=True))).eval()
    rng = np.random.default_rng(0)
    mask = np.ones((24, 8), np.int64)
    mask[::2, 5:] = 0
    np.savez(tmp_path / "tokens.npz", x=rng.integers(0, 50, (16, 8)), attention_mask=mask[:16],
             x_val=rng.integers(0, 50, (8, 8)), attention_mask_val=mask[16:])
    bundle = load_data(str(tmp_path / "tokens.npz"))
    io = adapt.fit(model, bundle.inputs, bundle.example(2))
    check_against_model(bundle, model)
    recipe = recipes.resolve("cts", ["search.batch_size=8", "search.steps=2", "search.sparsity=0.5",
                                     "search.checkpoint=true"])
    found = cts(SearchContext(model=model, loaded=LoadedModel(model=model, kind="hf", io=io), data=bundle,
                              recipe=recipe, device=torch.device("cpu")))
    assert 0.45 < found.mask.sparsity < 0.55
    assert model.config.use_cache is True


def test_checkpoint_is_a_cts_weight_search_key():
    from ticketforge.errors import UserError

    recipes.resolve("cts", ["search.checkpoint=true"])
    with pytest.raises(UserError, match="checkpoint"):
        recipes.resolve("magnitude", ["search.checkpoint=true"])


def test_planted_ticket_is_found_through_the_weight_gates():
    """A planted problem: a teacher that uses only a known 5% of a wide layer's weights (the rest
    is zero in it but not in the student's starting weights would be trivial), so the search must
    find which weights carry the output. Unstructured CTS through _WeightGates finds most of them."""
    torch.manual_seed(0)
    n_in, n_out = 64, 32
    teacher = nn.Linear(n_in, n_out, bias=False)
    planted = torch.rand(n_out, n_in) < 0.05
    with torch.no_grad():
        teacher.weight.mul_(planted * 4 + 0.02)  # the planted weights dominate the output
    g = torch.Generator().manual_seed(0)
    x = torch.randn(512, n_in, generator=g)
    y = teacher(x).argmax(1).detach()
    model = nn.Sequential(teacher).eval()
    keep = int(planted.sum())
    recipe = recipes.resolve("cts", ["search.batch_size=64", "search.steps=300", "search.lr=0.1",
                                     f"search.sparsity={1 - keep / planted.numel()}", "search.stop_overlap=1"])
    bundle = DataBundle(train=TensorDataset(x, y), val=TensorDataset(x[:64], y[:64]), spec="test")
    ctx = SearchContext(model=model, loaded=LoadedModel(model=model), data=bundle, recipe=recipe,
                        device=torch.device("cpu"))
    found = cts(ctx)
    hit = float((found.mask["0.weight"] & planted).sum()) / keep
    assert found.mask.kept == keep and hit > 0.8, hit


@pytest.mark.parametrize("name", ["reverse_kl", "forward_kl", "ce"])
def test_a_vocabulary_sized_objective_is_taken_in_chunks_with_the_same_value_and_gradient(name, monkeypatch):
    """A language model's per-token objective over its whole vocabulary: chunked and recomputed in
    the backward pass, it holds about one logits-sized tensor (the gradient) instead of five."""
    from ticketforge.search import cts as cts_mod

    g = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(256, 4096, generator=g), torch.randn(256, 4096, generator=g)
    labels = torch.randint(0, 4096, (256,), generator=g)
    logits_bytes = student.numel() * 4
    results = {}
    for chunk in (1 << 30, 1 << 15):
        monkeypatch.setattr(cts_mod, "OBJECTIVE_CHUNK", chunk)
        s = student.clone().requires_grad_()

        def step():
            loss = cts_mod.objective(name, s, teacher, labels)
            loss.backward()
            return loss.detach()

        loss, peak = peak_live_bytes(step)
        results[chunk] = (loss, s.grad, peak / logits_bytes)
    (whole, g_whole, peak_whole), (chunked, g_chunked, peak_chunked) = results.values()
    assert torch.allclose(whole, chunked, rtol=1e-5)
    assert torch.allclose(g_whole, g_chunked, rtol=1e-4, atol=1e-9)
    assert peak_chunked < 1.3
    assert peak_whole > 1.9  # the unchunked form holds at least the softmax beside the gradient
