"""Peer complaint 3: coupled layers break (residual add, concat, depthwise and grouped convs, a
single-output-channel conv mistaken for depthwise). Each net is shrunk and must compute exactly
what its masked version computes."""
import pytest
import torch

from tests.channel_nets import Concat, Depthwise, Grouped, Residual, SingleChannel, masked_and_shrunk, randomize_bn


def check_equal(masked, shrunk, x):
    with torch.no_grad():
        assert torch.allclose(masked(x), shrunk(x), atol=1e-4)


def test_residual_add_shares_one_group():
    x = torch.randn(4, 3, 8, 8)
    plan, keep, masked, shrunk = masked_and_shrunk(randomize_bn(Residual()), x)
    shared = [g for g in plan.groups if {m.module for m in g.of("out")} == {"stem.0", "f.1.0"}]
    assert len(shared) == 1, "the stem and the branch that feeds the add must share one gate"
    assert shrunk.stem[0].out_channels == shrunk.f[1][0].out_channels == shrunk.head[2].in_features == 8
    check_equal(masked, shrunk, x)


def test_concat_maps_consumer_columns():
    x = torch.randn(4, 3, 8, 8)
    plan, keep, masked, shrunk = masked_and_shrunk(randomize_bn(Concat()), x)
    assert shrunk.a[0].out_channels == 4 and shrunk.b[0].out_channels == 6 and shrunk.mix[0].in_channels == 10
    check_equal(masked, shrunk, x)


def test_depthwise_follows_its_producer():
    x = torch.randn(4, 3, 8, 8)
    plan, keep, masked, shrunk = masked_and_shrunk(randomize_bn(Depthwise()), x)
    hidden = [g for g in plan.groups if "expand.0" in {m.module for m in g.of("out")}]
    assert len(hidden) == 1 and {m.module for m in hidden[0].of("out")} == {"expand.0", "dw.0"}
    assert shrunk.dw[0].groups == shrunk.dw[0].in_channels == shrunk.dw[0].out_channels == 16
    check_equal(masked, shrunk, x)


def test_grouped_conv_keeps_its_groups_and_shrinks_with_the_rest():
    """A grouped conv (groups=4 over 16 channels) and its producer lose the same positions in every
    group, so the groups stay intact (4 groups of 2 channels each after halving)."""
    x = torch.randn(4, 3, 8, 8)
    plan, keep, masked, shrunk = masked_and_shrunk(randomize_bn(Grouped()), x)
    assert not plan.skipped
    assert shrunk.g[0].groups == 4 and shrunk.g[0].weight.shape == (8, 2, 3, 3)
    assert shrunk.stem[0].out_channels == 8 and shrunk.tail[0].out_channels == 12
    check_equal(masked, shrunk, x)


def test_single_channel_conv_is_not_depthwise():
    x = torch.randn(4, 1, 6, 6)
    plan, keep, masked, shrunk = masked_and_shrunk(randomize_bn(SingleChannel()), x)
    assert shrunk.stem[0].weight.shape == (4, 1, 3, 3) and shrunk.stem[0].groups == 1
    assert shrunk.squeeze[0].in_channels == 4 and shrunk.squeeze[0].out_channels == 1
    # a 1-channel group has nothing to remove; the Linear after flatten loses whole spatial blocks
    assert shrunk.expand[0].out_channels == 4 and shrunk.head[1].in_features == 4 * 36
    check_equal(masked, shrunk, x)


@pytest.mark.parametrize("net", [Residual, Concat, Depthwise, Grouped])
def test_final_layer_never_pruned(net):
    x = torch.randn(2, 3, 8, 8)
    plan, *_ , shrunk = masked_and_shrunk(randomize_bn(net()), x)
    assert shrunk(x).shape == (2, 5)
    assert all(m.module != "head.2" or m.kind == "in" for g in plan.groups for m in g.members)
