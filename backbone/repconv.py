"""repconv_*: re-parameterisable plain nets (RepVGG, MobileOne). Train with parallel BN branches,
export as a single Conv(bias)+ReLU per layer after `reparameterize()` (Ding et al. 2021, Vasu et al. 2023).

repconv_tiny  - MobileOne-style: depthwise 3x3 RepConv + pointwise 1x1 RepConv per block (0.35M params, 0.34M folded).
repconv_small - RepVGG-style: dense 3x3 RepConv blocks (3.4M params, 3.1M folded; dense 3x3 is what NPUs run fastest).
Kwargs: widths, depths, stem_channels, num_features, depthwise, width_mult, depth_mult.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from backbone import register_backbone, register_backbone_class
from backbone.layers import conv_bn, conv_from, fuse_kernel_bn, global_pool, init_weights, make_divisible


class RepConv(nn.Module):
    """ReLU( BN(conv_kxk(x)) + BN(conv_1x1(x)) [k>1] + BN(x) [same shape] ); folds into ReLU(conv_kxk'(x))."""

    def __init__(self, in_c, out_c, k=3, stride=1, groups=1):
        super().__init__()
        self.conv_kxk = conv_bn(in_c, out_c, k, stride, groups, act=False)
        self.conv_1x1 = conv_bn(in_c, out_c, 1, stride, groups, act=False) if k > 1 else None
        self.identity = nn.BatchNorm2d(out_c) if in_c == out_c and stride == 1 else None
        self.act = nn.ReLU(inplace=True)
        self.reparam = None  # the folded conv once reparameterize() ran

    def forward(self, x):
        if self.reparam is not None:
            return self.act(self.reparam(x))
        y = self.conv_kxk(x)
        if self.conv_1x1 is not None:
            y = y + self.conv_1x1(x)
        if self.identity is not None:
            y = y + self.identity(x)
        return self.act(y)

    @torch.no_grad()
    def reparameterize(self):
        if self.reparam is not None:
            return
        conv = self.conv_kxk[0]
        k = conv.kernel_size[0]
        w, b = fuse_kernel_bn(conv.weight, None, self.conv_kxk[1])
        if self.conv_1x1 is not None:  # a 1x1 kernel is a kxk kernel that is zero off-centre
            w1, b1 = fuse_kernel_bn(self.conv_1x1[0].weight, None, self.conv_1x1[1])
            w, b = w + F.pad(w1, [k // 2] * 4), b + b1
        if self.identity is not None:  # identity = kxk kernel with a 1 at the centre of its own channel
            in_per_group = conv.in_channels // conv.groups
            wid = torch.zeros_like(w)
            idx = torch.arange(conv.out_channels)
            wid[idx, idx % in_per_group, k // 2, k // 2] = 1
            wi, bi = fuse_kernel_bn(wid, None, self.identity)
            w, b = w + wi, b + bi
        self.reparam = conv_from(w, b, like=conv)
        self.conv_kxk = self.conv_1x1 = self.identity = None


@register_backbone_class
class RepConvNet(nn.Module):
    """Stem (/2) + 4 stages (each starts with stride 2, /32 in all) + 1x1 RepConv to num_features + GAP."""

    def __init__(self, widths=(48, 96, 192, 384), depths=(2, 3, 6, 1), stem_channels=32, num_features=1024,
                 depthwise=False, width_mult=1.0, depth_mult=1.0):
        super().__init__()
        c_in = make_divisible(stem_channels * width_mult)
        layers = [RepConv(3, c_in, 3, 2)]
        for w, d in zip(widths, depths):
            c_out = make_divisible(w * width_mult)
            for i in range(max(1, math.ceil(d * depth_mult))):
                s = 2 if i == 0 else 1
                if depthwise:  # MobileOne block: spatial mixing per channel, then channel mixing
                    layers += [RepConv(c_in, c_in, 3, s, groups=c_in), RepConv(c_in, c_out, 1)]
                else:  # RepVGG block
                    layers.append(RepConv(c_in, c_out, 3, s))
                c_in = c_out
        layers.append(RepConv(c_in, num_features, 1))
        self.features = nn.Sequential(*layers)
        self.num_features = num_features
        init_weights(self)

    def forward(self, x):
        return global_pool(self.features(x))

    def reparameterize(self):
        for m in self.modules():
            if isinstance(m, RepConv):
                m.reparameterize()


@register_backbone("repconv_tiny", arch=RepConvNet)
def repconv_tiny(**kw):
    return RepConvNet(**{**dict(widths=(32, 64, 128, 256), depths=(1, 2, 6, 2), stem_channels=16,
                                num_features=512, depthwise=True), **kw})


@register_backbone("repconv_small", arch=RepConvNet)
def repconv_small(**kw):
    return RepConvNet(**{**dict(widths=(48, 96, 192, 384), depths=(2, 3, 6, 1), stem_channels=32,
                                num_features=1024, depthwise=False), **kw})
