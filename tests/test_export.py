"""checkpoint.py + export_model.py: tiny untrained models (no training needed), CPU only, ~1 min.

    python3 -m pytest -q tests/test_export.py

Everything the export claims is re-checked here independently: fresh ONNX Runtime sessions on the written
files against the PyTorch model rebuilt from the checkpoint, the text path exactly as search/ runs it
(search.charmap.encode_batch + numpy lookup into input_embeddings.pt.npy), dynamic B and L, no Gather on a
graph input, int8 size/cosine, refusals with exit code 2 and one stderr line.
"""
import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import export_model  # noqa: E402
from checkpoint import CheckpointError, is_student_checkpoint, load_checkpoint, save_checkpoint  # noqa: E402
from model import build_model, default_model_cfg  # noqa: E402
from search import charmap  # noqa: E402
from search.engine import preprocess  # noqa: E402

MAX_LEN, VOCAB, EMB, DIM = 24, 1024, 32, 48
# Chinese, emoji (incl. ZWJ sequences), rare CJK extension B, scripts a person-caption dataset never has
TEXTS = ["a man in a blue coat with a black backpack", "穿红色外套和黑色裤子的女人，背着包",
         "girl 👧🏻 with an umbrella ☂️ 雨伞", "𠀋𪚥 ꙮ 𓀀 ᚠᛇᚻ Ωμέγα ⵣ 🧑‍🚀"]


def _cfg(**kw):
    a = dict(backbone="repconv_tiny", text_backbone="char_tiny", feature_dim=DIM, image_size=[64, 32],
             max_seq_length=MAX_LEN, vocab_size=VOCAB, embed_dim=EMB)
    a.update(kw)
    return default_model_cfg(a, teacher_dim=DIM, teacher_name="toy/teacher")


