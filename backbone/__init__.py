"""Image encoders, registered by name (timm-style).

    from backbone import create_backbone, list_backbones, reparameterize_model
    net = create_backbone("mobile_small")            # or create_backbone("mobile_small", width_mult=0.75)
    net = create_backbone("backbone.mobilenet.MobileNet", width_mult=0.5)   # the seed's dotted form
    feats = net(images)                              # [B, net.num_features], globally average-pooled
    reparameterize_model(net)                        # before export: fold BN / RepConv branches into Conv

Every backbone takes images [B, 3, H, W] of any size >= 32x32 (stride 32; 224x112 persons, 64x32 in tests)
and returns [B, num_features]. Families: mobile_* (MobileNetV2-like, ReLU), repconv_* (RepVGG / MobileOne
style, folds to plain Conv+ReLU), tv_* (torchvision reference nets, optional local ImageNet weights).
Only registered names and registered classes resolve (a name read from a checkpoint never imports anything).
"""
import inspect

import torch.nn as nn

BACKBONES = {}  # name -> factory(**kwargs) -> nn.Module with .num_features
ARCH_PARAMS = {}  # name -> the keyword parameters the architecture declares (what backbone_kwargs may set)
CLASSES = {}  # the seed's dotted names "backbone.<module>.<Class>" -> a class registered below (nothing else)
_SCALARS = (bool, int, float, str, type(None))


def _declared(fn):
    """Keyword parameters of a callable (its **kwargs are not a declaration)."""
    return {n for n, p in inspect.signature(fn).parameters.items()
            if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}


def register_backbone(name=None, arch=None):
    """Decorator: @register_backbone("name") or bare @register_backbone (uses the function name). `arch`: the class
    a **kwargs factory forwards to, whose parameters are then the ones kwargs may set."""
    def deco(fn):
        key = name or fn.__name__
        if key in BACKBONES:
            raise ValueError(f"backbone {key!r} registered twice")
        BACKBONES[key] = fn
        ARCH_PARAMS[key] = _declared(fn) | (_declared(arch) if arch is not None else set())
        return fn
    if callable(name):  # bare decorator
        fn, name = name, None
        return deco(fn)
    return deco


def register_backbone_class(cls):
    """Class decorator: makes `backbone.<module>.<Class>` (the seed's dotted form) name this class."""
    CLASSES[f"{cls.__module__}.{cls.__qualname__}"] = cls
    return cls


def list_backbones():
    return sorted(BACKBONES)


def is_known_backbone(name) -> bool:
    return isinstance(name, str) and (name in BACKBONES or name in CLASSES
                                      or (name.startswith("backbone.") and name[len("backbone."):] in BACKBONES))


def _check_kwargs(name, kwargs, allowed):
    """kwargs come from checkpoints and the command line: only declared parameters, only plain JSON values."""
    unknown = sorted(set(kwargs) - allowed)
    if unknown:
        raise ValueError(f"backbone {name!r} has no parameter(s) {', '.join(map(repr, unknown))}; "
                         f"it takes {', '.join(sorted(allowed)) or 'none'}")
    for k, v in kwargs.items():
        ok = isinstance(v, _SCALARS) or (isinstance(v, (list, tuple)) and all(isinstance(x, _SCALARS) for x in v))
        if not ok:
            raise ValueError(f"backbone {name!r}: parameter {k!r} must be a number, string or list, "
                             f"not {type(v).__name__}")


def create_backbone(name: str, **kwargs) -> nn.Module:
    """A registered name, or the seed's dotted `backbone.<module>.<Class>` form of a registered class.

    Names come from checkpoints too, so nothing else resolves: no import, no attribute lookup by name, and
    kwargs reach only the parameters the architecture declares."""
    if not isinstance(name, str):
        raise ValueError(f"backbone name must be a string, got {type(name).__name__}")
    key = name[len("backbone."):] if name.startswith("backbone.") and name[len("backbone."):] in BACKBONES else name
    if key in BACKBONES:
        _check_kwargs(name, kwargs, ARCH_PARAMS[key])
        net = BACKBONES[key](**kwargs)
    elif name in CLASSES:
        _check_kwargs(name, kwargs, _declared(CLASSES[name]))
        net = CLASSES[name](**kwargs)
    else:
        raise ValueError(f"unknown backbone {name!r:.80}; registered: {', '.join(list_backbones())} "
                         f"(or the dotted form {', '.join(sorted(CLASSES))})")
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
