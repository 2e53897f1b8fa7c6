"""Teacher cache, teachers and tools/extract_label.py. Tiny random SiglipModel / Siglip2Model / CLIPModel are built
from configs (with an offline char-level tokenizer) and loaded back through the real from_pretrained path; the
attribute teacher runs the packaged all-MiniLM-L6-v2.  python3 -m pytest -q tests/test_extract.py"""
import json
import os
import re
import pickle
import shutil
import string
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))
import data  # noqa: E402
import embedding_cache  # noqa: E402
import extract_label  # noqa: E402
import teachers  # noqa: E402
from embedding_cache import FIELDS, CacheMismatchError, EmbeddingCache  # noqa: E402

ENV = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONWARNINGS="ignore")


# ---------------------------------------------------------------------------------------------------------------
# tiny models saved like hub checkpoints

def _tokenizer():
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    vocab = {"<pad>": 0, "<unk>": 1, "<eos>": 2, "<bos>": 3}
    for c in " " + string.ascii_letters + string.digits + ",.'-":  # upper case too: lowercasing must matter
        vocab[c] = len(vocab)
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Split(Regex("."), "isolated")  # one token per character
    return PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", unk_token="<unk>", eos_token="<eos>",
                                   bos_token="<bos>", model_max_length=64)


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    import transformers as T
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("teachers")
    text = dict(vocab_size=80, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                max_position_embeddings=64)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)
    out = {}
    out["siglip"] = root / "siglip-tiny"
    T.SiglipModel(T.SiglipConfig(text_config=text, vision_config=dict(vision, image_size=32, patch_size=8))
                  ).save_pretrained(out["siglip"])
    T.SiglipProcessor(T.SiglipImageProcessor(size={"height": 32, "width": 32}), _tokenizer()
                      ).save_pretrained(out["siglip"])
    out["siglip2"] = root / "naflex-tiny"  # NaFlex: pixel_attention_mask + spatial_shapes inputs
    T.Siglip2Model(T.Siglip2Config(text_config=text, vision_config=dict(vision, patch_size=8, num_patches=16))
                   ).save_pretrained(out["siglip2"])
    T.Siglip2Processor(T.Siglip2ImageProcessor(patch_size=8, max_num_patches=16), _tokenizer()
                       ).save_pretrained(out["siglip2"])
    out["clip"] = root / "clip-tiny"
    T.CLIPModel(T.CLIPConfig(text_config=dict(text, max_position_embeddings=77, eos_token_id=2, bos_token_id=3,
                                              pad_token_id=0),
                             vision_config=dict(vision, image_size=32, patch_size=8), projection_dim=24)
                ).save_pretrained(out["clip"])
    T.CLIPProcessor(T.CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
                    _tokenizer()).save_pretrained(out["clip"])
    return out


# ---------------------------------------------------------------------------------------------------------------
# helpers

def subset(src_json, dst, k, edit=None):
    """First k records of a dataset JSON, images copied beside it (so tests may delete or truncate them)."""
    dst.mkdir(parents=True, exist_ok=True)
    recs = json.loads(Path(src_json).read_text(encoding="utf-8"))[:k]
    for r in recs:
        (dst / r["file_path"]).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(Path(src_json).parent / r["file_path"], dst / r["file_path"])
    if edit:
        edit(recs)
    path = dst / "data.json"
    path.write_text(json.dumps(recs, ensure_ascii=False), encoding="utf-8")
    return path


def extract(data_json, emb, teacher, *extra):
    argv = ["--data", str(data_json), "--embedding_path", str(emb), "--teacher", str(teacher),
            "--workers", "0", "--device", "cpu", *map(str, extra)]
    return extract_label.main(extract_label.get_args_parser().parse_args(argv))


def cli(*argv):
    return subprocess.run([sys.executable, str(ROOT / "tools/extract_label.py"), *map(str, argv)],
                          capture_output=True, text=True, env=ENV, timeout=120)


