"""Channel removal on the built-in families: a MobileNetV2 (inverted residuals, depthwise, linear
projection) and a ViT (MLP hidden width shrinks; attention heads and the residual stream stay whole)."""
import torch

from tests.channel_nets import masked_and_shrunk, randomize_bn
from ticketforge import models


def test_mobilenetv2_shrinks_exactly():
    model = randomize_bn(models.build("mobilenetv2", {"width": 0.25, "last_channels": 64}))
    x = torch.randn(2, 3, 16, 16)
    plan, keep, masked, shrunk = masked_and_shrunk(model, x)
    dws = [m for m in shrunk.modules() if isinstance(m, torch.nn.Conv2d) and m.groups > 1]
    assert dws and all(m.groups == m.in_channels == m.out_channels for m in dws)
    assert sum(p.numel() for p in shrunk.parameters()) < 0.6 * sum(p.numel() for p in model.parameters())
    with torch.no_grad():
        assert torch.allclose(masked(x), shrunk(x), atol=1e-4)


def test_vit_mlp_hidden_shrinks_heads_stay():
    model = models.build("vit", {"image_size": 8, "patch_size": 4, "dim": 32, "depth": 1, "heads": 2,
                                 "mlp_dim": 64}).eval()
    x = torch.randn(2, 3, 8, 8)
    plan, keep, masked, shrunk = masked_and_shrunk(model, x)
    linears = {n: m for n, m in shrunk.named_modules() if isinstance(m, torch.nn.Linear)}
    qkv = next(m for n, m in linears.items() if n.endswith("qkv"))
    assert qkv.out_features == 3 * 32, "attention heads stay whole"
    assert any("qkv" in s for s in plan.skipped)
    hidden = [m for n, m in linears.items() if "mlp" in n]
    assert hidden[0].out_features == 32 and hidden[1].in_features == 32
    with torch.no_grad():
        assert torch.allclose(masked(x), shrunk(x), atol=1e-4)
