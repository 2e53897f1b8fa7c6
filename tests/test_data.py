"""data.py: JSON formats, malformed input, image skips, split, caption rows, transforms, Datasets.
Every test builds its own tiny JSON + PIL images under tmp_path.  python3 -m pytest -q tests/test_data.py"""
import hashlib
import json
import os
import pickle
import random
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import data  # noqa: E402
from data import DatasetError  # noqa: E402

SIZE = (32, 16)  # (H, W): small so the Dataset tests stay fast


def _img(path, size=(20, 40), seed=0, mode="RGB"):
    """A noisy image (noise so a truncated JPEG really loses pixel data)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    a = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(a).convert(mode).save(path)
    return path


def _write(path, obj):
    path.write_text(json.dumps(obj, ensure_ascii=False), encoding="utf-8")
    return path


ATTR = "man,black hair,red shirt,blue jeans,white shoes,backpack"


def _synth(tmp_path, n_ids=4, per_id=2):
    """SYNTH-PEDES style: attributes/prompt_caption as list or str, captions_zh on some records."""
    recs = []
    for pid in range(n_ids):
        for k in range(per_id):
            fp = f"imgs/{pid}_{k}.jpg"
            _img(tmp_path / fp, seed=pid * 10 + k)
            rec = {"id": pid, "file_path": fp, "captions": [f"person {pid} view {k} a", f"person {pid} view {k} b"],
                   "attributes": [ATTR] if k == 0 else ATTR, "prompt_caption": [f"prompt {pid}", "x"] if k == 0
                   else f"prompt {pid}"}
            if pid % 2 == 0:
                rec["captions_zh"] = [f"人 {pid} 视角 {k} 甲", f"人 {pid} 视角 {k} 乙"]
            recs.append(rec)
    return _write(tmp_path / "synth.json", recs)


# ---------------------------------------------------------------------------------------------------------------
# formats

def test_load_synth(tmp_path):
    path = _synth(tmp_path)
    recs = data.load_records(path)
    assert len(recs) == 8 and [r["index"] for r in recs] == list(range(8))
    r0, r1 = recs[0], recs[1]
    assert r0["id"] == 0 and r0["file_path"] == "imgs/0_0.jpg"
    assert r0["image_path"] == str(tmp_path / "imgs/0_0.jpg") and os.path.isabs(r0["image_path"])
    assert r0["attributes"] == ATTR and r1["attributes"] == ATTR
    assert r0["prompt_caption"] == "prompt 0" and r1["prompt_caption"] == "prompt 0"
    assert r0["captions_zh"][1] == "人 0 视角 0 乙" and recs[2]["captions_zh"] == []
    assert r0["split"] is None
    other = tmp_path / "elsewhere"
    assert data.load_records(path, image_root=str(other))[3]["image_path"] == str(other / recs[3]["file_path"])


def test_load_cuhk_and_rstp(tmp_path):
    cuhk = [{"split": "Train", "captions": ["a man"], "file_path": "CUHK01/a.png", "processed_tokens": [["a", "man"]],
             "id": 1}, {"split": "val", "captions": ["a woman", "she"], "file_path": "b.png",
                        "processed_tokens": [], "id": 7}]
    recs = data.load_records(_write(tmp_path / "reid_raw.json", cuhk), image_root="/imgs")
    assert [r["id"] for r in recs] == [0, 6]  # 1-based -> 0-based
    assert [r["split"] for r in recs] == ["train", "val"]
    assert recs[0]["image_path"] == "/imgs/CUHK01/a.png" and recs[0]["attributes"] is None
    # same keys with a 0 id (ICFG-PEDES style): already 0-based, must not become -1
    icfg = [dict(cuhk[0], id=0), dict(cuhk[1], id=3)]
    assert [r["id"] for r in data.load_records(_write(tmp_path / "icfg.json", icfg))] == [0, 3]
    rstp = [{"id": 0, "img_path": "0000_c14_0031.jpg", "captions": ["x", "y"], "split": "train"},
            {"id": 5, "img_path": "0005_c1.jpg", "captions": ["z"], "split": "test"}]
    recs = data.load_records(_write(tmp_path / "data_captions.json", rstp))
    assert [r["id"] for r in recs] == [0, 5] and recs[1]["file_path"] == "0005_c1.jpg"
    assert recs[1]["image_path"] == str(tmp_path / "0005_c1.jpg") and recs[1]["split"] == "test"


GOOD = {"id": 1, "file_path": "a.jpg", "captions": ["a"]}


@pytest.mark.parametrize("text, where, what", [
    ('[{"id": 1, "file_path": "a.jpg", "captions": ["a"]},\n {"id": 2, "file_path": "b.jpg", "captions": ["b"]},\n'
     ' {"id": 3, "file_path": "c.jpg" "captions": ["c"]}]', "record 2", "invalid JSON"),
    ('[{"id": 1, "file_path": "a.jpg", "captions": ["a"]} {"id": 2}]', "record 0", "missing ','"),
    ('{"id": 1}', None, "list"),
    ('[]', None, "no records"),
    (json.dumps([GOOD, "oops"]), "record 1", "object"),
    (json.dumps([GOOD, {"id": 2, "captions": ["b"]}]), "record 1", "file_path"),
    (json.dumps([GOOD, GOOD, {"id": 2, "file_path": "b.jpg"}]), "record 2", "captions"),
    (json.dumps([{"id": 2, "file_path": "b.jpg", "captions": "a string"}]), "record 0", "captions"),
    (json.dumps([GOOD, {"id": 2, "file_path": "b.jpg", "captions": ["x", 3]}]), "record 1", "captions"),
    (json.dumps([GOOD, dict(GOOD, id="2")]), "record 1", "id"),
    (json.dumps([dict(GOOD, id=2.0)]), "record 0", "id"),
    (json.dumps([dict(GOOD, id=True)]), "record 0", "id"),
    (json.dumps([{k: v for k, v in GOOD.items() if k != "id"}]), "record 0", "id"),
    (json.dumps([dict(GOOD, id=-3)]), "record 0", "id"),
    (json.dumps([GOOD, dict(GOOD, captions_zh=["一", "二"])]), "record 1", "captions_zh"),
    (json.dumps([dict(GOOD, attributes=5)]), "record 0", "attributes"),
    (json.dumps([dict(GOOD, split=3)]), "record 0", "split"),
])
def test_malformed(tmp_path, text, where, what):
    path = tmp_path / "bad.json"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(DatasetError) as e:
        data.load_records(path)
    msg = str(e.value)
    assert msg.startswith(f"{path}: ") and "\n" not in msg and what in msg
    if where:
        assert f": {where}: " in msg
    assert isinstance(e.value, ValueError)


def test_missing_file_and_cli_error(tmp_path):
    with pytest.raises(DatasetError, match="no such file"):
        data.load_records(tmp_path / "nope.json")
    bad = tmp_path / "bad.json"
    bad.write_text('[{"id": 1, "captions": ["a"]}]')
    p = subprocess.run([sys.executable, str(Path(data.__file__)), "--data", str(bad)], capture_output=True, text=True)
    assert p.returncode == 2 and "Traceback" not in p.stderr  # 2 = bad input (cli.py)
    assert p.stderr.strip() == f"error: {bad}: record 0: missing 'file_path' (or 'img_path')"


def test_dataset_hash(tmp_path):
    path = _synth(tmp_path)
    assert data.dataset_hash(path) == hashlib.sha256(path.read_bytes()).hexdigest()
    h = data.dataset_hash(path)
    path.write_text(path.read_text() + " ")
    assert data.dataset_hash(path) != h


# ---------------------------------------------------------------------------------------------------------------
# caption rows, split

def test_caption_rows(tmp_path):
    recs = data.load_records(_synth(tmp_path))
    rows = data.caption_rows(recs)
    # record 0 has en + zh, record 2 (id 1) en only
    assert rows[:4] == [(0, "en", "person 0 view 0 a", "person 0 view 0 a"),
                        (0, "en", "person 0 view 0 b", "person 0 view 0 b"),
                        (0, "zh", "人 0 视角 0 甲", "person 0 view 0 a"),
                        (0, "zh", "人 0 视角 0 乙", "person 0 view 0 b")]
    assert rows[8] == (2, "en", "person 1 view 0 a", "person 1 view 0 a") and rows[10][0] == 3
    assert len(rows) == sum(len(r["captions"]) + len(r["captions_zh"]) for r in recs)
    off = data.caption_offsets(recs)
    assert all(off[ri] <= k < off[ri + 1] for k, (ri, *_) in enumerate(rows)) and off[-1] == len(rows)
    ev = data.eval_captions(recs, [2, 0], langs=("en", "zh"))
    assert [e[0] for e in ev] == [8, 9, 0, 1, 2, 3]
    assert all(rows[row][2] == text and rows[row][0] == ri == recs.index(recs[ri]) and pid == recs[ri]["id"]
               for row, pid, ri, text in ev)
    assert [e[0] for e in data.eval_captions(recs, [0, 2])] == [0, 1, 8, 9]


def _many(n_ids=300, per_id=3, split=None):
    return [dict(id=pid, captions=["c"], captions_zh=[], split=split, attributes=None)
            for pid in range(n_ids) for _ in range(per_id)]


def test_split_identity_holdout():
    recs = _many()
    train, test = data.split_records(recs, 0.1, "train"), data.split_records(recs, 0.1, "test")
    assert sorted(train + test) == list(range(len(recs)))
    tr_ids, te_ids = {recs[i]["id"] for i in train}, {recs[i]["id"] for i in test}
    assert not tr_ids & te_ids and 10 <= len(te_ids) <= 60  # ~10 % of 300 identities
    assert te_ids == {p for p in range(300) if zlib.crc32(str(p).encode()) % 1000 < 100}  # the documented rule
    assert data.split_records(recs, 0.1, "test") == test  # deterministic
    shuffled = recs[:]
    random.Random(0).shuffle(shuffled)
    assert {shuffled[i]["id"] for i in data.split_records(shuffled, 0.1, "test")} == te_ids  # order-independent
    assert {recs[i]["id"] for i in data.split_records(recs[:150], 0.1, "test")} == {p for p in te_ids if p < 50}
    assert data.split_records(recs, 0.0, "test") == [] and data.split_records(recs, 1.0, "train") == []
    with pytest.raises(ValueError):
        data.split_records(recs, 0.1, "dev")
    with pytest.raises(ValueError):
        data.split_records(recs, 0.1, "val", val_ratio=1.5)


def test_validation_split_comes_from_training_ids_and_leaves_test_alone():
    recs = _many()
    test = data.split_records(recs, 0.1, "test")
    for vr in (0.0, 0.05, 0.2):
        assert data.split_records(recs, 0.1, "test", val_ratio=vr) == test  # test ids never move
        tr = data.split_records(recs, 0.1, "train", val_ratio=vr)
        va = data.split_records(recs, 0.1, "val", val_ratio=vr)
        assert sorted(tr + va + test) == list(range(len(recs)))
        ids = [{recs[i]["id"] for i in x} for x in (tr, va, test)]
        assert not ids[0] & ids[1] and not ids[1] & ids[2] and not ids[0] & ids[2]  # identity-disjoint
        expect = {p for p in range(300) if zlib.crc32(str(p).encode()) % 1000 >= 100
                  and zlib.crc32(b"val/" + str(p).encode()) % 1000 < vr * 1000}
        assert ids[1] == expect  # the documented rule
    assert data.split_records(recs, 0.1, "val", val_ratio=0.0) == []
    assert 5 <= len({recs[i]["id"] for i in data.split_records(recs, 0.1, "val", val_ratio=0.1)}) <= 50


def test_split_respects_json():
    recs = [dict(id=i, split=s) for i, s in enumerate(["train", "test", "val", "train", None])]
    recs[4]["id"] = next(p for p in range(1000) if zlib.crc32(str(p).encode()) % 1000 < 100)  # hash says test
    assert data.split_records(recs, 0.1, "train") == [0, 3]
    assert data.split_records(recs, 0.1, "test") == [1, 4]
    assert data.split_records(recs, 0.1, "val", val_ratio=0.0) == [2]  # the JSON's val is the validation split
    assert data.split_records(recs, 0.0, "test") == [1]  # JSON split wins over the ratio


# ---------------------------------------------------------------------------------------------------------------
# images

def test_check_images_counts(tmp_path):
    good = [_img(tmp_path / f"g{i}.jpg", seed=i) for i in range(3)]
    zero = tmp_path / "zero.jpg"
    zero.write_bytes(b"")
    full = _img(tmp_path / "full.jpg", size=(64, 128), seed=9).read_bytes()
    trunc = tmp_path / "trunc.jpg"
    trunc.write_bytes(full[: len(full) * 6 // 10])
    junk = tmp_path / "junk.png"
    junk.write_bytes(b"not an image at all")
    paths = [good[0], tmp_path / "missing.jpg", zero, good[1], trunc, junk, tmp_path / "gone.png", good[2]]
    recs = [dict(image_path=str(p)) for p in paths]
    ok, n_missing, n_corrupt = data.check_images(recs, num_threads=2)
    assert (ok, n_missing, n_corrupt) == ([0, 3, 7], 2, 3)
    assert data.format_skip_summary(n_missing, n_corrupt) == "skipped 5 images (2 missing, 3 undecodable)"
    assert data.check_images(recs, indices=[4, 7, 1]) == ([7], 1, 1)
    # header-only check is cheap but cannot see truncation (the Dataset fallback covers it)
    assert data.check_images(recs, decode=False)[0] == [0, 3, 4, 7]
    assert [data.load_image(str(p)) is None for p in paths] == [False, True, True, False, True, True, True, False]
    img = data.load_image(str(_img(tmp_path / "gray.png", mode="L")))
    assert img.mode == "RGB" and img.size == (20, 40)


def _numpy_eval(img, size, mean=data.IMAGENET_MEAN, std=data.IMAGENET_STD):
    """What search/ does: RGB, PIL bilinear resize to (W, H), /255, normalise, CHW float32."""
    h, w = size
    x = np.asarray(img.convert("RGB").resize((w, h), Image.BILINEAR), dtype=np.float32) / 255.0
    x = (x - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    return x.transpose(2, 0, 1)


@pytest.mark.parametrize("mode, src", [("RGB", (37, 91)), ("L", (16, 32)), ("RGBA", (200, 150)), ("P", (50, 61))])
def test_eval_transform_matches_numpy(tmp_path, mode, src):
    a = np.random.default_rng(1).integers(0, 256, (src[1], src[0], 3), dtype=np.uint8)
    img = Image.fromarray(a).convert(mode)
    for size in [(224, 112), (31, 17)]:
        x = data.build_transform(size, train=False)(img)
        assert x.dtype == torch.float32 and tuple(x.shape) == (3, *size)
        np.testing.assert_allclose(x.numpy(), _numpy_eval(img, size), rtol=0, atol=1e-6)
    mean, std = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
    np.testing.assert_allclose(data.build_transform((8, 4), False, mean, std)(img).numpy(),
                               _numpy_eval(img, (8, 4), mean, std), rtol=0, atol=1e-6)


def test_train_transform_keeps_colour():
    red = Image.new("RGB", (30, 70), (200, 30, 40))
    want = _numpy_eval(red, SIZE)[:, 0, 0]
    torch.manual_seed(0)
    for _ in range(20):
        x = data.build_transform(SIZE, train=True)(red)
        assert tuple(x.shape) == (3, *SIZE)
        px = x.reshape(3, -1).T.numpy()
        # every pixel is the original colour or erased (0): no hue/saturation/brightness jitter
        assert np.all(np.isclose(px, want, atol=1e-5).all(1) | (px == 0).all(1))


# ---------------------------------------------------------------------------------------------------------------
# Datasets

class FakeCache:
    """The EmbeddingCache surface the Dataset uses: array(field) float16 [N, D], done(field) bool [N]."""

    def __init__(self, n_img, n_cap, dim=8):
        rng = np.random.default_rng(0)
        self.arrays = {"image": rng.standard_normal((n_img, dim)).astype(np.float16),
                       "caption": rng.standard_normal((n_cap, dim)).astype(np.float16)}
        self.dones = {"image": np.arange(n_img) % 3 != 1, "caption": np.arange(n_cap) % 4 != 2}

    def array(self, field):
        return self.arrays[field]

    def done(self, field):
        return self.dones[field]


@pytest.fixture
def ds_setup(tmp_path):
    recs = data.load_records(_synth(tmp_path))
    cache = FakeCache(len(recs), len(data.caption_rows(recs)))
    return recs, cache


def test_distill_item(ds_setup):
    from search.charmap import encode_batch
    recs, cache = ds_setup
    rows = data.caption_rows(recs)
    ds = data.DistillDataset(recs, range(len(recs)), cache=cache, image_size=SIZE, max_seq_length=24, seed=3)
    assert len(ds) == len(recs) and ds.n_dropped == 0
    seen_langs, seen_has = set(), set()
    for i in range(len(ds)):
        it = ds[i]
        assert it["image"].dtype == torch.float32 and tuple(it["image"].shape) == (3, *SIZE)
        assert it["text_ids"].dtype == torch.int64 and tuple(it["text_ids"].shape) == (24,)
        assert it["text_mask"].dtype == torch.bool and tuple(it["text_mask"].shape) == (24,)
        r, c = it["img_row"], it["cap_row"]
        assert r == i and it["pid"] == recs[r]["id"] and rows[c][0] == r
        ids, mask = encode_batch([rows[c][2]], max_len=24, vocab_size=8192)
        assert torch.equal(it["text_ids"], torch.from_numpy(ids[0])) and torch.equal(it["text_mask"],
                                                                                   torch.from_numpy(mask[0]))
        assert it["has_t_img"] == bool(cache.dones["image"][r]) and it["has_t_cap"] == bool(cache.dones["caption"][c])
        for key, field, row, has in (("t_img_emb", "image", r, it["has_t_img"]), ("t_cap_emb", "caption", c,
                                                                                  it["has_t_cap"])):
            e = it[key]
            assert e.dtype == torch.float32 and tuple(e.shape) == (8,)
            want = cache.arrays[field][row].astype(np.float32) if has else np.zeros(8, np.float32)
            assert np.array_equal(e.numpy(), want)
        seen_langs.add(rows[c][1])
        seen_has.add((it["has_t_img"], it["has_t_cap"]))
    assert seen_langs == {"en", "zh"} and (True, True) in seen_has and len(seen_has) > 1
    en = data.DistillDataset(recs, range(len(recs)), cache=cache, image_size=SIZE, langs=("en",))
    assert all(rows[en[i]["cap_row"]][1] == "en" for i in range(len(en)))
    zh = data.DistillDataset(recs, range(len(recs)), image_size=SIZE, langs=("zh",))
    assert len(zh) == 4 and zh.n_dropped == 4  # only even ids have Chinese captions
    it = zh[0]
    assert rows[it["cap_row"]][1] == "zh" and tuple(it["t_img_emb"].shape) == (0,)  # no cache: empty, no teacher
    assert not it["has_t_img"] and not it["has_t_cap"]


def test_compose(ds_setup):
    recs, cache = ds_setup
    ds = data.DistillDataset(recs, range(len(recs)), cache=cache, image_size=SIZE, compose_prob=1.0, seed=1)
    texts = []
    for i in range(len(ds)):
        it = ds[i]
        assert it["cap_row"] == -1 and not it["has_t_cap"] and not it["t_cap_emb"].any()
        assert it["has_t_img"] == bool(cache.dones["image"][i]) and it["text_mask"].sum() > 5
        texts.append(tuple(it["text_ids"].tolist()))
    assert len(set(texts)) > 1
    # a record without captions still trains from its attributes when composing is on
    bare = [dict(recs[0], captions=[], captions_zh=[])]
    assert len(data.DistillDataset(bare, [0], image_size=SIZE, compose_prob=0.5)) == 1
    with pytest.raises(DatasetError):
        data.DistillDataset(bare, [0], image_size=SIZE)


def test_items_mark_query_texts_for_an_online_teacher(ds_setup):
    """query_lang says which items carry a query-like text (1 en, 2 zh) that main.TextTeacher may embed; the text
    itself travels only when asked for, and is the text that was encoded."""
    from search.charmap import encode_batch
    recs, cache = ds_setup
    kinds = {}
    for aug, comp in ((1.0, 0.0), (0.0, 1.0), (0.0, 0.0)):
        ds = data.DistillDataset(recs, range(len(recs)), cache=cache, image_size=SIZE, augment_prob=aug,
                                 compose_prob=comp, seed=2, return_text=True)
        for i in range(len(ds)):
            it = ds[i]
            ids, mask = encode_batch([it["text"]], max_len=ds.max_seq_length, vocab_size=ds.vocab_size)
            assert it["text_ids"].tolist() == ids[0].tolist()
            kinds.setdefault((aug, comp), set()).add(it["query_lang"])
            if it["query_lang"]:
                assert it["cap_row"] == -1 and not it["has_t_cap"]
    assert kinds[(1.0, 0.0)] == {1, 2} and kinds[(0.0, 1.0)] == {0} and kinds[(0.0, 0.0)] == {0}
    # --consist_weight: query-like items carry their bare keyword list, the others an empty row marked absent
    ds = data.DistillDataset(recs, range(len(recs)), cache=cache, image_size=SIZE, augment_prob=0.5, seed=3,
                             plain_targets=True)
    items = _items(ds)
    assert {bool(it["query_lang"]) for it in items} == {True, False}
    for it in items:
        assert it["has_plain"] == bool(it["query_lang"]) and it["plain_mask"].sum() > (5 if it["has_plain"] else 0)
        assert it["plain_ids"].shape == it["text_ids"].shape
    assert "text" not in data.DistillDataset(recs, range(len(recs)), cache=cache, image_size=SIZE)[0]


def test_noise_words_only_in_english_texts_and_off_by_default(ds_setup):
    """--noise_word_prob: English texts (dataset rows, composed, query-like) gain words and keep their teacher
    targets; Chinese rows never change; with 0 the items are exactly those of a dataset without the option."""
    recs, cache = ds_setup
    kw = dict(cache=cache, image_size=SIZE, augment_prob=0.3, compose_prob=0.2, seed=5, return_text=True)
    base = _items(data.DistillDataset(recs, range(len(recs)), **kw))
    assert _same(base, _items(data.DistillDataset(recs, range(len(recs)), noise_word_prob=0.0, **kw)))
    noisy = _items(data.DistillDataset(recs, range(len(recs)), noise_word_prob=1.0, **kw))
    changed = 0
    for a, b in zip(base, noisy):
        assert a["cap_row"] == b["cap_row"] and torch.equal(a["t_cap_emb"], b["t_cap_emb"])
        if any("\u4e00" <= ch <= "\u9fff" for ch in a["text"]):
            assert a["text"] == b["text"]  # Chinese: no word boundaries, never touched
        elif a["text"] != b["text"]:
            changed += 1
            assert len(b["text"].split()) > len(a["text"].split())
    assert changed >= len(base) // 4


def _items(ds):
    return [ds[i] for i in range(len(ds))]


def _same(a, b):
    return all(torch.equal(x["image"], y["image"]) and x["cap_row"] == y["cap_row"]
               and torch.equal(x["text_ids"], y["text_ids"]) for x, y in zip(a, b))


def test_determinism(ds_setup):
    recs, cache = ds_setup
    kw = dict(cache=cache, image_size=SIZE, compose_prob=0.5, seed=7)
    a, b = data.DistillDataset(recs, range(8), **kw), data.DistillDataset(recs, range(8), **kw)
    a.set_epoch(2)
    b.set_epoch(2)
    state = torch.get_rng_state()
    ia = _items(a)
    assert torch.equal(state, torch.get_rng_state())  # the global RNG is left alone
    assert _same(ia, _items(b)) and _same(ia, list(reversed([a[i] for i in reversed(range(8))])))
    b.set_epoch(3)
    ib = _items(b)
    assert not any(torch.equal(x["image"], y["image"]) for x, y in zip(ia, ib))
    c = data.DistillDataset(recs, range(8), **dict(kw, seed=8))
    c.set_epoch(2)
    assert not _same(ia, _items(c))


def test_bad_image_fallback_and_cache_mismatch(ds_setup):
    recs, cache = ds_setup
    ds = data.DistillDataset(recs, range(len(recs)), cache=cache, image_size=SIZE)
    os.remove(recs[3]["image_path"])
    Path(recs[4]["image_path"]).write_bytes(b"\xff\xd8 broken")
    a = ds[3]
    assert a["img_row"] == 5 and torch.equal(a["image"], ds[5]["image"])  # next loadable item, deterministic
    assert ds[4]["img_row"] == 5 and ds[2]["img_row"] == 2
    for bad in (FakeCache(len(recs) + 1, cache.arrays["caption"].shape[0]), FakeCache(len(recs), 3)):
        with pytest.raises(DatasetError, match="teacher cache has"):
            data.DistillDataset(recs, range(len(recs)), cache=bad, image_size=SIZE)


def test_dataloader_workers(ds_setup):
    recs, cache = ds_setup
    ds = data.DistillDataset(recs, range(len(recs)), cache=cache, image_size=SIZE, seed=5)
    ds[0]  # opens the (fake) memmaps in this process; they must not travel with the pickle
    clone = pickle.loads(pickle.dumps(ds))
    assert clone._arrays is None and _same(_items(clone), _items(ds))
    dl = torch.utils.data.DataLoader(ds, batch_size=4, num_workers=2, shuffle=False)
    batches = list(dl)
    assert len(batches) == 2
    b = batches[0]
    assert tuple(b["image"].shape) == (4, 3, *SIZE) and b["text_ids"].dtype == torch.int64
    assert b["has_t_img"].dtype == torch.bool and tuple(b["t_cap_emb"].shape) == (4, 8)
    assert b["pid"].tolist() == [recs[i]["id"] for i in range(4)] and b["cap_row"].dtype == torch.int64
    assert torch.equal(b["image"][1], ds[1]["image"])  # workers reproduce the main-process items


def test_eval_images(tmp_path):
    recs = data.load_records(_synth(tmp_path))
    ev = data.EvalImages(recs, [5, 1], image_size=SIZE)
    assert len(ev) == 2
    x = ev[0]
    np.testing.assert_allclose(x.numpy(), _numpy_eval(Image.open(recs[5]["image_path"]), SIZE), atol=1e-6)
    os.remove(recs[1]["image_path"])
    with pytest.raises(DatasetError, match="cannot load image"):
        ev[1]


def test_real_embedding_cache(tmp_path):
    """The same contract through the real EmbeddingCache (memmaps reopened inside the workers)."""
    from embedding_cache import EmbeddingCache
    path = _synth(tmp_path)
    recs = data.load_records(path)
    n_cap = len(data.caption_rows(recs))
    counts = {"image": len(recs), "caption": n_cap, "attributes": len(recs), "prompt_caption": len(recs)}
    w = EmbeddingCache.create(tmp_path / "emb", {"teacher": "fake", "teacher_kind": "siglip", "multilingual": False,
                                                 "dataset": str(path), "dataset_sha256": data.dataset_hash(path)},
                              counts, dim=6)
    emb = np.random.default_rng(0).standard_normal((len(recs), 6))
    w.write("image", np.arange(0, len(recs), 2), emb[::2])  # odd rows have no teacher
    w.write("caption", np.arange(n_cap), np.random.default_rng(1).standard_normal((n_cap, 6)))
    cache = EmbeddingCache.open(tmp_path / "emb", data_json=path)
    ds = data.DistillDataset(recs, range(len(recs)), cache=cache, image_size=SIZE)
    b = next(iter(torch.utils.data.DataLoader(ds, batch_size=8, num_workers=2)))
    assert b["has_t_img"].tolist() == [i % 2 == 0 for i in range(8)] and b["has_t_cap"].all()
    assert b["t_img_emb"].dtype == torch.float32 and tuple(b["t_img_emb"].shape) == (8, 6)
    np.testing.assert_allclose(b["t_img_emb"][0].numpy(), emb[0] / np.linalg.norm(emb[0]), atol=2e-3)
    assert not b["t_img_emb"][1].any()
