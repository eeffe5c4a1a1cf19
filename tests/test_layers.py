"""Layer pruning: which blocks are removable, that removing one is exact, and the whole recipe:
fewer Conv nodes and parameters in model.onnx, a ticket.pt that rebuilds, clear errors."""
import onnx
import pytest
import torch
from click.testing import CliRunner
from torch import nn

from ticketforge import cli, recipe as recipe_mod
from ticketforge.errors import UserError
from ticketforge.models import build
from ticketforge.pipeline import Job, compress
from ticketforge.structures.blocks.residual import choose, gated_version, remove_blocks, removable_blocks, removed_version
from ticketforge.ui import UI

from tests.tiny import FAST, TINY, saved, small_digits


class Res(nn.Module):
    """A user's block, as the acceptance check writes it: the ReLU follows the add."""

    def __init__(self, c):
        super().__init__()
        self.f = nn.Sequential(nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c), nn.ReLU(), nn.Conv2d(c, c, 3, padding=1))

    def forward(self, x):
        return torch.relu(x + self.f(x))


class PlainAdd(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.f = nn.Conv2d(c, c, 1)

    def forward(self, x):
        out = self.f(x)
        out += x
        return out


class Projected(nn.Module):
    """Shortcut through a conv: removing the branch would not leave x."""

    def __init__(self, c):
        super().__init__()
        self.f, self.g = nn.Conv2d(c, c, 3, padding=1), nn.Conv2d(c, c, 1)

    def forward(self, x):
        return torch.relu(self.g(x) + self.f(x))


@pytest.mark.parametrize("block, rest", [(Res(4), torch.relu), (PlainAdd(4), lambda x: x)])
def test_removing_a_block_zeroes_its_branch_exactly(block, rest):
    x = torch.randn(3, 4, 5, 5)
    removed = removed_version(block)
    assert removed is not None and not list(removed.parameters())
    assert torch.equal(removed(x), rest(x))
    gated = gated_version(block.eval())
    assert torch.allclose(gated(x), block(x))
    gated.gate.zero_()
    assert torch.allclose(gated(x), rest(x))


def test_projected_shortcut_is_not_removable():
    assert removed_version(Projected(4)) is None
    assert removable_blocks(nn.Sequential(Projected(4), Res(4))) == ["1"]


@pytest.mark.parametrize("arch, expected", [
    ("digits-resnet", ["1", "3"]),                          # the stride-2 block has a conv shortcut
    ("resnet20", ["1", "2", "3", "5", "6", "8", "9"]),      # 9 blocks, 2 downsampling
    ("vit", ["blocks.0", "blocks.1"]),                      # two residual adds per block
])
def test_builtin_blocks_found(arch, expected):
    assert removable_blocks(build(arch, TINY[arch])) == expected


def test_mobilenet_inverted_residuals_found():
    model = build("mobilenetv2", TINY["mobilenetv2"])
    want = [n for n, m in model.named_modules() if type(m).__name__ == "InvertedResidual" and m.residual]
    assert want and removable_blocks(model) == want


def test_budget_selection():
    scores, macs = {"a": 0.1, "b": -1.0, "c": 2.0}, {"a": 30, "b": 30, "c": 30}
    assert choose(scores, macs, 100, blocks=2, target=0.5) == ["b", "a"]
    assert choose(scores, macs, 100, blocks=0, target=0.5) == ["b", "a"]   # 100 -> 70 -> 40
    assert choose(scores, macs, 100, blocks=0, target=0.99) == ["b"]       # always at least one


def test_layers_recipe_removes_blocks_from_the_onnx_graph(tmp_path):
    arch = "resnet20"
    recipe = recipe_mod.resolve("layers", FAST + ["finetune.epochs=1", "search.steps=4", "search.blocks=2"])
    report = compress(Job(model_path=saved(arch, tmp_path / "m.pt"), recipe=recipe,
                          data=small_digits(tmp_path / "d.npz"), arch=arch, arch_kwargs=TINY[arch],
                          out=tmp_path / "out", ui=UI(quiet=True)))
    dense, small = (onnx.load(str(tmp_path / "out" / f)) for f in ("dense.onnx", "model.onnx"))

    def convs(m):
        return sum(n.op_type == "Conv" for n in m.graph.node)

    assert convs(small) == convs(dense) - 4  # two blocks of two 3x3 convs each
    assert report["params"]["compressed"] < report["params"]["dense"]
    assert report["macs"]["compressed"] < report["macs"]["dense"]
    removed = report["search"]["removed"]
    # the same blocks (the search lists them by score, convert in the model's order)
    assert len(removed) == 2 and sorted(report["convert"]["removed_blocks"]) == sorted(removed)
    assert report["latency"] and report["parity"] < 1e-3
    # ticket.pt rebuilds: a fresh model, the same blocks removed, then the weights
    ticket = torch.load(tmp_path / "out" / "ticket.pt", weights_only=True)
    assert [(c["structure"], sorted(c["spec"]["removed_blocks"])) for c in ticket["structures"]] == [("blocks", sorted(removed))]
    assert set(ticket["structures"][0]["spec"]["calls"]) >= set(removed)  # how each block was called: it rebuilds
    model = remove_blocks(build(arch, TINY[arch]), ticket["structures"][0]["spec"]["removed_blocks"])
    model.load_state_dict(ticket["state_dict"])
    assert len(model.state_dict()) == len(ticket["state_dict"])


def test_target_macs_budget(tmp_path):
    arch = "digits-resnet"
    recipe = recipe_mod.resolve("layers", FAST + ["finetune.epochs=0", "search.steps=2", "search.target_macs=0.99"])
    report = compress(Job(model_path=saved(arch, tmp_path / "m.pt"), recipe=recipe,
                          data=small_digits(tmp_path / "d.npz"), arch=arch, arch_kwargs=TINY[arch],
                          out=tmp_path / "out", ui=UI(quiet=True)))
    assert len(report["search"]["removed"]) == 1  # the default removes at least one block
    assert report["search"]["macs_kept_fraction"] < 1


PLAIN = """
from torch import nn
def plain():
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(256, 10))
"""


def test_model_without_removable_blocks_is_a_clear_error(tmp_path):
    (tmp_path / "plainnet.py").write_text(PLAIN)
    exec(PLAIN, ns := {})
    torch.save(ns["plain"]().state_dict(), tmp_path / "m.pt")
    small_digits(tmp_path / "d.npz")
    result = CliRunner().invoke(cli.cli, ["compress", "m.pt", "--arch", "plainnet:plain", "--data", "d.npz",
                                          "--recipe", "layers", "--out", "out"])
    assert result.exit_code == 2
    assert "no removable residual block" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "out").exists()


def test_too_many_blocks_and_mismatched_structure_are_user_errors(tmp_path):
    arch = "digits-resnet"
    recipe = recipe_mod.resolve("layers", FAST + ["search.blocks=3"])
    with pytest.raises(UserError, match="only 2 removable blocks"):
        compress(Job(model_path=saved(arch, tmp_path / "m.pt"), recipe=recipe, data=small_digits(tmp_path / "d.npz"),
                     arch=arch, arch_kwargs=TINY[arch], out=tmp_path / "out", ui=UI(quiet=True)))
    assert not (tmp_path / "out").exists()
    # method and structure are chosen apart: the recipe's CTS on another structure, its block budget gone
    other = recipe_mod.resolve("layers", ["convert.structure=unstructured"])
    assert (other.search.method, other.convert.structure) == ("cts", "unstructured")
    with pytest.raises(UserError, match="'blocks' is searched by the methods cts, similarity; got search.method 'magnitude'"):
        recipe_mod.resolve("magnitude", ["convert.structure=blocks"])