def check_cache(emb, data_json, teacher_name):
    recs = data.load_records(data_json)
    counts = dict(image=len(recs), caption=len(data.caption_rows(recs)), attributes=len(recs),
                  prompt_caption=len(recs))
    cache = EmbeddingCache.open(emb, data_json=data_json, counts=counts)
    m = json.loads((Path(emb) / "manifest.json").read_text())
    assert m["teacher"] == str(teacher_name) and m["counts"] == counts and m["dtype"] == "float16"
    assert m["normalized"] is True and m["format_version"] == embedding_cache.FORMAT_VERSION
    assert m["dataset_sha256"] == data.dataset_hash(data_json) and m["dataset"] == os.path.abspath(data_json)
    for f in FIELDS:
        a, d = cache.array(f), cache.done(f)
        assert a.dtype == np.float16 and a.shape == (counts[f], m["dim"]) and d.shape == (counts[f],)
        norms = np.linalg.norm(a[d].astype(np.float32), axis=1)
        assert np.allclose(norms, 1, atol=2e-3), f
        assert not np.any(a[~d]), f  # rows without a teacher stay zero
    return cache, m, recs


# ---------------------------------------------------------------------------------------------------------------
# HF teachers through from_pretrained

@pytest.mark.parametrize("kind", ["siglip", "siglip2", "clip"])
def test_hf_teacher_extract(tiny_models, synth_data, tmp_path, kind):
    path = tiny_models[kind]
    data_json = subset(synth_data, tmp_path / "d", 5)
    out = extract(data_json, tmp_path / "emb", path, "--batch_size", 4)
    cache, m, recs = check_cache(tmp_path / "emb", data_json, path)
    rows = data.caption_rows(recs)
    assert all(cache.done(f).all() for f in FIELDS)  # the synthetic records have attributes and prompt_caption
    assert out["computed"] == {f: len(cache.done(f)) for f in FIELDS}
    assert m["teacher_kind"] == kind and m["multilingual"] == (kind == "siglip2")
    model = __import__("transformers").AutoModel.from_pretrained(path)
    with torch.no_grad():
        assert m["logit_scale"] == pytest.approx(float(model.logit_scale.exp()), rel=1e-5)
        assert m["logit_bias"] == (None if kind == "clip" else pytest.approx(float(model.logit_bias), rel=1e-5))

    t = teachers.load_teacher(path, "cpu")
    assert (t.kind, t.dim, t.multilingual) == (kind, m["dim"], m["multilingual"])
    # row order = dataset order: each cached row is the teacher's embedding of that record / caption row
    ref = t.embed_images([data.load_image(r["image_path"]) for r in recs])
    assert np.allclose(cache.array("image").astype(np.float32), ref, atol=3e-3)
    texts = [text if t.multilingual else pivot for _, _, text, pivot in rows]
    assert np.allclose(cache.array("caption").astype(np.float32), t.embed_texts(texts), atol=3e-3)
    zh = [i for i, r in enumerate(rows) if r[1] == "zh"]
    assert zh, "the synthetic data should have Chinese captions"
    en_of = [i - len(recs[rows[i][0]]["captions"]) for i in zh]  # the parallel English row
    same = np.array_equal(cache.array("caption")[zh], cache.array("caption")[en_of])
    assert same == (not t.multilingual)  # English-only teachers embed the pivot, SigLIP2 the Chinese itself
    attr = [teachers.attribute_text(r["attributes"]) for r in recs]
    assert np.allclose(cache.array("attributes").astype(np.float32), t.embed_texts(attr), atol=3e-3)

    if kind in ("siglip", "siglip2"):
        # SigLIP text: lowercased, padded to 64 tokens, no attention mask, last-token pooling (its training setup)
        s = "A Man In A Red Shirt"
        assert np.allclose(t.embed_texts([s]), t.embed_texts([s.lower()]), atol=1e-6)
        ids = t.tokenizer([s.lower()], padding="max_length", max_length=64, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            o = model.get_text_features(input_ids=ids)
        o = getattr(o, "pooler_output", o).numpy()
        assert np.allclose(t.embed_texts([s]), o / np.linalg.norm(o, axis=1, keepdims=True), atol=1e-5)
    else:  # CLIP is case sensitive with this tokenizer and pads to the longest text
        assert not np.allclose(t.embed_texts(["A Man"]), t.embed_texts(["a man"]), atol=1e-3)
        one = t.embed_texts(["a man"])
        assert np.allclose(one, t.embed_texts(["a man", "a much longer caption about a person"])[:1], atol=1e-5)


def test_attribute_teacher(synth_data, tmp_path):
    def edit(recs):
        recs[0].pop("attributes")
        recs[1]["prompt_caption"] = []
    data_json = subset(synth_data, tmp_path / "d", 4, edit)
    out = extract(data_json, tmp_path / "emb", "attributes", "--batch_size", 8)
    cache, m, recs = check_cache(tmp_path / "emb", data_json, "attributes")
    assert m["teacher_kind"] == "attributes" and m["dim"] == 384 and m["multilingual"] is False
    assert m["logit_scale"] is None
    # no attributes -> no image (privileged) and no attributes row; no prompt_caption -> no prompt row
    assert cache.done("image").tolist() == [False, True, True, True] == cache.done("attributes").tolist()
    assert cache.done("prompt_caption").tolist() == [True, False, True, True]
    assert cache.done("caption").all() and out["computed"]["image"] == 3
    assert np.array_equal(cache.array("image")[1:], cache.array("attributes")[1:])
    # the image row is the MiniLM embedding of the readable attribute sentence, computed here with the
    # sentence-transformers API directly
    t = teachers.load_teacher("attributes")
    st = t.model
    sent = [", ".join(p for p in r["attributes"].split(",") if p != "unknown") for r in recs[1:]]
    assert "unknown" not in " ".join(sent)
    ref = st.encode(sent, normalize_embeddings=True)
    assert np.allclose(cache.array("image")[1:].astype(np.float32), ref, atol=2e-3)
    rows = data.caption_rows(recs)  # English-only: a zh row is its English pivot
    ref = st.encode([p for _, _, _, p in rows], normalize_embeddings=True)
    assert np.allclose(cache.array("caption").astype(np.float32), ref, atol=2e-3)
    with pytest.raises(TypeError):
        t.embed_images([None])
    assert np.allclose(t.embed_attribute_records(recs[1:]), cache.array("image")[1:].astype(np.float32), atol=2e-3)
    with pytest.raises(ValueError, match="no attributes"):
        t.embed_attribute_records(recs[:1])


# ---------------------------------------------------------------------------------------------------------------
# resume, refusal, bad images, sharding

def test_resume_computes_only_the_rest(tiny_models, synth_data, tmp_path, monkeypatch):
    data_json = subset(synth_data, tmp_path / "d", 6)
    path = tiny_models["siglip"]
    full = extract(data_json, tmp_path / "full", path, "--batch_size", 4)
    written = []
    orig = EmbeddingCache.write
    monkeypatch.setattr(EmbeddingCache, "write",
                        lambda self, f, rows, emb: (written.append((f, list(rows))), orig(self, f, rows, emb))[1])
    first = extract(data_json, tmp_path / "emb", path, "--batch_size", 4, "--max_batches", 3)
    assert first["stopped"] and sum(first["computed"].values()) == sum(len(r) for _, r in written) > 0
    part = EmbeddingCache.open(tmp_path / "emb")
    assert sum(int(part.done(f).sum()) for f in FIELDS) == sum(first["computed"].values())
    n_first = len(written)
    assert n_first == 3
    second = extract(data_json, tmp_path / "emb", path, "--batch_size", 4)
    assert not second["stopped"]
    for f in FIELDS:  # re-run writes exactly the rows the first run did not: nothing twice, nothing missed
        a = [r for g, rows in written[:n_first] if g == f for r in rows]
        b = [r for g, rows in written[n_first:] if g == f for r in rows]
        assert not set(a) & set(b) and sorted(a + b) == list(range(full["eligible"][f])), f
        assert second["computed"][f] == full["computed"][f] - first["computed"][f]
    third = extract(data_json, tmp_path / "emb", path)
    assert sum(third["computed"].values()) == 0  # all done: a third run computes nothing
    a, b = EmbeddingCache.open(tmp_path / "emb"), EmbeddingCache.open(tmp_path / "full")
    for f in FIELDS:
        assert np.array_equal(a.array(f), b.array(f)) and np.array_equal(a.done(f), b.done(f)), f


def test_kill_9_between_rows_and_mask_resumes_exactly(synth_data, tmp_path):
    """kill -9 after a batch's rows are written and synced but before its done bytes: the cache keeps the first
    batches' rows marked done (each with its data), the killed batch not done; a re-run computes exactly the rest."""
    data_json = subset(synth_data, tmp_path / "d", 6)
    driver = (f"import os, signal, sys; sys.path[:0] = [{str(ROOT)!r}, {str(ROOT / 'tools')!r}]\n"
              "import embedding_cache, extract_label\n"
              "orig, calls = embedding_cache._RowFile.sync, []\n"
              "def sync(self):\n"
              "    calls.append(1)\n"
              "    orig(self)\n"
              "    if len(calls) == 3: os.kill(os.getpid(), signal.SIGKILL)\n"
              "embedding_cache._RowFile.sync = sync\n"
              "extract_label.main(extract_label.get_args_parser().parse_args(sys.argv[1:]))\n")
    argv = ["--data", str(data_json), "--embedding_path", str(tmp_path / "emb"), "--teacher", "attributes",
            "--workers", "0", "--device", "cpu", "--batch_size", "4", "--fields", "caption"]
    r = subprocess.run([sys.executable, "-c", driver, *argv], capture_output=True, text=True, env=ENV, timeout=300)
    assert r.returncode == -9, r.stderr[-2000:]
    part = EmbeddingCache.open(tmp_path / "emb")
    done, arr = part.done("caption"), part.array("caption").astype(np.float32)
    assert done.tolist() == [True] * 8 + [False] * (len(done) - 8)  # two whole batches, not the third
    assert np.allclose(np.linalg.norm(arr[done], axis=1), 1, atol=2e-3)
    again = extract(data_json, tmp_path / "emb", "attributes", "--batch_size", 4, "--fields", "caption")
    assert again["computed"]["caption"] == len(done) - 8
    full = extract(data_json, tmp_path / "full", "attributes", "--batch_size", 4, "--fields", "caption")
    a, b = EmbeddingCache.open(tmp_path / "emb"), EmbeddingCache.open(tmp_path / "full")
    assert np.array_equal(a.done("caption"), b.done("caption")) and a.done("caption").all()
    # same rows, same batches as an uninterrupted run; equal to float16 rounding (bitwise only single-threaded:
    # the killed run and the reference are different processes, and 2-thread GEMMs need not agree to the last bit)
    assert np.allclose(a.array("caption").astype(np.float32), b.array("caption").astype(np.float32), atol=2e-3)


def test_refuses_mismatched_cache(tiny_models, synth_data, tmp_path):
    data_a = subset(synth_data, tmp_path / "a", 3)
    data_b = subset(synth_data, tmp_path / "b", 4)
    extract(data_a, tmp_path / "emb", tiny_models["siglip"], "--fields", "caption")
    before = {p.name: p.read_bytes() for p in (tmp_path / "emb").iterdir()}
    r = cli("--data", data_b, "--embedding_path", tmp_path / "emb", "--teacher", tiny_models["siglip"])
    assert r.returncode == 2, r.stderr
    lines = [l for l in r.stderr.splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "cache was built for" in lines[0], r.stderr
    assert "Traceback" not in r.stderr + r.stdout
    # another teacher on the same data is refused too (in-process: same exit code)
    with pytest.raises(SystemExit) as e:
        extract(data_a, tmp_path / "emb", tiny_models["clip"])
    assert e.value.code == 2
    assert {p.name: p.read_bytes() for p in (tmp_path / "emb").iterdir()} == before  # untouched
    with pytest.raises(CacheMismatchError, match="cache was built for"):
        EmbeddingCache.open(tmp_path / "emb", data_json=data_b)
    with pytest.raises(CacheMismatchError):
        EmbeddingCache.open(tmp_path / "emb", counts={"caption": 1})
    with pytest.raises(CacheMismatchError, match="no teacher cache"):
        EmbeddingCache.open(tmp_path / "nothing")


def test_offline_hub_id_is_one_line(synth_data, tmp_path, monkeypatch, capsys):
    import huggingface_hub.constants
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # this machine has no hub anyway
    data_json = subset(synth_data, tmp_path / "d", 2)
    with pytest.raises(SystemExit) as e:  # the default teacher is a hub id
        extract_label.main(extract_label.get_args_parser().parse_args(
            ["--data", str(data_json), "--embedding_path", str(tmp_path / "emb")]))
    assert e.value.code == 2  # bad input (cli.py)
    # the record store is built first (its notice and progress bars come before the error)
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip() and not ln.startswith(("record store", "image check ("))]
    assert len(lines) == 1 and "Traceback" not in err, err
    msg = lines[0]
    assert msg.startswith("error: could not load teacher google/siglip2-so400m-patch16-512: ")
    assert msg.endswith("(offline? pass a local path)")
    assert not (tmp_path / "emb").exists()  # nothing written when the teacher cannot load
    with pytest.raises(SystemExit) as e:
        extract(tmp_path / "missing.json", tmp_path / "emb", "attributes")
    assert e.value.code == 2 and re.match(r"^error: .*missing.json: no such file$", capsys.readouterr().err.strip())
    with pytest.raises(SystemExit) as e:
        extract(data_json, tmp_path / "emb", "attributes", "--fields", "image,pixels")
    assert e.value.code == 2 and capsys.readouterr().err.startswith("error: --fields")


def test_missing_and_empty_images_are_skipped(tiny_models, synth_data, tmp_path, capsys):
    data_json = subset(synth_data, tmp_path / "d", 5)
    recs = data.load_records(data_json)
    os.remove(recs[1]["image_path"])
    open(recs[3]["image_path"], "wb").close()  # zero bytes
    out = extract(data_json, tmp_path / "emb", tiny_models["siglip2"], "--workers", 2, "--batch_size", 2)
    text = capsys.readouterr().out
    assert "skipped 2 images (1 missing, 1 undecodable)" in text
    assert (out["n_missing"], out["n_corrupt"]) == (1, 1)
    cache, _, _ = check_cache(tmp_path / "emb", data_json, tiny_models["siglip2"])
    assert cache.done("image").tolist() == [True, False, True, False, True]
    assert cache.done("caption").all() and cache.done("attributes").all()
    assert f"image 3/5" in text and "dim 32 float16" in text


def test_torchrun_shards_match_single_process(tiny_models, synth_data, tmp_path):
    data_json = subset(synth_data, tmp_path / "d", 5)
    path = tiny_models["siglip"]
    extract(data_json, tmp_path / "one", path, "--batch_size", 3)
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        str(ROOT / "tools/extract_label.py"), "--data", str(data_json), "--embedding_path",
                        str(tmp_path / "two"), "--teacher", str(path), "--workers", "0", "--device", "cpu",
                        "--batch_size", "3"], capture_output=True, text=True, env=ENV, timeout=180)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "computed: image 5  caption" in r.stdout  # totals summed over both ranks
    names = os.listdir(tmp_path / "two")
    assert not [n for n in names if ".rank" in n or ".tmp" in n], names  # shards folded in by rank 0
    a, b = EmbeddingCache.open(tmp_path / "one"), EmbeddingCache.open(tmp_path / "two")
    for f in FIELDS:
        assert b.done(f).all()
        assert np.allclose(a.array(f).astype(np.float32), b.array(f).astype(np.float32), atol=2e-3), f


