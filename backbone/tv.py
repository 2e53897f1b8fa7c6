"""tv_*: torchvision reference networks as backbones (classifier removed, global average pool).

They are baselines (hardswish / SiLU / squeeze-excite are less NPU-friendly than the mobile_* and repconv_*
families). `weights_path=` loads a LOCAL torchvision ImageNet state_dict (no downloads), e.g.
    create_backbone("tv_resnet18", weights_path="weights/resnet18-f37072fd.pth")
"""
import torch
import torch.nn as nn
import torchvision

from backbone import register_backbone
from backbone.layers import fold_batchnorms, global_pool

_HEADS = ("fc.", "classifier.")  # keys we drop, so a state_dict without them loads too


class TorchvisionBackbone(nn.Module):
    def __init__(self, arch: str, weights_path=None):
        super().__init__()
        net = getattr(torchvision.models, arch)(weights=None)
        if weights_path:
            try:
                sd = torch.load(weights_path, map_location="cpu", weights_only=True)
            except Exception as e:  # noqa: BLE001 - unpickling/zip/IO errors: one line for the user
                first = (str(e).strip().splitlines() or [type(e).__name__])[0][:120]
                raise ValueError(f"{weights_path}: not a readable torch state_dict ({first})") from None
            if not isinstance(sd, dict):
                raise ValueError(f"{weights_path}: not a state_dict (a {type(sd).__name__})")
            missing, unexpected = net.load_state_dict(sd, strict=False)
            missing = [k for k in missing if not k.startswith(_HEADS)]
            if missing or unexpected:
                raise ValueError(f"{weights_path}: not a torchvision {arch} state_dict "
                                 f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
        if hasattr(net, "fc"):  # ResNet: everything before avgpool/fc
            self.features = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool,
                                          net.layer1, net.layer2, net.layer3, net.layer4)
            self.num_features = net.fc.in_features
        else:  # MobileNetV3 / EfficientNet: .features then avgpool + classifier
            self.features = net.features
            self.num_features = [m for m in net.features.modules() if isinstance(m, nn.Conv2d)][-1].out_channels

    def forward(self, x):
        return global_pool(self.features(x))

    def reparameterize(self):
        fold_batchnorms(self)


def _register(arch):
    register_backbone("tv_" + arch)(lambda weights_path=None: TorchvisionBackbone(arch, weights_path))


for _arch in ("mobilenet_v3_small", "mobilenet_v3_large", "resnet18", "efficientnet_b0"):
    _register(_arch)
