"""Synthetic SYNTH-PEDES data (tools/make_synthetic_pedes.py) and the caption composer (captions.py).
    python3 -m pytest -q tests/test_synthetic.py
"""
import json
import random
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import captions  # noqa: E402
from tools import make_synthetic_pedes as msp  # noqa: E402
from conftest import SYNTH_ARGS  # noqa: E402

CJK = re.compile(r"[\u4e00-\u9fff]")
COLOURS = list(msp.PALETTE) + ["blonde"]
ATTRS = "woman,long black hair,red coat,blue jeans,white sneakers,black handbag"


def _load(json_path):
    return json.loads(Path(json_path).read_text(encoding="utf-8"))


def _colours_in(text):
    return {c for c in COLOURS if re.search(rf"\b{c}\b", text.lower())}


def _files(root):
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(Path(root).rglob("*.jpg"))}


# ----------------------------------------------------------------------------- generator

def test_deterministic_and_independent_of_ids(synth_data, tmp_path):
    kw = dict(SYNTH_ARGS, ids=5)
    a = msp.generate(tmp_path / "a", **kw)
    b = msp.generate(tmp_path / "b", **kw)
    assert a.read_bytes() == b.read_bytes()
    assert _files(tmp_path / "a") == _files(tmp_path / "b")
    # id i does not depend on how many ids were made: the first 5 ids equal the fixture's (24 ids)
    full = _load(synth_data)
    assert _load(a) == [r for r in full if r["id"] < 5]
    fa, ff = _files(tmp_path / "a"), _files(Path(synth_data).parent)
    assert all(ff[k] == v for k, v in fa.items())
    c = msp.generate(tmp_path / "c", **dict(kw, seed=1))
    assert c.read_bytes() != a.read_bytes()
    fc = _files(tmp_path / "c")
    assert fc.keys() == fa.keys() and all(fc[k] != fa[k] for k in fa)


def test_extra_train_ids_keep_the_test_split(synth_data, tmp_path):
    """--extra_train_ids adds training-only people after --ids; the first ids (and so their hash-chosen test and
    validation identities) are byte-identical to a run without them."""
    import data as data_lib
    n = SYNTH_ARGS["ids"]
    p = msp.generate(tmp_path / "x", **dict(SYNTH_ARGS, extra_train_ids=6))
    recs = _load(p)
    full = _load(synth_data)
    assert recs[:len(full)] == full and "split" not in full[0]
    extra = recs[len(full):]
    assert sorted({r["id"] for r in extra}) == list(range(n, n + 6))
    assert all(r["split"] == "train" for r in extra)
    fx, ff = _files(tmp_path / "x"), _files(Path(synth_data).parent)
    assert all(fx[k] == v for k, v in ff.items()) and len(fx) == len(ff) + 6 * SYNTH_ARGS["images_per_id"]
    a, b = data_lib.load_records(str(synth_data)), data_lib.load_records(str(p))
    for split in ("test", "val"):
        # ratios high enough that both splits are non-empty among the fixture's ids
        assert data_lib.split_records(a, 0.3, split, 0.3) == data_lib.split_records(b, 0.3, split, 0.3) != []
    assert len(data_lib.split_records(b, 0.3, "train", 0.3)) == (
        len(data_lib.split_records(a, 0.3, "train", 0.3)) + len(extra))
    r = subprocess.run([sys.executable, str(ROOT / "tools" / "make_synthetic_pedes.py"), "--out", str(tmp_path / "e"),
                        "--ids", "2", "--extra_train_ids", "-1"], capture_output=True, text=True)
    assert r.returncode != 0 and "--extra_train_ids must be >= 0" in r.stderr and "Traceback" not in r.stderr


def test_two_workers_match_one(tmp_path):
    kw = dict(ids=50, images_per_id=4, seed=3, height=64, width=32)  # 200 images: the pool path
    a = msp.generate(tmp_path / "a", workers=1, **kw)
    b = msp.generate(tmp_path / "b", workers=2, **kw)
    assert a.read_bytes() == b.read_bytes()
    assert _files(tmp_path / "a") == _files(tmp_path / "b")


