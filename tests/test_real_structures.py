"""Structures on the shapes real models come in (issue 12), in plain torch so that they run without
transformers: residual adds in a submodule that gets the block's input as a second argument, a
post-norm block, an extra tensor argument and keyword flags, a child fx cannot trace, a block that
also returns attention weights; attention heads; grouped convs."""
from __future__ import annotations

import copy

import torch
from torch import nn

from ticketforge.structures.blocks.residual import (gate_name, install_gates, recorded_calls, removable_blocks,
                                                    remove_blocks)
from ticketforge.structures.channels import graph, select, spec, surgery


class Output(nn.Module):
    """Like HF's BertOutput: the add of the block's input happens here, on a second argument."""

    def __init__(self, d):
        super().__init__()
        self.dense, self.norm = nn.Linear(2 * d, d), nn.LayerNorm(d)

    def forward(self, hidden, input_tensor):
        return self.norm(self.dense(hidden) + input_tensor)


class Untraceable(nn.Module):
    """Python control flow on a tensor value: fx cannot trace it, its parent must still be found."""

    def __init__(self, d):
        super().__init__()
        self.fc = nn.Linear(d, 2 * d)

    def forward(self, x):
        if float(x.detach().abs().sum()) >= 0:
            return torch.relu(self.fc(x))
        return self.fc(x)


class PostNormLayer(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.attn, self.norm1 = nn.Linear(d, d), nn.LayerNorm(d)
        self.inter, self.out = Untraceable(d), Output(d)

    def forward(self, hidden, mask=None, output_attentions=False, **kwargs):
        a = self.attn(hidden) * (mask.unsqueeze(-1) if mask is not None else 1)
        h = self.norm1(a + hidden)
        out = self.out(self.inter(h), h)
        return (out, a) if output_attentions else (out,)


class Net(nn.Module):
    def __init__(self, d=16, layers=3):
        super().__init__()
        self.layers = nn.ModuleList(PostNormLayer(d) for _ in range(layers))
        self.head = nn.Linear(d, 4)

    def forward(self, x):
        mask = (x[..., 0] > -10).float()
        for layer in self.layers:
            x = layer(x, mask, output_attentions=True)[0]
        return self.head(x.mean(1))


def test_post_norm_block_with_mask_kwargs_and_an_untraceable_child():
    torch.manual_seed(0)
    model, x = Net().eval(), torch.randn(3, 5, 16)
    names = removable_blocks(model, x)
    assert names == ["layers.0", "layers.1", "layers.2"]
    removed = remove_blocks(copy.deepcopy(model), ["layers.1"], example=x)
    block = removed.layers[1]
    # post-norm: what stays is norm(norm1(x)), with the norms' weights and nothing else
    assert sorted(n for n, _ in block.named_parameters()) == [
        "rest.norm1.bias", "rest.norm1.weight", "rest.out.norm.bias", "rest.out.norm.weight"]
    h = torch.randn(2, 5, 16)
    want = model.layers[1].out.norm(model.layers[1].norm1(h))
    got = block(h, torch.ones(2, 5), output_attentions=True)
    assert torch.allclose(got[0], want, atol=1e-6) and got[1] is None  # the attention output is gone with it
    # the gate at 0 is the removed block, at 1 the block itself; a ticket's recorded calls rebuild it
    gated = install_gates(copy.deepcopy(model), ["layers.1"], x)
    assert torch.allclose(gated(x), model(x), atol=1e-6)
    gated.get_buffer(gate_name("layers.1")).fill_(0)
    assert torch.allclose(gated(x), removed(x), atol=1e-6)
    rebuilt = remove_blocks(copy.deepcopy(model), ["layers.1"], calls=recorded_calls(removed))
    assert torch.equal(rebuilt(x), removed(x))


class Attention(nn.Module):
    """HF's layout: q/k/v/o projections, heads inferred from the width by view(..., -1, head_dim)."""

    def __init__(self, d=32, heads=4):
        super().__init__()
        self.num_attention_heads, self.head_dim = heads, d // heads
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = (nn.Linear(d, d) for _ in range(4))
        self.bias_table = nn.Parameter(torch.randn(7, heads))  # per-head, like Swin's

    def forward(self, x):
        b, t, _ = x.shape
        q, k, v = (p(x).view(b, t, -1, self.head_dim).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj))
        bias = self.bias_table[:t].t().unsqueeze(-1)  # heads x t x 1
        att = torch.softmax(q @ k.transpose(-1, -2) / self.head_dim ** 0.5 + bias, -1)
        return self.o_proj((att @ v).transpose(1, 2).reshape(b, t, -1))


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = Attention()
        self.fc1, self.fc2, self.head = nn.Linear(32, 64), nn.Linear(64, 32), nn.Linear(32, 3)

    def forward(self, x):
        x = x + self.attn(x)
        x = x + self.fc2(torch.relu(self.fc1(x)))
        return self.head(x.mean(1))


def test_whole_heads_are_removed_with_their_table_column():
    torch.manual_seed(0)
    model, x = Tiny().eval(), torch.randn(2, 6, 32)
    plan = graph.discover(model, x)
    heads = [g for g in plan.groups if g.kind == "heads"]
    assert len(heads) == 1 and heads[0].size == 4 and heads[0].unit == 8
    assert {m.module for m in heads[0].members} == {"attn.q_proj", "attn.k_proj", "attn.v_proj", "attn.o_proj",
                                                     "attn.bias_table"}
    keep = [torch.tensor([0, 2]) if g.kind == "heads" else torch.arange(g.size) for g in plan.groups]
    masked = copy.deepcopy(model)
    surgery.channel_mask(masked, plan, keep).apply(masked)
    small = surgery.shrink(masked, plan, keep, x)
    assert small.attn.num_attention_heads == 2 and small.attn.q_proj.out_features == 16
    assert small.attn.bias_table.shape == (7, 2) and torch.equal(small.attn.bias_table, model.attn.bias_table[:, [0, 2]])
    assert torch.allclose(masked(x), small(x), atol=1e-5)
    rebuilt = spec.apply_spec(Tiny().eval(), spec.arch_spec(small))
    rebuilt.load_state_dict(small.state_dict())
    assert rebuilt.attn.num_attention_heads == 2 and torch.allclose(rebuilt(x), small(x))


def test_grouped_conv_keeps_its_groups():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 32, 1), nn.BatchNorm2d(32), nn.ReLU(),
                          nn.Conv2d(32, 32, 3, padding=1, groups=4), nn.BatchNorm2d(32), nn.ReLU(),
                          nn.Conv2d(32, 16, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 3)).eval()
    x = torch.randn(2, 3, 8, 8)
    plan = graph.discover(model, x)
    g = next(g for g in plan.groups if any(m.module == "3" for m in g.members))
    assert g.size == 8 and g.unit == 4  # 8 positions in each of the 4 conv groups
    scores = [torch.arange(grp.size, dtype=torch.float) for grp in plan.groups]
    keep, info = select.select(plan, scores, 0.6, 4)
    masked = copy.deepcopy(model)
    surgery.channel_mask(masked, plan, keep).apply(masked)
    small = surgery.shrink(masked, plan, keep, x)
    assert small[3].groups == 4 and small[3].out_channels < 32 and small[3].out_channels % 4 == 0
    assert torch.allclose(masked(x), small(x), atol=1e-5)
