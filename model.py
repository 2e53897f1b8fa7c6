"""The student: image tower (CNN backbone + linear projection) and character text tower, both L2-normalised
into one feature_dim space. With text_only there is no image tower and feature_dim = the teacher's dim, so
the student text model searches galleries enrolled with the teacher's image encoder.

    cfg = default_model_cfg(args, teacher_dim=1152, teacher_name="google/siglip2-so400m-patch16-512")
    model = build_model(cfg)                 # cfg is plain JSON; checkpoints store it and rebuild from it alone
    img, txt = model(images, ids, mask)      # [B, D] each, unit norm (img is None when text_only)

No logit scale here: the losses own their temperatures.
"""
import json
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from backbone import create_backbone
from search.charmap import CHARMAP_VERSION, DEFAULT_VOCAB_SIZE
from search.query_words import is_vocab_word
from text_encoder import TEXT_POOLS, create_text_encoder

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

_REQUIRED = ("backbone", "text_backbone", "feature_dim", "image_size", "max_seq_length", "vocab_size",
             "embed_dim", "text_only", "teacher_dim", "teacher_name", "mean", "std", "charmap_version")


def _parse_size(v):
    """[H, W] from (224, 112), "224x112", "224,112" or 224 (square)."""
    try:
        if isinstance(v, str):
            v = [int(s) for s in v.lower().replace("x", ",").split(",") if s.strip()]
        if isinstance(v, int) and not isinstance(v, bool):
            v = [v, v]
        if not isinstance(v, (list, tuple)) or not all(type(s) is int for s in v):
            raise ValueError
    except ValueError:
        raise ValueError(f"image_size must be H,W (two integers, e.g. 224x112), got {v!r:.60}") from None
    if len(v) != 2 or min(v) < 16 or max(v) > 8192:  # same floor as opts.py; at stride 32 the last map is 1x1
        raise ValueError(f"image_size must be H,W with both in 16..8192, got {v}")
    return list(v)


def _parse_kwargs(v):
    """Backbone kwargs as a dict, also from a JSON string on the command line ('{"width_mult": 0.75}')."""
    try:
        v = json.loads(v) if isinstance(v, str) else v
    except (ValueError, RecursionError) as e:
        raise ValueError(f"backbone_kwargs is not valid JSON ({type(e).__name__})") from None
    if not isinstance(v, dict):
        raise ValueError(f"backbone_kwargs must be a JSON object, got {type(v).__name__}")
    if "weights_path" in v:  # a file path read from a checkpoint must not choose what gets loaded
        raise ValueError("backbone_kwargs may not set weights_path (use --backbone_weights at the start of training)")
    return dict(v)


# integer fields of the cfg and their sane ranges: a cfg is read from a checkpoint, so every value is checked
_INT_RANGES = {"feature_dim": (1, 1 << 16), "max_seq_length": (2, 1 << 14), "vocab_size": (0x254, 1 << 22),
               "embed_dim": (1, 1 << 14)}


def validate_model_cfg(cfg):
    """ValueError (one line) unless `cfg` is a well-formed model cfg; returns a normalised copy."""
    if not isinstance(cfg, dict):
        raise ValueError(f"model_cfg must be a dict, got {type(cfg).__name__}")
    missing = [k for k in _REQUIRED if k not in cfg]
    if missing:
        raise ValueError(f"model cfg lacks {missing}")
    cfg = dict(cfg)
    for k in ("backbone", "text_backbone"):
        if not isinstance(cfg[k], str) or not cfg[k]:
            raise ValueError(f"model_cfg {k} must be a name, got {cfg[k]!r:.60}")
    for k, (lo, hi) in _INT_RANGES.items():
        v = cfg[k]
        if type(v) is not int or not lo <= v <= hi:
            raise ValueError(f"model_cfg {k} must be an integer in {lo}..{hi}, got {v!r:.60}")
    if type(cfg["text_only"]) is not bool:
        raise ValueError(f"model_cfg text_only must be true or false, got {cfg['text_only']!r:.60}")
    td = cfg["teacher_dim"]
    if td is not None and (type(td) is not int or not 1 <= td <= 1 << 16):
        raise ValueError(f"model_cfg teacher_dim must be a positive integer or null, got {td!r:.60}")
    cfg["image_size"] = _parse_size(cfg["image_size"])
    for k in ("mean", "std"):
        v = cfg[k]
        if not (isinstance(v, (list, tuple)) and len(v) == 3
                and all(type(x) in (int, float) and math.isfinite(x) for x in v)) or (k == "std" and min(v) <= 0):
            raise ValueError(f"model_cfg {k} must be 3 finite numbers{' > 0' if k == 'std' else ''}, got {v!r:.60}")
    cfg["backbone_kwargs"] = _parse_kwargs(cfg.get("backbone_kwargs") or {})
    qv = cfg.get("query_vocab")
    if qv is not None and not (isinstance(qv, (list, tuple)) and all(isinstance(w, str) for w in qv)):
        raise ValueError(f"model_cfg query_vocab must be a list of words, got {type(qv).__name__}")
    bad = next((w for w in qv or () if not is_vocab_word(w)), None)
    if bad is not None:
        raise ValueError(f"model_cfg query_vocab must be a list of words: {bad!r:.40} is not a lower-case word")
    if cfg.get("text_pool", "mean") not in TEXT_POOLS:
        raise ValueError(f"model_cfg text_pool must be one of {TEXT_POOLS}, got {cfg.get('text_pool')!r:.40}")
    return cfg


