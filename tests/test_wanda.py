"""The LM field's one-shot baselines as search methods: wanda (|W| x input norm), sparsegpt (layer-wise
OBS with the kept weights updated) and similarity (ShortGPT's Block Influence for blocks)."""
import json

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from ticketforge import recipe as recipes, structures
from ticketforge.data import DataBundle
from ticketforge.loading import LoadedModel
from ticketforge.masks import keep_count
from ticketforge.search.base import SearchContext
from ticketforge.search.calibration import calibration
from ticketforge.search.magnitude import magnitude_scores
from ticketforge.search.sparsegpt import obs_prune, sparsegpt
from ticketforge.search.wanda import wanda, wanda_scores
from ticketforge.structures.nm import pattern as nm

from tests._tiny import FAST
from tests.tiny import small_digits


def context(model, x, recipe="wanda", sets=(), inputs=("input",)):
    y = torch.zeros(len(x), dtype=torch.long)
    bundle = DataBundle(train=TensorDataset(x, y), val=TensorDataset(x[:4], y[:4]), spec="test", inputs=list(inputs))
    r = recipes.resolve(recipe, [f"search.calibration_samples={len(x)}", "search.batch_size=16", *sets])
    return SearchContext(model=model.eval(), loaded=LoadedModel(model=model), data=bundle, recipe=r,
                         device=torch.device("cpu"))


def features(n=64, f=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, f, generator=g) * torch.linspace(0.1, 3, f)


# ---------------------------------------------------------------- wanda

def test_wanda_score_is_weight_magnitude_times_input_norm():
    torch.manual_seed(0)
    model, x = nn.Sequential(nn.Linear(16, 8)), features()
    ctx = context(model, x)
    scores = wanda_scores(model, ["0.weight"], calibration(ctx, model))
    by_hand = model[0].weight.detach().abs() * x.pow(2).sum(0).sqrt()
    torch.testing.assert_close(scores["0.weight"], by_hand)


def test_conv_input_norm_is_per_channel_over_batch_and_positions_and_per_group():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(4, 6, 3, padding=1, groups=2))
    x = torch.randn(8, 4, 5, 5) * torch.tensor([1.0, 10.0, 0.1, 3.0])[:, None, None]
    scores = wanda_scores(model, ["0.weight"], calibration(context(model, x), model))
    norms = x.pow(2).sum((0, 2, 3)).sqrt()  # one per input channel
    w = model[0].weight.detach().abs()      # (6, 2, 3, 3): outputs 0-2 read channels 0-1, outputs 3-5 channels 2-3
    expected = torch.cat([w[:3] * norms[:2, None, None], w[3:] * norms[2:, None, None]])
    torch.testing.assert_close(scores["0.weight"], expected)


def test_every_output_row_keeps_the_same_fraction():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 12), nn.ReLU(), nn.Linear(12, 5))
    result = wanda(context(model, features(), sets=["search.sparsity=0.75"]))
    for name, m in result.mask.items():
        per_row = m.reshape(m.shape[0], -1).sum(1)
        assert (per_row == keep_count(m[0].numel(), 0.75)).all(), name
    assert result.info["method"] == "wanda"


def test_a_feature_with_a_huge_input_norm_keeps_its_small_weights():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 8))
    with torch.no_grad():
        model[0].weight.uniform_(0.5, 1.0)
        model[0].weight[:, 3] = 0.05  # the smallest weight of every row...
    x = features()
    x[:, 3] *= 200  # ...multiplies the largest input
    ctx = context(model, x, sets=["search.sparsity=0.5"])
    kept = wanda(ctx).mask["0.weight"]
    assert kept[:, 3].all()
    by_magnitude = magnitude_scores(model)["0.weight"]
    assert not (by_magnitude >= by_magnitude.median()).reshape(8, 16)[:, 3].any()  # magnitude drops them all