def test_format(synth_data):
    recs = _load(synth_data)
    root = Path(synth_data).parent
    n_ids, k = SYNTH_ARGS["ids"], SYNTH_ARGS["images_per_id"]
    assert len(recs) == n_ids * k
    assert sorted({r["id"] for r in recs}) == list(range(n_ids))
    for r in recs:
        assert set(r) == {"id", "file_path", "attributes", "captions", "captions_zh", "prompt_caption"}
        assert isinstance(r["id"], int) and r["file_path"].startswith(f"Part1/{r['id']}/")
        assert len(r["attributes"].split(",")) == 6
        assert 2 <= len(r["captions"]) <= 3 and len(r["captions_zh"]) == len(r["captions"])
        assert len(set(r["captions"])) == len(r["captions"])
        assert all(isinstance(c, str) and c.strip() for c in r["captions"] + r["captions_zh"])
        assert isinstance(r["prompt_caption"], list) and len(r["prompt_caption"]) == 1
        assert "unknown" not in " ".join(r["captions"] + r["prompt_caption"]).lower()
        with Image.open(root / r["file_path"]) as im:
            im.load()
            assert im.format == "JPEG" and im.mode == "RGB"
            assert im.size == (SYNTH_ARGS["width"], SYNTH_ARGS["height"])
    # one identity keeps one attribute string; identities are mostly distinguishable
    by_id = {}
    for r in recs:
        by_id.setdefault(r["id"], set()).add(r["attributes"])
    assert all(len(v) == 1 for v in by_id.values())
    assert len({next(iter(v)) for v in by_id.values()}) >= 0.8 * n_ids


def test_no_zh_and_requested_size(tmp_path):
    p = msp.generate(tmp_path, ids=2, images_per_id=2, seed=0, height=96, width=40, zh=False)
    recs = _load(p)
    assert all("captions_zh" not in r for r in recs)
    assert Image.open(tmp_path / recs[0]["file_path"]).size == (40, 96)


def test_captions_follow_attributes(synth_data):
    recs = _load(synth_data)
    covered = total = 0
    for r in recs:
        a = captions.parse_attributes(r["attributes"])
        allowed = set().union(*(_colours_in(v) for v in a.values() if v))
        for en, zh in zip(r["captions"], r["captions_zh"]):
            assert _colours_in(en) <= allowed, (en, r["attributes"])  # no invented colours
            assert CJK.search(zh)
            for c in _colours_in(en):  # the Chinese caption is the translation: same colours
                assert captions.ZH_VOCAB[c][1] in zh, (en, zh)
        for f in ("upper", "lower", "shoes", "carried"):
            if a[f]:
                total += 1
                covered += any(a[f] in en for en in r["captions"])
        assert all(c in r["prompt_caption"][0] for c in allowed)  # the template caption names everything
    assert covered >= 0.85 * total


def test_images_of_one_id_differ(synth_data):
    recs = _load(synth_data)
    root = Path(synth_data).parent
    for pid in range(4):
        ims = [np.asarray(Image.open(root / r["file_path"]), dtype=np.float32) for r in recs if r["id"] == pid]
        for i in range(len(ims)):
            for j in range(i + 1, len(ims)):
                assert np.abs(ims[i] - ims[j]).mean() > 5


def test_upper_colour_is_in_the_image(synth_data):
    """The torso of the saved JPEG shows the upper-garment colour the attributes name (the data's colour signal)."""
    recs = _load(synth_data)
    root = Path(synth_data).parent
    names = list(msp.PALETTE)
    pal = np.array([msp.PALETTE[n] for n in names], dtype=np.float32)
    hits = n = 0
    for r in recs:
        ident = msp.make_identity(SYNTH_ARGS["seed"], r["id"])
        assert ident["attributes"] == r["attributes"]
        k = int(Path(r["file_path"]).stem)
        _, info = msp.render_image(ident, SYNTH_ARGS["seed"], r["id"], k, SYNTH_ARGS["height"], SYNTH_ARGS["width"])
        if info["upper_box"] is None:
            continue
        x0, y0, x1, y1 = info["upper_box"]
        arr = np.asarray(Image.open(root / r["file_path"]).convert("RGB"), dtype=np.float32)
        med = np.median(arr[y0:y1 + 1, x0:x1 + 1].reshape(-1, 3), axis=0)
        pred = names[int(np.argmin(((pal - med) ** 2).sum(1)))]
        hits += pred == ident["upper_colour"]
        n += 1
    assert n >= 0.8 * len(recs) and hits >= 0.9 * n, (hits, n)


