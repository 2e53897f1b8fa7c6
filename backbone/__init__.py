"""Image encoders, registered by name (timm-style).

    from backbone import create_backbone, list_backbones, reparameterize_model
    net = create_backbone("mobile_small")            # or create_backbone("mobile_small", width_mult=0.75)
    net = create_backbone("backbone.mobilenet.MobileNet", width_mult=0.5)   # the seed's dotted form
    feats = net(images)                              # [B, net.num_features], globally average-pooled
    reparameterize_model(net)                        # before export: fold BN / RepConv branches into Conv

Every backbone takes images [B, 3, H, W] of any size >= 32x32 (stride 32; 224x112 persons, 64x32 in tests)
and returns [B, num_features]. Families: mobile_* (MobileNetV2-like, ReLU), repconv_* (RepVGG / MobileOne
style, folds to plain Conv+ReLU), tv_* (torchvision reference nets, optional local ImageNet weights).
"""
import importlib

import torch.nn as nn

BACKBONES = {}  # name -> factory(**kwargs) -> nn.Module with .num_features


def register_backbone(name=None):
    """Decorator: @register_backbone("name") or bare @register_backbone (uses the function name)."""
    def deco(fn):
        key = name or fn.__name__
        if key in BACKBONES:
            raise ValueError(f"backbone {key!r} registered twice")
        BACKBONES[key] = fn
        return fn
    if callable(name):  # bare decorator
        fn, name = name, None
        return deco(fn)
    return deco


def list_backbones():
    return sorted(BACKBONES)


def create_backbone(name: str, **kwargs) -> nn.Module:
    """A registered name, or a dotted `<module>.<Class>` path (seed style `backbone.mf3.ANet2`): the module is
    imported and the class is called with **kwargs."""
    if name in BACKBONES:
        return BACKBONES[name](**kwargs)
    if name.startswith("backbone.") and name[len("backbone."):] in BACKBONES:  # "backbone.mobile_tiny"
        return BACKBONES[name[len("backbone."):]](**kwargs)
    module, _, attr = name.rpartition(".")
    if not module:
        raise ValueError(f"unknown backbone {name!r}; registered: {', '.join(list_backbones())}, "
                         f"or a dotted <module>.<Class> path")
    try:
        cls = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"backbone {name!r}: cannot import {attr!r} from {module!r} ({e})") from None
    net = cls(**kwargs)
    if not isinstance(net, nn.Module) or not hasattr(net, "num_features"):
        raise ValueError(f"backbone {name!r} must be an nn.Module with a `num_features` attribute")
    return net


def reparameterize_model(model: nn.Module) -> nn.Module:
    """Fold train-time structure (BN, RepConv branches) for export, in place. Calls `reparameterize()` on the
    outermost submodules that have it (each owns its children's folding); uses BN running statistics, so
    the folded model equals the *eval-mode* model."""
    if hasattr(model, "reparameterize"):
        model.reparameterize()
    else:
        for child in model.children():
            reparameterize_model(child)
    return model


# import the families last: they register themselves through register_backbone above
from backbone import mobilenet, repconv, resnet, tv  # noqa: E402,F401