def _make_ckpt(path, data=None, **kw):
    torch.manual_seed(0)
    model = build_model(_cfg(**kw))
    with torch.no_grad():
        # An untrained model maps every input to nearly the same embedding (small init; a deep random CNN's
        # pooled features barely depend on the image), which would let any parity check pass trivially. So:
        # fan-in scaled Linear weights, unit-variance character table, and BN statistics calibrated on a batch
        # of images (real, non-default running stats: folding has something to get wrong).
        for m in model.modules():
            if isinstance(m, torch.nn.Linear):
                m.reset_parameters()
            elif isinstance(m, torch.nn.Embedding):
                m.weight.normal_(0, 1)
            elif isinstance(m, torch.nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
                m.momentum = None  # cumulative average over the calibration batch
        model.text_encoder.pos_embed.normal_(0, 0.1)
        if not model.text_only:
            imgs = [im for _, im in export_model.synthetic_images(8, seed=1)]
            model.train()
            model.encode_image(torch.from_numpy(np.stack([preprocess(im, None, (64, 32), export_model.IMAGENET_MEAN,
                                                                     export_model.IMAGENET_STD) for im in imgs])))
            model.eval()
    save_checkpoint(path, {"model": model.state_dict(), "model_cfg": model.cfg, "optimizer": {}, "scaler": {},
                           "scheduler": {}, "step": 0, "args": {"data": data} if data else {},
                           "rng": {"torch": torch.get_rng_state()},
                           "criterion": {}})
    return path


def _args(ckpt, out, *extra):
    p = argparse.ArgumentParser(parents=[export_model.get_args_parser()])
    return p.parse_args([str(ckpt), str(out), *extra])


def _torch_model(ckpt):
    d = load_checkpoint(ckpt)
    m = build_model(d["model_cfg"])
    m.load_state_dict(d["model"])
    return m.eval()


def _sess(path):
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def _cos_min(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(((a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))).min())


def _export(tmp_path_factory, name, *flags, **kw):
    d = tmp_path_factory.mktemp(name)
    ckpt = _make_ckpt(d / "student.pt", **kw)
    out = d / "out"
    with torch.no_grad():
        export_model.export(_args(ckpt, out, *flags))
    return ckpt, out, None


@pytest.fixture(scope="module")
def exported(tmp_path_factory, synth_data):
    """One dynamic-shape export of repconv_tiny with --fp16 (held-out parity on the synthetic data's test ids)
    -> (ckpt, out_dir, None). A variant missing its bound raises ExportFailure and fails the fixture. (int8: see
    recipe_dynamic; calibrated int8 of this random, BN-calibrated repconv_tiny misses the bound, min cos ~0.7.)"""
    return _export(tmp_path_factory, "export", "--fp16", "--batch_check", "3", data=synth_data)


STATIC_L = 16  # < MAX_LEN: search/ must truncate longer queries to it


@pytest.fixture(scope="module")
def recipe_static(tmp_path_factory, synth_data):
    """The shipped recipe's architecture (res_tiny / char_tiny), tiny, static shapes [1,3,64,32] / [1,16,E], int8."""
    return _export(tmp_path_factory, "static", "--static_shapes", "--batch", "1", "--text_length", str(STATIC_L),
                   "--int8", "--fp16", data=synth_data, backbone="res_tiny")


@pytest.fixture(scope="module")
def recipe_dynamic(tmp_path_factory, synth_data):
    return _export(tmp_path_factory, "dynamic", "--int8", "--fp16", "--batch_check", "2", data=synth_data,
                   backbone="res_tiny")


# ------------------------------------------------------------------------------------------------ checkpoint.py
def test_checkpoint_atomic_roundtrip_and_refusals(tmp_path):
    p = tmp_path / "c.pt"
    obj = {"model": {"w": torch.ones(2)}, "model_cfg": {"image_size": [64, 32]}, "step": 3, "args": {"lr": 1e-3},
           "rng": {"torch": torch.get_rng_state()}}
    save_checkpoint(p, obj)
    assert os.listdir(tmp_path) == ["c.pt"]  # no tmp file left behind
    d = load_checkpoint(p)
    assert d["step"] == 3 and torch.equal(d["model"]["w"], torch.ones(2)) and is_student_checkpoint(d)
    # values weights_only loading would refuse are caught at save time, naming the key; the old file survives
    with pytest.raises(CheckpointError, match=r"\['args'\].*Namespace"):
        save_checkpoint(p, {**obj, "args": argparse.Namespace(lr=1)})
    with pytest.raises(CheckpointError, match=r"\['x'\]\[1\].*numpy"):
        save_checkpoint(p, {**obj, "x": [1, np.float64(2.0)]})
    assert load_checkpoint(p)["step"] == 3 and os.listdir(tmp_path) == ["c.pt"]
    # every unusable file is one line
    (tmp_path / "t.txt").write_text("hello")
    torch.save({"a": torch.zeros(1)}, tmp_path / "sd.pt")
    torch.save({"model": {"a": torch.zeros(1)}, "args": argparse.Namespace(a=1), "model_cfg": {}}, tmp_path / "ns.pt")
    raw = p.read_bytes()
    (tmp_path / "trunc.pt").write_bytes(raw[: len(raw) // 2])
    for name, pat in [("missing.pt", "no such"), ("t.txt", "not a PyTorch"), ("sd.pt", "bare state_dict"),
                      ("ns.pt", "argparse.Namespace"), ("trunc.pt", "corrupt or truncated")]:
        with pytest.raises(CheckpointError, match=pat) as e:
            load_checkpoint(tmp_path / name)
        assert "\n" not in str(e.value)
    assert isinstance(CheckpointError("x"), ValueError)


# ------------------------------------------------------------------------------------------------ export
def test_files_and_model_info(exported):
    ckpt, out, _ = exported
    names = sorted(os.listdir(out))
    assert names == sorted(["input_embeddings.pt.npy", "input_embeddings.fp16.npy", "model_image.onnx",
                            "model_image.fp16.onnx", "model_info.json", "model_text.fp16.onnx",
                            "model_text.onnx", "query_bank.npy"])  # and no tmp leftovers
    info = json.loads((out / "model_info.json").read_text())
    variants, ops, outside = info.pop("variants"), info.pop("ops"), info.pop("outside_npu_list")
    # the query bank of search/hubness.py: the student's embeddings of the training identities' query-like texts
    qb = info.pop("query_bank")
    bank = np.load(out / "query_bank.npy", allow_pickle=False)
    assert qb == {"file": "query_bank.npy", "rows": len(bank), "k": max(1, round(len(bank) / 90)), "weight": 0.5}
    assert bank.dtype == np.float16 and bank.shape[1] == DIM and len(bank) > 10
    import data as data_lib
    from evaluation_model import query_bank
    recs = data_lib.load_records(str(load_checkpoint(ckpt)["args"]["data"]))
    want = query_bank(_torch_model(ckpt), _torch_model(ckpt).cfg, recs, data_lib.split_records(recs, 0.1, "train"))
    np.testing.assert_allclose(bank.astype(np.float32), want, atol=2e-3)
    assert info == {"format_version": 1, "image_size": [64, 32], "mean": [0.485, 0.456, 0.406],
                    "std": [0.229, 0.224, 0.225], "max_seq_length": MAX_LEN, "vocab_size": VOCAB,
                    "embed_dim": EMB, "charmap_version": charmap.CHARMAP_VERSION, "feature_dim": DIM,
                    "teacher_space": False, "teacher": "toy/teacher", "backbone": "repconv_tiny",
                    "text_backbone": "char_tiny", "image_model": "model_image.onnx",
                    "text_model": "model_text.onnx", "input_embeddings": "input_embeddings.pt.npy",
                    "query_vocab": None, "static_shapes": None,
                    "input_shapes": {"model_image.onnx": {"image": ["batch", 3, 64, 32]},
                                     "model_text.onnx": {"text_embeds": ["batch", "seq", EMB],
                                                         "text_mask": ["batch", "seq"]}}}
    assert list(variants) == ["fp16"] and variants["fp16"] == {
        "image_model": "model_image.fp16.onnx", "text_model": "model_text.fp16.onnx",
        "input_embeddings": "input_embeddings.fp16.npy", "parity": variants["fp16"]["parity"]}
    assert variants["fp16"]["parity"]["cos_image"] >= 0.999 and variants["fp16"]["parity"]["cos_text"] >= 0.999
    assert sorted(ops) == sorted(n for n in names if n.endswith(".onnx")) and sorted(outside) == sorted(ops)
    table = np.load(out / "input_embeddings.pt.npy", allow_pickle=False)
    assert table.dtype == np.float32 and table.shape == (VOCAB, EMB)


def test_graph_contract(exported):
    _, out, _ = exported
    img = onnx.load(out / "model_image.onnx")
    txt = onnx.load(out / "model_text.onnx")

    def dims(v):
        return [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]
    assert [i.name for i in img.graph.input] == ["image"] and [o.name for o in img.graph.output] == ["embedding"]
    b, c, h, w = dims(img.graph.input[0])
    assert isinstance(b, str) and (c, h, w) == (3, 64, 32)
    assert [i.name for i in txt.graph.input] == ["text_embeds", "text_mask"]
    (b1, l1, e), (b2, l2) = dims(txt.graph.input[0]), dims(txt.graph.input[1])
    assert isinstance(b1, str) and isinstance(l1, str) and e == EMB and (b1, l1) == (b2, l2)
    assert all(i.type.tensor_type.elem_type == onnx.TensorProto.FLOAT for i in txt.graph.input)
    # the lookup stays outside: no Gather reads a graph input, as data or indices (Shape->Gather is fine)
    ins = {i.name for i in txt.graph.input}
    assert not [n for n in txt.graph.node if n.op_type.startswith("Gather") and set(n.input) & ins]
    assert export_model.gathers_on_inputs(txt) == []
    # and the repconv branches were folded: one Conv per RepConv, no BatchNormalization
    ops = {n.op_type for n in img.graph.node}
    assert "BatchNormalization" not in ops and "Conv" in ops


def test_gather_check_is_not_vacuous(tmp_path):
    """An Embedding on a graph input must be detected (guards the assertion above against passing trivially):
    it exports as Gather(data=table initializer, indices=graph input)."""
    emb = torch.nn.Embedding(10, 4).eval()
    f = tmp_path / "e.onnx"
    with pytest.warns(DeprecationWarning):  # the TorchScript exporter announces its deprecation
        torch.onnx.export(emb, (torch.zeros(1, 3, dtype=torch.long),), str(f), dynamo=False, input_names=["ids"],
                          output_names=["embedding"])
    g = onnx.load(f)
    assert [n.op_type for n in g.graph.node] == ["Gather"] and g.graph.node[0].input[1] == "ids"
    assert export_model.gathers_on_inputs(g)


def test_image_parity_batch_1_and_3(exported):
    ckpt, out, _ = exported
    model = _torch_model(ckpt)  # unfolded, straight from the checkpoint
    info = json.loads((out / "model_info.json").read_text())
    imgs = [im for _, im in export_model.synthetic_images(3, seed=7)]
    x = np.stack([preprocess(im, None, info["image_size"], info["mean"], info["std"]) for im in imgs])
    sess = _sess(out / "model_image.onnx")
    for b in (1, 3):
        got = sess.run(["embedding"], {"image": x[:b]})[0]
        ref = model.encode_image(torch.from_numpy(x[:b])).detach().numpy()
        assert got.shape == (b, DIM)
        assert np.abs(got - ref).max() < 1e-4 and _cos_min(got, ref) >= 0.9999
        assert np.allclose(np.linalg.norm(got, axis=1), 1, atol=1e-4)
    # different images give clearly different embeddings, so the parity above is not a constant-output artefact
    assert _cos_min(got[:1], got[1:2]) < 0.99


def test_text_parity_search_path_dynamic_b_and_l(exported):
    ckpt, out, _ = exported
    model = _torch_model(ckpt)
    table = np.load(out / "input_embeddings.pt.npy", allow_pickle=False)
    ids, mask = charmap.encode_batch(TEXTS, max_len=MAX_LEN, vocab_size=VOCAB)
    # the never-seen characters (all but the spaces) really land in the hashed rows beyond the direct range
    rows = ids[3][mask[3]][1:]
    assert (rows[rows != charmap.char_row(ord(" "), VOCAB)] >= 0x253).all() and len(rows) > 10
    sess = _sess(out / "model_text.onnx")
    outs = {}
    for L in (MAX_LEN, 10, 1):  # search/ trims to the longest query: L=1 is an empty query (just CLS)
        for b in (1, len(TEXTS)):
            x = charmap.lookup(table, ids[:b, :L])  # exactly what search/ feeds the graph
            got = sess.run(["embedding"], {"text_embeds": x, "text_mask": mask[:b, :L].astype(np.float32)})[0]
            ref = model.encode_text(torch.from_numpy(ids[:b, :L]), torch.from_numpy(mask[:b, :L])).detach().numpy()
            assert got.shape == (b, DIM)
            assert _cos_min(got, ref) >= 0.9999 and np.abs(got - ref).max() < 1e-4, (L, b)
            outs[(L, b)] = got
    assert _cos_min(outs[(MAX_LEN, len(TEXTS))][:1], outs[(MAX_LEN, len(TEXTS))][1:2]) < 0.99
    # L really changes the input (truncation), so the two L runs are not the same computation twice
    assert not np.allclose(outs[(MAX_LEN, len(TEXTS))][0], outs[(10, len(TEXTS))][0], atol=1e-3)


def test_int8_smaller_and_close(recipe_dynamic):
    """Calibrated static int8 of BOTH towers: written, smaller, QDQ, close to PyTorch fp32 through the search path."""
    ckpt, out, _ = recipe_dynamic
    model = _torch_model(ckpt)
    ids, mask = charmap.encode_batch(TEXTS, max_len=MAX_LEN, vocab_size=VOCAB)
    for f in ("model_text", "model_image"):
        assert (out / f"{f}.int8.onnx").stat().st_size < 0.6 * (out / f"{f}.onnx").stat().st_size
        ops = {n.op_type for n in onnx.load(out / f"{f}.int8.onnx").graph.node}
        assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    int8_table = charmap.load_table(out / "input_embeddings.int8.npz")  # what search/ reads for the int8 graph
    got = _sess(out / "model_text.int8.onnx").run(
        ["embedding"], {"text_embeds": charmap.lookup(int8_table, ids), "text_mask": mask.astype(np.float32)})[0]
    assert _cos_min(got, model.encode_text(torch.from_numpy(ids), torch.from_numpy(mask)).detach().numpy()) >= 0.99
    x = np.stack([preprocess(im, None, (64, 32), export_model.IMAGENET_MEAN, export_model.IMAGENET_STD)
                  for _, im in export_model.synthetic_images(3, seed=3)])
    got = _sess(out / "model_image.int8.onnx").run(["embedding"], {"image": x})[0]
    assert _cos_min(got, model.encode_image(torch.from_numpy(x)).detach().numpy()) >= 0.99
    # the recorded held-out parity is what the export gated on
    par = json.loads((out / "model_info.json").read_text())["variants"]["int8"]["parity"]
    assert par["cos_image"] >= 0.99 and par["cos_text"] >= 0.99 and par["n_queries"] > 10
    assert export_model.r1_ok(par["r1"], par["r1_fp32"], par["n_queries"], 1.0)


def test_text_only_exports_without_image_graph(tmp_path, capsys):
    ckpt = _make_ckpt(tmp_path / "to.pt", text_only=True)
    out = tmp_path / "out"
    export_model.main(_args(ckpt, out, "--batch_check", "2", "--fp16"))
    assert sorted(os.listdir(out)) == ["input_embeddings.fp16.npy", "input_embeddings.pt.npy", "model_info.json",
                                       "model_text.fp16.onnx", "model_text.onnx"]
    info = json.loads((out / "model_info.json").read_text())
    assert info["image_model"] is None and info["teacher_space"] is True and info["feature_dim"] == DIM
    printed = capsys.readouterr().out
    assert f'export to "{out / "model_text.onnx"}" OK.' in printed and "Simplified Model" in printed
    # fp16 variant: float32 I/O kept, close to PyTorch
    model = _torch_model(ckpt)
    ids, mask = charmap.encode_batch(TEXTS, max_len=MAX_LEN, vocab_size=VOCAB)
    sess = _sess(out / "model_text.fp16.onnx")
    got = sess.run(["embedding"], {"text_embeds": charmap.lookup(np.load(out / "input_embeddings.pt.npy"), ids),
                                   "text_mask": mask.astype(np.float32)})[0]
    assert got.dtype == np.float32
    ref = model.encode_text(torch.from_numpy(ids), torch.from_numpy(mask)).detach().numpy()
    assert _cos_min(got, ref) >= 0.999


def test_refuses_non_student_in_process(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("not a model")
    torch.save(torch.zeros(3), tmp_path / "tensor.pt")
    good = load_checkpoint(_make_ckpt(tmp_path / "good.pt"))
    good["model_cfg"] = {**good["model_cfg"], "feature_dim": DIM * 2}  # weights no longer fit the cfg
    save_checkpoint(tmp_path / "mismatch.pt", good)
    for f, pat in [("notes.txt", "not a PyTorch checkpoint"), ("tensor.pt", "not a student checkpoint"),
                   ("mismatch.pt", "weights do not match")]:
        with pytest.raises(SystemExit) as e:
            export_model.main(_args(tmp_path / f, tmp_path / "out"))
        assert e.value.code == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and pat in err and "\n" not in err, err
    assert not (tmp_path / "out").exists()  # nothing written for a refused checkpoint


def test_cli_refuses_plain_state_dict(tmp_path):
    f = tmp_path / "plain_state_dict.pt"
    torch.save(torch.nn.Linear(2, 2).state_dict(), f)
    r = subprocess.run([sys.executable, str(ROOT / "export_model.py"), str(f), str(tmp_path / "out")],
                       capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "not a student checkpoint" in lines[0], r.stderr
    assert "Traceback" not in r.stderr


def test_verification_catches_a_wrong_graph(exported):
    """The ORT check fails loudly: feeding it references from a different model must be reported."""
    _, out, _ = exported
    x = np.random.RandomState(0).randn(2, 3, 64, 32).astype(np.float32)
    wrong_ref = np.random.RandomState(1).randn(2, DIM).astype(np.float32)
    _, _, err = export_model.verify((out / "model_image.onnx").read_bytes(), [("x", {"image": x}, wrong_ref)],
                                    0.9999, 1e-4, "model_image.onnx")
    assert err and "differs from PyTorch" in err


def test_verification_images_from_dataset(synth_data):
    x, src = export_model.verification_images({"data": synth_data}, _cfg(), 3)
    assert x.shape == (3, 3, 64, 32) and x.dtype == np.float32 and "images from" in src
    x, src = export_model.verification_images({"data": "/nonexistent/d.json"}, _cfg(), 2)
    assert x.shape == (2, 3, 64, 32) and "synthetic" in src and "not found" in src


# ------------------------------------------------------------------------------------------------ static shapes
def _dims(v):
    return [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]


def test_static_shapes_contract_and_no_plumbing(recipe_static):
    _, out, _ = recipe_static
    img, txt = onnx.load(out / "model_image.onnx"), onnx.load(out / "model_text.onnx")
    assert _dims(img.graph.input[0]) == [1, 3, 64, 32] and _dims(img.graph.output[0]) == [1, DIM]
    assert [_dims(i) for i in txt.graph.input] == [[1, STATIC_L, EMB], [1, STATIC_L]]
    for f in sorted(p.name for p in out.glob("*.onnx")):  # fp32, fp16 and int8
        ops = {n.op_type for n in onnx.load(out / f).graph.node}
        assert not ops & export_model.PLUMBING_OPS, (f, ops & export_model.PLUMBING_OPS)
    info = json.loads((out / "model_info.json").read_text())
    assert info["static_shapes"] == {"batch": 1, "text_length": STATIC_L}
    assert info["input_shapes"]["model_text.onnx"] == {"text_embeds": [1, STATIC_L, EMB], "text_mask": [1, STATIC_L]}


def test_static_parity_through_search(recipe_static):
    """search/ pads or truncates queries to the static length and runs the fixed batch; equal to PyTorch on the
    same truncated text. A query longer than STATIC_L - 1 characters must be cut (not fail, not differ)."""
    from search.engine import ImageEncoder, TextEncoder
    ckpt, out, _ = recipe_static
    model = _torch_model(ckpt)
    enc = TextEncoder(out)
    assert enc.max_seq_length == STATIC_L and not enc.dynamic_length
    got = enc.encode(TEXTS + [""])  # 5 texts through a batch-1 graph; the first is longer than 15 characters
    ids, mask = charmap.encode_batch(TEXTS + [""], max_len=STATIC_L, vocab_size=VOCAB)
    ref = model.encode_text(torch.from_numpy(ids), torch.from_numpy(mask)).detach().numpy()
    assert _cos_min(got, ref) >= 0.9999 and np.abs(got - ref).max() < 1e-4
    full = model.encode_text(*(torch.from_numpy(a) for a in charmap.encode_batch(TEXTS[:1], MAX_LEN, VOCAB)))
    assert _cos_min(got[:1], full.detach().numpy()) < 0.9999  # truncation really happened
    imgs = [(im, None) for _, im in export_model.synthetic_images(3, seed=5)]
    got = ImageEncoder(out).encode(imgs)
    x = np.stack([preprocess(im, None, (64, 32), export_model.IMAGENET_MEAN, export_model.IMAGENET_STD)
                  for im, _ in imgs])
    ref = model.encode_image(torch.from_numpy(x)).detach().numpy()
    assert got.shape == (3, DIM) and _cos_min(got, ref) >= 0.9999


def test_static_int8_parity_through_search(recipe_static):
    """The static int8 pair with its int8 table (TextEncoder picks the variant's table) against fp32 ONNX."""
    from search.engine import ImageEncoder, TextEncoder, load_export
    _, out, _ = recipe_static
    info = load_export(out)
    v = info["variants"]["int8"]
    t8 = TextEncoder(out, text_model=str(out / v["text_model"]))
    assert Path(t8.info["_input_embeddings"]).name == "input_embeddings.int8.npz"
    assert (out / "input_embeddings.int8.npz").stat().st_size < 0.3 * (out / "input_embeddings.pt.npy").stat().st_size
    assert _cos_min(t8.encode(TEXTS), TextEncoder(out).encode(TEXTS)) >= 0.99
    imgs = [(im, None) for _, im in export_model.synthetic_images(4, seed=9)]
    i32 = ImageEncoder(info).encode(imgs)
    i8 = ImageEncoder(dict(info, _image_model=str(out / v["image_model"]))).encode(imgs)
    assert _cos_min(i8, i32) >= 0.99 and _cos_min(i32[:1], i32[1:2]) < 0.99


def test_shape_flag_refusals(tmp_path, capsys, synth_data):
    ckpt = _make_ckpt(tmp_path / "s.pt")
    for flags, pat in [(["--batch", "2"], "use them with --static_shapes"),
                       (["--static_shapes", "--text_length", str(MAX_LEN + 1)], "--text_length must be in"),
                       (["--static_shapes", "--batch", "0"], "--batch must be >= 1"),
                       (["--int8"], "pass --data"),
                       (["--int8", "--data", str(tmp_path / "none.json")], "not found")]:
        with pytest.raises(SystemExit) as e:
            export_model.main(_args(ckpt, tmp_path / "out", *flags))
        err = capsys.readouterr().err.strip()
        assert e.value.code == 2 and err.startswith("error: ") and pat in err and "\n" not in err, (flags, err)
    assert not (tmp_path / "out").exists()


def test_table_formats_roundtrip_and_refusals(tmp_path):
    t = np.random.RandomState(0).randn(50, 6).astype(np.float32)
    t[3] = 0  # an all-zero row (PAD is often one) must not divide by zero
    for kind, tol in (("fp32", 0), ("fp16", 2e-3), ("int8", 0.02)):
        f = tmp_path / charmap.TABLE_FILES[kind]
        f.write_bytes(charmap.table_bytes(t, kind))
        got = charmap.load_table(f)
        assert got.dtype == np.float32 and got.shape == t.shape and np.abs(got - t).max() <= tol * np.abs(t).max()
        assert np.array_equal(got, charmap.stored_table(t, kind))
    np.savez(tmp_path / "bad.npz", int8=np.zeros((2, 2), np.int8))
    np.save(tmp_path / "bad.npy", np.zeros((2, 2), np.int64))
    (tmp_path / "empty.npy").write_bytes(b"")
    for f in ("bad.npz", "bad.npy", "empty.npy"):
        with pytest.raises(ValueError):
            charmap.load_table(tmp_path / f)


# ------------------------------------------------------------------------------------------------ op report
def test_op_report_matches_graphs_and_npu_list(recipe_static, recipe_dynamic):
    for _, out, _ in (recipe_static, recipe_dynamic):
        info = json.loads((out / "model_info.json").read_text())
        files = sorted(f.name for f in out.glob("*.onnx"))
        assert sorted(info["ops"]) == files
        for f in files:
            rep = export_model.op_report(onnx.load(out / f))
            assert info["ops"][f] == rep["ops"] and info["outside_npu_list"][f] == rep["outside_npu_list"]
    static = json.loads((recipe_static[1] / "model_info.json").read_text())
    # static fp32 and int8 graphs use only listed ops; fp16 adds its Cast nodes (float32 I/O)
    assert all(v == ([] if ".fp16." not in f else ["Cast"]) for f, v in static["outside_npu_list"].items()), \
        static["outside_npu_list"]
    # not vacuous: the dynamic text graph's shape plumbing is reported
    dyn = json.loads((recipe_dynamic[1] / "model_info.json").read_text())
    assert "Shape" in dyn["outside_npu_list"]["model_text.onnx"]


def test_readme_op_lists_are_generated_from_the_report(recipe_static, recipe_dynamic):
    """README.md's op-lists block is exactly tools/op_lists.py's output for the recipe (dynamic, then static)."""
    from tools import op_lists
    infos = [json.loads((out / "model_info.json").read_text()) for _, out, _ in (recipe_dynamic, recipe_static)]
    block = op_lists.op_lists(infos)
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    if os.environ.get("UPDATE_README_OP_LISTS") == "1":  # after a model change: rewrite the block, then re-run
        (ROOT / "README.md").write_text(op_lists.replace_block(readme, block), encoding="utf-8")
        readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert op_lists.replace_block(readme, block) == readme, \
        "README op lists are stale: UPDATE_README_OP_LISTS=1 python3 -m pytest tests/test_export.py -k op_lists"


# ------------------------------------------------------------------------------------------------ OpenVINO
def test_openvino_matches_onnxruntime(recipe_static, recipe_dynamic):
    """A second runtime: OpenVINO CPU with the f32 inference-precision hint runs every fp32 graph (dynamic and
    static) and matches ONNX Runtime; the fp16 and int8 QDQ graphs run too and stay close."""
    ov = pytest.importorskip("openvino", reason="openvino is not installed (pip install openvino; "
                                                "requirements.txt lists it)")
    core = ov.Core()
    rng = np.random.RandomState(0)
    table = np.load(recipe_dynamic[1] / "input_embeddings.pt.npy")
    for _, out, _ in (recipe_dynamic, recipe_static):
        static = json.loads((out / "model_info.json").read_text())["static_shapes"]
        b, L = (1, STATIC_L) if static else (3, 11)
        ids, mask = charmap.encode_batch((TEXTS * 2)[:b], max_len=L, vocab_size=VOCAB)
        feeds = {"model_image": {"image": rng.randn(b, 3, 64, 32).astype(np.float32)},
                 "model_text": {"text_embeds": charmap.lookup(table, ids), "text_mask": mask.astype(np.float32)}}
        for f in sorted(out.glob("*.onnx")):
            x = feeds[f.name.split(".")[0]]
            ref = _sess(f).run(["embedding"], x)[0]
            cm = core.compile_model(str(f), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
            got = cm(x)[cm.output(0)]
            assert got.shape == ref.shape
            if ".int8." in f.name:  # runtimes may round int8 arithmetic differently
                assert _cos_min(got, ref) >= 0.99, f.name
            elif ".fp16." in f.name:  # and fp16 arithmetic
                assert _cos_min(got, ref) >= 0.9999, f.name
            else:
                assert np.abs(got - ref).max() < 1e-5 and _cos_min(got, ref) >= 0.99999, f.name


def test_text_only_int8(tmp_path, synth_data):
    """A text-only student: int8 text graph + int8 table written on cosine parity alone (no image tower, no R@1)."""
    ckpt = _make_ckpt(tmp_path / "to.pt", data=synth_data, text_only=True)
    out = tmp_path / "out"
    with torch.no_grad():
        export_model.export(_args(ckpt, out, "--int8", "--batch_check", "2"))
    info = json.loads((out / "model_info.json").read_text())
    v = info["variants"]["int8"]
    assert v["image_model"] is None and v["parity"]["cos_image"] is None and v["parity"]["r1"] is None
    assert v["parity"]["cos_text"] >= 0.99 and (out / "model_text.int8.onnx").exists()
    assert not (out / "model_image.int8.onnx").exists()


def test_query_vocab_travels_to_search_and_filters_queries(tmp_path, capsys):
    """A checkpoint's word list becomes query_vocab.txt; search's TextEncoder then drops the words it lacks (and
    not with filter_queries=False); an export of a checkpoint without one removes an earlier export's file; a
    malformed list is one line at load time."""
    from search.engine import ExportError, TextEncoder
    ckpt = _make_ckpt(tmp_path / "student.pt")
    d = load_checkpoint(ckpt)
    words = ["a", "man", "in", "blue", "coat", "with", "black", "backpack"]
    save_checkpoint(ckpt, {**d, "model_cfg": {**d["model_cfg"], "query_vocab": words}})
    out = tmp_path / "out"
    with torch.no_grad():
        export_model.export(_args(ckpt, out))
    info = json.loads((out / "model_info.json").read_text())
    assert info["query_vocab"] == "query_vocab.txt"
    assert (out / "query_vocab.txt").read_text().split() == sorted(words)
    enc, raw = TextEncoder(str(out)), TextEncoder(str(out), filter_queries=False)
    q, plain = "looking for a man in a blue coat with a black backpack", "a man in a blue coat with a black backpack"
    assert enc.prepare(q) == plain and raw.prepare(q) == q
    assert np.allclose(enc.encode([q]), raw.encode([plain]), atol=1e-5)
    assert _cos_min(raw.encode([q]), raw.encode([plain])) < 0.9999  # the dropped words did change the embedding
    assert enc.prepare("穿红色外套的女人 wearing") == "穿红色外套的女人"  # other scripts kept, unknown Latin dropped
    import evaluation_model  # evaluation reads every query exactly as search/ does: labels, then the word list
    for t in (q, "Sex - man. Coat: blue. Bag: black backpack.", "a man: blue coat | backpack - black"):
        assert evaluation_model.query_filter(d["model_cfg"] | {"query_vocab": words})(t) == enc.prepare(t), t
    assert enc.prepare("Sex - man. Coat: blue. Bag: black backpack.") == "man, blue Coat, black backpack"
    (out / "query_vocab.txt").write_text("man\nNot A Word!\n")
    with pytest.raises(ExportError, match="query_vocab.txt.*not a lower-case word") as e:
        TextEncoder(str(out))
    assert "\n" not in str(e.value)
    save_checkpoint(ckpt, d)  # no word list: the old file goes, model_info says none
    with torch.no_grad():
        export_model.export(_args(ckpt, out))
    assert not (out / "query_vocab.txt").exists() and json.loads((out / "model_info.json").read_text())["query_vocab"] is None
    assert TextEncoder(str(out)).prepare(q) == q


def test_query_bank_absent_or_refused(tmp_path, capsys, synth_data):
    """No training data: no bank, said in one line, and search ranks by raw cosine; --query_bank 0 removes an
    earlier export's bank; a missing --data is refused."""
    from search.engine import TextEncoder
    ckpt = _make_ckpt(tmp_path / "student.pt", data=synth_data)
    out = tmp_path / "out"
    with torch.no_grad():
        export_model.export(_args(ckpt, out, "--query_bank", "20"))
    info = json.loads((out / "model_info.json").read_text())
    assert info["query_bank"]["rows"] == len(np.load(out / "query_bank.npy")) <= 60
    assert TextEncoder(str(out)).hub["weight"] == 0.5
    with torch.no_grad():
        export_model.export(_args(ckpt, out, "--query_bank", "0"))
    assert not (out / "query_bank.npy").exists() and json.loads((out / "model_info.json").read_text())["query_bank"] is None
    assert TextEncoder(str(out)).hub is None
    nodata = _make_ckpt(tmp_path / "nodata.pt")
    with torch.no_grad():
        export_model.export(_args(nodata, tmp_path / "out2"))
    assert "query bank: none (the checkpoint names no training data" in capsys.readouterr().out
    assert json.loads((tmp_path / "out2" / "model_info.json").read_text())["query_bank"] is None
    for flags, msg in ((["--query_bank", "-1"], "--query_bank must be >= 0"),
                       (["--data", str(tmp_path / "missing.json")], "missing.json: not found")):
        with pytest.raises(export_model.ExportFailure, match=msg):
            export_model.export(_args(ckpt, tmp_path / "out3", *flags))