def _parse_stripes(v):
    """'auto' (one stripe per row of the last feature map, at most 8), 0 (global average pool) or N >= 1."""
    if v in ("auto", None):
        return "auto"
    try:
        n = int(v)
    except (TypeError, ValueError):
        raise ValueError(f"stripes must be 'auto' or an integer >= 0, got {v!r}") from None
    if n < 0 or n > 64:
        raise ValueError(f"stripes must be 'auto' or an integer in [0, 64], got {v!r}")
    return n


def default_model_cfg(args, teacher_dim, teacher_name=""):
    """Model cfg (plain JSON-able dict) from an argparse Namespace or a dict; missing keys take defaults."""
    get = args.get if isinstance(args, dict) else (lambda k, d=None: getattr(args, k, d))

    def opt(k, d):
        v = get(k, None)
        return d if v is None else v

    text_only = bool(opt("text_only", False))
    if text_only and not teacher_dim:
        raise ValueError("text_only needs the teacher dim (the student text model lives in the teacher's space)")
    return {
        "backbone": opt("backbone", "res_tiny"),
        "backbone_kwargs": _parse_kwargs(opt("backbone_kwargs", {})),  # architecture only, never a weights path
        "text_backbone": opt("text_backbone", "char_small"),
        "feature_dim": int(teacher_dim if text_only else opt("feature_dim", 512)),
        "image_size": _parse_size(opt("image_size", [224, 112])),
        "max_seq_length": int(opt("max_seq_length", 128)),
        "vocab_size": int(opt("vocab_size", DEFAULT_VOCAB_SIZE)),
        "embed_dim": int(opt("embed_dim", 256)),
        "text_only": text_only,
        "teacher_dim": int(teacher_dim) if teacher_dim else None,
        "teacher_name": str(teacher_name or ""),
        "stripes": _parse_stripes(opt("stripes", "auto")),
        "text_pool": str(opt("text_pool", "mean")),
        "mean": [float(x) for x in opt("mean", IMAGENET_MEAN)],
        "std": [float(x) for x in opt("std", IMAGENET_STD)],
        "charmap_version": CHARMAP_VERSION,
    }


def l2norm(x):
    # explicit Mul/ReduceSum/Sqrt/Div rather than F.normalize (ReduceL2/Expand): simpler for NPU exporters
    return x / (x * x).sum(dim=-1, keepdim=True).clamp(min=1e-12).sqrt()


class ImageHead(nn.Module):
    """BatchNorm1d -> Linear on the pooled CNN features (the ReID "BNNeck").

    Pooled post-ReLU features share a large positive mean; through a plain Linear it becomes a common component
    that makes every image embedding nearly the same direction (measured: cos 0.99 between any two images after
    200 steps, retrieval at chance). Centring them first removes it. At export, `reparameterize()` folds the BN
    (a fixed affine in eval mode) into the Linear, so the graph stays one Gemm and batch 1 == batch N.
    """

    def __init__(self, in_dim, out_dim):
        super().__init__()
        self.bn = nn.BatchNorm1d(in_dim)
        self.fc = nn.Linear(in_dim, out_dim)

    def forward(self, x):
        return self.fc(self.bn(x))

    @torch.no_grad()
    def reparameterize(self):
        if isinstance(self.bn, nn.Identity):
            return
        bn = self.bn
        scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
        shift = bn.bias - bn.running_mean * scale
        fc = nn.Linear(self.fc.in_features, self.fc.out_features).to(self.fc.weight)
        fc.weight.copy_(self.fc.weight * scale[None, :])
        fc.bias.copy_(self.fc.bias + self.fc.weight @ shift)
        self.fc, self.bn = fc, nn.Identity()