def test_bad_args_are_one_line(tmp_path):
    script = str(ROOT / "tools" / "make_synthetic_pedes.py")
    (tmp_path / "afile").write_text("x")
    for extra in (["--ids", "0"], ["--seed", "-1"], ["--height", "8"], ["--out", str(tmp_path / "afile")]):
        argv = ["--out", str(tmp_path / "o"), "--ids", "2"] + extra
        p = subprocess.run([sys.executable, script] + argv, capture_output=True, text=True)
        assert p.returncode != 0
        assert p.stderr.strip().startswith("error:") and len(p.stderr.strip().splitlines()) == 1, p.stderr


# ----------------------------------------------------------------------------- captions

def test_parse_attributes_tolerant():
    full = captions.parse_attributes(" Man , Black Hair,black shirt,pink shorts , black shoes,unknown")
    assert full == {"gender": "man", "hair": "black hair", "upper": "black shirt", "lower": "pink shorts",
                    "shoes": "black shoes", "carried": None}
    short = captions.parse_attributes("woman,long hair")
    assert short["hair"] == "long hair" and short["upper"] is None and short["carried"] is None
    more = captions.parse_attributes("man,bald,red coat,unknown,black boots,black bag,red umbrella")
    assert more["lower"] is None and "bag" in more["carried"] and "umbrella" in more["carried"]
    assert captions.parse_attributes(full) == full
    assert captions.parse_attributes(["man,black hair"])["hair"] == "black hair"


def test_compose_varies_and_never_empty():
    rng = random.Random(0)
    caps = [captions.compose_caption(ATTRS, rng, "en") for _ in range(60)]
    assert all(c.strip() for c in caps)
    assert len(set(caps)) >= 40
    assert len({c.split()[0] for c in caps}) >= 4  # several templates
    order = {c.index("coat") < c.index("jeans") for c in caps if "coat" in c and "jeans" in c}
    assert order == {True, False}  # random field order
    assert sum("handbag" not in c for c in caps) >= 3  # random omissions...
    values = [v for v in captions.parse_attributes(ATTRS).values()][1:]
    assert all(any(v in c for v in values) for c in caps)  # ...but never all of them
    words = set(" ".join(caps).lower().replace(".", " ").replace(",", " ").split())
    assert len(words & {"woman", "lady", "girl", "she", "person", "pedestrian"}) >= 3
    # a single known field survives every draw; nothing known still gives a sentence
    one = [captions.compose_caption("man,unknown,unknown,unknown,unknown,red umbrella", rng) for _ in range(20)]
    assert all("red umbrella" in c for c in one)
    assert captions.compose_caption("unknown,unknown,unknown,unknown,unknown,unknown", rng).strip()
    assert captions.compose_caption("", rng, "zh").strip()


def test_chinese_is_the_translation():
    for s in range(20):
        en, zh = captions.compose_caption_pair(ATTRS, random.Random(s))
        assert captions.compose_caption(ATTRS, random.Random(s), "en") == en
        assert captions.compose_caption(ATTRS, random.Random(s), "zh") == zh
        assert CJK.search(zh) and not re.search("[A-Za-z]", zh)  # everything here is in the dictionary
        assert ("红色外套" in zh) == ("red coat" in en)
        assert ("蓝色牛仔裤" in zh) == ("blue jeans" in en)
        assert ("黑色长发" in zh) == ("long black hair" in en)
        assert ("黑色手提包" in zh) == ("black handbag" in en)
    assert captions.translate_phrase("light blue jeans") == "浅蓝色牛仔裤"
    assert captions.translate_phrase("short-sleeved white shirt") == "白色短袖衬衫"


def test_unknown_words_fall_back_to_english():
    attrs = "man,zorblax hair,maroon glorpcoat,khaki trousers,unknown,unknown"
    rng = random.Random(1)
    for _ in range(20):
        en, zh = captions.compose_caption_pair(attrs, rng)
        assert en.strip() and CJK.search(zh)
        if "glorpcoat" in en:
            assert "maroon glorpcoat" in zh  # whole unknown phrase kept as is
        if "khaki trousers" in en:
            assert "卡其色长裤" in zh
    assert captions.translate_phrase("maroon coat") == "maroon 外套"
    try:
        captions.compose_caption(attrs, rng, "fr")
    except ValueError as e:
        assert "lang" in str(e)
    else:
        raise AssertionError("lang='fr' accepted")