class Tokens(nn.Module):
    """Token ids packed with their attention mask (N, 2, L), as ticketforge.data packs them."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(10, 8)
        self.lin = nn.Linear(8, 4)

    def forward(self, x):
        return self.lin(self.emb(x[:, 0])).mean(1)


def test_padded_tokens_do_not_count_in_the_input_norms():
    torch.manual_seed(0)
    model = Tokens()
    with torch.no_grad():
        model.emb.weight[0] = 1000.0  # the padding id: huge, if it counted
    ids = torch.randint(1, 10, (6, 5))
    mask = torch.ones(6, 5, dtype=torch.long)
    mask[:, 3:] = 0
    ids[mask == 0] = 0
    x = torch.stack([ids, mask], 1)
    ctx = context(model, x, inputs=("input", "attention_mask"))
    scores = wanda_scores(model, ["lin.weight"], calibration(ctx, model))
    tokens = model.emb(ids[mask == 1]).detach()
    torch.testing.assert_close(scores["lin.weight"], model.lin.weight.detach().abs() * tokens.pow(2).sum(0).sqrt())


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 3))


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_two_four_masks_are_valid(method):
    model, x = mlp(), features(f=32)
    ctx = context(model, x, recipe=f"{method}-2to4")
    result = structures.find_ticket(ctx)
    eligible, _ = nm.split_layers(model)
    assert eligible == ["0.weight", "2.weight"]
    for n in eligible:
        groups = result.mask[n].reshape(-1, 4)
        assert (groups.sum(1) == 2).all(), n
        if method == "sparsegpt":  # it zeroes what it removes, and updates what it keeps
            assert not dict(result.model.named_parameters())[n][~result.mask[n]].any()
    assert result.mask["4.weight"].all()  # not eligible: dense
    if method == "wanda":  # the structure chooses within its groups from the Wanda scores
        expected = nm.nm_mask(wanda_scores(model, ["0.weight"], calibration(ctx, model))["0.weight"])
        assert torch.equal(result.mask["0.weight"], expected)


# ---------------------------------------------------------------- sparsegpt

def correlated(n=256, f=64, seed=0):
    """Inputs near a 16-dimensional subspace (as a network's hidden features are): what the kept
    weights' update makes up for."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 16, generator=g) @ torch.randn(16, f, generator=g) + 0.3 * torch.randn(n, f, generator=g)


def test_sparsegpt_reconstructs_better_than_magnitude_without_update():
    torch.manual_seed(0)
    model, x = nn.Sequential(nn.Linear(64, 32, bias=False)), correlated()
    dense = model[0].weight.detach().clone()
    result = sparsegpt(context(model, x, recipe="sparsegpt"))
    pruned, kept = model[0].weight.detach(), result.mask["0.weight"]
    assert kept.float().mean() == 0.5 and not pruned[~kept].any()
    error = (x @ (dense - pruned).T).norm()
    by_magnitude = dense * (dense.abs() >= dense.abs().flatten().median())  # same density, no update
    assert error < 0.6 * (x @ (dense - by_magnitude).T).norm()  # measured: 0.37
    assert result.info["reconstruction_error"]["0.weight"] == pytest.approx(
        float(error ** 2 / (x @ dense.T).norm() ** 2), rel=1e-3)


def test_sparsegpt_prunes_each_layer_on_the_inputs_of_the_pruned_layers_before_it():
    torch.manual_seed(0)
    model, x = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 16, bias=False)), correlated()
    second = model[2].weight.detach().clone()
    sparsegpt(context(model, x, recipe="sparsegpt"))
    hidden = model[1](model[0](x)).detach()  # the first layer as sparsegpt left it
    expected, _ = obs_prune(second[None], (hidden.T @ hidden)[None], sparsity=0.5)
    torch.testing.assert_close(model[2].weight.detach(), expected[0], atol=1e-5, rtol=1e-4)


# ---------------------------------------------------------------- similarity

class Residual(nn.Module):
    def __init__(self, d, scale=1.0):
        super().__init__()
        self.f = nn.Sequential(nn.Linear(d, d), nn.ReLU(), nn.Linear(d, d))
        with torch.no_grad():
            self.f[2].weight.mul_(scale)
            self.f[2].bias.mul_(scale)

    def forward(self, x):
        return x + self.f(x)


def test_block_influence_removes_the_identity_like_block_first():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 16), Residual(16, 3.0), Residual(16, 1e-3), Residual(16, 3.0),
                          nn.Linear(16, 3))
    ctx = context(model, features(), recipe="similarity-blocks", sets=["search.blocks=1"])
    result = structures.find_ticket(ctx)
    assert result.info["removed"] == ["2"]
    influence = result.info["block_influence"]
    assert influence["2"] < 1e-3 < min(influence["1"], influence["3"])
    assert result.info["scores"] == pytest.approx(influence, abs=1e-6)


# ---------------------------------------------------------------- from the command line

@pytest.mark.parametrize("method, recipe, section", [("wanda", "magnitude", None), ("wanda", "magnitude-2to4", "2:4"),
                                                     ("sparsegpt", "magnitude-2to4", "2:4")])
def test_compress_with_the_one_shot_methods_from_the_cli(tiny, cli, monkeypatch, method, recipe, section):
    monkeypatch.chdir(tiny)
    out = tiny / f"out-{method}-{recipe}"
    result = cli("compress", "mlp.pt", *FAST, "--recipe", recipe, "--set", f"search.method={method}",
                 "--set", "search.calibration_samples=64", "--epochs", "0", "--quiet", "--out", out)
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    assert report["search"]["method"] == method and report["search"]["calibration_samples"] == 64
    if section:
        assert report["structure"][section]["onnx"]["bad"] == 0


RESIDUAL_MLP = """
from torch import nn

class Res(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.f = nn.Sequential(nn.Linear(d, d), nn.ReLU(), nn.Linear(d, d))

    def forward(self, x):
        return x + self.f(x)

def Net():
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 32), Res(32), Res(32), nn.Linear(32, 10))
"""


def test_compress_with_similarity_on_blocks_from_the_cli(tmp_path, cli):
    (tmp_path / "resmlp.py").write_text(RESIDUAL_MLP)  # --arch resmlp:Net, from the current folder
    built = {}
    exec(RESIDUAL_MLP, built)
    torch.save(built["Net"]().state_dict(), tmp_path / "m.pt")
    out = tmp_path / "out"
    result = cli("compress", tmp_path / "m.pt", "--arch", "resmlp:Net", "--data", small_digits(tmp_path / "d.npz"),
                 "--device", "cpu", "--recipe", "similarity-blocks", "--set", "search.blocks=1",
                 "--set", "search.calibration_samples=32", "--epochs", "0", "--set", "validate.repeats=3",
                 "--set", "validate.warmup=0", "--set", "validate.latency_batches=[1]", "--quiet", "--out", out)
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    assert report["search"]["method"] == "similarity" and len(report["search"]["removed"]) == 1
    assert list(report["convert"]["removed_blocks"]) == report["search"]["removed"]
