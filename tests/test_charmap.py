"""search/charmap.py: the character -> table-row mapping.  Run: python -m pytest -q tests/test_charmap.py"""
import random
import sys
import time
import unicodedata
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from search.charmap import (CLS, DEFAULT_VOCAB_SIZE, PAD, char_row, char_rows, encode_batch, lookup,  # noqa: E402
                            normalize_text)


def spec_row(cp, V=DEFAULT_VOCAB_SIZE):
    """The mapping as INTERFACES.md states it, in plain Python ints (independent of the numpy code)."""
    if 0x20 <= cp <= 0x24F:
        return 3 + cp
    return ((cp * 2654435761) % 2**32) % (V - 0x253) + 0x253


def chars_of(ids_row, mask_row):
    return [int(i) for i in ids_row[mask_row][1:]]


def test_rows_match_spec_on_random_code_points():
    rng = random.Random(0)
    cps = [rng.randrange(0x110000) for _ in range(5000)] + list(range(0x1F, 0x260)) + [0x10FFFF, 0x1F600]
    for V in (DEFAULT_VOCAB_SIZE, 600, 50000):
        got = char_rows(np.array(cps), V)
        assert got.tolist() == [spec_row(c, V) for c in cps]
    assert char_row(ord("a")) == 3 + 97 and char_row(0x7EA2) == spec_row(0x7EA2)


def test_encode_matches_spec_and_is_deterministic():
    texts = ["A man in a RED coat", "穿红色外套的女人", "😀 smile", "mixed 中英 text"]
    ids, mask = encode_batch(texts, max_len=32)
    ids2, mask2 = encode_batch(list(texts), max_len=32)
    assert np.array_equal(ids, ids2) and np.array_equal(mask, mask2)
    assert ids.dtype == np.int64 and mask.dtype == bool and ids.shape == mask.shape == (4, 32)
    for t, row, m in zip(texts, ids, mask):
        assert row[0] == CLS and m[0]
        assert chars_of(row, m) == [spec_row(ord(c)) for c in normalize_text(t)]
        assert np.array_equal(m, row != PAD)  # no character ever maps to PAD
        assert m.sum() == 1 + len(normalize_text(t)) and not m[m.sum():].any()  # tokens first, then padding


def test_emoji_is_one_char_not_utf8_bytes():
    ids, mask = encode_batch(["😀"], max_len=8)
    assert mask.sum() == 2 and ids[0, 1] == spec_row(0x1F600)


def test_lowercase_and_nfkc():
    assert normalize_text("ＡＢＣ Hello") == "abc hello"  # full-width -> ASCII, lowercased
    assert normalize_text("ﬁne ① Ⅻ") == "fine 1 xii"
    assert normalize_text("CAFE\u0301") == "caf\u00e9"  # e + combining acute composes to one char
    ids, mask = encode_batch(["Cafe\u0301", "café"], max_len=8)
    assert np.array_equal(ids[0], ids[1])


def test_uncomposable_combining_mark_kept():
    s = normalize_text("x\u0301")
    assert s == "x\u0301" and unicodedata.category(s[1]) == "Mn"
    ids, mask = encode_batch(["x\u0301"], max_len=8)
    assert chars_of(ids[0], mask[0]) == [spec_row(ord("x")), spec_row(0x301)]


def test_whitespace_and_control_chars():
    assert normalize_text("  a\t\tb\nc\r\n d\u3000e\u00a0f  ") == "a b c d e f"
    assert normalize_text("a\x00b\x07c\x7fd\u200be\ufefff\u200dg") == "abcdefg"  # Cc/Cf dropped
    assert normalize_text("a \u200b b") == "a b"  # dropping a format char must not leave a double space
    assert normalize_text("\x1cx\x1fy") == "x y"  # separator controls count as whitespace in Python


@pytest.mark.parametrize("s", ["", " ", "\t\n\u3000 ", "\x00\x01\u200b\ufeff"])
def test_empty_like_text_is_just_cls(s):
    ids, mask = encode_batch([s], max_len=5)
    assert ids[0].tolist() == [CLS, PAD, PAD, PAD, PAD] and mask[0].tolist() == [True] + [False] * 4


def test_truncation_to_max_len():
    ids, mask = encode_batch(["abcdefghij", "abc"], max_len=6)
    assert ids.shape == (2, 6)
    assert chars_of(ids[0], mask[0]) == [spec_row(ord(c)) for c in "abcde"]  # CLS + 5 chars
    assert mask[1].sum() == 4
    ids1, mask1 = encode_batch(["abc"], max_len=1)
    assert ids1.tolist() == [[CLS]] and mask1.all()
    with pytest.raises(ValueError):
        encode_batch(["abc"], max_len=0)


def test_never_fails_and_ids_in_range():
    rng = random.Random(1)
    weird = ["\ud800", "a\udfffb", "\U0010ffff", "\ue000", "\U000e0001", "\u0378", "".join(
        chr(rng.randrange(0x110000)) for _ in range(300))]
    weird += ["".join(chr(rng.randrange(0x110000)) for _ in range(rng.randrange(40))) for _ in range(200)]
    for V in (DEFAULT_VOCAB_SIZE, 1000, 596):
        ids, mask = encode_batch(weird, max_len=64, vocab_size=V)
        assert ids.min() >= 0 and ids.max() < V
        assert (ids[:, 1:][mask[:, 1:]] >= 3).all()  # real chars never land on reserved rows


def test_vocab_size_respected():
    ids_a, _ = encode_batch(["红色外套 red"], max_len=16, vocab_size=8192)
    ids_b, _ = encode_batch(["红色外套 red"], max_len=16, vocab_size=1000)
    assert ids_b.max() < 1000 and not np.array_equal(ids_a, ids_b)  # hashed rows depend on V
    assert np.array_equal(ids_a[0, 5:9], ids_b[0, 5:9])  # " red": direct rows do not
    with pytest.raises(ValueError):
        encode_batch(["x"], vocab_size=0x253)


def test_single_string_is_a_batch_of_one():
    a, ma = encode_batch("hello", max_len=8)
    b, mb = encode_batch(["hello"], max_len=8)
    assert np.array_equal(a, b) and np.array_equal(ma, mb)


def test_lookup():
    table = np.random.default_rng(0).standard_normal((700, 5)).astype(np.float32)
    ids, _ = encode_batch(["ab", "红"], max_len=4, vocab_size=700)
    x = lookup(table, ids)
    assert x.shape == (2, 4, 5) and x.dtype == np.float32
    assert np.array_equal(x[0, 1], table[spec_row(ord("a"), 700)]) and np.array_equal(x[1, 3], table[PAD])


def test_batch_speed():
    rng = random.Random(2)
    texts = [f"a woman {i} with long black hair, red coat 穿红色外套 {rng.random()}" for i in range(1000)]
    texts[::7] = ["tab\there\u200b" * 5] * len(texts[::7])  # some take the per-char slow path
    t = time.perf_counter()
    encode_batch(texts, max_len=64)
    assert time.perf_counter() - t < 0.5  # ~10 ms here; generous for a loaded CI box


def test_no_torch_import():
    import subprocess
    code = "import sys; import search.charmap; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[1])