def test_two_nodes_attribute_teacher_match_one_rank(synth_data, tmp_path):
    """Two torchrun 'nodes' (--nnodes 2, one gloo rank each, rendezvous on 127.0.0.1) shard the rows by global rank
    into one cache; it equals a 1-rank run. Both nodes' local rank 0 find no record store: one builds it, the other
    waits on its lock and uses it."""
    import socket
    data_json = subset(synth_data, tmp_path / "d", 7)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes=2", f"--node_rank={node}",
                               "--nproc_per_node=1", "--master_addr=127.0.0.1", f"--master_port={port}",
                               str(ROOT / "tools/extract_label.py"), "--data", str(data_json), "--embedding_path",
                               str(tmp_path / "two"), "--teacher", "attributes", "--workers", "0", "--device", "cpu",
                               "--batch_size", "2"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env=ENV) for node in (0, 1)]
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err[-2000:]
    one = extract(data_json, tmp_path / "one", "attributes", "--batch_size", 5)
    n_cap = one["eligible"]["caption"]
    assert f"computed: image 7  caption {n_cap}  attributes 7  prompt_caption 7" in outs[0][0]  # summed over ranks
    assert not [n for n in os.listdir(tmp_path / "two") if ".rank" in n or ".tmp" in n]
    assert not [n for n in os.listdir(tmp_path / "d") if ".tmp." in n or ".old." in n]  # one store, published once
    a, b = EmbeddingCache.open(tmp_path / "one"), EmbeddingCache.open(tmp_path / "two")
    assert a.manifest == b.manifest
    for f in FIELDS:
        assert np.array_equal(a.done(f), b.done(f)) and a.done(f).all(), f
        assert np.allclose(a.array(f).astype(np.float32), b.array(f).astype(np.float32), atol=1e-3), f


