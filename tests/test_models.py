"""Backbones, text encoder, PersonSearchModel, text-tower ONNX export.  Run: python -m pytest -q tests/test_models.py"""
import copy
import json
import sys
import warnings
from argparse import Namespace
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from backbone import create_backbone, list_backbones, reparameterize_model  # noqa: E402
from model import build_model, default_model_cfg, validate_model_cfg  # noqa: E402
from search.charmap import encode_batch  # noqa: E402
from text_encoder import create_text_encoder, list_text_backbones  # noqa: E402

@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # tiny inputs gain nothing from intra-op threads, and on a shared 2-core box OpenMP spin-waiting
    # made these tests ~5x slower; restore the setting for whatever runs next
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


TEXTS = ["A man in a red coat and blue jeans", "穿红色外套的女人", "girl 😀 w/ backpack"]


def ids_mask(texts=TEXTS, max_len=24):
    ids, mask = encode_batch(texts, max_len=max_len)
    return torch.from_numpy(ids), torch.from_numpy(mask)


def assert_finite_grads(module):
    for n, p in module.named_parameters():
        if p.requires_grad:
            assert p.grad is not None, f"{n} got no gradient"
            assert torch.isfinite(p.grad).all(), f"{n} has non-finite gradient"


def randomize_bn(module, seed=0):
    """Non-trivial BN statistics, so folding is actually exercised (fresh BN is the identity)."""
    g = torch.Generator().manual_seed(seed)
    for m in module.modules():
        if isinstance(m, nn.BatchNorm2d):
            c = m.num_features
            m.running_mean.copy_(torch.randn(c, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(c, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(c, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(c, generator=g) * 0.1)


# ---------------------------------------------------------------- backbones
@pytest.mark.parametrize("name", list_backbones())
def test_backbone_shapes_and_grads(name):
    torch.manual_seed(0)
    net = create_backbone(name)
    y = net(torch.randn(2, 3, 64, 32))
    assert y.shape == (2, net.num_features) and torch.isfinite(y).all()
    (y * torch.randn_like(y)).sum().backward()
    assert_finite_grads(net)
    with torch.no_grad():
        y = net.eval()(torch.randn(1, 3, 224, 112))
    assert y.shape == (1, net.num_features) and torch.isfinite(y).all()


@pytest.mark.parametrize("name", list_backbones())
def test_reparameterize_equivalence(name):
    torch.manual_seed(0)
    net = create_backbone(name).eval()
    with torch.no_grad():
        randomize_bn(net)
        x = torch.randn(2, 3, 64, 32)
        y0 = net(x)
        reparameterize_model(net)
        y1 = net(x)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in net.modules()), "BN left after folding"
    torch.testing.assert_close(y1, y0, rtol=1e-4, atol=1e-4 * max(1.0, y0.abs().max().item()))
    leaves = {type(m) for m in net.modules() if not list(m.children())}
    if name.startswith("repconv"):
        assert leaves <= {nn.Conv2d, nn.ReLU}, leaves  # a plain Conv+ReLU net (+ functional GAP)
    if name.startswith("mobile"):
        assert leaves <= {nn.Conv2d, nn.ReLU, nn.Identity}, leaves
    if name.startswith("res_"):
        assert leaves <= {nn.Conv2d, nn.ReLU, nn.Identity, nn.MaxPool2d}, leaves


def test_folded_repconv_onnx_is_conv_relu_only(tmp_path):
    import onnx
    net = reparameterize_model(create_backbone("repconv_tiny").eval())
    path = tmp_path / "img.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(net, (torch.randn(1, 3, 64, 32),), str(path), input_names=["image"],
                          dynamo=False, opset_version=17)
    ops = {n.op_type for n in onnx.load(str(path)).graph.node}
    assert ops <= {"Conv", "Relu", "GlobalAveragePool", "Flatten", "Reshape", "Identity"}, ops


def test_reparameterize_twice_is_a_noop():
    net = create_backbone("repconv_tiny").eval()
    x = torch.randn(1, 3, 64, 32)
    with torch.no_grad():
        y1 = reparameterize_model(net)(x)
        y2 = reparameterize_model(net)(x)
    assert torch.equal(y1, y2)


def test_seed_dotted_names():
    net = create_backbone("backbone.mobilenet.MobileNet", width_mult=0.25, num_features=64)
    assert net(torch.randn(1, 3, 64, 32)).shape == (1, 64)
    net = create_backbone("backbone.repconv.RepConvNet", widths=(8, 8, 16, 16), depths=(1, 1, 1, 1),
                          num_features=32)
    assert net(torch.randn(1, 3, 64, 32)).shape == (1, 32)
    assert create_backbone("backbone.mobile_tiny").num_features == create_backbone("mobile_tiny").num_features
    for bad in ("backbone.mf3.ANet2", "backbone.mobilenet.NoSuchClass", "no_such_backbone"):
        with pytest.raises(ValueError):
            create_backbone(bad)


def test_width_and_depth_multipliers():
    def size(net):
        return sum(p.numel() for p in net.parameters())
    base = create_backbone("mobile_tiny")
    assert size(create_backbone("mobile_tiny", width_mult=1.0)) > size(base)
    deeper = create_backbone("mobile_tiny", depth_mult=1.0)
    assert len(deeper.features) > len(base.features)
    assert create_backbone("mobile_tiny", num_features=128).num_features == 128


def test_tv_weights_path(tmp_path):
    import torchvision
    ref = torchvision.models.mobilenet_v3_small(weights=None)  # stands in for a downloaded ImageNet file
    torch.save(ref.state_dict(), tmp_path / "w.pth")
    net = create_backbone("tv_mobilenet_v3_small", weights_path=str(tmp_path / "w.pth"))
    assert torch.equal(net.features[0][0].weight, ref.features[0][0].weight)
    assert torch.equal(net.features[-1][1].running_var, ref.features[-1][1].running_var)
    assert not any(isinstance(m, nn.Linear) for m in net.modules())  # classifier removed
    torch.save({"foo": torch.zeros(1)}, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match="not a torchvision"):
        create_backbone("tv_mobilenet_v3_small", weights_path=str(tmp_path / "bad.pth"))


# ---------------------------------------------------------------- text encoder
def _text_enc(name, pool, **kw):
    enc = create_text_encoder(name, pool=pool, **kw)
    if pool == "attn":  # non-uniform weights (zero-initialised, it starts as the mean)
        nn.init.normal_(enc.pool_score.weight, std=1.0)
    return enc


@pytest.mark.parametrize("pool", ["mean", "attn"])
@pytest.mark.parametrize("name", list_text_backbones())
def test_text_shapes_and_grads(name, pool):
    torch.manual_seed(0)
    enc = _text_enc(name, pool, out_dim=48)
    y = enc(*ids_mask())
    assert y.shape == (3, 48) and torch.isfinite(y).all()
    (y * torch.randn_like(y)).sum().backward()
    assert_finite_grads(enc)
    assert enc.input_embeddings.weight.shape == (8192, 256)


@pytest.mark.parametrize("pool", ["mean", "attn"])
@pytest.mark.parametrize("name", list_text_backbones())
def test_text_padding_invariance(name, pool):
    torch.manual_seed(0)
    enc = _text_enc(name, pool, out_dim=48).eval()
    with torch.no_grad():
        ref = enc(*ids_mask(max_len=40))
        for L in (36, 64):  # 36 >= the longest text + CLS, so nothing is truncated
            torch.testing.assert_close(enc(*ids_mask(max_len=L)), ref, rtol=1e-5, atol=1e-5)
        ids, mask = ids_mask(max_len=40)
        x = enc.input_embeddings(ids)
        junk = torch.where(mask[..., None], x, torch.randn_like(x) * 100)  # garbage in padded slots
        torch.testing.assert_close(enc.forward_embedded(junk, mask.float()), ref, rtol=1e-5, atol=1e-5)
        # and the padding really is excluded, not just small: unmasking it changes the output
        assert not torch.allclose(enc.forward_embedded(junk, torch.ones_like(mask, dtype=torch.float)), ref)


@pytest.mark.parametrize("pool", ["mean", "attn"])
@pytest.mark.parametrize("name", list_text_backbones())
def test_text_length_groups_equal_the_full_length_forward(name, pool):
    """forward() encodes rows in length groups cut to their longest text; values and gradients must equal one
    full-length pass (forward_embedded), rows in their original order, for a batch of several groups."""
    import text_encoder
    torch.manual_seed(0)
    enc = _text_enc(name, pool, out_dim=24, max_seq_length=96)
    B = 3 * text_encoder.LENGTH_GROUP + 5
    lengths = torch.randint(1, 97, (B,))
    # a full-length row and an empty one (mean pool only: attention pooling of a text with no token averages
    # its padding, which has no length-independent meaning)
    lengths[3], lengths[7] = 96, (0 if pool == "mean" else 1)
    ids = torch.randint(1, 8192, (B, 96))
    mask = torch.arange(96)[None, :] < lengths[:, None]
    ids = ids * mask  # pad id 0
    y = enc(ids, mask)
    g = torch.randn_like(y)
    (y * g).sum().backward()
    grads = {k: p.grad.clone() for k, p in enc.named_parameters() if p.grad is not None}
    enc.zero_grad()
    ref = enc.forward_embedded(enc.input_embeddings(ids), mask.float())
    (ref * g).sum().backward()
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-6)
    for k, p in enc.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(grads[k], p.grad, rtol=1e-4, atol=1e-5, msg=lambda m, k=k: f"{k}: {m}")
    # rows really are kept apart: swapping two rows' texts swaps (only) their outputs
    perm = torch.arange(B)
    perm[[3, 10]] = perm[[10, 3]]
    with torch.no_grad():
        torch.testing.assert_close(enc(ids[perm], mask[perm]), ref.detach()[perm], rtol=1e-5, atol=1e-6)