# ---------------------------------------------------------------------------------------------------------------
# query-like training text, field mentions, the attribute vocabulary

def test_mentioned_fields_reads_what_a_caption_names():
    a = "woman,long black hair,red striped t-shirt,blue jeans,white sneakers,black handbag"
    assert captions.mentioned_fields(a, "A lady with long black hair in a red striped t-shirt.") == \
        {"gender", "hair", "upper"}
    # 'shirt' must not match 't-shirt', a colour alone is not the garment, a neutral noun is no gender
    assert captions.mentioned_fields("man,bald,red shirt,unknown,black shoes,unknown",
                                     "This person wears a red t-shirt and black shoes") == {"shoes"}


def test_augment_caption_varies_structure_and_reports_its_fields():
    a = "woman,long black hair,red coat,blue jeans,white sneakers,black handbag"
    values = captions.parse_attributes(a)
    rng = random.Random(0)
    texts = set()
    for i in range(300):
        lang = "zh" if i % 4 == 0 else "en"
        text, fields = captions.augment_caption(a, rng, lang)
        assert text.strip() and fields and fields <= set(captions.ATTRIBUTE_FIELDS)
        if lang == "en":
            low = text.lower()
            for f in fields - {"gender"}:  # every reported field is in the text (colour word at least)
                assert values[f].split()[0] in low or f == "hair" and "hair" in low, (f, text)
        texts.add(text)
    assert len(texts) > 250  # structure, order, omissions, synonyms: almost never the same text twice
    lens = sorted(len(t) for t in texts)
    assert lens[0] < 25 and lens[-1] > 80  # fragments and long forms
    assert any(":" in t for t in texts) and any("," not in t and " " in t for t in texts)
    with pytest.raises(ValueError):
        captions.augment_caption(a, rng, "fr")


def test_augment_caption_wraps_attributes_in_words_that_mean_nothing():
    """Leads, fillers and invented labels teach the student to ignore what is not an attribute; none of them may
    be an attribute word, or the student would learn to ignore a colour or a garment."""
    meaning = {w for k, (kind, _) in captions.ZH_VOCAB.items() if kind in ("colour", "noun", "mod", "hairmod", "shade")
               for w in k.split()} - {"person", "pedestrian"}
    meaning |= captions.MALE | captions.FEMALE
    for phrase in captions._EN_LEADS + captions._EN_FILLERS + captions._EN_CONNECT:
        assert not set(captions._words(phrase)) & meaning, phrase
    rng = random.Random(3)
    invented = {captions._pseudo_word(rng) for _ in range(2000)}
    assert len(invented) > 500 and not invented & captions._known_words()
    a = "man,short black hair,blue striped shirt,gray trousers,black boots,black backpack"
    texts = [captions.augment_caption(a, rng, "en")[0] for _ in range(1500)]
    first = [captions._words(t)[0] for t in texts if captions._words(t)]
    assert sum(w not in meaning for w in first) > 150  # a lead or a filler in front, often
    assert any("\n" in t for t in texts) and any(". " in t.rstrip(".") for t in texts)  # separators from pieces
    assert len(set(first)) > 40


def test_filler_words_are_real_words_no_caption_uses():
    """Real filler words: frequent English words, never an attribute word, a word of the training captions, or a
    word of the bench's own field labels and request leads (so those rows stay unseen wordings)."""
    sys.path.insert(0, str(ROOT / "bench"))
    import query_forms
    captions_used = ["A man in a red shirt and blue jeans walks with his black backpack."]
    words = captions.filler_words(captions.caption_vocabulary(captions_used))
    assert len(words) > 5000 and len(set(words)) == len(words)
    held_out = {w.lower() for label in query_forms._LABELS.values() for w in label.split()}
    held_out |= {w for lead in ("looking for a", "find the", "show me the", "any") for w in lead.split()}
    assert not set(words) & (held_out | captions._known_words() | {"walks", "his", "man", "with"})
    assert {"time", "city", "music"} <= set(words)  # ordinary words that say nothing about a person's looks
    a = "woman,long brown hair,white coat,black trousers,white sneakers,black handbag"
    rng = random.Random(5)
    texts = [captions.augment_caption(a, rng, "en", words)[0] for _ in range(2000)]
    used = {w for t in texts for w in captions._words(t.lower())} & set(words)
    assert len(used) > 100  # real words appear, drawn from the whole list
    # without a word list the texts are exactly those of invented words only (the same random stream)
    r1, r2 = random.Random(9), random.Random(9)
    assert ([captions.augment_caption(a, r1, "en")[0] for _ in range(300)]
            == [captions.augment_caption(a, r2, "en", None)[0] for _ in range(300)])
    assert captions.filler_words(n=0) == ()


