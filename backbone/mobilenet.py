"""mobile_*: MobileNetV2-style inverted residuals with plain ReLU (NPU-friendly: Conv, ReLU, Add, pooling).

Sizes (params, no projection head): mobile_tiny 0.55M, mobile_small 2.1M, mobile_base 4.1M.
Override width_mult / depth_mult / num_features / stem_channels as kwargs:
    create_backbone("mobile_tiny", width_mult=0.75)
"""
import math

import torch.nn as nn

from backbone import register_backbone, register_backbone_class
from backbone.layers import conv_bn, fold_batchnorms, global_pool, init_weights, make_divisible

# MobileNetV2 stages: (expansion t, channels c, repeats n, stride s) of the first block
_STAGES = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1))


class InvertedResidual(nn.Module):
    def __init__(self, in_c, out_c, stride, expand):
        super().__init__()
        hid = make_divisible(in_c * expand)
        layers = [conv_bn(in_c, hid, 1)] if expand != 1 else []
        layers += [conv_bn(hid, hid, 3, stride, groups=hid), conv_bn(hid, out_c, 1, act=False)]  # linear bottleneck
        self.conv = nn.Sequential(*layers)
        self.residual = stride == 1 and in_c == out_c

    def forward(self, x):
        return x + self.conv(x) if self.residual else self.conv(x)


@register_backbone_class
class MobileNet(nn.Module):
    def __init__(self, width_mult=1.0, depth_mult=1.0, num_features=1280, stem_channels=32):
        super().__init__()
        c_in = make_divisible(stem_channels * width_mult)
        layers = [conv_bn(3, c_in, 3, 2)]
        for t, c, n, s in _STAGES:
            c_out = make_divisible(c * width_mult)
            for i in range(max(1, math.ceil(n * depth_mult))):
                layers.append(InvertedResidual(c_in, c_out, s if i == 0 else 1, t))
                c_in = c_out
        layers.append(conv_bn(c_in, num_features, 1))
        self.features = nn.Sequential(*layers)
        self.num_features = num_features
        init_weights(self)

    def forward(self, x):
        return global_pool(self.features(x))

    def reparameterize(self):
        fold_batchnorms(self)  # -> Conv(bias) + ReLU + Add only


def _mobile(defaults, kwargs):
    return MobileNet(**{**defaults, **kwargs})


@register_backbone("mobile_tiny", arch=MobileNet)
def mobile_tiny(**kw):
    return _mobile(dict(width_mult=0.5, depth_mult=0.67, num_features=512), kw)


@register_backbone("mobile_small", arch=MobileNet)
def mobile_small(**kw):
    return _mobile(dict(width_mult=1.0, depth_mult=1.0, num_features=1024), kw)


@register_backbone("mobile_base", arch=MobileNet)
def mobile_base(**kw):
    return _mobile(dict(width_mult=1.4, depth_mult=1.0, num_features=1280), kw)