def test_text_too_long_is_refused():
    enc = create_text_encoder("char_tiny", out_dim=8, max_seq_length=16)
    with pytest.raises(ValueError, match="max_seq_length"):
        enc(*ids_mask(max_len=17))
    with pytest.raises(ValueError):
        create_text_encoder("char_nope", out_dim=8)
    with pytest.raises(ValueError, match="text pool"):
        create_text_encoder("char_tiny", out_dim=8, pool="max")


def test_attn_pool_starts_as_the_mean():
    torch.manual_seed(0)
    attn = create_text_encoder("char_tiny", out_dim=16, pool="attn")
    mean = create_text_encoder("char_tiny", out_dim=16)
    mean.load_state_dict({k: v for k, v in attn.state_dict().items() if not k.startswith("pool_score")})
    with torch.no_grad():
        torch.testing.assert_close(attn(*ids_mask()), mean(*ids_mask()), rtol=1e-5, atol=1e-6)


def _export_text(enc, path, exporter):
    class Wrapper(nn.Module):  # what export_model.py exports: the graph after the table lookup
        def __init__(self, enc):
            super().__init__()
            self.enc = enc

        def forward(self, text_embeds, text_mask):
            return self.enc.forward_embedded(text_embeds, text_mask)

    w = Wrapper(enc).eval()
    args = (torch.randn(2, 12, enc.embed_dim), torch.ones(2, 12))
    names = dict(input_names=["text_embeds", "text_mask"], output_names=["embedding"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if exporter == "torchscript":
            dyn = {"text_embeds": {0: "B", 1: "L"}, "text_mask": {0: "B", 1: "L"}}
            torch.onnx.export(w, args, str(path), dynamo=False, dynamic_axes=dyn, opset_version=17, **names)
        else:
            B, L = torch.export.Dim("B"), torch.export.Dim("L", max=enc.max_seq_length)
            torch.onnx.export(w, args, str(path), dynamo=True, dynamic_shapes=({0: B, 1: L}, {0: B, 1: L}),
                              opset_version=18, verbose=False, **names)
    return w


@pytest.mark.parametrize("pool", ["mean", "attn"])
@pytest.mark.parametrize("exporter", ["torchscript", "dynamo"])
def test_text_onnx_export(tmp_path, exporter, pool):
    import onnx
    import onnxruntime as ort
    torch.manual_seed(0)
    enc = _text_enc("char_tiny", pool, out_dim=32, max_seq_length=32)
    path = tmp_path / "text.onnx"
    w = _export_text(enc, path, exporter)
    graph = onnx.load(str(path)).graph
    inputs = {i.name for i in graph.input}
    assert {"text_embeds", "text_mask"} <= inputs
    assert not [n for n in graph.node if n.op_type == "Gather" and set(n.input) & inputs], "Gather on an input"
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for B, L in ((3, 7), (1, 29)):  # neither the traced B nor L
        x = torch.randn(B, L, enc.embed_dim)
        m = torch.ones(B, L)
        m[0, L // 2:] = 0
        out = sess.run(None, {"text_embeds": x.numpy(), "text_mask": m.numpy()})[0]
        with torch.no_grad():
            np.testing.assert_allclose(out, w(x, m).numpy(), rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------- PersonSearchModel
def small_cfg(**kw):
    args = dict(backbone="mobile_tiny", text_backbone="char_tiny", feature_dim=64, max_seq_length=32)
    args.update(kw)
    return default_model_cfg(args, teacher_dim=96, teacher_name="test-teacher")


def test_model_outputs_normalised():
    torch.manual_seed(0)
    model = build_model(small_cfg()).eval()
    ids, mask = ids_mask()
    with torch.no_grad():
        img, txt = model(torch.randn(2, 3, 64, 32), ids, mask)
        emb = model.encode_text_embedded(model.text_encoder.input_embeddings(ids), mask.float())
    assert img.shape == (2, 64) and txt.shape == (3, 64)
    torch.testing.assert_close(img.norm(dim=-1), torch.ones(2))
    torch.testing.assert_close(txt.norm(dim=-1), torch.ones(3))
    torch.testing.assert_close(emb, txt)


def test_text_only_mode():
    cfg = small_cfg(text_only=True, feature_dim=512)
    assert cfg["feature_dim"] == 96 and cfg["text_only"]  # forced to the teacher's dim
    model = build_model(cfg)
    assert not hasattr(model, "backbone") and not any("backbone" in k for k in model.state_dict())
    img, txt = model(None, *ids_mask())
    assert img is None and txt.shape == (3, 96)
    with pytest.raises(RuntimeError):
        model.encode_image(torch.randn(1, 3, 64, 32))
    with pytest.raises(ValueError):
        default_model_cfg({"text_only": True}, teacher_dim=None)


@pytest.mark.parametrize("kw", [dict(), dict(backbone="repconv_tiny", backbone_kwargs='{"width_mult": 0.5}'),
                                dict(text_only=True), dict(text_pool="attn")])
def test_cfg_json_roundtrip_loads_strictly(kw):
    torch.manual_seed(0)
    cfg = small_cfg(**kw)
    model = build_model(cfg).eval()
    cfg2 = json.loads(json.dumps(cfg))
    assert cfg2 == cfg
    model2 = build_model(cfg2).eval()
    model2.load_state_dict(copy.deepcopy(model.state_dict()), strict=True)
    ids, mask = ids_mask()
    x = torch.randn(1, 3, 64, 32)
    with torch.no_grad():
        a, b = model(x, ids, mask), model2(x, ids, mask)
    torch.testing.assert_close(b[1], a[1])
    if a[0] is not None:
        torch.testing.assert_close(b[0], a[0])


def test_text_pool_from_a_checkpoint_cfg():
    cfg = small_cfg()
    old = {k: v for k, v in cfg.items() if k != "text_pool"}  # checkpoints from before --text_pool: the mean
    assert build_model(old).text_encoder.pool == "mean"
    assert build_model(small_cfg(text_pool="attn")).text_encoder.pool_score is not None
    with pytest.raises(ValueError, match="text_pool"):
        validate_model_cfg(dict(cfg, text_pool="__import__('os')"))


def test_default_model_cfg_parsing():
    cfg = default_model_cfg(Namespace(image_size="256x128", backbone="mobile_base", feature_dim=None), 1152)
    assert cfg["image_size"] == [256, 128] and cfg["backbone"] == "mobile_base" and cfg["feature_dim"] == 512
    assert default_model_cfg({"image_size": (224, 112)}, 8)["image_size"] == [224, 112]
    assert cfg["charmap_version"] == "cp-hash-v1" and len(cfg["mean"]) == len(cfg["std"]) == 3
    bad = dict(cfg, charmap_version="other")
    with pytest.raises(ValueError, match="character mapping"):
        build_model(bad)


# ---------------------------------------------------------------- stripe pooling
def test_stripe_pooling_keeps_height_and_old_checkpoints_load():
    from model import resolve_stripes
    torch.manual_seed(0)
    m = build_model(small_cfg(backbone="res_tiny", image_size="128x64")).eval()  # last map 4x2 -> 4 stripes
    assert m.n_stripes == 4 and m.image_head.bn.num_features == 4 * m.backbone.num_features
    x = torch.randn(2, 3, 128, 64)
    with torch.no_grad():
        a = m.encode_image(x)
        b = m.encode_image(torch.flip(x, dims=[2]))  # upside down: same global content, other places
    assert a.shape == (2, 64) and not torch.allclose(a, b, atol=1e-3)
    g = build_model(small_cfg(backbone="res_tiny", image_size="128x64", stripes=0)).eval()
    assert g.n_stripes == 0 and g.image_head.bn.num_features == g.backbone.num_features
    old = small_cfg(backbone="res_tiny", image_size="128x64")
    del old["stripes"]  # a checkpoint written before stripes existed: the global pool it was trained with
    assert build_model(old).n_stripes == 0
    assert resolve_stripes("auto", 7) == 7 and resolve_stripes("auto", 16) == 8 and resolve_stripes("auto", 9) == 3
    with pytest.raises(ValueError):
        build_model(small_cfg(backbone="res_tiny", image_size="128x64", stripes=3))  # 3 does not divide 4
    with pytest.raises(ValueError):
        small_cfg(stripes="many")


def test_query_vocab_in_a_checkpoint_cfg_is_checked():
    cfg = small_cfg()
    assert validate_model_cfg(dict(cfg, query_vocab=["man", "red"]))["query_vocab"] == ["man", "red"]
    build_model(dict(cfg, query_vocab=["man"]))  # the model ignores it: a list of words for the query side
    for bad in ("man red", [1, 2], {"man": 1}, ["man", "Red Shirt"]):
        with pytest.raises(ValueError, match="query_vocab must be a list of words"):
            validate_model_cfg(dict(cfg, query_vocab=bad))