def test_insert_noise_words_keeps_the_text_and_adds_only_meaningless_words():
    """--noise_word_prob: the original words stay, in order; what is added comes from the word list (or is
    invented), never a caption or attribute word; a result over max_chars comes back as the unchanged text."""
    words = captions.filler_words(captions.caption_vocabulary(["A man in a red shirt."]))
    text = "The woman in a white coat and black trousers, carrying a black handbag."
    rng, added, lengths = random.Random(3), set(), set()
    for _ in range(400):
        out = captions.insert_noise_words(text, rng, words)
        toks = out.split()
        it = iter(toks)
        assert all(t in it for t in text.split())  # the text's words, in their order (a subsequence)
        new = [t for t in toks if t not in text.split()]
        lengths.add(len(out.split()) - len(text.split()))
        added |= {w for t in new for w in captions._words(t.lower())}
    assert not added & (captions._known_words() | set(captions._words(text.lower())))
    assert len(added & set(words)) > 50 and min(lengths) >= 1 and max(lengths) >= 6
    assert captions.insert_noise_words(text, random.Random(1), words, max_chars=len(text)) == text
    assert any(captions.insert_noise_words("red shirt", random.Random(s), None) != "red shirt" for s in range(3))


def test_plain_caption_is_the_bare_keyword_list_of_the_named_fields():
    a = "Gentleman,short black hair,blue striped shirt,gray trousers,unknown,black backpack"
    assert captions.plain_caption(a, {"carried", "gender", "upper"}) == "man, blue striped shirt, black backpack"
    assert captions.plain_caption(a, {"shoes"}) == ""  # an absent field names nothing
    assert captions.plain_caption(a, {"gender", "hair"}, "zh") == "男，" + captions.translate_phrase("short black hair")
    rng = random.Random(4)
    for _ in range(300):  # every augmented text has a non-empty keyword list of the fields it kept
        text, fields = captions.augment_caption(a, rng, rng.choice(["en", "zh"]))
        plain = captions.plain_caption(a, fields, "en")
        assert plain and all(p in a.replace("Gentleman", "man") for p in plain.split(", "))


def test_attribute_vocab_targets():
    attrs = ["man,short black hair,red shirt,blue jeans,black shoes,unknown",
             "woman,long brown hair,red coat,black trousers,white sneakers,black handbag"] * 3
    v = captions.AttributeVocab.build(attrs, min_count=3)
    assert ("upper", "red") in v.words and ("carried", "handbag") in v.words
    t, w = v.targets(attrs[0])
    on = {v.words[i] for i in range(len(v)) if t[i]}
    assert on == {("gender", "man"), ("hair", "short"), ("hair", "black"), ("hair", "hair"), ("upper", "red"),
                  ("upper", "shirt"), ("lower", "blue"), ("lower", "jeans"), ("shoes", "black"), ("shoes", "shoes")}
    assert all(w)  # an image is labelled on every field (no bag is a fact)
    t, w = v.targets(attrs[1], {"upper"})
    known = {v.words[i][0] for i in range(len(v)) if w[i]}
    assert known == {"upper"} and {v.words[i] for i in range(len(v)) if t[i]} == {("upper", "red"), ("upper", "coat")}
    rare = captions.AttributeVocab.build(attrs, min_count=4).words  # words seen 3 times are left out
    assert ("upper", "red") in rare and ("upper", "shirt") not in rare and ("carried", "handbag") not in rare
    assert v.targets(None) == ([0.0] * len(v), [0.0] * len(v))
