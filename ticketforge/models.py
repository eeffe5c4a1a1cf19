"""Built-in architectures, found by name (`ticketforge models`), and `--arch` resolution."""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from ticketforge.errors import UserError
from ticketforge.registry import Registry, import_user_module

MODELS: Registry[Callable[..., nn.Module]] = Registry("built-in model")
register_model = MODELS.register


def import_callable(spec: str, option: str) -> Callable:
    """`package.module:callable` (dotted attributes allowed), imported from the current directory;
    every failure is the user's spec and becomes one line naming `option`."""
    module_name, _, attr = spec.partition(":")
    fn = import_user_module(module_name, f"{option} {spec!r}:")
    for part in attr.split("."):
        fn = getattr(fn, part, None)
        if fn is None:
            raise UserError(f"{option} {spec!r}: {module_name!r} has no attribute {attr!r}")
    if not callable(fn):
        raise UserError(f"{option} {spec!r}: {attr!r} is not callable")
    return fn


def resolve_arch(arch: str) -> Callable[..., nn.Module]:
    """A built-in name, or `package.module:callable` importable from the current directory."""
    if arch in MODELS:
        return MODELS[arch]
    if ":" not in arch:
        raise UserError(f"--arch {arch!r}: not a built-in model ({', '.join(sorted(MODELS))}) "
                        "and not of the form package.module:callable")
    return import_callable(arch, "--arch")


def build(arch: str, kwargs: dict | None = None) -> nn.Module:
    fn = resolve_arch(arch)
    try:
        model = fn(**(kwargs or {}))
    except Exception as exc:
        raise UserError(f"--arch {arch!r}: calling it with {kwargs or {}} failed: {type(exc).__name__}: {exc}") from None
    if not isinstance(model, nn.Module):
        raise UserError(f"--arch {arch!r} returned {type(model).__name__}, not a torch.nn.Module")
    return model


# ---------------------------------------------------------------- built-ins

def conv_bn(cin: int, cout: int, k: int = 3, stride: int = 1, groups: int = 1, act: bool = True) -> nn.Sequential:
    layers = [nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout)]
    if act:
        layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


class BasicBlock(nn.Module):
    """ResNet basic block; `shortcut` is an identity unless the shape changes (then a 1x1 conv)."""

    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.body = nn.Sequential(conv_bn(cin, cout, 3, stride), conv_bn(cout, cout, 3, act=False))
        self.shortcut = nn.Identity() if stride == 1 and cin == cout else conv_bn(cin, cout, 1, stride, act=False)

    def forward(self, x):
        return torch.relu(self.body(x) + self.shortcut(x))


@register_model("digits-resnet")
def digits_resnet(num_classes: int = 10, in_channels: int = 1, width: int = 32) -> nn.Module:
    """The demo model: a small residual CNN with a depthwise-separable stage, for 8x8 digits."""
    w = width
    return nn.Sequential(
        conv_bn(in_channels, w),
        BasicBlock(w, w),
        BasicBlock(w, 2 * w, stride=2),
        BasicBlock(2 * w, 2 * w),
        conv_bn(2 * w, 2 * w, 3, groups=2 * w),  # depthwise
        conv_bn(2 * w, 4 * w, 1),                # pointwise
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4 * w, num_classes),
    )


@register_model("resnet20")
def resnet20(num_classes: int = 10, in_channels: int = 3, width: int = 16) -> nn.Module:
    """CIFAR ResNet-20 (He et al. 2016): 3 stages of 3 basic blocks, widths 16/32/64."""
    layers: list[nn.Module] = [conv_bn(in_channels, width)]
    cin = width
    for stage in range(3):
        cout = width * 2 ** stage
        for i in range(3):
            layers.append(BasicBlock(cin, cout, stride=2 if stage > 0 and i == 0 else 1))
            cin = cout
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, num_classes)]
    return nn.Sequential(*layers)


class TlabBlock(nn.Module):
    """The CTS authors' ResNet block (TLAB models/resnet.py): conv-BN-ReLU-conv-BN plus the input,
    then ReLU; where the shape changes the shortcut is a 3x3 stride-2 conv with BN (not 1x1)."""

    def __init__(self, cin: int, cout: int, stride: int, bn):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), bn(cout), nn.ReLU(inplace=True),
                                  nn.Conv2d(cout, cout, 3, 1, 1, bias=False), bn(cout))
        self.shortcut = (nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), bn(cout))
                         if stride != 1 or cin != cout else nn.Identity())

    def forward(self, x):
        return torch.relu(self.body(x) + self.shortcut(x))


@register_model("resnet20-tlab")
def resnet20_tlab(num_classes: int = 10, in_channels: int = 3, width: int = 16, running_stats: bool = False) -> nn.Module:
    """ResNet-20 as the CTS authors build it (tanayarora09/TLAB, models/resnet.py, ResNetCifar):
    3x3 shortcut convs, kaiming-normal Conv/Linear weights, BatchNorm gamma ~ U(0, 1) and beta 0,
    and BatchNorm without running statistics (batch statistics in eval mode too; `running_stats`
    turns them on, for deployment at batch 1)."""
    def bn(c):
        m = nn.BatchNorm2d(c, track_running_stats=running_stats)
        nn.init.uniform_(m.weight)
        nn.init.zeros_(m.bias)
        return m

    layers: list[nn.Module] = [nn.Sequential(nn.Conv2d(in_channels, width, 3, 1, 1, bias=False), bn(width),
                                             nn.ReLU(inplace=True))]
    cin = width
    for stage in range(3):
        cout = width * 2 ** stage
        for i in range(3):
            layers.append(TlabBlock(cin, cout, 2 if stage > 0 and i == 0 else 1, bn))
            cin = cout
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, num_classes)]
    model = nn.Sequential(*layers)
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            nn.init.kaiming_normal_(m.weight)  # TLAB's conv_fc_init; the Linear keeps torch's bias init
    return model


