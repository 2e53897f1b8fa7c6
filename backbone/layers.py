"""Shared building blocks and BatchNorm folding for the backbones."""
import torch
import torch.nn as nn
import torch.nn.functional as F


def make_divisible(v: float, divisor: int = 8) -> int:
    """Round channels to a multiple of 8 (what NPUs/SIMD like), never dropping more than 10%."""
    new_v = max(divisor, int(v + divisor / 2) // divisor * divisor)
    return new_v + divisor if new_v < 0.9 * v else new_v


def conv_bn(in_c, out_c, k=3, stride=1, groups=1, act=True) -> nn.Sequential:
    """Conv(no bias) -> BN [-> ReLU]. ReLU, not ReLU6/hardswish: it is the one activation every NPU has."""
    layers = [nn.Conv2d(in_c, out_c, k, stride, k // 2, groups=groups, bias=False), nn.BatchNorm2d(out_c)]
    if act:
        layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


def global_pool(x: torch.Tensor) -> torch.Tensor:
    # adaptive_avg_pool2d(x, 1) exports as GlobalAveragePool (widely supported) rather than ReduceMean
    return F.adaptive_avg_pool2d(x, 1).flatten(1)


def init_weights(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


@torch.no_grad()
def fuse_kernel_bn(weight, bias, bn: nn.BatchNorm2d):
    """(W, b) of a conv followed by eval-mode BN -> (W', b') of the single equivalent conv."""
    std = (bn.running_var + bn.eps).sqrt()
    gamma = bn.weight if bn.affine else torch.ones_like(std)
    beta = bn.bias if bn.affine else torch.zeros_like(std)
    t = gamma / std
    b = torch.zeros_like(std) if bias is None else bias
    return weight * t.reshape(-1, 1, 1, 1), beta + (b - bn.running_mean) * t


def conv_from(weight, bias, like: nn.Conv2d) -> nn.Conv2d:
    """A biased Conv2d with like's geometry (stride/padding/groups) holding the given weight and bias."""
    conv = nn.Conv2d(like.in_channels, like.out_channels, like.kernel_size, like.stride, like.padding,
                     like.dilation, like.groups, bias=True, device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        conv.weight.copy_(weight)
        conv.bias.copy_(bias)
    return conv


def fold_batchnorms(module: nn.Module) -> nn.Module:
    """Fold every Conv2d -> BatchNorm2d pair into one biased Conv2d, in place (BN becomes Identity).
    Pairs are found structurally: adjacent entries of an nn.Sequential (conv_bn, torchvision's
    Conv2dNormActivation, ResNet downsample) and sibling attributes convN/bnN (torchvision ResNet blocks)."""
    names = [n for n, _ in module.named_children()]
    pairs = list(zip(names, names[1:])) if isinstance(module, nn.Sequential) else []
    pairs += [(n, "bn" + n[4:]) for n in names if n.startswith("conv") and "bn" + n[4:] in names]
    for c, b in pairs:
        conv, bn = getattr(module, c), getattr(module, b)
        if isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d) and conv.padding_mode == "zeros":
            setattr(module, c, conv_from(*fuse_kernel_bn(conv.weight, conv.bias, bn), like=conv))
            setattr(module, b, nn.Identity())
    for child in module.children():
        fold_batchnorms(child)
    return module