class StripePool(nn.Module):
    """Average over n horizontal stripes of the feature map -> [B, C * n] (PCB-style part pooling).

    A global average pool keeps *what* is in the picture but not *where*: "red shirt, blue jeans" and "blue
    shirt, red jeans" pool to nearly the same vector, and the channels must learn colour-and-height jointly
    before the pool. Stripes keep the height: head, torso, legs, feet land in different features. Exported as
    one AveragePool (the map size is fixed), an op every NPU has."""

    def __init__(self, n):
        super().__init__()
        self.n = int(n)

    def forward(self, fmap):
        return F.adaptive_avg_pool2d(fmap, (self.n, 1)).flatten(1)


def resolve_stripes(stripes, map_h):
    """'auto' -> the map height if <= 8, else its largest divisor <= 8; an explicit n must divide the height."""
    if stripes == "auto":
        return max(d for d in range(1, min(8, map_h) + 1) if map_h % d == 0)
    n = int(stripes)
    if n and map_h % n:
        raise ValueError(f"stripes {n} does not divide the last feature map's height {map_h} (image height / "
                         f"backbone stride); use a divisor of {map_h}, 0 or 'auto'")
    return n


class PersonSearchModel(nn.Module):
    def __init__(self, cfg, backbone_weights=None):
        super().__init__()
        cfg = validate_model_cfg(cfg)
        if cfg["charmap_version"] != CHARMAP_VERSION:
            raise ValueError(f"model was trained with character mapping {cfg['charmap_version']!r}, "
                             f"this code implements {CHARMAP_VERSION!r}")
        if cfg["text_only"] and cfg["feature_dim"] != cfg["teacher_dim"]:
            raise ValueError("text_only requires feature_dim == teacher_dim")
        self.cfg = dict(cfg)
        self.text_only = bool(cfg["text_only"])
        self.feature_dim = int(cfg["feature_dim"])
        if not self.text_only:
            kw = dict(cfg.get("backbone_kwargs") or {})
            if backbone_weights:  # ImageNet init at the start of training; not part of the cfg
                kw["weights_path"] = backbone_weights
            self.backbone = create_backbone(cfg["backbone"], **kw)
            self.pool = None
            n = cfg.get("stripes", 0)  # checkpoints from before stripe pooling: the global pool
            if n:
                with torch.no_grad():  # the last map's height for this image size (eval: BN stats untouched)
                    was = self.backbone.training
                    self.backbone.eval()
                    map_h = self.backbone.features(torch.zeros(1, 3, *cfg["image_size"])).shape[2]
                    self.backbone.train(was)
                n = resolve_stripes(n, map_h)
            self.n_stripes = n
            if n:
                self.pool = StripePool(n)
            self.image_head = ImageHead(self.backbone.num_features * max(1, n), self.feature_dim)
        self.text_encoder = create_text_encoder(cfg["text_backbone"], out_dim=self.feature_dim,
                                                max_seq_length=cfg["max_seq_length"],
                                                vocab_size=cfg["vocab_size"], embed_dim=cfg["embed_dim"],
                                                pool=cfg.get("text_pool", "mean"))  # older checkpoints: mean

    def encode_image(self, images):
        if self.text_only:
            raise RuntimeError("text_only model has no image tower")
        feats = self.backbone(images) if self.pool is None else self.pool(self.backbone.features(images))
        return l2norm(self.image_head(feats))

    def encode_text(self, ids, mask):
        return l2norm(self.text_encoder(ids, mask))

    def encode_text_embedded(self, x, mask):
        return l2norm(self.text_encoder.forward_embedded(x, mask))

    def forward(self, images, ids, mask):
        img = None if self.text_only or images is None else self.encode_image(images)
        return img, self.encode_text(ids, mask)

    def no_weight_decay(self):
        return {"text_encoder.pos_embed"}


def build_model(model_cfg: dict, backbone_weights=None) -> PersonSearchModel:
    """Rebuild from the cfg alone (checkpoint['model_cfg']); backbone_weights only for a fresh ImageNet init."""
    return PersonSearchModel(model_cfg, backbone_weights=backbone_weights)