def _divisible(v: float, divisor: int = 8) -> int:
    """Round a scaled width to a multiple of `divisor` (never below 90% of it), as MobileNet does."""
    n = max(divisor, int(v + divisor / 2) // divisor * divisor)
    return n + divisor if n < 0.9 * v else n


class InvertedResidual(nn.Module):
    """MobileNetV2 block: 1x1 expansion, 3x3 depthwise, 1x1 linear projection (no activation after
    it: a ReLU in the narrow space would destroy information); identity shortcut when shapes allow."""

    def __init__(self, cin: int, cout: int, stride: int, expand: int):
        super().__init__()
        hidden = cin * expand
        layers: list[nn.Module] = []
        if expand != 1:
            layers += [nn.Conv2d(cin, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU6(inplace=True)]
        layers += [nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False), nn.BatchNorm2d(hidden),
                   nn.ReLU6(inplace=True),
                   nn.Conv2d(hidden, cout, 1, bias=False), nn.BatchNorm2d(cout)]
        self.body = nn.Sequential(*layers)
        self.residual = stride == 1 and cin == cout

    def forward(self, x):
        return x + self.body(x) if self.residual else self.body(x)


# (expansion, channels, blocks, first stride): MobileNetV2's stages for small images, the
# ImageNet stem stride and the two widest stages dropped so that 8x8 and 32x32 inputs keep a
# spatial extent to the end.
MOBILENETV2_SMALL = [(1, 16, 1, 1), (6, 24, 2, 1), (6, 32, 3, 2), (6, 64, 2, 2), (6, 96, 2, 1)]


@register_model("mobilenetv2")
def mobilenetv2(num_classes: int = 10, in_channels: int = 3, width: float = 0.5, last_channels: int = 256) -> nn.Module:
    """MobileNetV2-style net (Sandler et al. 2018) for small images; `width` scales every stage."""
    c = _divisible(32 * width)
    layers: list[nn.Module] = [nn.Sequential(nn.Conv2d(in_channels, c, 3, 1, 1, bias=False), nn.BatchNorm2d(c),
                                             nn.ReLU6(inplace=True))]
    for t, ch, n, s in MOBILENETV2_SMALL:
        cout = _divisible(ch * width)
        for i in range(n):
            layers.append(InvertedResidual(c, cout, s if i == 0 else 1, t))
            c = cout
    layers += [nn.Sequential(nn.Conv2d(c, last_channels, 1, bias=False), nn.BatchNorm2d(last_channels),
                             nn.ReLU6(inplace=True)),
               nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(last_channels, num_classes)]
    return nn.Sequential(*layers)


class Attention(nn.Module):
    """Multi-head self-attention with explicit qkv and output Linears (rather than
    nn.MultiheadAttention) so that every weight is a prunable Linear and exports as MatMul/Gemm."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim {dim} is not divisible by heads {heads}")
        self.heads, self.scale = heads, (dim // heads) ** -0.5
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        b, n, d = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        attn = ((q @ k.transpose(-2, -1)) * self.scale).softmax(-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(b, n, d))


class TransformerBlock(nn.Module):
    """Pre-norm transformer encoder block: x + attn(LN(x)), then x + MLP(LN(x))."""

    def __init__(self, dim: int, heads: int, mlp_dim: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp_dim), nn.GELU(), nn.Linear(mlp_dim, dim))

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class VisionTransformer(nn.Module):
    def __init__(self, num_classes: int, in_channels: int, image_size: int, patch_size: int, dim: int,
                 depth: int, heads: int, mlp_dim: int, pool: str):
        super().__init__()
        if image_size % patch_size:
            raise ValueError(f"image_size {image_size} is not a multiple of patch_size {patch_size}")
        if pool not in ("cls", "mean"):
            raise ValueError(f"pool must be 'cls' or 'mean', got {pool!r}")
        self.pool = pool
        self.patch_embed = nn.Conv2d(in_channels, dim, patch_size, patch_size)
        tokens = (image_size // patch_size) ** 2 + (pool == "cls")
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim)) if pool == "cls" else None
        self.pos_embed = nn.Parameter(torch.randn(1, tokens, dim) * 0.02)
        self.blocks = nn.Sequential(*[TransformerBlock(dim, heads, mlp_dim) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x):
        x = self.patch_embed(x).flatten(2).transpose(1, 2)
        if self.cls_token is not None:
            x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], 1)
        x = self.norm(self.blocks(x + self.pos_embed))
        return self.head(x[:, 0] if self.cls_token is not None else x.mean(1))


@register_model("vit")
def vit(num_classes: int = 10, in_channels: int = 3, image_size: int = 32, patch_size: int = 4, dim: int = 64,
        depth: int = 4, heads: int = 4, mlp_dim: int = 128, pool: str = "cls") -> nn.Module:
    """A small Vision Transformer (Dosovitskiy et al. 2021); for 8x8 digits use image_size=8 with
    patch_size 2 or 4."""
    return VisionTransformer(num_classes, in_channels, image_size, patch_size, dim, depth, heads, mlp_dim, pool)