# ---------------------------------------------------------------------------------------------------------------
# the cache on its own

def test_cache_write_pickle_shards(tmp_path):
    base = dict(teacher="t", teacher_kind="x", logit_scale=10.0, logit_bias=-5.0, dataset="d.json",
                dataset_sha256="ab" * 32, multilingual=False, preprocessing={})
    counts = dict(image=5, caption=7, attributes=5, prompt_caption=5)
    c = EmbeddingCache.create(tmp_path / "c", base, counts, dim=4)
    rng = np.random.default_rng(0)
    v = rng.normal(size=(2, 4)).astype(np.float32) * 7
    c.write("caption", [1, 5], v)
    r = EmbeddingCache.open(tmp_path / "c")
    assert r.logit_scale == 10.0 and r.logit_bias == -5.0 and r.dim == 4 and r.fields == FIELDS
    assert r.done("caption").tolist() == [False, True, False, False, False, True, False]
    assert np.allclose(r.array("caption")[[1, 5]], v / np.linalg.norm(v, axis=1, keepdims=True), atol=1e-3)
    assert isinstance(r.array("caption"), np.memmap)
    blob = pickle.dumps(r)  # DataLoader workers: no memmap inside the pickle, reopened lazily
    assert len(blob) < 2000
    assert np.array_equal(pickle.loads(blob).array("caption"), r.array("caption"))
    with pytest.raises(PermissionError):
        r.write("caption", [0], v[:1])
    with pytest.raises(ValueError):
        c.write("caption", [0], np.zeros((1, 4)))  # a zero vector cannot be normalised
    # resume with the same manifest reopens; another dim/teacher is refused with one line
    assert EmbeddingCache.create(tmp_path / "c", base, counts, dim=4).done("caption").sum() == 2
    with pytest.raises(CacheMismatchError, match="cache was built for teacher t, not u"):
        EmbeddingCache.create(tmp_path / "c", dict(base, teacher="u"), counts, dim=4)
    with pytest.raises(CacheMismatchError, match="dim"):
        EmbeddingCache.create(tmp_path / "c", base, counts, dim=8)
    # torchrun layout: per-rank masks are unioned by readers and folded by merge_done
    s0 = EmbeddingCache.open(tmp_path / "c", mode="r+", shard=0)
    s1 = EmbeddingCache.open(tmp_path / "c", mode="r+", shard=1)
    s0.write("image", [0, 2], v)
    s1.write("image", [1], v[:1])
    assert EmbeddingCache.open(tmp_path / "c").done("image").tolist() == [True, True, True, False, False]
    s0.merge_done()
    assert not [n for n in os.listdir(tmp_path / "c") if ".rank" in n]
    assert EmbeddingCache.open(tmp_path / "c").done("image").tolist() == [True, True, True, False, False]


def test_attribute_text_and_dtype():
    assert teachers.attribute_text("man,black hair, red shirt ,unknown,white shoes,Unknown") == \
        "man, black hair, red shirt, white shoes"
    assert teachers.resolve_dtype("auto", "cpu") == torch.float32
    assert teachers.resolve_dtype("bf16", "cuda") == torch.bfloat16
    with pytest.raises(teachers.TeacherLoadError):
        teachers.resolve_dtype("int8", "cpu")
    with pytest.raises(teachers.TeacherLoadError, match="no such folder"):
        teachers.load_teacher("/nonexistent/siglip")
