"""Built-in architectures: shapes, the structure each promises, ONNX export, and the whole
magnitude recipe end to end on 8x8 digits."""
import pytest
import torch
from torch import nn

from ticketforge import recipe as recipe_mod
from ticketforge.export import export_onnx
from ticketforge.models import MODELS, build
from ticketforge.pipeline import Job, compress
from ticketforge.recipe import ExportConfig
from ticketforge.ui import UI
from ticketforge.validate import session

from tests.tiny import FAST, TINY, saved, small_digits

def test_every_builtin_has_a_tiny_config():
    assert set(TINY) == set(MODELS)


@pytest.mark.parametrize("arch", sorted(TINY))
def test_export_matches_torch(arch, tmp_path):
    model = build(arch, TINY[arch]).eval()
    x = torch.rand(3, 1, 8, 8)
    path = export_onnx(model, x[:2], tmp_path / "m.onnx", ExportConfig())
    got = session(path).run(None, {"input": x.numpy()})[0]  # batch 3: the batch axis is dynamic
    assert abs(got - model(x).detach().numpy()).max() < 1e-4


def test_mobilenetv2_structure():
    model = build("mobilenetv2", TINY["mobilenetv2"])
    blocks = [m for m in model.modules() if type(m).__name__ == "InvertedResidual"]
    assert blocks and any(b.residual for b in blocks) and not all(b.residual for b in blocks)
    for b in blocks:
        convs = [m for m in b.body if isinstance(m, nn.Conv2d)]
        dw = [c for c in convs if c.groups > 1]
        assert len(dw) == 1 and dw[0].groups == dw[0].in_channels == dw[0].out_channels
        # the projection is linear: nothing follows its BatchNorm
        assert isinstance(b.body[-1], nn.BatchNorm2d) and b.body[-2] is convs[-1]


@pytest.mark.parametrize("pool", ["cls", "mean"])
def test_vit_weights_are_all_linear_or_patch_conv(pool):
    model = build("vit", {**TINY["vit"], "pool": pool})
    assert not any(isinstance(m, nn.MultiheadAttention) for m in model.modules())
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    # per block: qkv, proj, two MLP layers; plus the head
    assert len(linears) == 4 * TINY["vit"]["depth"] + 1
    assert model(torch.rand(2, 1, 8, 8)).shape == (2, 10)


@pytest.mark.parametrize("arch", ["mobilenetv2", "vit"])
def test_magnitude_recipe_end_to_end(arch, tmp_path):
    recipe = recipe_mod.resolve("magnitude", FAST + ["finetune.epochs=1"], sparsity=0.5)
    report = compress(Job(model_path=saved(arch, tmp_path / "m.pt"), recipe=recipe,
                          data=small_digits(tmp_path / "d.npz"), arch=arch,
                          arch_kwargs=TINY[arch], out=tmp_path / "out", ui=UI(quiet=True)))
    assert (tmp_path / "out" / "model.onnx").exists()
    assert report["parity"] < 1e-3
    assert report["sparsity"]["torch"] == pytest.approx(0.5, abs=1e-3)


def test_resnet20_tlab_is_the_authors_resnet20():
    """TLAB's ResNet-20: 3x3 shortcut convs, BN gamma ~ U(0, 1) and beta 0, BN without running
    statistics unless asked, kaiming-normal weights (std sqrt(2 / fan_in))."""
    torch.manual_seed(0)
    model = build("resnet20-tlab")
    shortcuts = [m.shortcut[0] for m in model.modules() if type(m).__name__ == "TlabBlock"
                 and isinstance(m.shortcut, nn.Sequential)]
    assert len(shortcuts) == 2 and all(c.kernel_size == (3, 3) and c.stride == (2, 2) for c in shortcuts)
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(bns) == 21 and not any(b.track_running_stats for b in bns)
    gammas = torch.cat([b.weight.detach() for b in bns])
    assert gammas.min() >= 0 and gammas.max() <= 1 and gammas.std() > 0.2
    assert all(float(b.bias.detach().abs().max()) == 0 for b in bns)
    conv = model[7].body[3]  # 64 x 64 x 3 x 3
    assert float(conv.weight.detach().std()) == pytest.approx((2 / (64 * 9)) ** 0.5, rel=0.05)
    assert all(b.track_running_stats for b in build("resnet20-tlab", {"running_stats": True}).modules()
               if isinstance(b, nn.BatchNorm2d))


def test_batch_statistics_only_model_is_refused_at_export_with_the_fix(tmp_path):
    from ticketforge.errors import UserError

    with pytest.raises(UserError, match="running_stats"):
        export_onnx(build("resnet20-tlab", {"in_channels": 1}).eval(), torch.rand(2, 1, 8, 8), tmp_path / "m.onnx",
                    ExportConfig())
